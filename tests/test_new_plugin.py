"""``qlora new-plugin`` writes plugin packages that install and pass their own tests; the packages that
docs/plugins.md shows (hello world, qlora-sgd and its tests) work as written.

Every package is installed for real, from a copy, into a folder of its own (``pip install --target``), never into
the environment running this suite, and its tests and commands run in subprocesses that see that folder.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from qlora_core import hookspecs
from qlora_core.cli import main as qlora_main

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_MD = (ROOT / "docs" / "plugins.md").read_text()

HOOKS = [name for name, obj in vars(hookspecs).items() if name.startswith("qlora_") and hasattr(obj, "qlora_spec")]
PRINTER = "loss-printer"  # generated as it comes
EVERY = "every-hook"  # generated with --hook for every hook


def section(markdown: str, heading: str) -> str:
    """The text of a markdown section, up to the next heading of the same or a higher level (outside code)."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = markdown.splitlines(keepends=True)
    start = lines.index(heading + "\n")
    fenced = False
    for i in range(start + 1, len(lines)):
        if lines[i].startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", lines[i]):
            return "".join(lines[start:i])
    return "".join(lines[start:])


def labelled_files(text: str) -> dict[str, str]:
    """The code blocks a markdown text introduces with a file name: "`path`:" then the block."""
    return dict(re.findall(r"^`([\w./-]+)`:\n\n```\w*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL))


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def write_files(folder: Path, files: dict[str, str]) -> Path:
    for path, content in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(content)
    return folder


def env_with(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def new_plugin(capsys, *args: str) -> tuple[int, str, str]:
    """``qlora new-plugin ARGS`` through the command line's own entry function: exit code, stdout, stderr."""
    try:
        code = qlora_main(["new-plugin", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


HELLO = labelled_files(section(PLUGINS_MD, "## Hello world in 20 lines"))
SGD = labelled_files(section(PLUGINS_MD, "## Writing a plugin package"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Two generated packages and the documented ones (hello, sgd), each installed from a copy into ``site``."""
    from qlora_core.tools.new_plugin import new_plugin as write_package

    work = tmp_path_factory.mktemp("new-plugin")
    printer = write_package(PRINTER, work)
    every = write_package(EVERY, work, HOOKS)
    hello = write_files(work / "qlora-hello", {p.removeprefix("qlora-hello/"): t for p, t in HELLO.items()})
    sgd = write_files(work / "qlora-sgd", SGD)
    copies = [shutil.copytree(p, work / "copies" / p.name) for p in (printer, every, hello, sgd)]
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--no-input", "--no-compile", "--target", str(site), *map(str, copies)],
                   check=True, capture_output=True, text=True, env={**os.environ, "PIP_NO_INDEX": "1"})
    # Their tests start now, in the background, and test_installed_packages_pass_their_own_tests (the last
    # test of this file) waits for them: the other tests run meanwhile.
    tests = [printer / "tests", every / "tests", sgd / "tests"]
    log = work / "pytest.log"
    with log.open("w") as out:
        own_tests = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, tests)],
                                     cwd=work, env=env_with(site), stdout=out, stderr=subprocess.STDOUT)
    yield {"work": work, "site": site, PRINTER: printer, EVERY: every, "sgd": sgd, "own_tests": own_tests,
           "log": log}
    if own_tests.poll() is None:
        own_tests.kill()
        own_tests.wait()


def test_the_generated_package_has_a_pyproject_entry_point_and_module(installed):
    pkg = installed[PRINTER]
    assert sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*") if p.is_file()) == [
        "README.md", "pyproject.toml", "qlora_loss_printer.py", "tests/test_qlora_loss_printer.py"]
    project = tomllib.loads((pkg / "pyproject.toml").read_text())
    assert project["project"]["name"] == "qlora-loss-printer"
    assert project["project"]["entry-points"]["qlora"] == {PRINTER: "qlora_loss_printer"}
    assert project["tool"]["setuptools"]["py-modules"] == ["qlora_loss_printer"]
    assert "pip install ./qlora-loss-printer" in (pkg / "README.md").read_text()
    # Nothing else was left in the parent folder (the temporary folder was renamed).
    assert sorted(p.name for p in installed["work"].iterdir() if p.name.startswith((".", "qlora-loss"))) == [
        "qlora-loss-printer"]


def test_every_hook_asked_for_is_implemented_with_the_hooks_arguments(installed):
    tree = ast.parse((installed[EVERY] / "qlora_every_hook.py").read_text())
    impls = {fn.name: [a.arg for a in fn.args.args] for fn in tree.body if isinstance(fn, ast.FunctionDef)}
    assert sorted(impls) == sorted(HOOKS)
    for name, args in impls.items():
        assert args == list(getattr(hookspecs, name).__code__.co_varnames[:len(args)]), name
        assert len(args) == getattr(hookspecs, name).__code__.co_argcount, name


def test_qlora_plugins_lists_the_installed_packages_with_their_distributions(installed):
    proc = subprocess.run([sys.executable, "-m", "qlora_core", "plugins", "--json"], env=env_with(installed["site"]),
                          capture_output=True, text=True, check=True)
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    printer = rows[PRINTER]
    assert printer["distribution"] == "qlora-loss-printer" and printer["version"] == "0.1.0"
    assert printer["entry_point"] == "qlora_loss_printer" and printer["default"] is False
    assert printer["hooks"] == ["qlora_config_options", "qlora_on_log"] and "error" not in printer
    assert Path(printer["file"]).parent == installed["site"]
    assert rows[EVERY]["distribution"] == "qlora-every-hook" and sorted(rows[EVERY]["hooks"]) == sorted(HOOKS)
    assert rows["hello"]["distribution"] == "qlora-hello" and rows["hello"]["hooks"] == ["qlora_on_log"]


def test_hello_world_is_at_most_20_lines_and_prints_at_every_logging_step(installed, qlora_tiny_config, tmp_path):
    assert sorted(HELLO) == ["qlora-hello/pyproject.toml", "qlora-hello/qlora_hello.py"]
    assert sum(len(text.splitlines()) for text in HELLO.values()) <= 20
    assert "20 lines" in PLUGINS_MD.split("\n## ", 2)[1].splitlines()[0]
    install, run = blocks(section(PLUGINS_MD, "## Hello world in 20 lines"), "bash")[0].splitlines()
    assert install == "pip install ./qlora-hello"  # what the fixture did, into its own folder
    command = run.split()
    assert command[:4] == ["qlora", "run", "--plugin", "hello"]

    # The documented command on the tiny model instead of the embedded default job.
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(qlora_tiny_config))
    proc = subprocess.run([sys.executable, "-m", "qlora_core", "run", str(config), *command[2:],
                           "--output", str(tmp_path / "run")], env=env_with(installed["site"]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert len(logged) == 10  # --set train.max_steps=10, a row every step in the tiny config
    printed = [line for line in proc.stdout.splitlines() if line.startswith("hello from step")]
    assert printed == [f"hello from step {r['step']}: loss {r['loss']:.4f}" for r in logged]


@pytest.mark.parametrize("name", ["Hello", "1st", "my_plugin", "my--plugin", "trailing-", "-x", "qlora-x",
                                  "adamw", "a b", ""])
def test_a_bad_name_is_one_error_line_and_writes_nothing(name, tmp_path, capsys):
    code, out, err = new_plugin(capsys, "--dir", str(tmp_path), "--", name)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and repr(name) in err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_kept_as_it_is(tmp_path, capsys):
    existing = tmp_path / "qlora-mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    code, out, err = new_plugin(capsys, "mine", "--dir", str(tmp_path))
    assert code == 2 and out == ""
    assert err == f"error: {existing} exists already; remove it or pick another name or --dir\n"
    assert [p.name for p in tmp_path.iterdir()] == ["qlora-mine"]
    assert [p.name for p in existing.iterdir()] == ["notes.txt"] and (existing / "notes.txt").read_text() == "mine"


def test_an_unknown_hook_or_a_missing_parent_is_one_error_line(tmp_path, capsys):
    code, _, err = new_plugin(capsys, "mine", "--dir", str(tmp_path), "--hook", "on_sav")
    assert code == 2 and err == "error: --hook on_sav: no such hook; did you mean qlora_on_save, qlora_on_sample, " \
                                "qlora_on_log?\n"
    code, _, err = new_plugin(capsys, "mine", "--dir", str(tmp_path / "nowhere"))
    assert code == 2 and len(err.splitlines()) == 1 and "--dir" in err and "no such folder" in err
    assert list(tmp_path.iterdir()) == []


def test_hook_names_may_leave_out_the_prefix(tmp_path, capsys):
    code, out, err = new_plugin(capsys, "saver", "--dir", str(tmp_path), "--hook", "on_save", "--hook", "qlora_on_save")
    assert code == 0 and err == ""
    assert f"plugin package: {tmp_path / 'qlora-saver'}" in out
    tree = ast.parse((tmp_path / "qlora-saver" / "qlora_saver.py").read_text())
    names = [fn.name for fn in tree.body if isinstance(fn, ast.FunctionDef)]
    assert names == ["qlora_config_options", "qlora_on_log", "qlora_on_save"]


def test_installed_packages_pass_their_own_tests(installed):
    """The generated packages' tests, and docs/plugins.md's tests of qlora-sgd, in one pytest session."""
    code = installed["own_tests"].wait(timeout=600)
    output = installed["log"].read_text()
    assert code == 0, output[-5000:]
    assert re.search(r"^12 passed", output.splitlines()[-1]), output[-500:]
