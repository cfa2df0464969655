"""TensorBoard logging for qlora runs, as a separately installed plugin (``tensorboard``).

What a run writes, into ``tensorboard.log_dir`` (by default ``RUN_DIR/tensorboard``), on the main process only:

- every row of ``metrics.jsonl`` as scalars at its step: a logging step's values as ``train/KEY`` (``train/loss``,
  ``train/learning_rate``, ``train/grad_norm``, ``train/tokens_per_second``, ``train/tokens``, ``train/epoch``,
  ``train/elapsed``, ``train/gpu_memory_gib`` on a GPU) and an evaluation's as ``eval/KEY`` without the
  ``eval_`` prefix (``eval/loss``, ``eval/perplexity``, ``eval/tokens``); a value that is ``None`` (the grad norm
  without clipping) is left out;
- with ``tensorboard.log_every_step``, every optimizer step's own values (``qlora_on_step_end``: not averaged over
  the logging window) as ``step/KEY`` (``step/loss``, ``step/learning_rate``, ...);
- the run's config, flattened to dotted keys (``lora.r``, ``train.learning_rate``, ...), as the hparams of the
  session (TensorBoard's HPARAMS tab), linked to ``train/loss`` and ``eval/loss``;
- the plugins that took part (``plugins.json``: name, distribution, version) as the text ``run/plugins``;
- at the end, the numbers of the run's summary as ``summary/KEY`` at the last step, the exported adapter's folder
  as the text ``run/adapter``, the text ``run/status`` (``completed``, or ``failed at step N: ERROR`` /
  ``interrupted at step N: ...``) and, when it completed, the end of the hparams session as a success.

A resumed run (``qlora run --resume``) writes into the same folder and tells TensorBoard to drop what the
first attempt wrote after the checkpoint, since those steps are logged again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_core import Option, UsageError, hookimpl

__version__ = "0.1.0"

#: The scalars linked to the hparams (TensorBoard's HPARAMS tab shows them beside each session's config).
HPARAM_METRICS = ("train/loss", "eval/loss")


def flat_config(config: Any) -> dict[str, Any]:
    """The run's config as ``{dotted.key: value}``: numbers, strings and booleans as they are, anything else
    (``None``, lists) as its JSON text."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value, default=str)

    walk("", config.to_dict())
    return flat


