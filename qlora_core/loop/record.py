"""The run folder and its record: ``config.yaml``, ``plugins.json``, ``metrics.jsonl`` and ``run.json``, and what
a finished run hands back (:class:`RunResult`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from qlora_core.framework.plugins import __version__
from qlora_core.framework.config import Config
from qlora_core.framework.errors import UsageError
from qlora_core.framework.plugins import PluginSet


#: the lock a live run holds on its folder (:class:`RunLock`); it stays in the folder after the run
LOCK_FILE = ".qlora.lock"


def _contents(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name != LOCK_FILE]


def check_output_dir(output_dir: str | Path | None, overwrite: bool) -> None:
    """Refuse an output that is a file, or a non-empty folder without ``overwrite``."""
    if output_dir is None:
        return
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {str(out)!r} is a file, not a folder; choose another --output")
    if out.is_dir() and _contents(out) and not overwrite:
        raise UsageError(f"output folder {str(out)!r} is not empty; choose another --output or pass --overwrite")


def default_output_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def prepare_output_dir(output_dir: str | Path | None, overwrite: bool, lock: "RunLock | None" = None) -> Path:
    """The run folder: new, empty, or emptied on ``overwrite``. Never overwritten silently. With ``lock``, the
    folder is locked (:class:`RunLock`) before anything in it is removed, so a live run's folder is never emptied
    under it."""
    out = Path(output_dir) if output_dir is not None else default_output_dir()
    check_output_dir(out, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output folder {str(out)!r}: {e.strerror}; choose another --output") \
            from None
    if lock is not None:
        lock.acquire(out)
    for path in _contents(out):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return out


class RunLock:
    """An exclusive lock on a run folder while a run writes into it: a second run into the same folder (or a
    resume of it) is refused while the first lives.

    The lock is an ``flock`` on ``RUN_DIR/.qlora.lock``, which the operating system releases when the process ends,
    however it ends (``kill -9`` included), so a lock left by a run that is gone is taken over. The file records
    the holder (pid, host, start) for the message; it is emptied when the run releases it, so finding it full on
    taking the lock means its holder died.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self.path: Path | None = None
        #: a message for the user when the lock of a run that is gone was taken over, else None
        self.took_over: str | None = None

    def acquire(self, out: Path) -> None:
        import fcntl

        path = Path(out) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"output folder {str(out)!r} is not writable ({e.strerror}); choose another --output "
                             "or fix its permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}"
                raise UsageError(f"output folder {str(out)!r} is in use by another run ({who}); wait for it to "
                                 "end, or choose another --output") from None
            raise
        previous = _read_holder(fd)
        if previous:
            self.took_over = (f"took over the lock of {out}: the run that held it (pid "
                              f"{previous.get('pid', '?')} on {previous.get('host', '?')}) is gone")
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": datetime.now().isoformat(timespec="seconds")}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, body.encode(), 0)
        self._fd, self.path = fd, path

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)  # released cleanly: the next holder finds it empty
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"pid": "?"}


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


def run_status(run_dir: str | Path) -> dict[str, Any] | None:
    """A run folder's ``run.json`` (``{"status": "unreadable"}`` when it cannot be read), or ``None`` without one."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"status": "unreadable"}


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
