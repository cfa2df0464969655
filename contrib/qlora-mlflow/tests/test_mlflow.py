"""qlora-mlflow, installed (``pip install ./contrib/qlora-mlflow``) and tested with qlora's own fixtures: short real
runs, read back with ``mlflow.tracking.MlflowClient``."""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from qlora_core import Job, UsageError

PLUGIN = "mlflow"
# Held-out data and an evaluation every 2 steps, so the run logs eval rows between the training rows.
EVAL = ["data.eval_fraction=0.25", "train.eval_steps=2"]

# Fails at the start of a chosen step (fail.at_step), after the steps before it are logged and checkpointed.
FAILING_PLUGIN = '''
from qlora_core import Option, hookimpl

@hookimpl
def qlora_config_options():
    return [Option("fail.at_step", "int", 0, "raise when this step begins (0: never)")]

@hookimpl
def qlora_on_step_begin(run, step):
    if step == run.config["fail.at_step"]:
        raise RuntimeError(f"failing at step {step}")
'''

# Records every step's metrics as qlora_on_step_end hands them, into RUN_DIR/steps.jsonl.
STEP_RECORDER = '''
import json
from qlora_core import hookimpl

@hookimpl
def qlora_on_step_end(run, metrics):
    with open(run.output_dir / "steps.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\\n")
'''


def expected_metrics(rows: list[dict]) -> dict[str, dict[int, float]]:
    """The run's own record (metrics.jsonl rows) as the metric names the plugin documents: train/KEY, eval/KEY."""
    expected: dict[str, dict[int, float]] = {}
    for row in rows:
        evaluation = "eval_loss" in row
        for key, value in row.items():
            if key == "step" or value is None:
                continue
            name = "eval/" + key[len("eval_"):] if evaluation else "train/" + key
            expected.setdefault(name, {})[row["step"]] = float(value)
    return expected


def history(client: MlflowClient, run_id: str, name: str) -> dict[int, float]:
    """A metric's history by step, the last logged value of each step (a resumed run logs some steps again)."""
    points = sorted(client.get_metric_history(run_id, name), key=lambda m: (m.timestamp, m.step))
    return {m.step: m.value for m in points}


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_the_package_registers_its_plugin_and_runs_leave_it_out_unless_asked(qlora_plugins):
    ep = {e.name: e for e in md.entry_points(group="qlora")}[PLUGIN]
    assert ep.value == "qlora_mlflow:MLflowLogger" and ep.dist.name == "qlora-mlflow"
    config, plugins = qlora_plugins()
    assert PLUGIN not in plugins.names() and "mlflow.tracking_uri" not in config
    config, plugins = qlora_plugins(PLUGIN)
    assert PLUGIN in plugins.names()
    assert config["mlflow.tracking_uri"] is None and config["mlflow.experiment_name"] == "qlora"


