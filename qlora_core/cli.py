"""The ``qlora`` command line: a thin layer over :mod:`qlora_core.trainer` and :mod:`qlora_core.plugins`.

User errors print one ``error:`` line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from . import __version__
from .errors import UsageError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: same one-line form, same code
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qlora", description="QLoRA fine-tuning through plugins.")
    parser.add_argument("--version", action="version", version=f"qlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="fine-tune a model (with no CONFIG: the embedded default job)")
    run.add_argument("config", nargs="?", help="YAML config file (default: the embedded default job)")
    run.add_argument("--plugin", "-p", action="append", default=[], metavar="NAME",
                     help="use a plugin: entry-point name, module path or .py file; no:NAME turns a default off")
    run.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                     help="override a config key, e.g. --set lora.r=32")
    run.add_argument("--output", "-o", metavar="DIR", help="run folder (default: runs/<timestamp>)")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")

    plugins = sub.add_parser("plugins", help="list installed plugins")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    return parser


def quiet_third_party_noise() -> None:
    """Silence messages from dependencies that say nothing actionable to a qlora user."""
    import logging
    import warnings

    # bitsandbytes on CPU: "Failed to load CPU gemm_4bit_forward from kernels-community" (a hub download
    # it cannot make offline; its built-in kernel is used instead).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # PEFT still calls the name transformers 5.2x deprecated.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method.*deprecated", category=DeprecationWarning)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def cmd_run(args: argparse.Namespace) -> int:
    from .trainer import Job

    quiet_third_party_noise()
    job = Job(args.config, plugins=args.plugin, overrides=args.overrides, output_dir=args.output,
              overwrite=args.overwrite)
    result = job.run()
    print(f"run folder: {result.output_dir}")
    for path in result.exports:
        print(f"saved: {path}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import installed_plugins

    rows = installed_plugins()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qlora plugins")
    for col in ("name", "distribution", "version", "default", "hooks"):
        table.add_column(col)
    for row in rows:
        hooks = ", ".join(h.removeprefix("qlora_") for h in row["hooks"]) or f"[red]{row.get('error', '')}[/red]"
        table.add_row(row["name"], row["distribution"] or "", row["version"] or "", "yes" if row["default"] else "",
                      hooks)
    Console().print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "plugins":
            return cmd_plugins(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qlora plugins --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    raise AssertionError(args.command)


def entry() -> None:
    sys.exit(main())
