"""The cpu-offload plugin: its placement plan and the hooks that carry hidden states between devices.

A GPU is needed for the real split (benchmarks/gpu_features.py); here the "GPU" side is the CPU too, which
checks the planning, the budget errors and that the hooks leave the model's outputs unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qlora_core.framework.errors import ConfigError, UsageError
from qlora_core import Job, resolve
from qlora_plugins import cpu_offload


def test_on_a_gpu_the_model_is_loaded_on_the_cpu_and_placed_afterwards():
    cfg, plugins = resolve({}, plugins=["cpu-offload"], overrides=["offload.gpu_memory=40GiB"])
    kwargs = {"device_map": {"": torch.device("cuda", 1)}}
    plugins.hook.qlora_model_load_kwargs(kwargs=kwargs, config=cfg)
    assert kwargs["device_map"] == {"": "cpu"}
    assert cpu_offload._TARGET.pop(id(cfg)) == torch.device("cuda", 1)


def test_on_the_cpu_nothing_changes():
    cfg, plugins = resolve({}, plugins=["cpu-offload"])
    kwargs = {"device_map": {"": "cpu"}}
    plugins.hook.qlora_model_load_kwargs(kwargs=kwargs, config=cfg)
    assert kwargs["device_map"] == {"": "cpu"} and id(cfg) not in cpu_offload._TARGET


def test_leading_layers_fill_the_budget_next_to_the_fixed_part():
    assert cpu_offload.plan_placement([10, 10, 10, 10], fixed=25, budget=50) == 2
    assert cpu_offload.plan_placement([10, 10], fixed=25, budget=1000) == 2
    assert cpu_offload.plan_placement([10, 10], fixed=45, budget=50) == 0


def test_sizes_are_parsed_and_checked():
    assert cpu_offload.parse_size("40GiB") == 40 * 2**30
    assert cpu_offload.parse_size("500 MB") == 500 * 10**6
    with pytest.raises(ConfigError, match="offload.gpu_memory: must be a size such as 40GiB"):
        resolve({}, plugins=["cpu-offload"], overrides=["offload.gpu_memory=lots"])


def test_placement_hooks_keep_the_outputs_and_budgets_are_enforced(tiny_config, tmp_path):
    job = Job(copy.deepcopy(tiny_config), output_dir=tmp_path / "run")
    model = job.load_base_model(for_training=False)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layers = cpu_offload.decoder_layers(model)
    one_layer = cpu_offload.module_bytes(layers[0])
    inside = set(layers.modules())
    outside = {id(t): t for m in model.modules() if m not in inside
               for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))}
    fixed = sum(t.numel() * t.element_size() for t in outside.values())
    with pytest.raises(UsageError, match="offload.gpu_memory holds no decoder layer"):
        cpu_offload.place(model, torch.device("cpu"), fixed + one_layer // 2, 2**40)
    with pytest.raises(UsageError, match="offload.cpu_memory allows"):
        cpu_offload.place(model, torch.device("cpu"), fixed + one_layer, 1)
    on_gpu, on_cpu = cpu_offload.place(model, torch.device("cpu"), fixed + one_layer, 2**40)
    assert (on_gpu, on_cpu) == (1, 1)
    assert hasattr(layers[1], "_hf_hook") and hasattr(model.model.norm, "_hf_hook")
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before)


def test_not_a_default():
    _, plugins = resolve({})
    assert "cpu-offload" not in plugins.names()