def metric_tags(row: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` row's values by tag: ``train/KEY``, or ``eval/KEY`` for an evaluation's ``eval_KEY``."""
    is_eval = any(key.startswith("eval_") for key in row)
    tags = {}
    for key, value in row.items():
        if key == "step" or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if is_eval:
            tags["eval/" + key.removeprefix("eval_")] = float(value)
        else:
            tags["train/" + key] = float(value)
    return tags


def plugins_table(plugins: list[dict[str, Any]]) -> str:
    """The run's plugins as a Markdown table (TensorBoard's text tab renders it)."""
    lines = ["| plugin | distribution | version |", "|---|---|---|"]
    lines += [f"| {p.get('name')} | {p.get('distribution') or '-'} | {p.get('version') or '-'} |" for p in plugins]
    return "\n".join(lines)


class TensorBoardLogger:
    """Writes a run's metrics, config, plugins and adapter path as TensorBoard event files."""

    def __init__(self) -> None:
        self.writer: Any = None
        self.purge_step: int | None = None
        self.exports: list[Path] = []

    @hookimpl
    def qlora_config_options(self):
        return [Option("tensorboard.log_dir", "str", None,
                       "folder of the event files, inside the run folder (default: RUN_DIR/tensorboard)",
                       nullable=True),
                Option("tensorboard.log_every_step", "bool", False,
                       "also write every optimizer step's own values as step/KEY")]

    @hookimpl
    def qlora_configure(self, config):
        configured = config["tensorboard.log_dir"]
        if not configured:
            return
        path = Path(configured)
        if path.is_absolute() or configured.startswith("~") or ".." in path.parts:
            # A run writes only into its own folder; TensorBoard pointed at the runs' parent folder shows them all.
            raise UsageError(f"tensorboard.log_dir {configured!r} leaves the run folder; give a folder inside it, "
                             f"relative to it (--set tensorboard.log_dir=tb), or leave it out for "
                             f"RUN_DIR/tensorboard (`tensorboard --logdir runs` shows every run's)")

    # ------------------------------------------------------------------ the writer

    def log_dir(self, run: Any) -> Path:
        return Path(run.output_dir) / (run.config["tensorboard.log_dir"] or "tensorboard")

    def open(self, run: Any) -> Any:
        """The writer, created on first use with the session's hparams and the plugins list."""
        if self.writer is not None:
            return self.writer
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.log_dir(run)), purge_step=self.purge_step)
        for summary in hparams_summaries(flat_config(run.config), HPARAM_METRICS):
            self.writer.file_writer.add_summary(summary)
        plugins_file = Path(run.output_dir) / "plugins.json"
        plugins = json.loads(plugins_file.read_text()) if plugins_file.is_file() else []
        self.writer.add_text("run/plugins", plugins_table(plugins), global_step=run.step)
        self.writer.flush()
        return self.writer

    def close(self, run: Any, status: str) -> None:
        """Record how the run ended (the text ``run/status``) and close the event file. Only a completed run
        ends the hparams session (as a success): TensorBoard keeps the first end it reads, and a failed run
        may still be resumed and completed."""
        writer = self.open(run)
        writer.add_text("run/status", status, global_step=run.step)
        if status == "completed":
            writer.file_writer.add_summary(session_end(success=True))
        writer.close()
        self.writer = None

    def scalars(self, run: Any, row: dict[str, Any], prefix: str | None = None) -> None:
        """A row's values at its step, under their documented tags or, with ``prefix``, as ``PREFIX/KEY``."""
        writer = self.open(run)
        step = int(row.get("step", run.step))
        tags = metric_tags(row)
        if prefix is not None:
            tags = {f"{prefix}/{tag.split('/', 1)[1]}": value for tag, value in tags.items()}
        for tag, value in tags.items():
            writer.add_scalar(tag, value, global_step=step)
        writer.flush()

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def qlora_on_resume(self, run, checkpoint):
        # TensorBoard drops the events the first attempt wrote after the checkpoint: they are logged again.
        self.purge_step = run.step + 1

    @hookimpl
    def qlora_on_train_start(self, run):
        log_dir = self.log_dir(run)
        if log_dir.exists() and not log_dir.is_dir():
            raise UsageError(f"tensorboard.log_dir {run.config['tensorboard.log_dir']!r} is a file of the run "
                             f"folder, not a folder; set it to another name (--set tensorboard.log_dir=tb) or leave "
                             f"it out for RUN_DIR/tensorboard")
        if run.is_main_process:
            self.open(run)

    @hookimpl
    def qlora_on_step_end(self, run, metrics):
        if run.is_main_process and run.config["tensorboard.log_every_step"]:
            self.scalars(run, metrics, prefix="step")

    @hookimpl
    def qlora_on_log(self, run, metrics):
        if run.is_main_process:
            self.scalars(run, metrics)

    @hookimpl
    def qlora_on_evaluate(self, run, metrics):
        if run.is_main_process:
            self.scalars(run, metrics)

    @hookimpl
    def qlora_on_save(self, run, path):
        checkpoints = Path(run.output_dir) / "checkpoints"
        if run.is_main_process and checkpoints not in Path(path).parents:
            self.exports.append(Path(path))

    @hookimpl
    def qlora_on_train_end(self, run, summary):
        if not run.is_main_process:
            return
        writer = self.open(run)
        for key, value in summary.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"summary/{key}", float(value), global_step=run.step)
        adapter = adapter_folder(self.exports)
        if adapter is not None:
            writer.add_text("run/adapter", str(adapter.resolve()), global_step=run.step)
        self.close(run, "completed")

    @hookimpl
    def qlora_on_train_failed(self, run, error, status):
        if not run.is_main_process:
            return
        try:
            self.close(run, f"{status} at step {run.step}: {type(error).__name__}: {error}")
        except Exception as e:  # the run's own error is what the user must see: it is raised again afterwards
            run.notice(f"tensorboard: the run's end could not be written: {type(e).__name__}: {e}")


def adapter_folder(exports: list[Path]) -> Path | None:
    """The exported folder holding the PEFT adapter (``adapter_config.json``), normally ``RUN_DIR/adapter``."""
    for path in exports:
        if (path / "adapter_config.json").is_file():
            return path
    return None


def hparams_plugin_summary(tag: str, **content: Any) -> Any:
    """A summary carrying the hparams plugin's data (what its HPARAMS tab reads)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams.metadata import PLUGIN_DATA_VERSION, PLUGIN_NAME
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    data = HParamsPluginData(version=PLUGIN_DATA_VERSION, **content)
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME,
                                                                      content=data.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata)])


def hparams_summaries(hparams: dict[str, Any], metrics: tuple[str, ...]) -> list[Any]:
    """The experiment (the hparams and the metrics linked to them) and the session's start with its values,
    each value typed as it is in the config (booleans as booleans, numbers as numbers, the rest as text)."""
    from tensorboard.plugins.hparams.api_pb2 import DataType, Experiment, HParamInfo, MetricInfo, MetricName
    from tensorboard.plugins.hparams.metadata import EXPERIMENT_TAG, SESSION_START_INFO_TAG
    from tensorboard.plugins.hparams.plugin_data_pb2 import SessionStartInfo

    start = SessionStartInfo()
    infos = []
    for key, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[key].bool_value = value
            kind = "DATA_TYPE_BOOL"
        elif isinstance(value, (int, float)):
            start.hparams[key].number_value = value
            kind = "DATA_TYPE_FLOAT64"
        else:
            start.hparams[key].string_value = str(value)
            kind = "DATA_TYPE_STRING"
        infos.append(HParamInfo(name=key, type=DataType.Value(kind)))
    experiment = Experiment(hparam_infos=infos, metric_infos=[MetricInfo(name=MetricName(tag=m)) for m in metrics])
    return [hparams_plugin_summary(EXPERIMENT_TAG, experiment=experiment),
            hparams_plugin_summary(SESSION_START_INFO_TAG, session_start_info=start)]


def session_end(success: bool) -> Any:
    """The hparams plugin's end-of-session summary, with the run's status."""
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.metadata import SESSION_END_INFO_TAG
    from tensorboard.plugins.hparams.plugin_data_pb2 import SessionEndInfo

    status = Status.Value("STATUS_SUCCESS" if success else "STATUS_FAILURE")
    return hparams_plugin_summary(SESSION_END_INFO_TAG, session_end_info=SessionEndInfo(status=status))
