"""The third-party plugin package in contrib/qlora-sharegpt, installed for real with pip.

The package is installed once per session into a temporary folder (``pip install --no-deps
--no-build-isolation --target``, from a copy of its source so the build leaves nothing in the repo) and
that folder is put on ``sys.path`` only by the tests that want it, so ``importlib.metadata`` sees its
``qlora`` entry point exactly as it would see an installed third-party package.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qlora_core.framework import plugins as core_plugins
from qlora_core.cli import main
from qlora_core.loop.data import IGNORE_INDEX
from qlora_core.framework.errors import UsageError
from qlora_core import Job, resolve

from conftest import labelled_runs

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "contrib" / "qlora-sharegpt"
PLUGIN = "sharegpt-format"
DEFAULT_FORMAT_PLUGINS = {"guanaco-format", "alpaca-format", "chat-format"}
END = "<|im_end|>"  # the SmolLM2 chat template's end of turn, trained with each answer

# Human/gpt turns, the user/assistant spelling, a system turn and two answers in one conversation.
ROWS = [
    {"conversations": [{"from": "human", "value": f"What is the code of item {i}?"},
                       {"from": "gpt", "value": f"The code of item {i} is {i * 7 % 10}."}]}
    for i in range(6)
] + [
    {"conversations": [{"from": "system", "value": "Answer in one short sentence."},
                       {"from": "user", "value": "Name a colour."},
                       {"from": "assistant", "value": "Blue is a colour."},
                       {"from": "human", "value": "And another?"},
                       {"from": "gpt", "value": "Green is another."}]},
    {"conversations": [{"from": "human", "value": "Say hi."},
                       {"from": "gpt", "value": "Hi there!"}]},
]


def gpt_answers(row) -> list[str]:
    return [t["value"] for t in row["conversations"] if t["from"] in ("gpt", "assistant")]


@pytest.fixture(scope="session")
def sharegpt_target(tmp_path_factory) -> Path:
    """The package installed by pip into a temporary target folder (not on sys.path yet)."""
    work = tmp_path_factory.mktemp("qlora-sharegpt")
    src = work / "src"
    shutil.copytree(PACKAGE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "site"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--target", str(target), str(src)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    assert (target / "qlora_sharegpt.py").is_file()
    assert list(target.glob("qlora_sharegpt-*.dist-info"))
    return target


@pytest.fixture
def sharegpt_installed(sharegpt_target, monkeypatch) -> Path:
    """The installed package visible to importlib (for this test only)."""
    monkeypatch.syspath_prepend(str(sharegpt_target))
    assert PLUGIN in core_plugins.entry_points()
    return sharegpt_target


@pytest.fixture
def sharegpt_file(tmp_path) -> Path:
    path = tmp_path / "sharegpt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture
def sharegpt_config(tiny_config, sharegpt_file) -> dict:
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["path"] = str(sharegpt_file)
    return cfg


def test_not_installed_without_the_fixture():
    # The package is not part of the environment: only the tests that install it see it.
    assert PLUGIN not in core_plugins.entry_points()


def test_installed_plugin_is_listed_but_not_used_unless_requested(sharegpt_installed, sharegpt_config):
    ep = core_plugins.entry_points()[PLUGIN]
    assert ep.value == "qlora_sharegpt" and ep.dist.name == "qlora-sharegpt"

    cfg, plugin_set = resolve(sharegpt_config)
    assert PLUGIN not in plugin_set.names()
    assert DEFAULT_FORMAT_PLUGINS <= set(plugin_set.implementers("qlora_dataset_formats"))

    with pytest.raises(UsageError) as err:
        Job(sharegpt_config).load_data()
    msg = str(err.value)
    assert "conversations" in msg and "fit no known format" in msg
    assert "guanaco (text)" in msg and "alpaca (instruction + output)" in msg and "chat (messages)" in msg
    assert "sharegpt" not in msg


def test_requested_plugin_loads_sharegpt_and_trains_only_the_gpt_answers(sharegpt_installed, sharegpt_config):
    job = Job(sharegpt_config, plugins=[PLUGIN])
    # A requested formatter replaces the default formats.
    assert PLUGIN in job.plugins.names()
    assert not DEFAULT_FORMAT_PLUGINS & set(job.plugins.names())
    assert job.plugins.implementers("qlora_dataset_formats") == [PLUGIN]

    train, evals = job.load_data()
    assert job.format.name == "sharegpt" and job.format.fields == ("conversations",)
    assert evals == [] and len(train) == len(ROWS)
    for example, row in zip(train, ROWS):
        assert labelled_runs(example, job.tokenizer) == [a + END for a in gpt_answers(row)]
        # The prompt, system turn and role markers are all masked out.
        assert example.labels[0] == IGNORE_INDEX


def test_unknown_from_value_is_a_clear_error(sharegpt_installed, sharegpt_config, smollm2_tokenizer, tmp_path):
    import qlora_sharegpt

    bad = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}
    with pytest.raises(ValueError, match=r"turn 1 has unknown 'from' value 'bot'; expected one of: human, user, gpt, assistant, system"):
        qlora_sharegpt.SHAREGPT.format(bad, smollm2_tokenizer)
    with pytest.raises(ValueError, match="no 'gpt' turn"):
        qlora_sharegpt.SHAREGPT.format({"conversations": [{"from": "human", "value": "Hi"}]}, smollm2_tokenizer)

    # Through a run, the row is named in a usage error.
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(bad) + "\n")
    cfg = copy.deepcopy(sharegpt_config)
    cfg["data"]["path"] = str(path)
    with pytest.raises(UsageError, match=r"row 1 does not fit format 'sharegpt'.*'bot'"):
        Job(cfg, plugins=[PLUGIN]).load_data()


def test_qlora_plugins_json_shows_distribution_and_version(sharegpt_installed, capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    version = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]["version"]
    row = rows[PLUGIN]
    assert row["distribution"] == "qlora-sharegpt"
    assert row["version"] == version
    assert row["default"] is False
    assert row["hooks"] == ["qlora_dataset_formats"]
    assert "error" not in row


def test_short_training_run_on_sharegpt_data(sharegpt_installed, sharegpt_config, tmp_path):
    cfg = copy.deepcopy(sharegpt_config)
    cfg["train"]["max_steps"] = 2
    out = tmp_path / "run"
    result = Job(cfg, plugins=[PLUGIN], output_dir=out).run()
    assert result.steps == 2
    assert len(result.metrics) >= 2
    assert all(m["loss"] == m["loss"] for m in result.metrics if "loss" in m)  # no NaN
    recorded = json.loads((out / "plugins.json").read_text())
    names = [p["name"] for p in recorded] if isinstance(recorded, list) else list(recorded)
    assert PLUGIN in names
    assert (result.adapter_dir / "adapter_config.json").is_file()
