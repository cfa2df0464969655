"""qlora: QLoRA fine-tuning through plugins.

This module is qlora's public API: everything a plugin, a contrib package or a user's script needs is a name
here, listed in ``__all__`` and documented in ``docs/api.md``. Every other module of ``qlora_core`` is private
and may change without notice.

Plugins mark their hook implementations with :data:`hookimpl`::

    from qlora_core import hookimpl

    @hookimpl
    def qlora_on_step_end(run, metrics):
        ...

A run from Python::

    from qlora_core import Job

    result = Job("my.yaml", plugins=["adamw"], overrides=["lora.r=32"], output_dir="runs/x").run()
"""

from __future__ import annotations

from qlora_core.framework.plugins import __version__, hookimpl  # noqa: E402

from qlora_core.framework.config import Config, Option, auto_on  # noqa: E402
from qlora_core.framework.errors import ConfigError, PluginError, UsageError  # noqa: E402
from qlora_core.framework.formats import ChatTemplateFormat  # noqa: E402
from qlora_core.framework.paths import cache_dir, data_cache_dir  # noqa: E402
from qlora_core.framework.types import DatasetFormat, FormattedExample, Run, TrainControl  # noqa: E402
from qlora_core.loop.checkpoint import save_adapter  # noqa: E402
from qlora_core.loop.data import IGNORE_INDEX, TokenizedExample, collate, collate_packed  # noqa: E402
from qlora_core.loop.job import Job  # noqa: E402
from qlora_core.loop.loss import model_inputs  # noqa: E402
from qlora_core.loop.record import RunResult  # noqa: E402
from qlora_core.loop.setup import compute_dtype_for, resolve  # noqa: E402
from qlora_core.tools.bench import bench_memory, bench_rows, bench_step_done  # noqa: E402
from qlora_core.tools.evaluation import evaluate_run  # noqa: E402
from qlora_core.loop.generation import generate  # noqa: E402
from qlora_core.tools.inference import (MERGE_DTYPES, format_prompt, load_trained, merge,  # noqa: E402
                                        merge_adapter, resolve_dtype)
from qlora_core.loop.guidance import guidance_warnings, recommend  # noqa: E402
from qlora_core.tools.plan import PlanSettings, plan  # noqa: E402

__all__ = [
    "__version__",
    "hookimpl",
    # configuration
    "Config", "Option", "auto_on",
    # errors
    "UsageError", "ConfigError", "PluginError",
    # the run as plugins see it
    "Run", "TrainControl",
    # dataset formats and batches
    "DatasetFormat", "FormattedExample", "ChatTemplateFormat", "TokenizedExample", "IGNORE_INDEX", "collate",
    "collate_packed", "model_inputs",
    # a run from Python
    "Job", "RunResult", "resolve", "compute_dtype_for", "save_adapter",
    # tools
    "evaluate_run", "load_trained", "generate", "format_prompt", "merge", "merge_adapter", "resolve_dtype",
    "MERGE_DTYPES", "plan", "PlanSettings", "recommend", "guidance_warnings",
    # where converted models and prepared data are kept
    "cache_dir", "data_cache_dir",
    # for a qlora bench variant with its own code (a plugin's "run")
    "bench_rows", "bench_step_done", "bench_memory",
    # pytest fixtures and helpers for testing plugins (imports pytest, so loaded when first used)
    "testing",
]


def __getattr__(name: str):
    if name == "testing":
        import importlib

        return importlib.import_module("qlora_core.testing")
    raise AttributeError(f"module 'qlora_core' has no attribute {name!r}")
