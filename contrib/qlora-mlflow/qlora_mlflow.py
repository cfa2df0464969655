"""MLflow tracking for qlora runs, as a separately installed plugin (``mlflow``).

Each qlora run is one MLflow run, written by the main process only through ``mlflow.tracking.MlflowClient``:

- **metrics**: every row of ``metrics.jsonl`` at its step, a logging step's values as ``train/KEY``
  (``train/loss``, ``train/learning_rate``, ``train/grad_norm``, ``train/tokens_per_second``, ``train/tokens``,
  ``train/epoch``, ``train/elapsed``, ``train/gpu_memory_gib`` on a GPU) and an evaluation's as ``eval/KEY``
  without the ``eval_`` prefix (``eval/loss``, ``eval/perplexity``, ``eval/tokens``); ``None`` values (the grad
  norm without clipping) are left out. With ``mlflow.log_every_step``, also every optimizer step's own values
  (``qlora_on_step_end``: not averaged over the logging window) as ``step/KEY``. At the end, the numbers of the
  run's summary as ``summary/KEY``.
- **params**: the run's config flattened to dotted keys (``lora.r``, ``train.learning_rate``, ``plugins``, ...).
- **tags**: ``qlora.plugins`` (the names of the plugins that took part, in order), ``qlora.plugin.NAME``
  (``DISTRIBUTION VERSION`` of each), ``qlora.run_dir``, ``qlora.version``, and at the end
  ``qlora.adapter_path`` (the exported adapter's folder); on a failure ``qlora.error``.
- **artifacts**: the run folder's ``config.yaml`` and ``plugins.json``, and with ``mlflow.log_adapter: true`` the
  adapter's files under ``adapter/``.
- **status**: ``FINISHED``, ``FAILED`` when the run fails, ``KILLED`` when it is interrupted.

By default the tracking store is a SQLite database in the run folder, ``RUN_DIR/mlruns/mlflow.db``, its
artifacts in ``RUN_DIR/mlruns/artifacts`` (MLflow 3 keeps the plain-folder store in maintenance mode and refuses
it unless ``MLFLOW_ALLOW_FILE_STORE=true``; any store MLflow accepts can be named with ``mlflow.tracking_uri``).
The MLflow run's id is kept in ``RUN_DIR/mlflow.json``: ``qlora run --resume RUN_DIR`` continues the same MLflow
run (the steps after the checkpoint are logged again; each metric's history then holds both values for those
steps, the resumed one last).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from qlora_core import Option, UsageError, __version__ as qlora_version, hookimpl

__version__ = "0.1.0"

#: The run folder's record of its MLflow run: tracking URI, experiment and run ids.
RUN_FILE = "mlflow.json"
#: MLflow's limits: params and tags per batch, and a param's length.
BATCH = 100
MAX_PARAM_LENGTH = 6000


def flat_config(config: Any) -> dict[str, str]:
    """The run's config as ``{dotted.key: text}``: strings as they are, numbers and booleans as Python writes
    them, anything else (``None``, lists) as its JSON text."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = str(value)
        else:
            flat[prefix] = json.dumps(value, default=str)

    walk("", config.to_dict())
    return {key: value[:MAX_PARAM_LENGTH] for key, value in flat.items()}


