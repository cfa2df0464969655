"""Config: YAML + --set overrides, validated, every problem reported together by key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qlora_core import cli
from qlora_core.framework.config import CORE_OPTIONS, build_config
from qlora_core.framework.errors import ConfigError, UsageError
from qlora_core import resolve


def test_defaults_follow_the_guide_vocabulary():
    cfg, _ = resolve({})
    assert cfg["quant.bnb_4bit_quant_type"] == "nf4"
    assert cfg["quant.bnb_4bit_use_double_quant"] is True
    assert cfg["lora.target_modules"] == "all-linear"
    assert cfg["train.learning_rate"] == 2e-4


def test_no_config_means_the_embedded_default_job():
    cfg, _ = resolve(None)
    assert cfg["model.name_or_path"] == "embedded:smollm2-135m-instruct"
    assert cfg["data.path"] == "embedded:secret-rules"
    assert cfg["train.max_steps"] > 0


def test_set_overrides_dotted_keys_and_coerces_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lora": {"r": 8}}))
    cfg, _ = resolve(path, overrides=["lora.r=32", "train.learning_rate=2e-4", "lora.target_modules=[q_proj, v_proj]",
                                      "data.train_on_prompt=true"])
    assert cfg["lora.r"] == 32
    assert cfg["train.learning_rate"] == pytest.approx(2e-4)
    assert cfg["lora.target_modules"] == ["q_proj", "v_proj"]
    assert cfg["data.train_on_prompt"] is True


def test_all_problems_are_reported_together_each_naming_its_key():
    with pytest.raises(ConfigError) as e:
        resolve({"lora": {"r": 0, "lora_dropout": 1.5, "rank": 4},
                 "train": {"learning_rate": -1, "per_device_train_batch_size": "four"}})
    problems = e.value.problems
    assert len(problems) == 5
    text = str(e.value)
    assert "lora.r: must be > 0 (got 0)" in text
    assert "lora.lora_dropout: must be < 1" in text
    assert "lora.rank: unknown key" in text
    assert "train.learning_rate: must be >= 0" in text
    assert "train.per_device_train_batch_size: must be an integer (got 'four')" in text


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"train.learnig_rate: unknown key \(did you mean train.learning_rate\?\)"):
        resolve({"train": {"learnig_rate": 1e-4}})


def test_choices_are_checked():
    with pytest.raises(ConfigError, match="quant.bnb_4bit_quant_type: must be one of nf4, fp4"):
        resolve({"quant": {"bnb_4bit_quant_type": "int3"}})


def test_a_value_where_a_section_belongs_is_reported():
    with pytest.raises(ConfigError, match="lora: must be a section"):
        build_config({"lora": 5}, CORE_OPTIONS, [])


def test_config_set_checks_values_like_the_file():
    cfg, _ = resolve({})
    cfg.set("lora.r", "64")
    assert cfg["lora.r"] == 64
    with pytest.raises(ConfigError, match="lora.r: must be > 0"):
        cfg.set("lora.r", -2)


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  r: [1, 2\n")
    with pytest.raises(UsageError, match=r"bad.yaml' is not valid YAML at line"):
        resolve(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        resolve(tmp_path / "nope.yaml")


def test_malformed_set_is_a_usage_error():
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        resolve({}, overrides=["lora.r"])


def test_cli_config_error_is_one_line_with_exit_code_2(tmp_path, capsys):
    code = cli.main(["run", "--set", "lora.r=0", "--set", "train.learning_rate=-1", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: invalid config: ")
    assert "lora.r" in err and "train.learning_rate" in err
    assert not (tmp_path / "o").exists()


def test_cli_argparse_errors_also_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--no-such-flag"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_set_below_a_value_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="lora.r.x: lora.r is a value, not a section"):
        resolve({"lora": {"r": 8}}, overrides=["lora.r.x=1"])


def test_target_modules_given_with_commas_is_a_list():
    cfg, _ = resolve({}, overrides=["lora.target_modules=q_proj,v_proj"])
    assert cfg["lora.target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    cfg, plugins = resolve(path)
    assert cfg["quant.bnb_4bit_quant_type"] == "nf4"
    assert plugins.implementers("qlora_optimizer")
