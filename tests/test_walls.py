"""The architecture's walls: the core imports no plugin and no backend, plugins and contrib packages use only
qlora_core's public API, contrib never imports the built-in plugins.

The import-linter contracts in pyproject.toml state the first two for the installed packages (direct and
indirect imports); the AST check below also covers the contrib packages and imports made inside functions,
and checks that every name a plugin takes from qlora_core is public.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import qlora_core

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("bitsandbytes", "triton", "liger_kernel")


def imports(path: Path):
    """``(line, module, names)`` of every import in a file, at any depth (inside functions too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [a.name for a in node.names]


def crossings() -> list[str]:
    public = set(qlora_core.__all__)
    bad = []
    for path in sorted((ROOT / "qlora_core").rglob("*.py")):
        for line, module, _ in imports(path):
            top = module.split(".")[0]
            if top in ("qlora_plugins", "plugins") or top.startswith("qlora_sharegpt") or top in BACKENDS:
                bad.append(f"{path.relative_to(ROOT)}:{line} core imports {module}")
    for base in ("plugins", "contrib"):
        for path in sorted((ROOT / base).rglob("*.py")):
            for line, module, names in imports(path):
                where = f"{path.relative_to(ROOT)}:{line}"
                if module.startswith("qlora_core."):
                    bad.append(f"{where} imports inner module {module}")
                elif module == "qlora_core" and names:
                    bad += [f"{where} imports non-public qlora_core.{n}" for n in names if n not in public]
                elif base == "contrib" and module.split(".")[0] == "qlora_plugins":
                    bad.append(f"{where} contrib imports built-in plugin module {module}")
    return bad


def test_no_wall_is_crossed():
    assert crossings() == []


def test_the_check_sees_a_crossing(tmp_path, monkeypatch):
    """The check is not vacuous: a plugin reaching into the core's inside is reported."""
    fake = tmp_path / "plugins"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from qlora_core.loop.job import Job\n    from qlora_core import _nope\n")
    for folder in ("qlora_core", "contrib"):
        (tmp_path / folder).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert crossings() == ["plugins/bad.py:2 imports inner module qlora_core.loop.job",
                           "plugins/bad.py:3 imports non-public qlora_core._nope"]


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken" in done.stdout
