"""``qlora run``: fine-tune a model."""

from __future__ import annotations

import argparse

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


def main(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..trainer import Job

    if args.resume and args.output:
        raise UsageError("--resume writes into the run folder it continues; drop --output")
    job = Job(args.config, plugins=args.plugin, overrides=args.overrides, output_dir=args.output,
              overwrite=args.overwrite, resume=args.resume)
    result = job.run()
    print(f"run folder: {result.output_dir}")
    for path in result.exports:
        print(f"saved: {path}")
    return 0
