"""qlora-lion, installed (``pip install -e ./contrib/qlora-lion``) and tested with qlora's fixtures."""

from __future__ import annotations

import importlib.metadata as md
import json

import pytest
import torch
import yaml

from qlora_core import ConfigError, Job

PLUGIN = "lion"

# A plugin file that records which optimizer the run steps with.
PROBE = '''
import json
from qlora_core import hookimpl

@hookimpl
def qlora_on_train_start(run):
    inner = getattr(run.optimizer, "optimizer", run.optimizer)
    group = inner.param_groups[0]
    (run.output_dir / "optimizer.json").write_text(json.dumps({
        "class": type(inner).__module__ + "." + type(inner).__name__, "lr": group["lr"],
        "betas": list(group["betas"]), "weight_decay": group["weight_decay"]}))
'''


def test_the_package_registers_its_plugin_as_an_entry_point():
    ep = {e.name: e for e in md.entry_points(group="qlora")}[PLUGIN]
    assert ep.value == "qlora_lion" and ep.dist.name == "qlora-lion"


def test_requesting_it_replaces_the_default_optimizer(qlora_plugins):
    _, plugins = qlora_plugins()
    assert PLUGIN not in plugins.names()  # installed, but in no run that does not ask for it
    for names, overrides in (([PLUGIN], []), ([], ["train.optim=lion"])):
        _, plugins = qlora_plugins(*names, overrides=overrides)
        assert plugins.implementers("qlora_optimizer") == [PLUGIN]
        assert "paged-adamw-8bit" not in plugins.names()


def test_the_learning_rate_is_scaled_and_the_decay_keeps_adamws_per_step_decay(qlora_plugins):
    from lion_pytorch import Lion

    config, plugins = qlora_plugins(PLUGIN, overrides=["train.learning_rate=1e-3", "train.weight_decay=0.03"])
    plugins.hook.qlora_configure(config=config, device="cpu")
    optimizer = plugins.hook.qlora_optimizer(params=[torch.nn.Parameter(torch.zeros(4))], config=config)
    assert isinstance(optimizer, Lion)
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(3e-4) and group["betas"] == (0.9, 0.99)
    assert group["weight_decay"] == pytest.approx(0.1)  # lr * weight_decay as AdamW's 1e-3 * 0.03
    assert config["lion.weight_decay"] == pytest.approx(0.1)  # recorded as used

    config, plugins = qlora_plugins(PLUGIN, overrides=["lion.lr_scale=0.1", "lion.beta1=0.95", "lion.beta2=0.98",
                                                       "lion.weight_decay=0.5"])
    plugins.hook.qlora_configure(config=config, device="cpu")
    group = plugins.hook.qlora_optimizer(params=[torch.nn.Parameter(torch.zeros(4))], config=config).param_groups[0]
    assert group["lr"] == pytest.approx(config["train.learning_rate"] * 0.1)
    assert group["betas"] == (0.95, 0.98) and group["weight_decay"] == 0.5


@pytest.mark.parametrize("override, message", [
    ("lion.lr_scale=0", "lion.lr_scale: must be > 0"),
    ("lion.lr_scale=3", "lion.lr_scale: must be <= 1 (got 3.0)"),
    ("lion.beta1=1.5", "lion.beta1: must be <= 1 (got 1.5)"),
    ("lion.beta2=-0.1", "lion.beta2: must be >= 0"),
    ("lion.weight_decay=lots", "lion.weight_decay: must be a number"),
])
def test_a_bad_option_value_is_a_config_error(qlora_plugins, override, message):
    with pytest.raises(ConfigError) as err:
        qlora_plugins(PLUGIN, overrides=[override])
    assert message in str(err.value)


def test_a_zero_learning_rate_is_a_config_error(qlora_tiny_config):
    with pytest.raises(ConfigError, match=r"train.learning_rate: Lion needs a learning rate > 0 \(got 0.0\)"):
        Job(qlora_tiny_config, plugins=[PLUGIN], overrides=["train.learning_rate=0"])


def test_a_short_run_trains_with_lion(qlora_run, tmp_path):
    probe = tmp_path / "lion_probe.py"
    probe.write_text(PROBE)
    result = qlora_run(PLUGIN, str(probe), max_steps=6, weight_decay=0.01)
    assert result.steps == 6
    loss = {m["step"]: m["loss"] for m in result.metrics if "loss" in m}
    assert loss[6] < loss[1]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    used = json.loads((result.output_dir / "plugins.json").read_text())
    assert [p["name"] for p in used if "qlora_optimizer" in p["hooks"]] == [PLUGIN]
    stepped = json.loads((result.output_dir / "optimizer.json").read_text())
    assert stepped["class"] == "lion_pytorch.lion_pytorch.Lion"
    assert stepped["lr"] == pytest.approx(1e-3 * 0.3) and stepped["weight_decay"] == pytest.approx(0.01 / 0.3)
    saved = yaml.safe_load((result.output_dir / "config.yaml").read_text())
    assert saved["lion"]["weight_decay"] == pytest.approx(0.01 / 0.3)
