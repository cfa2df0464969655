"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and small datasets."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prepared datasets go to a folder of this test process, removed at its end (models stay in the user's cache).
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "QLORA_DATA_CACHE" not in os.environ:
    os.environ["QLORA_DATA_CACHE"] = tempfile.mkdtemp(prefix="qlora-test-prepared-")
    atexit.register(shutil.rmtree, os.environ["QLORA_DATA_CACHE"], True)

import pytest
import torch

from qlora_core import IGNORE_INDEX
from qlora_core.testing import labelled_runs, write_jsonl  # noqa: F401  (tests import them from here)

torch.set_num_threads(1)

# Interrupts the run (as Ctrl-C would) after the step given in the environment, if any.
INTERRUPTER = """
import os
from qlora_core import hookimpl

@hookimpl
def qlora_on_step_end(run, metrics):
    if str(metrics["step"]) == os.environ.get("QLORA_TEST_INTERRUPT_AT"):
        raise KeyboardInterrupt
"""

# The fixtures every plugin author gets (qlora_core.testing, a pytest plugin through the pytest11 entry point),
# under the names this suite has long used.


@pytest.fixture(scope="session")
def smollm2_tokenizer(qlora_tokenizer):
    return qlora_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(qlora_tiny_model_dir) -> Path:
    """A 2-layer Llama (real architecture, random weights) saved with the real SmolLM2 tokenizer."""
    return qlora_tiny_model_dir


def rows(run_dir):
    """The rows of a run's ``metrics.jsonl``."""
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(row):
    # Wall-clock figures differ between any two runs.
    return {k: v for k, v in row.items() if k not in ("tokens_per_second", "elapsed")}


def assert_same_losses(full, resumed):
    """Two run folders logged the same rows, step for step (floats to 1e-6), but for wall-clock figures."""
    a, b = rows(full), rows(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        ca, cb = comparable(ra), comparable(rb)
        assert ca.keys() == cb.keys()
        for key in ca:
            if isinstance(ca[key], float):
                assert cb[key] == pytest.approx(ca[key], rel=1e-6, abs=1e-6), (ra["step"], key)
            else:
                assert cb[key] == ca[key], (ra["step"], key)


def loss_by_hand(model, batch):
    """The summed next-token cross-entropy over a batch's answer tokens from the model's full logits, and their
    number: what every loss path must equal."""
    from qlora_core import model_inputs

    logits = model(**model_inputs(batch)).logits
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), batch["labels"][:, 1:][keep],
                                             reduction="sum")
    return loss, int(keep.sum())


@pytest.fixture
def guanaco_file(qlora_tiny_dataset) -> Path:
    """A small memorizable guanaco-format dataset."""
    return qlora_tiny_dataset


@pytest.fixture
def tiny_config(qlora_tiny_config) -> dict:
    """A fast config on the tiny model (float32, CPU, few steps, no progress bar)."""
    return qlora_tiny_config
