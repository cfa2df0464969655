"""The default progress display: a header, a live progress bar, eval lines, samples and a summary table.

Built with `rich`. Only the main process prints. When stdout is a terminal, training shows a live bar
(step/total, loss, learning rate, tokens/s, eval loss, GPU memory, ETA); otherwise (a pipe, CI, a log
file, pytest's capture) it prints one plain line per logging step instead::

    step 10/40 loss 1.2345 (mean of 5 steps, last 1.1987) lr 1.00e-04 tok/s 812 eta 0:01:30

A plain line's ``loss`` and ``tok/s`` are those of ``metrics.jsonl``'s row for that step: averaged over the
steps since the previous logging step (``train.logging_steps``), with the last step's own loss beside it.
The live bar shows the last step's loss (``step loss``) and an exponential moving average of the step
losses (``smoothed``), then the time left (``eta``) and the time spent (``elapsed``).

The console is created when the display is first needed (usually at train start), writing to the
``sys.stdout`` of that moment. To show the display on another console (a test's, say), call
:func:`use_console` before training starts.

State lives in ``run.extra["rich-progress"]``, so two runs in one process do not mix.
"""

from __future__ import annotations

import atexit
import math
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from qlora_core import hookimpl

if TYPE_CHECKING:
    from rich.progress import Task

    from qlora_core import Run

EXTRA_KEY = "rich-progress"

# Weight of the newest loss in the smoothed (exponential moving average) loss shown by the bar.
_SMOOTHING = 0.1


# --------------------------------------------------------------------------- formatting


def _fmt_float(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.{digits}f}"


