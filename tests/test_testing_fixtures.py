"""qlora_core.testing: the fixtures plugin authors get through the pytest11 entry point."""

from __future__ import annotations

import importlib.metadata as md
import json

from transformers import AutoModelForCausalLM


def test_the_fixtures_are_a_pytest_plugin_registered_by_qlora(pytestconfig):
    eps = {ep.name: ep.value for ep in md.entry_points(group="pytest11")}
    assert eps.get("qlora") == "qlora_core.testing"
    assert pytestconfig.pluginmanager.has_plugin("qlora")


def test_tiny_model_loads_with_the_real_tokenizer(qlora_tiny_model_dir, qlora_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(qlora_tiny_model_dir)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(qlora_tokenizer)
    ids = qlora_tokenizer("### Human: hi", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(qlora_tokenizer))


def test_tiny_dataset_and_config(qlora_tiny_dataset, qlora_tiny_config):
    rows = [json.loads(line) for line in qlora_tiny_dataset.read_text().splitlines()]
    assert len(rows) == 16 and all(r["text"].startswith("### Human: ") for r in rows)
    assert qlora_tiny_config["data"]["path"] == str(qlora_tiny_dataset)


def test_plugins_fixture_resolves_a_fresh_set_each_call(qlora_plugins):
    config, plugins = qlora_plugins("adamw")
    assert "adamw" in plugins.names() and "paged-adamw-8bit" not in plugins.names()
    config2, plugins2 = qlora_plugins()
    assert "paged-adamw-8bit" in plugins2.names() and plugins2 is not plugins
    config3, _ = qlora_plugins(overrides=["lora.r=4"])
    assert config3["lora.r"] == 4 and config["lora.r"] == 8


def test_run_fixture_trains_with_the_plugin_under_test(qlora_run):
    result = qlora_run("adamw", max_steps=4)
    assert result.steps == 4 and (result.adapter_dir / "adapter_model.safetensors").is_file()
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "adamw" in qlora_run.job.plugins.names()
    second = qlora_run(overrides=["train.max_steps=1"])
    assert second.output_dir != result.output_dir and second.steps == 1
