"""The launcher behind ``qlora run --nproc-per-node N``: torchrun (``torch.distributed.run``, the same arguments),
run so that a failed or interrupted run ends the way a one-process run does.

torchrun ends a run whose workers failed with its own ``ChildFailedError`` traceback, after the ``error:`` line each
worker printed, and every worker prints the same line. Here each worker writes the line it would print
(:func:`report`) into a folder this launcher makes, and the launcher prints each distinct line once when the workers
are gone, with one line for a worker that died without one (a crash, whose traceback is above). The exit code is
the workers': 2 for a user's mistake, 143 / 130 for a run stopped by SIGTERM / SIGINT, else the first failure's.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Sequence

REPORTS_ENV = "QLORA_LAUNCH_REPORTS"


def report(line: str) -> bool:
    """Under this launcher, keep ``line`` (an ``error:`` line or an interrupted run's message) for the launcher to
    print once, and return True; elsewhere return False (the caller prints it)."""
    folder = os.environ.get(REPORTS_ENV)
    if not folder or not Path(folder).is_dir():
        return False
    rank = os.environ.get("RANK", "0")
    with open(Path(folder) / f"rank-{rank}.txt", "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
    return True


def _reports(folder: Path) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for file in folder.glob("rank-*.txt"):
        try:
            found[int(file.stem.split("-", 1)[1])] = file.read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError):
            continue
    return found


def _print_once(reports: dict[int, list[str]]) -> None:
    seen: set[str] = set()
    for rank in sorted(reports):
        for line in reports[rank]:
            if line not in seen:
                seen.add(line)
                print(line, file=sys.stderr)


def _signal_name(code: int) -> str:
    try:
        return f" (killed by {signal.Signals(-code).name})" if code < 0 else ""
    except ValueError:
        return ""


def _failed(failures: dict, reports: dict[int, list[str]]) -> int:
    """Print what the failed workers reported, and a line for each that reported nothing; the exit code."""
    _print_once(reports)
    codes = []
    # When one worker fails, the agent stops the others with SIGTERM: one stopped before it could say anything
    # is not news beside the other's report.
    stopped_by_agent = -int(signal.SIGTERM)
    for rank in sorted(failures):
        failure = failures[rank]
        code = int(failure.exitcode)
        codes.append(code)
        if rank not in reports and not (code == stopped_by_agent and reports):
            print(f"error: training process {rank} (pid {failure.pid}) exited with code {code}{_signal_name(code)}; "
                  f"its output is above", file=sys.stderr)
    reported = [c for r, c in zip(sorted(failures), codes) if r in reports and c > 0]
    if reported:
        return reported[0]
    return next((c for c in codes if c > 0), 1)


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent's own log lines (its OMP_NUM_THREADS note, "Sending process N closing signal SIGTERM", each
    # failure's summary) say again what the lines printed here say.
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    with tempfile.TemporaryDirectory(prefix="qlora-launch-") as folder:
        os.environ[REPORTS_ENV] = folder
        try:
            run(args)
        except ChildFailedError as e:
            return _failed(e.failures, _reports(Path(folder)))
        except SignalException as e:  # the workers had the signal too and checkpointed (qlora_core.loop.interrupt)
            reports = _reports(Path(folder))
            _print_once(reports)
            return 128 + int(e.sigval)
        finally:
            os.environ.pop(REPORTS_ENV, None)
        _print_once(_reports(Path(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
