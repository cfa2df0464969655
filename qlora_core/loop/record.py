"""The run folder and its record: ``config.yaml``, ``plugins.json``, ``metrics.jsonl`` and ``run.json``, and what
a finished run hands back (:class:`RunResult`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from qlora_core.framework.plugins import __version__
from qlora_core.framework.config import Config
from qlora_core.framework.errors import UsageError
from qlora_core.framework.plugins import PluginSet


def check_output_dir(output_dir: str | Path | None, overwrite: bool) -> None:
    """Refuse an output that is a file, or a non-empty folder without ``overwrite``."""
    if output_dir is None:
        return
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {str(out)!r} is a file, not a folder; choose another --output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"output folder {str(out)!r} is not empty; choose another --output or pass --overwrite")


def prepare_output_dir(output_dir: str | Path | None, overwrite: bool) -> Path:
    """The run folder: new, empty, or emptied on ``overwrite``. Never overwritten silently."""
    if output_dir is None:
        output_dir = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(output_dir)
    check_output_dir(out, overwrite)
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class RunResult:
    """What a finished run produced."""

    output_dir: Path
    steps: int
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    exports: list[Path] = field(default_factory=list)

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir / "adapter"


class RunRecord:
    """The files that document a run: ``config.yaml``, ``plugins.json``, ``metrics.jsonl``, ``run.json``.

    ``run.json`` says ``running`` until the run ends, then ``completed``, ``failed`` or ``interrupted``: a
    folder whose ``run.json`` does not say ``completed`` is not a finished run.
    """

    def __init__(self, out: Path, main: bool):
        self.out = out
        self.main = main
        self.metrics: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self._started = datetime.now().isoformat(timespec="seconds")
        self._resumed_from: int | None = None

    def _write_status(self, status: str, **extra: Any) -> None:
        if not self.main:
            return
        body = {"status": status, "started": self._started, "qlora_version": __version__, **extra}
        if self._resumed_from is not None:
            body["resumed_from_step"] = self._resumed_from
        tmp = self.out / ".run.json.tmp"
        tmp.write_text(json.dumps(body, indent=2, default=str) + "\n")
        tmp.replace(self.out / "run.json")

    def start(self, config: Config, plugins: PluginSet) -> None:
        if not self.main:
            return
        config.dump(self.out / "config.yaml")
        plugins.dump(self.out / "plugins.json")
        (self.out / "metrics.jsonl").write_text("")
        self._write_status("running")

    def resume(self, config: Config, plugins: PluginSet, step: int) -> None:
        """Continue the record of a run from its checkpoint at ``step``: rows logged after it are dropped,
        since the resumed run logs those steps again."""
        rows = []
        path = self.out / "metrics.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self.metrics = [r for r in rows if r.get("step", 0) <= step]
        if not self.main:
            return
        previous = json.loads((self.out / "run.json").read_text()) if (self.out / "run.json").is_file() else {}
        self._started = previous.get("started", self._started)
        config.dump(self.out / "config.yaml")
        plugins.dump(self.out / "plugins.json")
        path.write_text("".join(json.dumps(r) + "\n" for r in self.metrics))
        self._resumed_from = step
        self._write_status("running")

    def metric(self, row: dict[str, Any]) -> None:
        self.metrics.append(row)
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def finish(self, status: str, error: BaseException | None = None) -> None:
        extra: dict[str, Any] = {"finished": datetime.now().isoformat(timespec="seconds")}
        if error is not None:
            extra["error"] = f"{type(error).__name__}: {error}"
        if self.summary:
            extra["summary"] = self.summary
        self._write_status(status, **extra)
