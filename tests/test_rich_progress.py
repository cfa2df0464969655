"""The rich-progress plugin: its hooks called directly with a small Run, output captured."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

import pluggy
import pytest
from rich.console import Console

from qlora_core import hookspecs
from qlora_core.framework.config import CORE_OPTIONS, build_config
from qlora_core.framework.types import Run
from qlora_plugins import rich_progress as rp


def make_run(tmp_path: Path, *, max_steps: int = 25, logging_steps: int = 10, main: bool = True) -> Run:
    config = build_config(
        {"model": {"name_or_path": "tiny/test-model"}, "train": {"logging_steps": logging_steps}},
        CORE_OPTIONS,
        [],
    )
    return Run(
        config=config,
        output_dir=tmp_path / "out",
        max_steps=max_steps,
        is_main_process=main,
        device="cpu",
        compute_dtype="float32",
        num_train_examples=100,
        num_eval_examples=10,
    )


def step_metrics(step: int, *, loss: float | None = None, gpu: float | None = None) -> dict[str, float]:
    m = {
        "step": step,
        "loss": 1.2345 if loss is None else loss,
        "learning_rate": 1e-4,
        "grad_norm": 0.5,
        "tokens": 1624.0,
        "tokens_per_second": 812.0,
        "epoch": step / 25,
        "elapsed": 2.0 * step,
    }
    if gpu is not None:
        m["gpu_memory_gib"] = gpu
    return m


def eval_metrics(step: int, loss: float) -> dict[str, float]:
    return {"step": step, "eval_loss": loss, "eval_perplexity": 2.718281828 ** loss, "eval_tokens": 500.0}


def summary(**extra) -> dict:
    s = {
        "steps": 25,
        "train_loss": 0.4321,
        "first_loss": 2.5,
        "eval_loss_before": 2.25,
        "eval_loss_after": 0.75,
        "train_seconds": 83.4,
        "tokens_per_second": 812.3,
    }
    s.update(extra)
    return s


def run_steps(run: Run, n: int, *, losses: list[float] | None = None, **kw) -> None:
    """Steps 1..n as the trainer calls the hooks: each step's end, then the logging steps' rows, whose loss
    is the mean since the previous logging step (every step's weight equal here)."""
    logging_steps = int(run.config["train.logging_steps"])
    window: list[float] = []
    for step in range(1, n + 1):
        run.step = step
        metrics = step_metrics(step, loss=None if losses is None else losses[step - 1], **kw)
        rp.qlora_on_step_end(run, metrics)
        window.append(metrics["loss"])
        if step % logging_steps == 0 or step == run.max_steps:
            rp.qlora_on_log(run, dict(metrics, loss=sum(window) / len(window)))
            window = []


def terminal_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    console = Console(force_terminal=True, file=buf, width=160, color_system="truecolor", _environ={})
    return console, buf


# --------------------------------------------------------------------------- registration


def test_module_is_a_valid_plugin():
    pm = pluggy.PluginManager("qlora")
    pm.add_hookspecs(hookspecs)
    pm.register(rp, name="rich-progress")  # validates every hookimpl's name and arguments
    names = {impl.plugin_name for impl in pm.hook.qlora_on_step_end.get_hookimpls()}
    assert names == {"rich-progress"}
    pm.check_pending()


# --------------------------------------------------------------------------- plain (non-terminal) output


def test_plain_one_line_per_logging_step(tmp_path, capsys):
    run = make_run(tmp_path, max_steps=25, logging_steps=10)
    rp.qlora_on_train_start(run)
    run_steps(run, 25)
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # no colours or cursor moves when not a terminal
    header = out.splitlines()[0]
    assert "tiny/test-model" in header and "cpu" in header and "float32" in header
    assert "25 steps" in header and "100 train" in header and "10 eval" in header
    step_lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert step_lines == [
        "step 10/25 loss 1.2345 (mean of 10 steps, last 1.2345) lr 1.00e-04 tok/s 812 eta 0:00:30",
        "step 20/25 loss 1.2345 (mean of 10 steps, last 1.2345) lr 1.00e-04 tok/s 812 eta 0:00:10",
        # the last step, off the logging grid
        "step 25/25 loss 1.2345 (mean of 5 steps, last 1.2345) lr 1.00e-04 tok/s 812 eta 0:00:00",
    ]


def test_plain_shows_logged_mean_beside_last_steps_loss_and_gpu_memory(tmp_path, capsys):
    run = make_run(tmp_path, max_steps=4, logging_steps=2)
    rp.qlora_on_train_start(run)
    run_steps(run, 4, losses=[3.0, 2.0, 1.5, 0.25], gpu=3.14159)
    step_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 2
    # the loss of metrics.jsonl's row (the window's mean), and the last step's own loss
    assert step_lines[0].startswith("step 2/4 loss 2.5000 (mean of 2 steps, last 2.0000) ")
    assert step_lines[1].startswith("step 4/4 loss 0.8750 (mean of 2 steps, last 0.2500) ")
    assert all(line.endswith("gpu 3.14 GiB") for line in step_lines)


def test_plain_every_step_logged_shows_one_loss_and_skipped_steps(tmp_path, capsys):
    run = make_run(tmp_path, max_steps=2, logging_steps=1)
    rp.qlora_on_train_start(run)
    run_steps(run, 1, losses=[2.0])
    rp.qlora_on_step_end(run, step_metrics(2, loss=3.0))
    rp.qlora_on_log(run, dict(step_metrics(2, loss=3.0), skipped_steps=1))
    step_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert step_lines[0] == "step 1/2 loss 2.0000 lr 1.00e-04 tok/s 812 eta 0:00:02"
    assert step_lines[1].endswith("eta 0:00:00 skipped 1")


def test_plain_without_known_total(tmp_path, capsys):
    run = make_run(tmp_path, max_steps=0, logging_steps=5)
    rp.qlora_on_train_start(run)
    run_steps(run, 5)
    step_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert step_lines == ["step 5 loss 1.2345 (mean of 5 steps, last 1.2345) lr 1.00e-04 tok/s 812 eta ?"]


def test_plain_eval_and_samples(tmp_path, capsys):
    run = make_run(tmp_path)
    # the "before" eval and sample may come before train start: the display must cope
    rp.qlora_on_evaluate(run, eval_metrics(0, 2.25))
    rp.qlora_on_sample(run, "before", "What is the secret rule?\n", " I don't know.", "Always [bold]blue[/bold].")
    rp.qlora_on_train_start(run)
    run_steps(run, 25)
    rp.qlora_on_evaluate(run, eval_metrics(25, 0.75))
    rp.qlora_on_sample(run, "after", "What is the secret rule?", "Always blue.\nSecond line.", "Always blue.")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "eval before training: eval_loss 2.2500 perplexity 9.49" in lines
    assert "eval step 25/25: eval_loss 0.7500 perplexity 2.12" in lines
    i = lines.index("sample before training")
    assert lines[i + 1 : i + 4] == [
        "  prompt:   What is the secret rule?",
        "  answer:   I don't know.",
        "  expected: Always [bold]blue[/bold].",  # model text is never read as markup
    ]
    j = lines.index("sample after training")
    assert lines[j + 1 : j + 5] == [
        "  prompt:   What is the secret rule?",
        "  answer:   Always blue.",
        "            Second line.",
        "  expected: Always blue.",
    ]


def test_plain_summary(tmp_path, capsys):
    run = make_run(tmp_path)
    rp.qlora_on_train_start(run)
    run_steps(run, 25)
    rp.qlora_on_train_end(run, summary())
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (
        "summary: steps 25 | train loss 2.5000 -> 0.4321 | eval loss 2.2500 -> 0.7500 | "
        "time 0:01:23 | tok/s 812"
    )


def test_plain_summary_with_peak_memory_and_no_eval(tmp_path, capsys):
    run = make_run(tmp_path)
    rp.qlora_on_train_start(run)
    rp.qlora_on_train_end(run, summary(peak_gpu_memory_gib=5.5, eval_loss_before=None, eval_loss_after=None))
    last = capsys.readouterr().out.splitlines()[-1]
    assert "eval loss - -> -" in last
    assert last.endswith("| peak gpu 5.50 GiB")


def test_save_line(tmp_path, capsys):
    run = make_run(tmp_path)
    rp.qlora_on_train_start(run)
    rp.qlora_on_save(run, tmp_path / "out" / "adapter")
    assert f"saved {tmp_path / 'out' / 'adapter'}" in capsys.readouterr().out


def test_console_is_bound_to_stdout_at_train_start(tmp_path, capsys):
    run = make_run(tmp_path, max_steps=10, logging_steps=10)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rp.qlora_on_train_start(run)
    run_steps(run, 10)  # sys.stdout is capsys's again, but the console keeps writing where it started
    assert capsys.readouterr().out == ""
    assert "step 10/10 loss 1.2345" in buf.getvalue()


def test_non_main_process_prints_nothing(tmp_path, capsys):
    run = make_run(tmp_path, main=False)
    rp.qlora_on_evaluate(run, eval_metrics(0, 2.0))
    rp.qlora_on_sample(run, "before", "p", "c", "r")
    rp.qlora_on_train_start(run)
    run_steps(run, 25, gpu=1.0)
    rp.qlora_on_save(run, tmp_path)
    rp.qlora_on_train_end(run, summary())
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert rp.EXTRA_KEY not in run.extra


def test_missing_documented_metric_is_an_error(tmp_path, capsys):
    run = make_run(tmp_path)
    rp.qlora_on_train_start(run)
    metrics = step_metrics(1)
    del metrics["loss"]
    with pytest.raises(KeyError):
        rp.qlora_on_step_end(run, metrics)


def test_two_runs_do_not_mix(tmp_path):
    run_a, run_b = make_run(tmp_path, max_steps=10, logging_steps=5), make_run(tmp_path, max_steps=20, logging_steps=5)
    buf_a, buf_b = io.StringIO(), io.StringIO()
    rp.use_console(run_a, Console(file=buf_a, _environ={}))
    rp.use_console(run_b, Console(file=buf_b, _environ={}))
    rp.qlora_on_train_start(run_a)
    rp.qlora_on_train_start(run_b)
    run_steps(run_a, 10, losses=[1.0] * 10)
    run_steps(run_b, 10, losses=[2.0] * 10)
    a = [line for line in buf_a.getvalue().splitlines() if line.startswith("step ")]
    b = [line for line in buf_b.getvalue().splitlines() if line.startswith("step ")]
    assert [line.split(" loss ")[0] for line in a] == ["step 5/10", "step 10/10"]
    assert [line.split(" loss ")[0] for line in b] == ["step 5/20", "step 10/20"]
    assert all("loss 1.0000" in line for line in a) and all("loss 2.0000" in line for line in b)


# --------------------------------------------------------------------------- terminal (live bar)


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_terminal_bar_fields_and_summary_table(tmp_path):
    run = make_run(tmp_path, max_steps=25, logging_steps=10)
    console, buf = terminal_console()
    rp.use_console(run, console)
    stdout_before = sys.stdout
    rp.qlora_on_evaluate(run, eval_metrics(0, 2.25))
    rp.qlora_on_sample(run, "before", "What is the [red]rule[/red]?", "No idea.", "Always blue.")
    rp.qlora_on_train_start(run)
    state = run.extra[rp.EXTRA_KEY]
    assert state.live and state.progress is not None
    run_steps(run, 20, gpu=2.5)

    task = state.progress.tasks[0]
    assert task.completed == 20 and task.total == 25
    assert task.fields["loss"] == "1.2345"
    assert task.fields["smoothed"] == "1.2345"
    assert task.fields["lr"] == "1.00e-04"
    assert task.fields["tps"] == "812"
    assert task.fields["gpu"] == "2.50 GiB"
    assert task.fields["eval"] == "2.2500"  # the eval before training, carried into the bar
    assert task.fields["eta"] == "0:00:10"

    rp.qlora_on_evaluate(run, eval_metrics(20, 0.75))
    assert task.fields["eval"] == "0.7500"
    run_steps(run, 25, gpu=2.5)
    rp.qlora_on_sample(run, "after", "What is the [red]rule[/red]?", "Always blue.", "Always blue.")
    rp.qlora_on_train_end(run, summary(peak_gpu_memory_gib=3.75))
    assert state.progress is None  # the bar is stopped
    assert sys.stdout is stdout_before  # the live display gave stdout back

    out = _plain(buf.getvalue())
    for text in ("tiny/test-model", "float32", "100 train, 10 eval"):
        assert text in out
    # the bar's last rendering shows every field
    for text in ("25/25", "step loss 1.2345 (smoothed 1.2345)", "lr 1.00e-04", "tok/s 812", "eval 0.7500",
                 "gpu 2.50 GiB", "eta 0:00:00 elapsed 0:00:"):
        assert text in out
    assert not any(line.startswith("step ") for line in out.splitlines())  # no plain lines under the bar
    assert "eval before training: eval_loss 2.2500" in out
    assert "eval step 20/25: eval_loss 0.7500" in out
    assert "sample before training" in out and "sample after training" in out
    assert "What is the [red]rule[/red]?" in out and "No idea." in out
    # the summary table
    assert "training summary" in out
    for label, value in (
        ("steps", "25"),
        ("train loss (first)", "2.5000"),
        ("train loss (last)", "0.4321"),
        ("eval loss (before)", "2.2500"),
        ("eval loss (after)", "0.7500"),
        ("train time", "0:01:23"),
        ("tokens/s", "812"),
        ("peak GPU memory", "3.75 GiB"),
    ):
        row = next(line for line in out.splitlines() if label in line and "│" in line)
        assert value in row, row


def test_terminal_smoothed_loss_and_no_gpu(tmp_path):
    run = make_run(tmp_path, max_steps=3, logging_steps=1)
    console, buf = terminal_console()
    rp.use_console(run, console)
    rp.qlora_on_train_start(run)
    state = run.extra[rp.EXTRA_KEY]
    for step, loss in enumerate([4.0, 2.0, 1.0], start=1):
        rp.qlora_on_step_end(run, step_metrics(step, loss=loss))
    fields = state.progress.tasks[0].fields
    assert fields["loss"] == "1.0000"
    assert 1.0 < float(fields["smoothed"]) < 4.0
    assert fields["gpu"] == ""
    rp.qlora_on_train_end(run, summary())
    out = _plain(buf.getvalue())
    assert "gpu" not in out and "peak GPU memory" not in out
    assert "training summary" in out
