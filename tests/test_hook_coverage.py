"""Every hook is specified, documented and exercised: a hook added without any of these fails the suite.

For each hook of ``qlora_core/hookspecs.py``:

- its docstring has a summary line, a ``:param:`` for each argument, a ``:returns:``, and says whether every
  plugin's implementation is called or the first non-None result wins; the module docstring's list of stages
  places it, which says when it is called;
- docs/plugins.md's Hook reference has its ``### qlora_NAME`` entry with the signature (the same arguments, in
  order), a **Called** paragraph (when), a **Returns** paragraph (what), and an example implementing it;
- a test file (``tests/**/*.py``, ``contrib/*/tests/**/*.py``) implements it in a plugin that takes part in a
  run or a command, so its call is exercised.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from qlora_core import hookspecs

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_MD = (ROOT / "docs" / "plugins.md").read_text()

HOOKS = [name for name, obj in inspect.getmembers(hookspecs, inspect.isfunction)
         if name.startswith("qlora_") and hasattr(obj, "qlora_spec")]


def hook_reference() -> str:
    """The Hook reference section of docs/plugins.md (up to the next ``## `` heading)."""
    match = re.search(r"^## Hook reference\n(.*?)(?=^## )", PLUGINS_MD, flags=re.MULTILINE | re.DOTALL)
    assert match, "docs/plugins.md has no '## Hook reference' section"
    return match.group(1)


def hook_entry(hook: str) -> str:
    """The ``### hook`` entry of the Hook reference, up to the next heading."""
    match = re.search(rf"^### {hook}\s*\n(.*?)(?=^##)", hook_reference() + "\n## ",
                      flags=re.MULTILINE | re.DOTALL)
    assert match, f"docs/plugins.md's Hook reference needs a '### {hook}' entry"
    return match.group(1)


def argument_names(arguments: str) -> list[str]:
    """The names in a documented argument list: ``a: dict[str, Any], b: int`` -> ``["a", "b"]``."""
    names, depth, current = [], 0, ""
    for char in arguments + ",":
        depth += char in "[("
        depth -= char in "])"
        if char == "," and depth == 0:
            if current.strip():
                names.append(current.split(":")[0].strip())
            current = ""
        else:
            current += char
    return names


def test_the_hooks_and_the_hook_reference_are_found():
    assert {"qlora_configure", "qlora_optimizer", "qlora_export"} <= set(HOOKS)
    assert len(HOOKS) == len([n for n in vars(hookspecs) if n.startswith("qlora_")]), \
        "a qlora_ function in hookspecs.py is not marked @hookspec"
    assert hook_reference().count("\n### qlora_") == len(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_the_hook_has_a_real_docstring(hook):
    spec = getattr(hookspecs, hook)
    doc = inspect.getdoc(spec) or ""
    summary = doc.split("\n\n", 1)[0]
    assert len(summary.split()) >= 3 and summary.endswith("."), f"{hook}: its docstring needs a summary line saying what it is for"
    for arg in inspect.signature(spec).parameters:
        assert f":param {arg}:" in doc, f"{hook}: its docstring needs ':param {arg}:'"
    returns = re.search(r":returns: (\S.*)", doc)
    assert returns, f"{hook}: its docstring needs ':returns:' saying what it returns"
    if spec.qlora_spec.get("firstresult"):
        assert "The first non-None result wins" in doc, f"{hook}: say that the first non-None result wins"
    else:
        assert "Every plugin's" in doc, f"{hook}: say that every plugin's implementation (or result) is used"
    # When it is called: the module docstring lists every hook under the stage of a run that calls it.
    stages = (hookspecs.__doc__ or "").split("Hooks are grouped by the stage", 1)[-1].split("\n\n")[1]
    assert f":func:`{hook}`" in stages, f"{hook}: list it under its stage in hookspecs.py's module docstring"


@pytest.mark.parametrize("hook", HOOKS)
def test_the_hook_reference_documents_the_hook(hook):
    entry = hook_entry(hook)
    signature = re.match(r"\s*```\n(qlora_\w+)\((.*?)\) -> (.+?)\n```", entry, flags=re.DOTALL)
    assert signature and signature.group(1) == hook, f"{hook}: its entry starts with its signature in a ``` block"
    documented = argument_names(signature.group(2))
    assert documented == list(inspect.signature(getattr(hookspecs, hook)).parameters), \
        f"{hook}: the documented signature's arguments differ from hookspecs.py's"
    assert re.search(r"^\*\*Called\*\* \S", entry, flags=re.MULTILINE), \
        f"{hook}: its entry needs a '**Called** ...' paragraph saying when it is called"
    assert re.search(r"^\*\*Returns\*\* \S", entry, flags=re.MULTILINE), \
        f"{hook}: its entry needs a '**Returns** ...' paragraph saying what it returns"
    examples = re.findall(r"^```python\n(.*?)^```", entry, flags=re.MULTILINE | re.DOTALL)
    assert any(re.search(rf"@hookimpl(\(.*\))?\n(    )?def {hook}\(", block) for block in examples), \
        f"{hook}: its entry needs a ```python example with an @hookimpl def {hook}(...)"


def files_with_tests() -> list[Path]:
    files = list((ROOT / "tests").rglob("*.py")) + list(ROOT.glob("contrib/*/tests/**/*.py"))
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


@pytest.mark.parametrize("hook", HOOKS)
def test_a_test_implements_the_hook(hook):
    implementing = [f.relative_to(ROOT).as_posix() for f in files_with_tests()
                    if re.search(rf"def {hook}\(", f.read_text(encoding="utf-8"))]
    assert implementing, (f"{hook}: no test implements it; add a test plugin with 'def {hook}(' whose effect a "
                          f"test observes (see tests/test_hooks.py and tests/test_hooks_more.py)")
