"""``qlora plugins``: list the installed plugins."""

from __future__ import annotations

import argparse
import json

HELP = "list installed plugins"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--load", action="store_true",
                        help="import every plugin to list its hooks (by default they are read from the source "
                             "where it says them, importing none of the plugins' dependencies)")


def main(args: argparse.Namespace) -> int:
    from qlora_core.framework.plugins import installed_plugins

    rows = installed_plugins(load=args.load)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qlora plugins")
    for col in ("name", "distribution", "version", "entry point", "default", "hooks"):
        table.add_column(col)
    for row in rows:
        hooks = ", ".join(h.removeprefix("qlora_") for h in row["hooks"]) or f"[red]{row.get('error', '')}[/red]"
        table.add_row(row["name"], row["distribution"] or "", row["version"] or "", row["entry_point"],
                      "yes" if row["default"] else "", hooks)
    Console().print(table)
    return 0
