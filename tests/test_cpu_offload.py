"""The cpu-offload plugin's placement arguments (the offload itself needs a GPU: benchmarks/gpu_features.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import BitsAndBytesConfig

from qlora_core.errors import ConfigError
from qlora_core.trainer import resolve


def kwargs_for(device):
    return {"dtype": torch.bfloat16, "device_map": {"": device},
            "quantization_config": BitsAndBytesConfig(load_in_4bit=True)}


def test_budget_becomes_device_map_auto_with_max_memory_for_this_gpu_and_the_cpu():
    cfg, plugins = resolve({}, plugins=["cpu-offload"],
                           overrides=["offload.gpu_memory=40GiB", "offload.cpu_memory=100GiB"])
    kwargs = kwargs_for(torch.device("cuda", 1))
    plugins.hook.qlora_model_load_kwargs(kwargs=kwargs, config=cfg)
    assert kwargs["device_map"] == "auto"
    assert kwargs["max_memory"] == {1: "40GiB", "cpu": "100GiB"}
    assert kwargs["quantization_config"].llm_int8_enable_fp32_cpu_offload is True


def test_on_the_cpu_nothing_changes():
    cfg, plugins = resolve({}, plugins=["cpu-offload"], overrides=["offload.gpu_memory=40GiB"])
    kwargs = kwargs_for("cpu")
    plugins.hook.qlora_model_load_kwargs(kwargs=kwargs, config=cfg)
    assert kwargs["device_map"] == {"": "cpu"} and "max_memory" not in kwargs
    assert kwargs["quantization_config"].llm_int8_enable_fp32_cpu_offload is False


def test_sizes_are_checked():
    with pytest.raises(ConfigError, match="offload.gpu_memory: must be a size such as 40GiB"):
        resolve({}, plugins=["cpu-offload"], overrides=["offload.gpu_memory=lots"])


def test_not_a_default():
    _, plugins = resolve({})
    assert "cpu-offload" not in plugins.names()