def metric_values(row: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` row's values by metric name: ``train/KEY``, or ``eval/KEY`` for an evaluation's
    ``eval_KEY``."""
    is_eval = any(key.startswith("eval_") for key in row)
    values = {}
    for key, value in row.items():
        if key == "step" or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values[("eval/" + key.removeprefix("eval_")) if is_eval else ("train/" + key)] = float(value)
    return values


def key_name(name: str) -> str:
    """A plugin name as an MLflow key (letters, digits, ``_ - . / :`` and spaces; anything else becomes ``_``)."""
    return re.sub(r"[^\w\-./: ]", "_", name)


class MLflowLogger:
    """Tracks a qlora run as an MLflow run: metrics by step, the config as params, the plugins, the adapter."""

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id: str | None = None
        self.resumed_at: int | None = None
        self.exports: list[Path] = []
        self.store_refused = False  # the tracking store could not be opened: nothing to log to

    @hookimpl
    def qlora_config_options(self):
        return [
            Option("mlflow.tracking_uri", "str", None,
                   "MLflow tracking URI (default: sqlite:///RUN_DIR/mlruns/mlflow.db)", nullable=True),
            Option("mlflow.experiment_name", "str", "qlora", "MLflow experiment the run is logged to",
                   check=lambda v: None if v.strip() else "must not be empty"),
            Option("mlflow.run_name", "str", None, "MLflow run name (default: the run folder's name)",
                   nullable=True),
            Option("mlflow.artifact_location", "str", None,
                   "artifact location of a new experiment (default: RUN_DIR/mlruns/artifacts with the default "
                   "tracking URI, else the store's)", nullable=True),
            Option("mlflow.log_adapter", "bool", False, "log the exported adapter's files as artifacts"),
            Option("mlflow.log_every_step", "bool", False, "also log every optimizer step's own values as step/KEY"),
        ]

    # ------------------------------------------------------------------ the MLflow run

    @staticmethod
    def tracking_uri(run: Any) -> str:
        configured = run.config["mlflow.tracking_uri"]
        if configured:
            return configured
        folder = (Path(run.output_dir) / "mlruns").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}"

    def artifact_location(self, run: Any) -> str | None:
        if run.config["mlflow.artifact_location"]:
            return run.config["mlflow.artifact_location"]
        if run.config["mlflow.tracking_uri"]:
            return None
        return (Path(run.output_dir) / "mlruns" / "artifacts").resolve().as_uri()

    def open(self, run: Any) -> str:
        """The MLflow run's id: created on first use (or, for a resumed run, the one in ``mlflow.json``)."""
        if self.run_id is not None:
            return self.run_id
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = self.tracking_uri(run)
        try:
            self.client = MlflowClient(uri)
        except MlflowException as e:
            self.store_refused = True
            reason = str(e.message).split(". ")[0]
            raise UsageError(f"mlflow.tracking_uri {uri!r} cannot be used: {reason}; give another "
                             f"(--set mlflow.tracking_uri=sqlite:///PATH/mlflow.db) or leave it out") from None
        client = self.client
        out = Path(run.output_dir)
        record = out / RUN_FILE
        previous = json.loads(record.read_text()) if self.resumed_at is not None and record.is_file() else {}
        params = flat_config(run.config)
        tags: dict[str, str] = {}
        if previous.get("tracking_uri") == uri:
            self.run_id = previous["run_id"]
            client.update_run(self.run_id, status="RUNNING")
            logged = client.get_run(self.run_id).data.params
            # Params cannot change in MLflow: a value changed on resume is kept as a tag.
            tags.update({f"qlora.resumed.{k}": v for k, v in params.items() if k in logged and logged[k] != v})
            params = {k: v for k, v in params.items() if k not in logged}
            tags["qlora.resumed_from_step"] = str(self.resumed_at)
        else:
            name = run.config["mlflow.experiment_name"]
            experiment = client.get_experiment_by_name(name)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else client.create_experiment(name, artifact_location=self.artifact_location(run)))
            created = client.create_run(experiment_id, run_name=run.config["mlflow.run_name"] or out.resolve().name)
            self.run_id = created.info.run_id
            record.write_text(json.dumps({"tracking_uri": uri, "experiment_id": experiment_id,
                                          "run_id": self.run_id}, indent=2) + "\n")
        plugins_file = out / "plugins.json"
        plugins = json.loads(plugins_file.read_text()) if plugins_file.is_file() else []
        tags.update({"qlora.plugins": ",".join(p["name"] for p in plugins), "qlora.run_dir": str(out.resolve()),
                     "qlora.version": qlora_version})
        tags.update({f"qlora.plugin.{key_name(p['name'])}": f"{p.get('distribution') or '-'} "
                                                             f"{p.get('version') or '-'}" for p in plugins})
        param_list = [Param(k, v) for k, v in params.items()]
        tag_list = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, max(len(param_list), len(tag_list)), BATCH):
            client.log_batch(self.run_id, params=param_list[i:i + BATCH], tags=tag_list[i:i + BATCH])
        for name in ("config.yaml", "plugins.json"):
            if (out / name).is_file():
                client.log_artifact(self.run_id, str(out / name))
        return self.run_id

    def log_metrics(self, run: Any, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        run_id = self.open(run)
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def qlora_on_resume(self, run, checkpoint):
        self.resumed_at = run.step

    @hookimpl
    def qlora_on_train_start(self, run):
        if run.is_main_process:
            self.open(run)

    @hookimpl
    def qlora_on_step_end(self, run, metrics):
        if run.is_main_process and run.config["mlflow.log_every_step"]:
            values = {"step/" + k.split("/", 1)[1]: v for k, v in metric_values(metrics).items()}
            self.log_metrics(run, values, int(metrics["step"]))

    @hookimpl
    def qlora_on_log(self, run, metrics):
        if run.is_main_process:
            self.log_metrics(run, metric_values(metrics), int(metrics.get("step", run.step)))

    @hookimpl
    def qlora_on_evaluate(self, run, metrics):
        if run.is_main_process:
            self.log_metrics(run, metric_values(metrics), int(metrics.get("step", run.step)))

    @hookimpl
    def qlora_on_save(self, run, path):
        checkpoints = Path(run.output_dir) / "checkpoints"
        if run.is_main_process and checkpoints not in Path(path).parents:
            self.exports.append(Path(path))

    @hookimpl
    def qlora_on_train_end(self, run, summary):
        if not run.is_main_process:
            return
        numbers = {f"summary/{k}": float(v) for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.log_metrics(run, numbers, run.step)
        adapter = next((p for p in self.exports if (p / "adapter_config.json").is_file()), None)
        if adapter is not None:
            self.client.set_tag(self.run_id, "qlora.adapter_path", str(adapter.resolve()))
            if run.config["mlflow.log_adapter"]:
                self.client.log_artifacts(self.run_id, str(adapter), artifact_path="adapter")
        self.client.set_terminated(self.run_id, "FINISHED")

    @hookimpl
    def qlora_on_train_failed(self, run, error, status):
        if not run.is_main_process or self.store_refused:
            return
        try:
            self.open(run)  # a run that failed before its first metric is tracked too, as failed
            self.client.set_tag(self.run_id, "qlora.error", f"{type(error).__name__}: {error}"[:8000])
            self.client.set_terminated(self.run_id, "KILLED" if status == "interrupted" else "FAILED")
        except Exception as e:  # the run's own error is what the user must see: it is raised again afterwards
            run.notice(f"mlflow: the MLflow run could not be marked {status}: {type(e).__name__}: {e}")
