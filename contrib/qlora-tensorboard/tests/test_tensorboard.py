"""qlora-tensorboard, installed (``pip install ./contrib/qlora-tensorboard``) and tested with qlora's own fixtures:
short real runs, their event files read back with TensorBoard's own reader."""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.api_pb2 import Status
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from tensorboard.util import tensor_util

from qlora_core import Job, UsageError

PLUGIN = "tensorboard"
# Held-out data and an evaluation every 2 steps, so the event files hold eval rows between the training rows.
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


def read_events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def text(acc: EventAccumulator, tag: str) -> str:
    (event,) = acc.Tensors(f"{tag}/text_summary")
    return tensor_util.make_ndarray(event.tensor_proto).item().decode()


def texts(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    events = acc.Tensors(f"{tag}/text_summary")
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()) for e in events]


def hparams_data(acc: EventAccumulator) -> dict[str, HParamsPluginData]:
    return {tag: HParamsPluginData.FromString(content) for tag, content in acc.PluginTagToContent("hparams").items()}

# Records every step's metrics as qlora_on_step_end hands them, into RUN_DIR/steps.jsonl.
STEP_RECORDER = '''
import json
from qlora_core import hookimpl

@hookimpl
def qlora_on_step_end(run, metrics):
    with open(run.output_dir / "steps.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\\n")
'''


def expected_scalars(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The run's own record (metrics.jsonl rows) as the tags the plugin documents: train/KEY, eval/KEY."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        evaluation = "eval_loss" in row
        for key, value in row.items():
            if key == "step" or value is None:
                continue
            tag = "eval/" + key[len("eval_"):] if evaluation else "train/" + key
            expected.setdefault(tag, []).append((row["step"], value))
    return expected


def assert_same_scalars(got: dict, expected: dict) -> None:
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        # Event files hold 32-bit floats.
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


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
    assert ep.value == "qlora_tensorboard:TensorBoardLogger" and ep.dist.name == "qlora-tensorboard"
    config, plugins = qlora_plugins()
    assert PLUGIN not in plugins.names() and "tensorboard.log_dir" not in config
    config, plugins = qlora_plugins(PLUGIN)
    assert PLUGIN in plugins.names() and config["tensorboard.log_dir"] is None


def test_a_run_records_every_metric_its_config_plugins_and_adapter(qlora_run, tmp_path):
    recorder = tmp_path / "step_recorder.py"
    recorder.write_text(STEP_RECORDER)
    result = qlora_run(PLUGIN, str(recorder), overrides=[*EVAL, "tensorboard.log_every_step=true"], max_steps=4,
                       logging_steps=2)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == result.metrics and any("eval_loss" in r for r in rows) and any("loss" in r for r in rows)

    acc = read_events(result.output_dir / "tensorboard")
    got = scalars(acc)
    expected = expected_scalars(rows)
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
            "eval/loss", "eval/perplexity"} <= set(expected)
    assert_same_scalars(got, expected)
    assert [s for s, _ in got["train/loss"]] == [2, 4] and [s for s, _ in got["eval/loss"]] == [0, 2, 4]
    # With tensorboard.log_every_step, each step's own values too, as qlora_on_step_end handed them.
    steps = [json.loads(line) for line in (result.output_dir / "steps.jsonl").read_text().splitlines()]
    every_step = {tag.replace("train/", "step/"): points for tag, points in expected_scalars(steps).items()}
    assert [s for s, _ in every_step["step/loss"]] == [1, 2, 3, 4]
    assert_same_scalars(got, every_step)
    assert got["summary/eval_loss_after"] == [(4, pytest.approx(result.summary["eval_loss_after"], rel=1e-6))]

    # The hparams: the run's config.yaml, flattened; the session ended successfully.
    data = hparams_data(acc)
    hparams = data["_hparams_/session_start_info"].session_start_info.hparams
    config = flatten(yaml.safe_load((result.output_dir / "config.yaml").read_text()))
    assert set(hparams) == set(config)
    for key, value in config.items():
        if isinstance(value, bool):
            assert hparams[key].bool_value is value, key
        elif isinstance(value, (int, float)):
            assert hparams[key].number_value == pytest.approx(value), key
        elif isinstance(value, str):
            assert hparams[key].string_value == value, key
        else:
            assert json.loads(hparams[key].string_value) == value, key
    assert hparams["lora.r"].number_value == 8 and PLUGIN in json.loads(hparams["plugins"].string_value)
    metrics = [m.name.tag for m in data["_hparams_/experiment"].experiment.metric_infos]
    assert metrics == ["train/loss", "eval/loss"]
    assert data["_hparams_/session_end_info"].session_end_info.status == Status.Value("STATUS_SUCCESS")
    assert texts(acc, "run/status") == [(4, "completed")]

    # The plugins that took part, with their versions, and the adapter's folder.
    plugins = text(acc, "run/plugins")
    recorded = json.loads((result.output_dir / "plugins.json").read_text())
    assert len(recorded) > 5
    for p in recorded:
        assert f"| {p['name']} | {p['distribution'] or '-'} | {p['version'] or '-'} |" in plugins
    assert f"| {PLUGIN} | qlora-tensorboard | 0.1.0 |" in plugins
    assert Path(text(acc, "run/adapter")) == result.adapter_dir.resolve()
    assert (Path(text(acc, "run/adapter")) / "adapter_config.json").is_file()