def test_a_run_is_tracked_in_the_run_folder_with_metrics_params_plugins_and_adapter(qlora_run, tmp_path):
    recorder = tmp_path / "step_recorder.py"
    recorder.write_text(STEP_RECORDER)
    result = qlora_run(PLUGIN, str(recorder), max_steps=4, logging_steps=2,
                       overrides=[*EVAL, "mlflow.log_adapter=true", "mlflow.log_every_step=true"])
    out = result.output_dir
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == result.metrics

    record = json.loads((out / "mlflow.json").read_text())
    uri = f"sqlite:///{(out / 'mlruns' / 'mlflow.db').resolve()}"
    assert record["tracking_uri"] == uri
    client = MlflowClient(uri)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == out.name
    assert client.get_experiment(run.info.experiment_id).name == "qlora"

    # Every metric of the run's record, at its steps, with its value.
    expected = expected_metrics(rows)
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
            "eval/loss", "eval/perplexity"} <= set(expected)
    for name, points in expected.items():
        assert history(client, run.info.run_id, name) == points, name
    assert sorted(expected["train/loss"]) == [2, 4] and sorted(expected["eval/loss"]) == [0, 2, 4]
    # With mlflow.log_every_step, each step's own values too, as qlora_on_step_end handed them.
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    every_step = {name.replace("train/", "step/"): points for name, points in expected_metrics(steps).items()}
    assert sorted(every_step["step/loss"]) == [1, 2, 3, 4]
    for name, points in every_step.items():
        assert history(client, run.info.run_id, name) == points, name
    assert run.data.metrics["summary/eval_loss_after"] == result.summary["eval_loss_after"]

    # The params are the run's config.yaml, flattened.
    config = flatten(yaml.safe_load((out / "config.yaml").read_text()))
    assert set(run.data.params) == set(config)
    for key, value in config.items():
        if isinstance(value, (bool, int, float, str)):
            assert run.data.params[key] == str(value), key
        else:
            assert json.loads(run.data.params[key]) == value, key
    assert run.data.params["lora.r"] == "8" and PLUGIN in json.loads(run.data.params["plugins"])

    # The plugins that took part (plugins.json), with their versions; the adapter's folder and files.
    recorded = json.loads((out / "plugins.json").read_text())
    tags = run.data.tags
    assert tags["qlora.plugins"].split(",") == [p["name"] for p in recorded]
    for p in recorded:
        assert tags[f"qlora.plugin.{p['name']}"] == f"{p['distribution'] or '-'} {p['version'] or '-'}"
    assert tags["qlora.plugin.mlflow"] == "qlora-mlflow 0.1.0"
    assert Path(tags["qlora.adapter_path"]) == result.adapter_dir.resolve()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plugins.json", "adapter"} <= artifacts
    adapter_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= adapter_files
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(out.resolve() / "mlruns")


def test_a_failed_run_is_marked_failed_and_resuming_continues_the_same_mlflow_run(qlora_run, tmp_path):
    uri = f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
    (tmp_path / "tracking").mkdir()
    failing = tmp_path / "fail_plugin.py"
    failing.write_text(FAILING_PLUGIN)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="failing at step 4"):
        qlora_run(PLUGIN, str(failing), output_dir=run_dir, max_steps=5, save_steps=2,
                  overrides=[f"mlflow.tracking_uri={uri}", "mlflow.experiment_name=tiny", "mlflow.run_name=first",
                             "mlflow.artifact_location=" + (tmp_path / "artifacts").as_uri(), "fail.at_step=4"])
    client = MlflowClient(uri)
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.info.run_name == "first"
    assert run.data.tags["qlora.error"] == "RuntimeError: failing at step 4"
    assert sorted(history(client, run_id, "train/loss")) == [1, 2, 3]
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    assert not (run_dir / "mlruns").exists()  # the option moved the store
    assert (tmp_path / "artifacts").is_dir()

    # Resumed from the checkpoint at step 2, with a changed setting: the same MLflow run, finished.
    result = Job(resume=run_dir, overrides=["fail.at_step=0"]).run()
    assert result.steps == 5
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["qlora.resumed_from_step"] == "2"
    assert run.data.params["fail.at_step"] == "4" and run.data.tags["qlora.resumed.fail.at_step"] == "0"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    for name, points in expected_metrics(result.metrics).items():
        assert history(client, run_id, name) == points, name
    # Steps 3 to 5 were logged again after the resume: step 3 twice in the history, the resumed value last.
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3, 3, 4, 5]


def test_a_tracking_store_mlflow_refuses_is_a_usage_error(qlora_run, tmp_path, monkeypatch):
    # A plain folder is MLflow's file store, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE is set.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    folder = tmp_path / "plain-folder"
    with pytest.raises(UsageError, match=r"^mlflow.tracking_uri '.*plain-folder' cannot be used: .+; give another "
                                         r"\(--set mlflow.tracking_uri=sqlite:///PATH/mlflow.db\) or leave it out$"):
        qlora_run(PLUGIN, overrides=[f"mlflow.tracking_uri={folder}"], max_steps=1)
    assert json.loads((tmp_path / "run-1" / "run.json").read_text())["status"] == "failed"
