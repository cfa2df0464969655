"""The documentation cannot drift from the code: hooks, config keys, entry points, CLI options, examples."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_core import hookspecs
from qlora_core.cli import build_parser

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PLUGINS_MD = (DOCS / "plugins.md").read_text()

HOOKS = sorted(name for name, obj in vars(hookspecs).items() if name.startswith("qlora_") and callable(obj))
HEADINGS = re.findall(r"^### (qlora_\w+)\s*$", PLUGINS_MD, flags=re.MULTILINE)


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def hook_args(name: str) -> list[str]:
    return list(inspect.signature(getattr(hookspecs, name)).parameters)


def test_hooks_are_found():
    assert "qlora_optimizer" in HOOKS and len(HOOKS) >= 10


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_heading_in_plugins_md(hook):
    assert hook in HEADINGS, f"docs/plugins.md needs a '### {hook}' section"


def test_every_hook_heading_in_plugins_md_is_a_hook():
    assert sorted(set(HEADINGS) - set(HOOKS)) == []
    assert len(HEADINGS) == len(set(HEADINGS)), "a hook is documented twice"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_docstring_has_returns_and_its_result_rule(hook):
    spec = getattr(hookspecs, hook)
    doc = inspect.getdoc(spec) or ""
    assert ":returns:" in doc
    firstresult = getattr(spec, "qlora_spec", {}).get("firstresult", False)
    if firstresult:
        assert "The first non-None result wins" in doc
    else:
        assert "Every plugin's" in doc, "say whether every plugin's result is used or the first one wins"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_docstring_documents_every_parameter(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    for arg in hook_args(hook):
        assert f":param {arg}:" in doc


def test_config_reference_matches_core_options():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_every_built_in_entry_point_is_mentioned_in_plugins_md():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = pyproject["project"]["entry-points"]["qlora"]
    assert names
    missing = [name for name in names if f"`{name}`" not in PLUGINS_MD]
    assert missing == []


@pytest.mark.parametrize("index", range(len(python_blocks(PLUGINS_MD))))
def test_python_examples_in_plugins_md_compile(index):
    compile(python_blocks(PLUGINS_MD)[index], f"docs/plugins.md python block {index + 1}", "exec")


def _hookimpls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if isinstance(target, ast.Name) and target.id == "hookimpl":
                    yield node


def test_hook_implementations_in_plugins_md_use_real_hooks_and_argument_names():
    checked = 0
    for block in python_blocks(PLUGINS_MD):
        for fn in _hookimpls(ast.parse(block)):
            assert fn.name in HOOKS, f"{fn.name} is not a hook"
            args = [a.arg for a in fn.args.args if a.arg != "self"]
            unknown = set(args) - set(hook_args(fn.name))
            assert not unknown, f"{fn.name} takes no argument {', '.join(sorted(unknown))}"
            checked += 1
    assert checked >= len(HOOKS)


def test_cli_md_mentions_every_command_and_option():
    cli_md = (DOCS / "cli.md").read_text()
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for command, sub in subparsers.choices.items():
        handler = sub.get_default("handler")
        if not handler.__module__.startswith(("qlora_core", "qlora_plugins")):
            continue  # a command of a separately installed package (contrib/), documented in its README
        assert f"qlora {command}" in cli_md
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert flag in cli_md, f"docs/cli.md does not mention qlora {command} {flag}"
