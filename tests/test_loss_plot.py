"""The loss-plot plugin: RUN_DIR/loss.png drawn from the run's metrics.jsonl, and `qlora plot RUN_DIR`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from qlora_core import Job, UsageError, testing
from qlora_core.cli import main as qlora

from qlora_plugins.loss_plot import loss_curves, loss_figure, read_metrics, run_title

PLUGIN = "loss-plot"
EVALS = ["data.eval_fraction=0.25", "train.eval_steps=2"]

# Run with the plugin below, it keeps a copy of loss.png as it is when step 3 begins: after the evaluation at
# step 2, before training ends.
MID_RUN_COPY = '''
import shutil
from qlora_core import hookimpl

@hookimpl
def qlora_on_step_begin(run, step):
    if step == 3:
        shutil.copy(run.output_dir / "loss.png", run.output_dir.parent / "loss-before-step-3.png")
'''


def lines_by_label(fig) -> dict[str, list[tuple[int, float]]]:
    return {line.get_label(): list(zip(line.get_xdata(), line.get_ydata()))
            for ax in fig.axes for line in ax.get_lines()}


def assert_png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (800, 600)
        im.verify()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, qlora_tiny_model_dir):
    """One short real run (the tiny model and data, as qlora_run's) with evaluations at steps 0, 2 and 4, and
    the copy of its picture from mid-run; shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("loss-plot")
    watcher = tmp / "mid_run_copy.py"
    watcher.write_text(MID_RUN_COPY)
    cfg = {"model": {"name_or_path": str(qlora_tiny_model_dir)},
           "data": {"path": str(testing.write_jsonl(tmp / "train.jsonl", testing.TINY_ROWS))},
           "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
           "train": {"per_device_train_batch_size": 4, "max_steps": 4, "warmup_steps": 2, "learning_rate": 1e-3,
                     "logging_steps": 1, "max_seq_length": 64, "sample_max_new_tokens": 0}}
    return Job(cfg, plugins=["no:rich-progress", PLUGIN, str(watcher)], overrides=EVALS,
               output_dir=tmp / "run").run()


def test_a_run_leaves_loss_png_drawn_from_its_metrics(finished_run):
    out = finished_run.output_dir
    assert_png(out / "loss.png")
    rows = finished_run.metrics  # the run's own record, in memory
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]

    fig = loss_figure(loss_curves(read_metrics(out)), run_title(out))
    drawn = lines_by_label(fig)
    assert drawn["train loss"] == [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert drawn["eval loss"] == [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert drawn["learning rate"] == [(r["step"], r["learning_rate"]) for r in rows if "loss" in r]
    assert fig.get_suptitle() == f"run: {Path(finished_run_model(out)).name}"


def finished_run_model(out: Path) -> str:
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())["model"]["name_or_path"]


def test_the_picture_is_refreshed_after_each_evaluation(finished_run):
    mid = finished_run.output_dir.parent / "loss-before-step-3.png"
    assert_png(mid)
    assert mid.read_bytes() != (finished_run.output_dir / "loss.png").read_bytes()


def test_qlora_plot_draws_the_same_picture_from_disk(finished_run, tmp_path, capsys):
    out = finished_run.output_dir
    target = tmp_path / "again.png"
    assert qlora(["plot", str(out), "--output", str(target)]) == 0
    assert capsys.readouterr().out.strip() == f"saved: {target}"
    assert target.read_bytes() == (out / "loss.png").read_bytes()


def test_qlora_plot_reads_a_run_whose_last_line_is_half_written(finished_run, tmp_path, capsys):
    copy = tmp_path / "running"
    shutil.copytree(finished_run.output_dir, copy, ignore=shutil.ignore_patterns("adapter", "loss.png"))
    whole = (copy / "metrics.jsonl").read_text()
    torn = whole + '{"step": 5, "epoch": 1.6, "loss": 0.5, "learning_ra'
    (copy / "metrics.jsonl").write_text(torn)

    assert qlora(["plot", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == f"saved: {copy / 'loss.png'}"
    assert_png(copy / "loss.png")
    assert read_metrics(copy) == finished_run.metrics  # the torn row is left out, every whole one kept


def test_a_damaged_line_before_the_last_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(UsageError, match=r"metrics.jsonl: line 2 is not JSON"):
        read_metrics(tmp_path)


@pytest.mark.parametrize("case", ["not a run", "no such folder", "no step logged"])
def test_qlora_plot_of_what_is_not_a_plottable_run_is_one_error_line(tmp_path, capsys, case):
    folder = tmp_path / "somewhere"
    if case != "no such folder":
        folder.mkdir()
        (folder / "notes.txt").write_text("not a run\n")
    if case == "no step logged":  # a run that has evaluated before training, and logged no step yet
        (folder / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 2.9, "eval_perplexity": 18.2}\n')

    assert qlora(["plot", str(folder)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder}")
    expected = {"not a run": "is not a run folder", "no such folder": "no such folder",
                "no step logged": "has no logged training step yet"}[case]
    assert expected in lines[0]
    assert not (folder / "loss.png").exists()


def test_qlora_plot_output_must_be_a_png_in_an_existing_folder(finished_run, tmp_path, capsys):
    out = str(finished_run.output_dir)
    assert qlora(["plot", out, "--output", str(tmp_path / "loss.pdf")]) == 2
    assert qlora(["plot", out, "-o", str(tmp_path / "missing" / "loss.png")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "ending in .png" in errors[0] and "no folder" in errors[1]


def test_no_loss_plot_leaves_no_picture(qlora_run):
    result = qlora_run(f"no:{PLUGIN}", max_steps=2)
    assert result.steps == 2 and (result.output_dir / "metrics.jsonl").is_file()
    assert not (result.output_dir / "loss.png").exists()


def test_loss_plot_is_a_default_plugin(qlora_plugins):
    _, plugins = qlora_plugins()
    assert PLUGIN in plugins.names(), "loss-plot is on by default: it belongs in qlora's list of default plugins"