def _fmt_perplexity(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    if math.isfinite(value) and abs(value) >= 1e4:
        return f"{value:.3g}"
    return _fmt_float(value, 2)


def _fmt_lr(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2e}"


def _fmt_rate(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value:.0f}" if math.isfinite(value) else str(value)


def _fmt_duration(seconds: Any) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(timedelta(seconds=int(round(seconds))))


def _fmt_gib(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f} GiB"


# --------------------------------------------------------------------------- state


class _State:
    """The display of one run."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal and not console.is_dumb_terminal
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.start_step = 0
        self.smoothed_loss: float | None = None
        self.smoothed_weight = 0.0
        self.eval_loss: float | None = None
        self.started = False
        self.finished = False
        self.last_logged_step = 0
        self.last_step_loss: float | None = None
        self.eta_text = "?"

    # -- output

    def line(self, text: str) -> None:
        """Print one plain line, exactly as given (no markup, highlighting or wrapping)."""
        self.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def render(self, renderable: Any) -> None:
        self.console.print(renderable)

    # -- smoothed loss

    def add_loss(self, loss: float) -> None:
        if not math.isfinite(loss):
            return
        # Bias-corrected EMA, so the first values are not pulled toward zero.
        prev = 0.0 if self.smoothed_loss is None else self.smoothed_loss * self.smoothed_weight
        self.smoothed_weight = self.smoothed_weight * (1 - _SMOOTHING) + _SMOOTHING
        self.smoothed_loss = (prev * (1 - _SMOOTHING) + _SMOOTHING * loss) / self.smoothed_weight

    # -- live bar

    def start_bar(self, total: int | None, completed: int) -> None:
        self.stop_bar()
        self.progress = Progress(
            TextColumn("[bold blue]train"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            _MetricsColumn(),
            TextColumn("[dim]elapsed"),
            TimeElapsedColumn(),
            console=self.console,
            refresh_per_second=2,
            transient=False,
        )
        self.task = self.progress.add_task(
            "train",
            total=total,
            completed=completed,
            loss="-",
            smoothed="",
            lr="-",
            tps="-",
            eval="",
            gpu="",
            eta="?",
        )
        self.progress.start()
        atexit.register(self.stop_bar)

    def update_bar(self, **fields: Any) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, **fields)

    def stop_bar(self) -> None:
        progress, self.progress = self.progress, None
        if progress is not None:
            atexit.unregister(self.stop_bar)
            progress.stop()


class _MetricsColumn(ProgressColumn):
    """loss, smoothed loss, learning rate, tokens/s, eval loss, GPU memory and ETA, from the task's fields."""

    def render(self, task: "Task") -> Text:
        f = task.fields
        text = Text()
        text.append("step loss ", style="dim")
        text.append(str(f.get("loss", "-")), style="bold")
        if f.get("smoothed"):
            text.append(f" (smoothed {f['smoothed']})", style="dim")
        text.append("  lr ", style="dim")
        text.append(str(f.get("lr", "-")))
        text.append("  tok/s ", style="dim")
        text.append(str(f.get("tps", "-")))
        if f.get("eval"):
            text.append("  eval ", style="dim")
            text.append(str(f["eval"]), style="green")
        if f.get("gpu"):
            text.append("  gpu ", style="dim")
            text.append(str(f["gpu"]))
        text.append("  eta ", style="dim")
        text.append(str(f.get("eta", "?")))
        return text


def use_console(run: "Run", console: Console) -> None:
    """Show this run's display on ``console`` (call before training starts; tests use it)."""
    existing = run.extra.get(EXTRA_KEY)
    if isinstance(existing, _State):
        existing.stop_bar()
    run.extra[EXTRA_KEY] = _State(console)


def _state(run: "Run") -> _State | None:
    """The run's display state, created on first use; ``None`` off the main process."""
    if not run.is_main_process:
        return None
    state = run.extra.get(EXTRA_KEY)
    if not isinstance(state, _State):
        state = _State(Console(file=sys.stdout))
        run.extra[EXTRA_KEY] = state
    return state


def _total(run: "Run") -> int | None:
    return run.max_steps if run.max_steps and run.max_steps > 0 else None


def _step_text(step: int, total: int | None) -> str:
    return f"{step}/{total}" if total else str(step)


# --------------------------------------------------------------------------- hooks


@hookimpl
def qlora_on_train_start(run: "Run") -> None:
    state = _state(run)
    if state is None:
        return
    state.started = True
    state.finished = False
    state.start_step = state.last_logged_step = run.step
    total = _total(run)
    model = run.config["model.name_or_path"]
    steps = str(total) if total else "?"
    train = "streamed" if run.config["data.streaming"] else run.num_train_examples
    if state.live:
        header = Table.grid(padding=(0, 2))
        header.add_column(style="dim")
        header.add_column()
        header.add_row("model", Text(str(model)))
        header.add_row("device", Text(f"{run.device} ({run.compute_dtype})"))
        header.add_row("steps", Text(steps))
        header.add_row("examples", Text(f"{train} train, {run.num_eval_examples} eval"))
        header.add_row("output", Text(str(run.output_dir)))
        state.render(Panel.fit(header, title="[bold]qlora", border_style="blue"))
        state.start_bar(total, run.step)
        if state.eval_loss is not None:
            state.update_bar(eval=_fmt_float(state.eval_loss))
    else:
        state.line(
            f"qlora: model {model} | device {run.device} ({run.compute_dtype}) | {steps} steps | "
            f"{train} train / {run.num_eval_examples} eval examples | output {run.output_dir}"
        )


@hookimpl
def qlora_on_step_end(run: "Run", metrics: dict[str, float]) -> None:
    state = _state(run)
    if state is None:
        return
    step = int(metrics["step"])
    loss = float(metrics["loss"])
    lr = metrics["learning_rate"]
    tps = metrics["tokens_per_second"]
    elapsed = float(metrics["elapsed"])
    gpu = metrics.get("gpu_memory_gib")  # only on a GPU
    total = _total(run)
    state.add_loss(loss)

    done = step - state.start_step
    eta: float | None = None
    if total is not None and done > 0:
        eta = elapsed / done * max(total - step, 0)
    eta_text = _fmt_duration(eta) if eta is not None else "?"

    if state.live and state.progress is not None:
        state.update_bar(
            completed=step,
            loss=_fmt_float(loss),
            smoothed=_fmt_float(state.smoothed_loss) if state.smoothed_loss is not None else "",
            lr=_fmt_lr(lr),
            tps=_fmt_rate(tps),
            gpu=_fmt_gib(gpu) if gpu is not None else "",
            eta=eta_text,
        )
    state.last_step_loss = loss
    state.eta_text = eta_text


@hookimpl
def qlora_on_log(run: "Run", metrics: dict[str, Any]) -> None:
    state = _state(run)
    if state is None:
        return
    step = int(metrics["step"])
    window = step - state.last_logged_step
    state.last_logged_step = step
    if state.live:
        return
    total = _total(run)
    loss = _fmt_float(metrics["loss"])
    if window > 1 and state.last_step_loss is not None:
        loss += f" (mean of {window} steps, last {_fmt_float(state.last_step_loss)})"
    text = (
        f"step {_step_text(step, total)} loss {loss} lr {_fmt_lr(metrics['learning_rate'])} "
        f"tok/s {_fmt_rate(metrics['tokens_per_second'])} eta {state.eta_text}"
    )
    gpu = metrics.get("gpu_memory_gib")
    if gpu is not None:
        text += f" gpu {_fmt_gib(gpu)}"
    if metrics.get("skipped_steps"):
        text += f" skipped {int(metrics['skipped_steps'])}"
    state.line(text)


@hookimpl
def qlora_on_evaluate(run: "Run", metrics: dict[str, float]) -> None:
    state = _state(run)
    if state is None:
        return
    step = int(metrics["step"])
    state.eval_loss = float(metrics["eval_loss"])
    if not state.started and step == 0:
        when = "before training"
    else:
        when = f"step {_step_text(step, _total(run))}"
    state.line(
        f"eval {when}: eval_loss {_fmt_float(metrics['eval_loss'])} "
        f"perplexity {_fmt_perplexity(metrics['eval_perplexity'])}"
    )
    state.update_bar(eval=_fmt_float(state.eval_loss))


@hookimpl
def qlora_on_sample(run: "Run", stage: str, prompt: str, completion: str, reference: str) -> None:
    state = _state(run)
    if state is None:
        return
    title = f"sample {stage} training"
    if state.live:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        grid.add_row("prompt", Text(prompt.strip()))
        grid.add_row("answer", Text(completion.strip(), style="cyan"))
        grid.add_row("expected", Text(reference.strip(), style="green"))
        state.render(Panel(grid, title=title, title_align="left", border_style="dim", expand=False))
        return
    lines = [title]
    for label, value in (("prompt", prompt), ("answer", completion), ("expected", reference)):
        body = value.strip().splitlines() or [""]
        lines.append(f"  {label + ':':<10}{body[0]}")
        lines.extend(f"  {'':<10}{more}" for more in body[1:])
    for text in lines:
        state.line(text)


@hookimpl
def qlora_on_notice(run: "Run", message: str) -> None:
    state = _state(run)
    if state is None:
        return
    state.line(f"note: {message}")


@hookimpl
def qlora_on_save(run: "Run", path: Path) -> None:
    state = _state(run)
    if state is None:
        return
    state.line(f"saved {path}")


@hookimpl
def qlora_on_train_end(run: "Run", summary: dict[str, Any]) -> None:
    state = _state(run)
    if state is None:
        return
    state.finished = True
    steps = summary["steps"]
    first_loss = summary["first_loss"]
    last_loss = summary["train_loss"]
    eval_before = summary["eval_loss_before"]
    eval_after = summary["eval_loss_after"]
    seconds = summary["train_seconds"]
    tps = summary["tokens_per_second"]
    peak = summary.get("peak_gpu_memory_gib")  # only on a GPU

    if state.live:
        if state.progress is not None:
            state.update_bar(completed=steps)
        state.stop_bar()
        table = Table(title="training summary", title_justify="left", show_header=False)
        table.add_column(style="dim")
        table.add_column(justify="right")
        table.add_row("steps", str(steps))
        table.add_row("train loss (first)", _fmt_float(first_loss))
        table.add_row("train loss (last)", _fmt_float(last_loss))
        table.add_row("eval loss (before)", _fmt_float(eval_before))
        table.add_row("eval loss (after)", _fmt_float(eval_after))
        table.add_row("train time", _fmt_duration(seconds))
        table.add_row("tokens/s", _fmt_rate(tps))
        if peak is not None:
            table.add_row("peak GPU memory", _fmt_gib(peak))
        state.render(table)
        return

    text = (
        f"summary: steps {steps} | train loss {_fmt_float(first_loss)} -> {_fmt_float(last_loss)} | "
        f"eval loss {_fmt_float(eval_before)} -> {_fmt_float(eval_after)} | "
        f"time {_fmt_duration(seconds)} | tok/s {_fmt_rate(tps)}"
    )
    if peak is not None:
        text += f" | peak gpu {_fmt_gib(peak)}"
    state.line(text)
