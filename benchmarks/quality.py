"""Quality of QLoRA against LoRA on the unquantized model: same base, data, steps and seed.

Trains the embedded default job twice through ``Job(...).run()``, with the default job's config:

- QLoRA: the base (SmolLM2-135M-Instruct, ``embedded:smollm2-135m-instruct``) in 4 bits, NF4 with double
  quantization (the default);
- LoRA: the same base unquantized (``--set quant.load_in_4bit=false``), the same adapters, optimizer,
  data order and seed;

then evaluates both runs with :func:`qlora_core.tools.evaluation.evaluate_run` on the same held-out set (the
embedded secret-rules task's test split, 64 questions never seen in training): eval loss per answer token,
perplexity and greedy exact match, before and after training. Prints a table (or ``--json``) with both
figures and the ratio QLoRA / LoRA; nothing is hard-coded: the script reports what it measures.

    python benchmarks/quality.py [--steps 40] [--seed 42] [--output DIR] [--overwrite] [--json]

The two run folders are ``DIR/qlora`` and ``DIR/lora``; the figures are also written to
``DIR/quality.json``. Measured figures: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

VARIANTS = {
    "qlora": ("QLoRA (NF4, dq)", []),
    "lora": ("LoRA (unquantized)", [("quant.load_in_4bit", False)]),
}


def log(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)


def train_and_evaluate(name: str, out: Path, steps: int, seed: int) -> dict[str, Any]:
    from qlora_core.tools.evaluation import evaluate_run
    from qlora_core.loop.job import Job

    label, extra = VARIANTS[name]
    # The default job's config; the display plugin off (its output would mix with the table), and no sample
    # answers (greedy, so they change nothing in training; the exact-match evaluation covers them).
    overrides = [("train.max_steps", steps), ("train.seed", seed), ("train.sample_max_new_tokens", 0), *extra]
    log(f"training {label}: {steps} steps -> {out}")
    started = time.perf_counter()
    job = Job(None, plugins=["no:rich-progress"], overrides=overrides, output_dir=out, overwrite=True)
    result = job.run()
    train_wall = time.perf_counter() - started
    log(f"  trained in {train_wall:.0f} s (eval loss {result.summary['eval_loss_after']:.5f}); evaluating")
    started = time.perf_counter()
    ev = evaluate_run(out)
    eval_wall = time.perf_counter() - started
    log(f"  evaluated in {eval_wall:.0f} s")
    return {
        "label": label,
        "run_dir": str(out),
        "load_in_4bit": job.config["quant.load_in_4bit"],
        "eval_loss_before": ev["before"]["eval_loss"],
        "eval_loss": ev["after"]["eval_loss"],
        "eval_perplexity": ev["after"]["eval_perplexity"],
        "exact_match_before": ev["before"].get("exact_match"),
        "exact_match_before_correct": ev["before"].get("exact_match_correct"),
        "exact_match": ev["after"].get("exact_match"),
        "exact_match_correct": ev["after"].get("exact_match_correct"),
        "exact_match_total": ev["after"].get("exact_match_total"),
        "trainer_eval_loss": result.summary["eval_loss_after"],
        "final_train_loss": result.summary.get("train_loss"),
        "train_seconds": result.summary["train_seconds"],
        "num_eval_examples": ev["num_examples"],
        "eval_tokens": ev["eval_tokens"],
    }


def compare(steps: int, seed: int, out: Path) -> dict[str, Any]:
    import torch
    import transformers

    runs = {name: train_and_evaluate(name, out / name, steps, seed) for name in VARIANTS}
    q, l = runs["qlora"], runs["lora"]
    ratio = q["eval_loss"] / l["eval_loss"] if l["eval_loss"] > 0 else math.inf
    return {
        "model": "embedded:smollm2-135m-instruct",
        "data": "embedded:secret-rules",
        "steps": steps,
        "seed": seed,
        "qlora": q,
        "lora": l,
        "eval_loss_ratio": ratio,
        "eval_loss_degradation_percent": (ratio - 1) * 100,
        "eval_loss_difference": q["eval_loss"] - l["eval_loss"],
        "perplexity_ratio": q["eval_perplexity"] / l["eval_perplexity"],
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "device": "cuda" if torch.cuda.is_available() else "cpu",
                        "threads": torch.get_num_threads(), "python": platform.python_version()},
        "finished": datetime.now().isoformat(timespec="seconds"),
    }


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    q, l = report["qlora"], report["lora"]

    def em(side: dict, key: str) -> str:
        if side[key] is None:
            return "-"
        return f"{side[key + '_correct']}/{side['exact_match_total']} ({100 * side[key]:.1f}%)"

    table = Table(title=f"QLoRA vs LoRA, {report['steps']} steps, seed {report['seed']}",
                  caption=f"{report['model']} on {report['data']}: {q['num_eval_examples']} held-out examples, "
                          f"{q['eval_tokens']} answer tokens")
    table.add_column("")
    table.add_column(q["label"], justify="right")
    table.add_column(l["label"], justify="right")
    table.add_column("QLoRA / LoRA", justify="right")
    table.add_row("eval loss, base", f"{q['eval_loss_before']:.4f}", f"{l['eval_loss_before']:.4f}",
                  f"{q['eval_loss_before'] / l['eval_loss_before']:.4f}")
    table.add_row("eval loss, trained", f"{q['eval_loss']:.5f}", f"{l['eval_loss']:.5f}",
                  f"{report['eval_loss_ratio']:.4f}")
    table.add_row("perplexity, trained", f"{q['eval_perplexity']:.5f}", f"{l['eval_perplexity']:.5f}",
                  f"{report['perplexity_ratio']:.5f}")
    table.add_row("exact match, base", em(q, "exact_match_before"), em(l, "exact_match_before"), "")
    table.add_row("exact match, trained", em(q, "exact_match"), em(l, "exact_match"), "")
    table.add_row("training time (s)", f"{q['train_seconds']:.0f}", f"{l['train_seconds']:.0f}",
                  f"{q['train_seconds'] / l['train_seconds']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"eval loss QLoRA / LoRA = {report['eval_loss_ratio']:.4f} "
                  f"({report['eval_loss_degradation_percent']:+.2f}% for QLoRA; "
                  f"difference {report['eval_loss_difference']:+.5f} nats per answer token)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps of each run (default: 40)")
    parser.add_argument("--seed", type=int, default=None, help="train.seed of both runs (default: the default job's)")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for the two runs and quality.json (default: runs/quality-<timestamp>)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing runs in --output")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    from qlora_core.framework.noise import quiet_third_party_noise
    from qlora_core.framework.errors import UsageError
    from qlora_core.loop.setup import default_config_data

    quiet_third_party_noise()
    seed = args.seed if args.seed is not None else default_config_data()["train"]["seed"]
    out = args.output or Path("runs") / f"quality-{datetime.now():%Y%m%d-%H%M%S}"
    busy = [out / name for name in VARIANTS if (out / name).is_dir() and any((out / name).iterdir())]
    if busy and not args.overwrite:
        print(f"error: {busy[0]} is not empty; choose another --output or pass --overwrite", file=sys.stderr)
        return 2
    try:
        report = compare(args.steps, seed, out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
        print(f"figures: {out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
