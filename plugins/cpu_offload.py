"""CPU offload: the QLoRA guide's ``max_memory={0: "...", "cpu": "..."}`` for a model that does not fit the GPU.

The embeddings, the output head, the final norm and as many decoder layers as fit ``offload.gpu_memory`` go on
the GPU; the remaining decoder layers stay on the CPU, still in 4 bits, and run there (bitsandbytes' CPU
kernels). Hidden states cross between the devices at the layer boundaries (accelerate's ``AlignDevicesHook``),
and autograd carries the gradients back across. Much slower, as the guide warns: the last resort after
smaller batches, lower rank and gradient checkpointing.

    qlora run config.yaml --plugin cpu-offload --set offload.gpu_memory=20GiB --set offload.cpu_memory=100GiB

Why not transformers' ``device_map="auto"`` with ``max_memory``, as the guide writes it: measured on an H200
(transformers 5.17, accelerate 1.15, bitsandbytes 0.50.2, ``benchmarks/gpu_features.py``), that path offloads
the CPU part's 4-bit layers to the meta device, moving their weights in at every forward, and bitsandbytes'
layers cannot be moved from there ("Tensor.item() cannot be called on meta tensors"). Running the CPU part on
the CPU avoids moving weights at all.

For training only: ``qlora generate`` / ``qlora eval`` of such a run load the model on the CPU.
"""

from __future__ import annotations

import re

from qlora_core import hookimpl
from qlora_core import Option
from qlora_core import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# The GPU the run would use, recorded at load time for the placement after it (keyed by the config object).
_TARGET: dict[int, object] = {}


def _check_size(value: str) -> str | None:
    return None if value == "auto" or _SIZE.match(value) else f"must be a size such as 40GiB or 500MB (got {value!r})"


def parse_size(value: str) -> int:
    number, unit = _SIZE.match(value).groups()
    return int(float(number) * _UNITS[unit.lower()])


@hookimpl
def qlora_config_options():
    return [
        Option("offload.gpu_memory", "str", "auto",
               "GPU memory for the model's weights (e.g. 20GiB); auto: 90% of what is free", check=_check_size),
        Option("offload.cpu_memory", "str", "auto",
               "CPU memory the offloaded layers may take (e.g. 100GiB); auto: 90% of what is available",
               check=_check_size),
    ]


@hookimpl
def qlora_model_load_kwargs(kwargs, config) -> None:
    import torch

    device_map = kwargs.get("device_map")
    if not (isinstance(device_map, dict) and len(device_map) == 1):
        return  # another plugin placed the model already
    target = torch.device(next(iter(device_map.values())))
    if target.type != "cuda":
        return  # on the CPU there is nothing to offload from
    # Load (and quantize) on the CPU; qlora_prepare_model moves what fits to the GPU.
    kwargs["device_map"] = {"": "cpu"}
    _TARGET[id(config)] = target


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers as stored (4-bit weights packed, with their constants)."""
    total = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    for p in module.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += sum(t.numel() * t.element_size() for t in _state_tensors(state))
    return total


def _state_tensors(state) -> list:
    import torch

    out = [v for v in (getattr(state, "absmax", None), getattr(state, "code", None)) if isinstance(v, torch.Tensor)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        out += _state_tensors(nested)
    return out


def decoder_layers(model):
    """The model's list of decoder layers (``model.model.layers`` for Llama-like models)."""
    import torch

    count = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise UsageError("cpu-offload: cannot find the model's decoder layers "
                     f"(a ModuleList of num_hidden_layers={count}); this architecture is not supported")


def plan_placement(sizes: list[int], fixed: int, budget: int) -> int:
    """How many leading decoder layers fit on the GPU next to the ``fixed`` bytes that must go there."""
    used, fit = fixed, 0
    for size in sizes:
        if used + size > budget:
            break
        used += size
        fit += 1
    return fit


def place(model, gpu, budget: int, cpu_budget: int) -> tuple[int, int]:
    """Put everything but the trailing decoder layers that do not fit ``budget`` bytes on ``gpu``.

    :returns: (decoder layers on the GPU, decoder layers left on the CPU).
    """
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    layers = decoder_layers(model)
    inside = {id(m) for m in layers.modules()}
    outside = [m for m in model.modules() if id(m) not in inside]
    # Count each tensor once: tied embeddings and head share one.
    fixed = sum(t.numel() * t.element_size() for t in {id(t): t for m in outside for t in
                                                        list(m.parameters(recurse=False))
                                                        + list(m.buffers(recurse=False))}.values())
    sizes = [module_bytes(layer) for layer in layers]
    on_gpu = plan_placement(sizes, fixed, budget)
    if on_gpu == 0:
        raise UsageError(f"cpu-offload: offload.gpu_memory holds no decoder layer next to the embeddings and head "
                         f"({fixed / 2**20:.0f} MiB); raise it above {(fixed + sizes[0]) / 2**20:.0f} MiB")
    cpu_bytes = sum(sizes[on_gpu:])
    if cpu_bytes > cpu_budget:
        raise UsageError(f"cpu-offload: the layers left on the CPU need {cpu_bytes / 2**30:.1f} GiB but "
                         f"offload.cpu_memory allows {cpu_budget / 2**30:.1f} GiB; raise offload.gpu_memory or "
                         f"offload.cpu_memory")
    for m in outside:  # embeddings, head, norms, rotary tables: their own tensors only
        m._apply(lambda t: t.to(gpu), recurse=False)
    for layer in layers[:on_gpu]:
        layer.to(gpu)
    if on_gpu < len(layers):
        # Each layer takes its inputs on its own device; the modules around the layers (the final norm
        # after a CPU layer) take theirs on the GPU.
        for layer in layers[:on_gpu]:
            add_hook_to_module(layer, AlignDevicesHook(execution_device=gpu, io_same_device=False))
        for layer in layers[on_gpu:]:
            add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu", io_same_device=False))
        parent = next(m for m in model.modules() if any(c is layers for c in m.children()))
        for child in parent.children():
            if child is not layers:
                add_hook_to_module(child, AlignDevicesHook(execution_device=gpu, io_same_device=False))
    return on_gpu, len(layers) - on_gpu


@hookimpl(tryfirst=True)
def qlora_prepare_model(model, config) -> None:
    import sys

    import psutil
    import torch

    target = _TARGET.pop(id(config), None)
    if target is None:
        return
    index = target.index if target.index is not None else torch.cuda.current_device()
    gpu = config["offload.gpu_memory"]
    cpu = config["offload.cpu_memory"]
    budget = int(torch.cuda.mem_get_info(index)[0] * 0.9) if gpu == "auto" else parse_size(gpu)
    cpu_budget = int(psutil.virtual_memory().available * 0.9) if cpu == "auto" else parse_size(cpu)
    on_gpu, on_cpu = place(model, torch.device("cuda", index), budget, cpu_budget)
    print(f"qlora: cpu-offload: {on_gpu} decoder layers on cuda:{index}, {on_cpu} on the CPU", file=sys.stderr)
