"""``qlora eval``: a run's held-out loss, perplexity and exact match, before and after training."""

from __future__ import annotations

import argparse
import json
import sys
import time

HELP = "evaluate a run: held-out loss, perplexity and exact match before and after training"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder `qlora run --output` wrote")
    parser.add_argument("--data", metavar="PATH",
                        help="held-out data instead of the run's own: a file, folder, hub id or embedded: name")
    parser.add_argument("--split", metavar="NAME",
                        help="split of --data (default: test, then validation, then train); without --data, "
                             "a split of the run's data.path")
    parser.add_argument("--max-samples", type=int, metavar="N", help="evaluate on at most N examples (-1: all)")
    parser.add_argument("--exact-match", action=argparse.BooleanOptionalAction, default=None,
                        help="score greedy answers by exact match (one generation per example; "
                             "default: on for the embedded secret-rules task only)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _fmt(value: float | None, digits: int = 4) -> str:
    """4 decimals; 4 significant digits for small values (a trained loss of 0.0013 is 0.001298), 3 for huge ones."""
    if value is None:
        return "-"
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if abs(value) >= 1e4:
        return f"{value:.3g}"
    if 0 < abs(value) < 0.01:
        return f"{value:.4g}"
    return f"{value:.{digits}f}"


def _fmt_em(side: dict) -> str:
    if "exact_match" not in side:
        return "-"
    return f"{side['exact_match_correct']}/{side['exact_match_total']} ({100 * side['exact_match']:.1f}%)"


def print_table(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    before, after = result["before"], result["after"]
    split = f" ({result['eval_split']})" if result.get("eval_split") else ""
    table = Table(title=f"qlora eval {result['run_dir']}",
                  caption=f"{result['num_examples']} held-out examples of {result['eval_data']}{split}, "
                          f"{result['eval_tokens']} answer tokens")
    table.add_column("")
    table.add_column("before (base)", justify="right")
    table.add_column("after (adapter)", justify="right")
    table.add_row("eval loss", _fmt(before["eval_loss"]), _fmt(after["eval_loss"]))
    table.add_row("perplexity", _fmt(before["eval_perplexity"]), _fmt(after["eval_perplexity"]))
    if result["exact_match"]:
        table.add_row("exact match", _fmt_em(before), _fmt_em(after))
    (console or Console()).print(table)


def main(args: argparse.Namespace) -> int:
    from qlora_core.tools.evaluation import evaluate_run

    started = time.monotonic()

    def progress(message: str) -> None:
        # On stderr, piped or not, so the result on stdout (a table or --json) stays clean.
        spent = int(time.monotonic() - started)
        print(f"qlora eval: [{spent // 60}:{spent % 60:02d}] {message}...", file=sys.stderr, flush=True)

    if args.max_samples is not None and args.max_samples != -1 and args.max_samples < 1:
        from qlora_core.framework.errors import UsageError

        raise UsageError(f"--max-samples must be a positive number of examples or -1 for all (got {args.max_samples})")
    result = evaluate_run(args.run_dir, data=args.data, split=args.split, max_samples=args.max_samples,
                          exact_match=args.exact_match, progress=progress)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0
