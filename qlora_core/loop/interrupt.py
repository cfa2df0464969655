"""Stopping a run on SIGTERM (preemption) and SIGINT (Ctrl-C) without losing its steps.

While a run trains, the first SIGTERM or SIGINT only asks it to stop: the step under way finishes, a checkpoint is
written, ``run.json`` says ``interrupted`` and the run ends with :class:`Interrupted` (the command line exits with
128 + the signal's number: 143 for SIGTERM, 130 for SIGINT). A second signal stops the process at once, by the
signal's default action; the checkpoints are written under a temporary name and renamed when complete, so the
folder still holds the last complete one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal after writing a checkpoint (``checkpoint``; ``None`` when no step was taken).

    A ``KeyboardInterrupt``, so callers that handle Ctrl-C handle it; :attr:`exit_code` is 128 + the signal.
    """

    def __init__(self, signum: int, run_dir: Path, step: int, max_steps: int, checkpoint: Path | None):
        self.signum = signum
        self.run_dir = Path(run_dir)
        self.step = step
        self.max_steps = max_steps
        self.checkpoint = checkpoint
        super().__init__(self.message())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        name = signal_name(self.signum)
        if self.checkpoint is None:
            return f"interrupted by {name} before the first step; nothing to resume (run it again)"
        return (f"interrupted by {name} after step {self.step} of {self.max_steps}; checkpoint {self.checkpoint}; "
                f"continue with: qlora run --resume {self.run_dir}")


class StopSignals:
    """A context manager that turns the first SIGTERM or SIGINT into a request (:attr:`received`) and a second into
    an immediate stop. Outside the main thread (where Python cannot handle signals) it does nothing."""

    def __init__(self, announce: Any = None):
        self.received: int | None = None
        self._announce = announce  # called with a message when the first signal arrives
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            # The second signal: stop now, as the signal would have without this handler.
            for other in SIGNALS:
                signal.signal(other, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        message = (f"received {signal_name(signum)}: finishing the step under way and writing a checkpoint "
                   f"(send it again to stop at once)")
        try:
            if self._announce is not None:
                self._announce(message)
            else:
                print(message, file=sys.stderr, flush=True)
        except Exception:  # a message must never keep the run from stopping cleanly
            pass
