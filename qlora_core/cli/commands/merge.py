"""``qlora merge``: a finished run's adapter merged into its dequantized base, saved as a plain model."""

from __future__ import annotations

import argparse

HELP = "merge a finished run's adapter into its dequantized base model, saved as a plain model folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from qlora_core.tools.inference import MERGE_DTYPES

    parser.add_argument("run_dir", metavar="RUN_DIR", help="the folder `qlora run --output` wrote")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="folder for the merged model and tokenizer; it must not exist, or be empty")
    parser.add_argument("--dtype", choices=MERGE_DTYPES, default="auto",
                        help="dtype of the merged weights (default: auto, the run's compute dtype here: "
                             "bfloat16 on a GPU that supports it, else float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")


def main(args: argparse.Namespace) -> int:
    from qlora_core.tools.inference import merge

    report = merge(args.run_dir, args.output, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model: {report.output_dir} ({report.dtype})")
    print(report.summary())
    return 0
