"""``qlora prepare``: format and tokenize a run's data ahead of training, into the data cache."""

from __future__ import annotations

import argparse
import json

HELP = "format and tokenize a config's data into the data cache ahead of training, and print its figures"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (default: the embedded default job)")
    parser.add_argument("--plugin", "-p", action="append", default=[], metavar="NAME",
                        help="use a plugin as qlora run would (a dataset format's plugin, say)")
    parser.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key, e.g. --set train.max_seq_length=1024")
    parser.add_argument("--json", action="store_true", help="print JSON")


def main(args: argparse.Namespace) -> int:
    from qlora_core.framework.errors import UsageError
    from qlora_core.loop.job import Job

    job = Job(args.config, plugins=args.plugin, overrides=args.overrides)
    if job.config["data.streaming"]:
        raise UsageError("data.streaming is on: the rows are prepared as training reads them, so there is nothing "
                         "to prepare ahead; set data.streaming=false to prepare (and cache) the whole dataset")
    job.load_data()
    reports = {name: report.to_dict() for name, report in job.data_reports.items()}
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    print_reports(job)
    return 0


def print_reports(job) -> None:
    from rich.console import Console
    from rich.table import Table

    reports = job.data_reports
    table = Table(title=f"qlora prepare: {job.config['data.path']} (format {job.format.name}, "
                        f"train.max_seq_length {job.config['train.max_seq_length']})", title_justify="left")
    table.add_column("")
    for name in reports:
        table.add_column(reports[name].what, justify="right")

    def row(label, value):
        table.add_row(label, *[value(r) for r in reports.values()])

    row("rows", lambda r: f"{r.rows:,}")
    row("examples kept", lambda r: f"{r.kept:,}")
    row("dropped (no answer token)", lambda r: f"{r.dropped:,}")
    row("truncated", lambda r: f"{r.truncated:,} ({r.truncated / max(1, r.kept):.1%})")
    row("tokens", lambda r: f"{r.tokens:,}")
    row("answer tokens", lambda r: f"{r.answer_tokens:,} ({r.answer_tokens / max(1, r.tokens):.1%})")
    for p in ("p50", "p90", "p99", "max"):
        row(f"length {p}", lambda r, p=p: f"{r.length_percentiles.get(p, 0):,}")
    row("prepared", lambda r: "from the cache" if r.cached else
        f"{r.seconds:.1f} s, {r.rows / max(r.seconds, 1e-9):,.0f} rows/s, {r.processes} process(es)")
    console = Console()
    console.print(table)
    where = {r.path for r in reports.values() if r.path}
    if where:
        console.print(f"cached in {', '.join(sorted(where))}; qlora run with this config starts from it",
                      soft_wrap=True)
