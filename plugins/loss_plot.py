"""The loss curve as a picture: ``RUN_DIR/loss.png``, and the ``qlora plot RUN_DIR`` command.

The picture is drawn from the run folder alone (``metrics.jsonl``, and ``config.yaml`` for the title), so the
plugin at the end of a run and ``qlora plot`` on a finished or still-running run draw the same thing. The top
panel holds the training loss (one point per logging step) and the eval loss (one marker per evaluation, the
one before training at step 0) against the optimizer step, on a log scale when the losses span a factor of ten
or more; the bottom panel the learning rate against the step.

The plugin draws on the main process after each evaluation (so a running run has a fresh picture) and when
training ends. matplotlib is imported only when a picture is drawn, through its Agg canvas (no display, no
``pyplot`` state): every ``qlora`` command imports this module, since it adds a command.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from qlora_core import UsageError, hookimpl

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from qlora_core import Run

METRICS_FILE = "metrics.jsonl"
PICTURE_FILE = "loss.png"

# Above this many points a series is drawn as a bare line; below, each point also gets a marker.
_MARKER_LIMIT = 50


@dataclass
class LossCurves:
    """The series of a run's picture, each a list of ``(step, value)`` pairs in the order they were logged."""

    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    learning_rate: list[tuple[int, float]] = field(default_factory=list)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``RUN_DIR/metrics.jsonl``; a last line that is not (yet) whole JSON is left out, since a
    running run may be writing it.

    :raises UsageError: the folder does not exist, holds no ``metrics.jsonl``, or a line other than the last
        is not JSON.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such folder; give the folder of a run (qlora run --output DIR, "
                         f"or runs/<timestamp>)")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir} is not a run folder (it holds no {METRICS_FILE}); give the folder of a "
                         f"run (qlora run --output DIR, or runs/<timestamp>)")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # being written
            raise UsageError(f"{path}: line {number} is not JSON; the file is damaged (a run writes one JSON "
                             f"object per line)") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def loss_curves(rows: list[dict[str, Any]]) -> LossCurves:
    """The series to draw from ``metrics.jsonl`` rows: training rows (``loss``, ``learning_rate``) and
    evaluation rows (``eval_loss``)."""
    curves = LossCurves()
    for row in rows:
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            continue
        for key, series in (("loss", curves.train_loss), ("eval_loss", curves.eval_loss),
                            ("learning_rate", curves.learning_rate)):
            value = _number(row.get(key))
            if value is not None:
                series.append((step, value))
    return curves


def run_title(run_dir: str | Path) -> str:
    """``RUN_NAME: MODEL``, the model as ``config.yaml`` names it (a local folder by its last part)."""
    run_dir = Path(run_dir).resolve()
    title = run_dir.name
    try:  # a missing or damaged config.yaml only leaves the model out of the title
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        config = None
    model = config.get("model") if isinstance(config, dict) else None
    model = model.get("name_or_path") if isinstance(model, dict) else None
    if isinstance(model, str) and model:
        if os.path.isabs(model) or os.path.isdir(model):
            model = Path(model).name or model
        title = f"{title}: {model}"
    return title


def _draw(ax, series: list[tuple[int, float]], **style: Any) -> None:
    steps = [s for s, _ in series]
    values = [v for _, v in series]
    if len(series) <= _MARKER_LIMIT and "marker" not in style:
        style["marker"] = "."
    ax.plot(steps, values, **style)


def loss_figure(curves: LossCurves, title: str) -> "Figure":
    """The picture: losses against the step above, the learning rate below, sharing the step axis.

    The lines carry the labels ``train loss``, ``eval loss`` and ``learning rate``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    fig.suptitle(title)
    if curves.train_loss:
        _draw(loss_ax, curves.train_loss, label="train loss", color="tab:blue", linewidth=1.5)
    if curves.eval_loss:
        _draw(loss_ax, curves.eval_loss, label="eval loss", color="tab:orange", linewidth=1.5, marker="o")
    losses = [v for _, v in curves.train_loss + curves.eval_loss]
    if losses and min(losses) > 0 and max(losses) / min(losses) >= 10:
        loss_ax.set_yscale("log")
        # Plain numbers (0.2, 0.5, 1, 2) rather than powers of ten; 1-2-5 steps over up to two decades.
        subs = (1.0, 2.0, 5.0) if max(losses) / min(losses) <= 100 else (1.0,)
        loss_ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=20))
        loss_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        loss_ax.yaxis.set_minor_formatter(NullFormatter())
    loss_ax.set_ylabel("loss")
    loss_ax.grid(True, which="major", alpha=0.3)
    if losses:
        loss_ax.legend(loc="upper right")
    if curves.learning_rate:
        _draw(lr_ax, curves.learning_rate, label="learning rate", color="tab:green", linewidth=1.5)
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_ax.set_xlabel("step")
    lr_ax.grid(True, alpha=0.3)
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def write_png(fig: "Figure", path: str | Path) -> Path:
    """Save the picture as PNG, through a temporary file in the same folder renamed over ``path``, so a reader
    never sees half a picture."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def draw_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw a run's picture from its folder into ``output`` (default ``RUN_DIR/loss.png``) and return the path.

    :raises UsageError: not a run folder, or no training step logged yet.
    """
    run_dir = Path(run_dir)
    curves = loss_curves(read_metrics(run_dir))
    if not curves.train_loss:
        raise UsageError(f"{run_dir} has no logged training step yet ({METRICS_FILE} holds no loss); plot it "
                         f"again after its first logging step (every train.logging_steps steps)")
    return write_png(loss_figure(curves, run_title(run_dir)), output or run_dir / PICTURE_FILE)


# --------------------------------------------------------------------------- the plugin


def _refresh(run: "Run") -> None:
    if not run.is_main_process:
        return
    out = Path(run.output_dir)
    curves = loss_curves(read_metrics(out))
    if not curves.train_loss:  # the evaluation before training, or before the first logging step
        return
    try:
        write_png(loss_figure(curves, run_title(out)), out / PICTURE_FILE)
    except OSError as e:  # the picture is a view of the run, not its product: the run goes on without it
        run.notice(f"loss-plot: could not write {out / PICTURE_FILE}: {e}")


@hookimpl
def qlora_on_evaluate(run: "Run", metrics: dict[str, float]) -> None:
    if metrics.get("step") != run.max_steps:  # after the last step, qlora_on_train_end draws it
        _refresh(run)


@hookimpl
def qlora_on_train_end(run: "Run", summary: dict[str, Any]) -> None:
    _refresh(run)


# --------------------------------------------------------------------------- qlora plot


def _add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (finished or still running)")
    parser.add_argument("--output", "-o", metavar="PNG", default=None,
                        help=f"where to write the picture (default: RUN_DIR/{PICTURE_FILE})")


def _main(args) -> int:
    output = args.output
    if output is not None:
        output = Path(output)
        if output.suffix.lower() != ".png":
            raise UsageError(f"--output {output}: the picture is a PNG; give a file name ending in .png")
        if not output.parent.is_dir():
            raise UsageError(f"--output {output}: no folder {output.parent}; create it first or write elsewhere")
    print(f"saved: {draw_run(args.run_dir, output)}")
    return 0


@hookimpl
def qlora_register_commands(register) -> None:
    # qlora plot RUN_DIR [--output PNG]
    register("plot", "draw a run's loss and learning rate against the step as a PNG", _add_arguments, _main)
