"""``qlora run``: fine-tune a model."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

HELP = "fine-tune a model (with no CONFIG: the embedded default job)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (default: the embedded default job)")
    parser.add_argument("--plugin", "-p", action="append", default=[], metavar="NAME",
                        help="use a plugin: entry-point name, module path or .py file; no:NAME turns a default off")
    parser.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key, e.g. --set lora.r=32")
    parser.add_argument("--output", "-o", metavar="DIR", help="run folder (default: runs/<timestamp>)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue RUN_DIR from its latest complete checkpoint (with its own config and plugins)")
    parser.add_argument("--nproc-per-node", type=int, metavar="N",
                        help="start N processes on this machine (one per GPU) through torchrun and train across "
                             "them; on several machines run torchrun yourself")


def under_launcher() -> bool:
    """Whether this process was started by torchrun / accelerate launch (one of several ranks)."""
    return "LOCAL_RANK" in os.environ


def launch_command(args: argparse.Namespace, output: str | None) -> list[str]:
    """The torchrun command (through :mod:`qlora_core.cli.launch`) that runs this ``qlora run`` in
    ``args.nproc_per_node`` processes: the same arguments, with the run folder fixed (every process must agree
    on it) and without ``--nproc-per-node``."""
    cmd = [sys.executable, "-m", "qlora_core.cli.launch", "--standalone", f"--nproc-per-node={args.nproc_per_node}",
           "-m", "qlora_core", "run"]
    if args.config:
        cmd.append(args.config)
    for name in args.plugin:
        cmd += ["--plugin", name]
    for pair in args.overrides:
        cmd += ["--set", pair]
    if args.resume:
        cmd += ["--resume", args.resume]
    elif output:
        cmd += ["--output", output]
    if args.overwrite:
        cmd.append("--overwrite")
    return cmd


def _launch(args: argparse.Namespace) -> int:
    from qlora_core.framework.errors import UsageError
    from qlora_core.loop.job import Job

    if args.nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be at least 1 (got {args.nproc_per_node})")
    if under_launcher():
        raise UsageError("--nproc-per-node starts the processes itself; under torchrun or accelerate launch drop it")
    output = args.output
    if not args.resume and output is None:
        output = str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    # Config, plugin and output-folder errors: reported once, here, before N processes would each report them.
    Job(args.config, plugins=args.plugin, overrides=args.overrides, output_dir=None if args.resume else output,
        overwrite=args.overwrite, resume=args.resume)
    return _run_forwarding_signals(launch_command(args, output))


def _run_forwarding_signals(cmd: list[str]) -> int:
    """Run the launcher and pass SIGTERM and SIGINT on to it (a scheduler preempting the job signals this
    process); torchrun passes them to every worker, which checkpoint and stop (qlora_core.loop.interrupt).
    Returns the launcher's exit code, or 128 + the signal when one stopped the run."""
    import signal

    # Its own session: a Ctrl-C at the terminal reaches the launcher once, through this process.
    proc = subprocess.Popen(cmd, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 + received[0] if received and code != 0 else code


def main(args: argparse.Namespace) -> int:
    from qlora_core.framework.errors import UsageError
    from qlora_core.loop.job import Job

    if args.resume and args.output:
        raise UsageError("--resume writes into the run folder it continues; drop --output")
    if args.nproc_per_node is not None:
        return _launch(args)
    job = Job(args.config, plugins=args.plugin, overrides=args.overrides, output_dir=args.output,
              overwrite=args.overwrite, resume=args.resume)
    result = job.run()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {result.output_dir}")
        # The progress display announced each export as it was saved; without it, they are listed here.
        if "rich-progress" not in job.plugins.names():
            for path in result.exports:
                print(f"saved: {path}")
    return 0
