"""The public API: every name of ``qlora_core.__all__`` exists, has its own docstring and an entry in docs/api.md."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import qlora_core

ROOT = Path(__file__).resolve().parent.parent
API_MD = (ROOT / "docs" / "api.md").read_text()
HEADINGS = re.findall(r"^### `(\w+)`\s*$", API_MD, flags=re.MULTILINE)
PUBLIC = list(qlora_core.__all__)


def test_the_public_api_is_not_empty_and_has_no_duplicates():
    assert len(PUBLIC) >= 25 and len(set(PUBLIC)) == len(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_exists(name):
    assert hasattr(qlora_core, name)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_has_an_entry_in_api_md(name):
    assert name in HEADINGS, f"docs/api.md needs a '### `{name}`' section"


def test_api_md_documents_only_public_names():
    assert sorted(set(HEADINGS) - set(PUBLIC)) == []
    assert len(HEADINGS) == len(set(HEADINGS))


def _doc_comment(name: str) -> str | None:
    """The ``#:`` comment right above ``NAME = ...`` in the module that defines a public constant."""
    for path in (ROOT / "qlora_core").rglob("*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(rf"^{name}\b.*=", line) and i and lines[i - 1].lstrip().startswith("#:"):
                return lines[i - 1]
    return None


@pytest.mark.parametrize("name", [n for n in PUBLIC if not n.startswith("__")])
def test_every_public_name_has_its_own_docstring(name):
    obj = getattr(qlora_core, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        doc = inspect.getdoc(obj) or ""
        assert doc and not doc.startswith(f"{obj.__name__}("), f"{name} needs a docstring of its own"
    elif inspect.ismodule(obj):
        assert len((obj.__doc__ or "").strip()) > 40, f"the module {name} needs a docstring"
    else:
        assert _doc_comment(name), f"{name} needs a '#: ...' comment where it is defined"


def test_the_api_docs_examples_compile():
    for i, block in enumerate(re.findall(r"^```python\n(.*?)^```", API_MD, flags=re.MULTILINE | re.DOTALL)):
        compile(block, f"docs/api.md python block {i + 1}", "exec")
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module == "qlora_core":
                assert {a.name for a in node.names} <= set(PUBLIC)
