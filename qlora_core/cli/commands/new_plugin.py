"""``qlora new-plugin``: write a new plugin package folder, ready to install, with passing tests."""

from __future__ import annotations

import argparse

HELP = "write a new plugin package qlora-NAME/ (pyproject.toml, README, the plugin module, its tests)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME",
                        help="the plugin's name (what --plugin takes): lower-case letters, digits and hyphens; the "
                             "package is qlora-NAME, its module qlora_NAME")
    parser.add_argument("--dir", default=".", metavar="PARENT",
                        help="folder to write qlora-NAME/ into (default: the current folder); it must exist")
    parser.add_argument("--hook", action="append", default=[], metavar="HOOK", dest="hooks",
                        help="also implement this hook (qlora_on_save or on_save; repeatable), with its arguments, "
                             "leaving runs as they were")


def main(args: argparse.Namespace) -> int:
    from qlora_core.tools.new_plugin import new_plugin

    target = new_plugin(args.name, args.dir, args.hooks)
    module = "qlora_" + args.name.replace("-", "_")
    print(f"plugin package: {target}")
    print(f"  {target / 'pyproject.toml'}: the entry point {args.name} = \"{module}\"")
    print(f"  {target / (module + '.py')}: the plugin")
    print(f"  {target / 'tests' / ('test_' + module + '.py')}: its tests")
    print(f"next: pip install -e {target} && python -m pytest -q {target / 'tests'}")
    return 0
