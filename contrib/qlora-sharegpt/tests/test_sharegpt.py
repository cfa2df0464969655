"""qlora-sharegpt, installed (``pip install ./contrib/qlora-sharegpt``) and tested with qlora's own fixtures."""

from __future__ import annotations

import copy
import importlib.metadata as md
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qlora_core import IGNORE_INDEX, Job, UsageError
from qlora_core import testing

import qlora_sharegpt

PACKAGE = Path(__file__).resolve().parents[1]
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


@pytest.fixture
def sharegpt_config(qlora_tiny_config, tmp_path) -> dict:
    cfg = copy.deepcopy(qlora_tiny_config)
    cfg["data"]["path"] = str(testing.write_jsonl(tmp_path / "sharegpt.jsonl", ROWS))
    return cfg


def test_the_package_registers_its_plugin_as_an_entry_point():
    ep = {e.name: e for e in md.entry_points(group="qlora")}[PLUGIN]
    assert ep.value == "qlora_sharegpt" and ep.dist.name == "qlora-sharegpt"


def test_installed_plugin_is_not_used_unless_requested(qlora_plugins, sharegpt_config):
    _, plugin_set = qlora_plugins(config=sharegpt_config)
    assert PLUGIN not in plugin_set.names()
    assert DEFAULT_FORMAT_PLUGINS <= set(plugin_set.implementers("qlora_dataset_formats"))

    with pytest.raises(UsageError) as err:
        Job(sharegpt_config).load_data()
    msg = str(err.value)
    assert "conversations" in msg and "fit no known format" in msg
    assert "guanaco (text)" in msg and "alpaca (instruction + output)" in msg and "chat (messages)" in msg
    assert "sharegpt" not in msg


def test_requested_plugin_loads_sharegpt_and_trains_only_the_gpt_answers(sharegpt_config):
    job = Job(sharegpt_config, plugins=[PLUGIN])
    # A requested formatter replaces the default formats.
    assert not DEFAULT_FORMAT_PLUGINS & set(job.plugins.names())
    assert job.plugins.implementers("qlora_dataset_formats") == [PLUGIN]

    train, evals = job.load_data()
    assert job.format.name == "sharegpt" and job.format.fields == ("conversations",)
    assert evals == [] and len(train) == len(ROWS)
    for example, row in zip(train, ROWS):
        assert testing.labelled_runs(example, job.tokenizer) == [a + END for a in gpt_answers(row)]
        # The prompt, system turn and role markers are all masked out.
        assert example.labels[0] == IGNORE_INDEX


def test_unknown_from_value_is_a_clear_error(sharegpt_config, qlora_tokenizer, tmp_path):
    bad = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}
    with pytest.raises(ValueError, match=r"turn 1 has unknown 'from' value 'bot'; expected one of: human, user, "
                                         r"gpt, assistant, system"):
        qlora_sharegpt.SHAREGPT.format(bad, qlora_tokenizer)
    with pytest.raises(ValueError, match="no 'gpt' turn"):
        qlora_sharegpt.SHAREGPT.format({"conversations": [{"from": "human", "value": "Hi"}]}, qlora_tokenizer)

    # Through a run, the row is named in a usage error.
    cfg = copy.deepcopy(sharegpt_config)
    cfg["data"]["path"] = str(testing.write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], bad]))
    with pytest.raises(UsageError, match=r"row 1 does not fit format 'sharegpt'.*'bot'"):
        Job(cfg, plugins=[PLUGIN]).load_data()


def test_qlora_plugins_lists_it_with_its_distribution_and_version():
    out = subprocess.run([sys.executable, "-m", "qlora_core", "plugins", "--json"], capture_output=True,
                         text=True, check=True).stdout
    row = {r["name"]: r for r in json.loads(out)}[PLUGIN]
    version = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]["version"]
    assert row["distribution"] == "qlora-sharegpt" and row["version"] == version
    assert row["default"] is False and row["hooks"] == ["qlora_dataset_formats"] and "error" not in row


def test_short_training_run_on_sharegpt_data(qlora_run, sharegpt_config):
    result = qlora_run(PLUGIN, config=sharegpt_config, max_steps=2)
    assert result.steps == 2
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # no NaN
    recorded = json.loads((result.output_dir / "plugins.json").read_text())
    assert PLUGIN in [p["name"] for p in recorded]
    assert (result.adapter_dir / "adapter_config.json").is_file()
