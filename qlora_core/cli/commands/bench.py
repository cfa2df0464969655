"""``qlora bench``: the guide's recipe and qlora's trainer measured side by side on a real architecture's shape."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "measure the guide's recipe and qlora's trainer side by side (tokens/s, GPU memory) on a model shape"


def _variant_names() -> str:
    """The named variants for the help text. A plugin's broken offer must not stop every other command (the
    parser is built for all of them): ``qlora bench`` itself reports it."""
    from qlora_core.framework.errors import PluginError
    from qlora_core.tools.bench import named_variants

    try:
        return ", ".join(named_variants())
    except PluginError as e:
        return f"(none listed: {e})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from qlora_core.tools.shapes import SHAPES

    parser.add_argument("--shape", default="llama3-8b", metavar="NAME_OR_PATH",
                        help=f"{', '.join(SHAPES)}, or a config.json (or model folder) path; random weights, "
                             f"built straight into 4 bits")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    parser.add_argument("--min-len", type=int, metavar="N",
                        help="ragged lengths, uniform in N .. --seq (default: every sequence --seq long)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the measured ones (default 2)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank, all linear layers, alpha 2r (default 16)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    parser.add_argument("--learning-rate", type=float, default=2e-4,
                        help="constant learning rate of every variant (default 2e-4, the guide's); higher makes "
                             "the loss curves move further on random weights")
    parser.add_argument("--variant", action="append", dest="variants", metavar="NAME[=KEY=VALUE,...]",
                        help=f"what to measure (repeatable; default seed and qlora): a variant the core or an "
                             f"installed plugin offers ({_variant_names()}), or NAME=KEY=VALUE,... for qlora with "
                             f"config overrides (plugin:NAME adds a plugin)")
    parser.add_argument("--ablations", action="store_true",
                        help="measure the seed, qlora and qlora with each lever changed, one at a time (the "
                             "variants the plugins mark as ablations)")
    parser.add_argument("--variant-timeout", type=float, default=1200, metavar="SECONDS",
                        help="stop a variant that takes longer (default 1200)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="write each variant's top CUDA kernels over two steps after the warmup to DIR")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the JSON report here")


def main(args: argparse.Namespace) -> int:
    from qlora_core.tools.bench import ablations, bench, render

    def save(report) -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")

    variants = list(args.variants or [])
    if args.ablations:
        measured = ablations()
        variants = measured + [v for v in variants if v not in measured]
    report = bench(shape=args.shape, seq=args.seq, batch=args.batch, steps=args.steps, warmup=args.warmup, r=args.r,
                   lora_dropout=args.lora_dropout, learning_rate=args.learning_rate,
                   variants=variants or ("seed", "qlora"),
                   timeout=args.variant_timeout, min_len=args.min_len,
                   profile_dir=args.profile, on_result=save)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report)
    failed = [r["variant"] for r in report["results"] if "error" in r]
    return 1 if failed and len(failed) == len(report["results"]) else 0
