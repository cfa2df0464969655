"""CPU offload: the QLoRA guide's ``device_map="auto"`` with ``max_memory={0: "...", "cpu": "..."}``.

The layers beyond the GPU budget are placed on the CPU by accelerate. Much slower, as the guide warns:
the last resort after smaller batches, lower rank and gradient checkpointing.

Known limitation (measured on an H200 with transformers 5.17, accelerate 1.15, bitsandbytes 0.50.2, see
benchmarks/gpu_features.py): when the budget splits the model between GPU and CPU, accelerate offloads the
CPU part's 4-bit layers to the meta device, and bitsandbytes cannot be moved from there
("Tensor.item() cannot be called on meta tensors" with double quantization, "Cannot copy out of meta
tensor" without). A budget too small for even the first layers places the whole model on the CPU, which
trains (slowly). Executing the CPU part on the CPU instead of offloading it is the fix still to make.

    qlora run config.yaml --plugin cpu-offload --set offload.gpu_memory=20GiB --set offload.cpu_memory=100GiB
"""

from __future__ import annotations

import re

from qlora_core import hookimpl
from qlora_core.config import Option

_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)


def _size(value: str) -> str | None:
    return None if _SIZE.match(value) else f"must be a size such as 40GiB or 500MB (got {value!r})"


@hookimpl
def qlora_config_options():
    return [
        Option("offload.gpu_memory", "str", "auto",
               "GPU memory the model's weights may use on each GPU (e.g. 20GiB); auto: what is free, less a margin",
               check=lambda v: None if v == "auto" else _size(v)),
        Option("offload.cpu_memory", "str", "auto", "CPU memory for the layers that do not fit (e.g. 100GiB)",
               check=lambda v: None if v == "auto" else _size(v)),
    ]


def max_memory(config, gpu_index: int) -> dict:
    """The ``max_memory`` map for ``from_pretrained``: this process's GPU and the CPU, nothing else (under
    torchrun each process offloads from its own GPU)."""
    import psutil
    import torch

    gpu = config["offload.gpu_memory"]
    cpu = config["offload.cpu_memory"]
    return {
        # auto: what is free now, less 10% for the activations and the allocator.
        gpu_index: int(torch.cuda.mem_get_info(gpu_index)[0] * 0.9) if gpu == "auto" else gpu.replace(" ", ""),
        "cpu": int(psutil.virtual_memory().available * 0.9) if cpu == "auto" else cpu.replace(" ", ""),
    }


@hookimpl
def qlora_model_load_kwargs(kwargs, config) -> None:
    import torch

    device_map = kwargs.get("device_map")
    if not (isinstance(device_map, dict) and len(device_map) == 1):
        return  # another plugin placed the model already
    target = torch.device(next(iter(device_map.values())))
    if target.type != "cuda":
        return  # on the CPU there is nothing to offload from
    kwargs["device_map"] = "auto"
    kwargs["max_memory"] = max_memory(config, target.index or 0)
    quant = kwargs.get("quantization_config")
    if quant is not None and hasattr(quant, "llm_int8_enable_fp32_cpu_offload"):
        # bitsandbytes refuses a device map with CPU entries unless told the CPU layers stay in float32.
        quant.llm_int8_enable_fp32_cpu_offload = True