def test_a_failed_run_records_its_status_and_a_resumed_one_logs_each_step_once(qlora_run, tmp_path):
    log_dir = tmp_path / "run" / "logs" / "tb"
    failing = tmp_path / "fail_plugin.py"
    failing.write_text(FAILING_PLUGIN)
    with pytest.raises(RuntimeError, match="failing at step 4"):
        qlora_run(PLUGIN, str(failing), overrides=["tensorboard.log_dir=logs/tb", "fail.at_step=4"],
                  max_steps=5, save_steps=2, output_dir=tmp_path / "run")
    run_dir = tmp_path / "run"
    assert not (run_dir / "tensorboard").exists()  # the option moved the event files
    acc = read_events(log_dir)
    assert [s for s, _ in scalars(acc)["train/loss"]] == [1, 2, 3]
    assert texts(acc, "run/status") == [(3, "failed at step 3: RuntimeError: failing at step 4")]
    # The hparams session is left open: a resumed run may still complete it.
    assert "_hparams_/session_end_info" not in hparams_data(acc)

    # Resumed from the checkpoint at step 2: steps 3 to 5 are logged again, and TensorBoard keeps only the new
    # ones for step 3.
    result = Job(resume=run_dir, overrides=["fail.at_step=0"]).run()
    assert result.steps == 5
    got = scalars(read_events(log_dir))
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5]
    assert_same_scalars(got, expected_scalars(result.metrics))
    acc = read_events(log_dir)
    assert texts(acc, "run/status") == [(3, "failed at step 3: RuntimeError: failing at step 4"), (5, "completed")]
    assert hparams_data(acc)["_hparams_/session_end_info"].session_end_info.status == Status.Value("STATUS_SUCCESS")


@pytest.mark.parametrize("where", ["/tmp/tb", "~/tb", "../tb", "tb/../../tb"])
def test_a_log_dir_outside_the_run_folder_is_a_usage_error(qlora_tiny_config, where):
    with pytest.raises(UsageError, match=r"^tensorboard.log_dir '.*' leaves the run folder; give a folder inside it"):
        Job(qlora_tiny_config, plugins=[PLUGIN], overrides=[f"tensorboard.log_dir={where}"])


def test_a_log_dir_that_is_a_file_of_the_run_is_a_usage_error(qlora_run, tmp_path):
    with pytest.raises(UsageError, match=r"^tensorboard.log_dir 'config.yaml' is a file of the run folder, not a "
                                         r"folder"):
        qlora_run(PLUGIN, overrides=["tensorboard.log_dir=config.yaml"], output_dir=tmp_path / "run")