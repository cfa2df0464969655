"""Random weights: the base model built from its folder's ``config.json`` alone, with random weights, its
linear layers quantized straight into 4 bits on the device (``qlora_core.tools.shapes.build_direct``).

For measuring speed and memory of any architecture without downloading or storing its weights: a Llama-3-70B
shape builds in seconds on the GPU, where its bf16 checkpoint (140 GB) would not fit the disk. The folder needs
only ``config.json`` and a tokenizer. Quantization follows the quant plugin's ``quantization_config`` (type,
double quantization, storage dtype: FSDP's bf16 storage too); without one, every weight is drawn in the compute
dtype. The weights are drawn from seed 0 on the device, so every process of a distributed run, and a later
``Job.from_run`` for evaluation or generation, builds the same model.

    qlora run config.yaml --plugin random-weights
"""

from __future__ import annotations

from pathlib import Path

from qlora_core import hookimpl
from qlora_core import UsageError


@hookimpl
def qlora_load_base_model(name_or_path, kwargs, config):
    from qlora_core.tools.shapes import build_direct

    folder = Path(name_or_path)
    if not (folder / "config.json").is_file():
        raise UsageError(f"random-weights: {name_or_path!r} is not a folder with a config.json; point "
                         f"model.name_or_path at one (the weights are not needed)")
    device = (kwargs.get("device_map") or {}).get("", "cpu")
    quant = kwargs.get("quantization_config")
    load_in_4bit = bool(quant is not None and getattr(quant, "load_in_4bit", False))
    opts = {}
    if load_in_4bit:
        opts = {"quant_type": quant.bnb_4bit_quant_type, "double_quant": quant.bnb_4bit_use_double_quant,
                "quant_storage": quant.bnb_4bit_quant_storage}
    return build_direct(folder, str(device), kwargs["dtype"], seed=0, load_in_4bit=load_in_4bit, **opts)
