"""The speed levers of the decoder layers are plugins: gradient checkpointing (recomputation, offload, the memory
budget), the fused 4-bit LoRA op with its NF4 kernel, compiled layers and liger-kernel. Turned off, the run trains
on plain PyTorch and PEFT and their keys are unknown; on, they act where the loop calls their hooks."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from qlora_core import ConfigError, Job
from qlora_plugins import nf4_kernel
from qlora_plugins.fused_lora import fused_count
from qlora_plugins.gradient_checkpointing import layer_policy

SPEED_PLUGINS = ("gradient-checkpointing", "fused-lora", "compile-layers", "liger-kernels")
OFF = [f"no:{name}" for name in SPEED_PLUGINS]


def test_without_the_speed_plugins_the_tiny_model_trains_on_plain_pytorch_and_peft(tiny_config, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setattr(nf4_kernel, "enabled", False)  # as in a process where no fused-lora run came before
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(max_steps=25, learning_rate=5e-3, per_device_train_batch_size=16, warmup_steps=0,
                        lr_scheduler_type="constant")
    job = Job(cfg, plugins=["adamw", "no:rich-progress", *OFF], output_dir=tmp_path / "run")
    result = job.run()
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert len(losses) == 25 and losses[-1] < 0.5 * losses[0], losses
    assert not set(SPEED_PLUGINS) & set(job.plugins.names())
    # Nothing of the levers on the model: PEFT's LoRA forward, the decoder layers' own forward, uncompiled.
    assert layer_policy(job.model) is None and fused_count(job.model) == 0
    layers = job.model.get_base_model().model.layers
    assert all(not hasattr(layer, "_qlora_original_forward") for layer in layers)
    assert not nf4_kernel.enabled  # nothing switched the one-kernel dequantization on: bitsandbytes' own


@pytest.mark.parametrize("plugin, key, value", [
    ("gradient-checkpointing", "train.activation_offload", False),
    ("gradient-checkpointing", "train.lean_recompute", False),
    ("gradient-checkpointing", "train.gpu_memory_budget", 10),
    ("fused-lora", "train.fused_lora", True),
    ("fused-lora", "train.fast_dequant", False),
    ("compile-layers", "train.compile", True),
])
def test_a_key_of_a_plugin_that_is_off_is_an_unknown_key(tiny_config, plugin, key, value):
    Job(tiny_config, overrides=[(key, value)])  # the plugin on (a default): a known key
    with pytest.raises(ConfigError, match=f"{key}: unknown key"):
        Job(tiny_config, plugins=[f"no:{plugin}"], overrides=[(key, value)])


def test_compile_layers_runs_after_fused_lora_and_auto_leaves_fused_layers_uncompiled(tiny_config, tmp_path,
                                                                                      monkeypatch):
    """train.compile's auto compiles on CUDA unless the layers are fused: the compile-layers plugin decides after
    the fused-lora plugin fused them (CUDA is stood in for on the CPU; compiling is lazy, nothing is built)."""
    from qlora_plugins import compile_layers, fused_lora

    monkeypatch.setattr(fused_lora, "on_cuda", lambda model: True)
    monkeypatch.setattr(compile_layers, "on_cuda", lambda model: True)

    def model(name, *plugins):
        job = Job(tiny_config, plugins=list(plugins), output_dir=tmp_path / name)
        job.load_data()
        return job.load_model()

    fused = model("fused")
    assert fused_count(fused) == 7 * 2 and not layer_policy(fused).compiled  # q k v o gate up down, 2 layers
    unfused = model("unfused", "no:fused-lora")
    assert fused_count(unfused) == 0 and layer_policy(unfused).compiled
    alone = model("alone", "no:fused-lora", "no:gradient-checkpointing")  # compiled without checkpointing too
    policy = layer_policy(alone)
    assert policy.compiled and policy.checkpointed == 0


def test_the_fused_lora_plugin_switches_the_nf4_kernel_for_its_run_only(tiny_config, tmp_path):
    job = Job(tiny_config, plugins=["no:rich-progress"], output_dir=tmp_path / "on")
    job.load_data()
    job.load_model()
    assert nf4_kernel.enabled  # train.fast_dequant's default
    job.train()
    assert not nf4_kernel.enabled  # the run is over: the next one makes its own choice
    off = Job(tiny_config, overrides=["train.fast_dequant=false"], output_dir=tmp_path / "off")
    off.load_data()
    off.load_model()
    assert not nf4_kernel.enabled


def test_liger_says_when_it_is_missing_on_cuda_as_training_starts(monkeypatch):
    import builtins

    from qlora_plugins.liger import LigerKernels

    real_import = builtins.__import__

    def no_liger(name, *args, **kwargs):
        if name.startswith("liger_kernel"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_liger)
    on_cuda = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(is_cuda=True)]))
    notices = []
    run = SimpleNamespace(notice=notices.append)
    plugin = LigerKernels()
    plugin.qlora_prepare_model(model=on_cuda, config=None)
    plugin.qlora_on_train_start(run=run)
    assert notices == ["liger-kernel is not installed: training without its fused kernels "
                       "(pip install 'qlora[gpu]')"]
    on_cpu = LigerKernels()
    on_cpu.qlora_prepare_model(model=SimpleNamespace(parameters=lambda: iter([SimpleNamespace(is_cuda=False)])),
                               config=None)
    on_cpu.qlora_on_train_start(run=run)
    assert len(notices) == 1


def test_the_speed_plugins_offer_their_bench_variants_on_their_own_keys():
    """Each plugin's ``qlora bench`` variants set only keys that plugin declares (or turn plugins off)."""
    from qlora_core.framework.plugins import load_plugin

    offered = {}
    for name in SPEED_PLUGINS:
        plugin = load_plugin(name).plugin
        variants = plugin.qlora_bench_variants()
        keys = {o.key for o in (plugin.qlora_config_options() if hasattr(plugin, "qlora_config_options") else [])}
        for variant, spec in variants.items():
            assert spec["help"]
            assert {s.split("=", 1)[0] for s in spec.get("set", [])} <= keys, variant
        offered.update(variants)
    assert set(offered) == {"qlora-lean-recompute", "qlora-offload", "qlora-checkpointing", "qlora+budget",
                            "qlora-fused-lora", "qlora-fast-dequant", "qlora+compile", "qlora-liger"}
    assert [v for v, spec in offered.items() if not spec.get("ablation")] == ["qlora-checkpointing"]


def test_gradient_checkpointing_tells_the_plan_it_recomputes_and_offloads(tiny_config):
    from qlora_core import resolve

    for value, offload in (("auto", True), (False, False)):
        config, plugins = resolve(tiny_config, overrides=[("train.activation_offload", value)])
        settings = SimpleNamespace(checkpointing=False, offload=False)  # the core's: every activation kept
        plugins.pm.get_plugin("gradient-checkpointing").qlora_plan_settings(settings=settings, config=config)
        assert settings.checkpointing and settings.offload is offload
