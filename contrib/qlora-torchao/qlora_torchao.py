"""Quant strategy without bitsandbytes: the base model's linear layers in torchao's NF4 (``torchao-nf4``).

The base model loads in the compute dtype (no ``quantization_config``), then every linear layer but the output
head gets its weight replaced by a frozen ``torchao`` ``NF4Tensor``: the QLoRA data type (4-bit NormalFloat in
blocks of 64, each block's absmax scale itself quantized to 8 bits in blocks of 256: double quantization), as
torchtune's QLoRA recipes use it. The layer stays a plain ``torch.nn.Linear``: ``F.linear`` on an
``NF4Tensor`` dequantizes the weight for the matmul and back-propagates to the input only, so PEFT wraps the
layer as it wraps any ``nn.Linear`` and trains its LoRA adapters through it.

Requested (``--plugin torchao-nf4``), it is the run's quantization concern and replaces the built-in ``nf4``
plugin: nothing of bitsandbytes is needed for the model. ``qlora merge`` and the ``merged-export`` plugin get
the weights the layers compute with (:func:`dequantize_nf4_model`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora_core import ConfigError, Option, hookimpl

if TYPE_CHECKING:
    import torch

PLUGIN = "torchao-nf4"


def _torchao():
    """torchao's NF4 API (``to_nf4``, ``NF4Tensor``). torchao tries to load its compiled kernels when imported
    and logs a warning for each that does not fit the machine (CUDA-only ones on a CPU): none is used by NF4,
    so those warnings are kept quiet."""
    import logging

    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization import NF4Tensor, to_nf4
    finally:
        logger.setLevel(level)
    return NF4Tensor, to_nf4


@hookimpl
def qlora_config_options():
    return [
        Option("torchao.block_size", "int", 64,
               "torchao-nf4: weights per NF4 block, each with its own absmax scale (QLoRA: 64)", minimum=2),
        Option("torchao.scaler_block_size", "int", 256,
               "torchao-nf4: block scales per double-quantization block (QLoRA: 256); smaller where a layer has "
               "fewer blocks or a count it does not divide", minimum=1),
    ]


@hookimpl
def qlora_configure(config, device) -> None:
    _torchao()  # imported here, its start-up warnings quiet, before PEFT or transformers import it
    problems = []
    if config["quant.bnb_4bit_quant_type"] != "nf4":
        problems.append(f"quant.bnb_4bit_quant_type: {config['quant.bnb_4bit_quant_type']!r} is not available "
                        f"with the {PLUGIN} plugin, which quantizes to NF4 only; set it to nf4 or use the nf4 "
                        f"plugin (bitsandbytes)")
    if not config["quant.bnb_4bit_use_double_quant"]:
        problems.append(f"quant.bnb_4bit_use_double_quant: false is not available with the {PLUGIN} plugin, whose "
                        f"NF4 always quantizes the block scales; set it to true or use the nf4 plugin")
    if config["quant.bnb_4bit_quant_storage"] != "uint8":
        problems.append(f"quant.bnb_4bit_quant_storage: {config['quant.bnb_4bit_quant_storage']!r} is not "
                        f"available with the {PLUGIN} plugin (torchao packs NF4 in uint8); set it to uint8")
    if "quant.skip_modules" in config and config["quant.skip_modules"]:
        problems.append(f"quant.skip_modules is not available with the {PLUGIN} plugin, which quantizes every "
                        f"linear layer but the output head; drop it or use the nf4 plugin (bitsandbytes)")
    # The gradient-checkpointing plugin's lean recomputation hands the frozen weight to a custom op of its own,
    # which a tensor subclass such as NF4Tensor cannot pass through: the layers are recomputed in full instead.
    lean = "train.lean_recompute"
    if lean in config and config[lean]:
        if config.is_explicit(lean):
            problems.append(f"{lean}: true is not available with the {PLUGIN} plugin (the lean recomputation's op "
                            f"cannot take an NF4 weight); drop the setting or set it to false")
        else:
            config.set(lean, False)
    if problems:
        raise ConfigError(problems)


@hookimpl
def qlora_quantization_config(config, compute_dtype) -> dict[str, Any]:
    # The base loads in the compute dtype; its linear layers are quantized once loaded (qlora_model_loaded).
    return {}


def nf4_linears(model) -> list[tuple[str, Any]]:
    """The ``(name, module)`` of every layer of ``model`` whose weight is a torchao ``NF4Tensor``."""
    NF4Tensor, _ = _torchao()
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), NF4Tensor)]


def scaler_block_size_for(numel: int, block_size: int, wanted: int) -> int:
    """The double-quantization block size for a weight of ``numel`` values: ``wanted``, or where the weight's
    block count is smaller or not a multiple of it, the largest divisor of that count below ``wanted`` (torchao
    needs the count to be a multiple)."""
    blocks = numel // block_size
    for size in range(min(wanted, blocks), 0, -1):
        if blocks % size == 0:
            return size
    return 1


def quantize_model(model, block_size: int = 64, scaler_block_size: int = 256) -> dict[str, int]:
    """Replace the weight of every ``nn.Linear`` of ``model`` but the output head by a frozen torchao
    ``NF4Tensor`` of it, in place, on the weight's device and in its dtype. A weight whose size is not a
    multiple of ``block_size`` stays as it is.

    :returns: ``{"quantized": N, "kept": M}``: layers quantized and linear layers left unquantized.
    """
    import torch

    NF4Tensor, to_nf4 = _torchao()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    counts = {"quantized": 0, "kept": 0}
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        weight = module.weight
        if isinstance(weight, NF4Tensor):
            continue
        if weight.numel() % block_size or not weight.is_floating_point():
            counts["kept"] += 1
            continue
        dense = weight.detach().contiguous()
        nf4 = to_nf4(dense, block_size, scaler_block_size_for(dense.numel(), block_size, scaler_block_size))
        module.weight = torch.nn.Parameter(nf4, requires_grad=False)
        del dense
        counts["quantized"] += 1
    return counts


def _upcast_unquantized(model) -> None:
    """The weights that are not NF4 (embeddings, norms, head) in float32, as PEFT's k-bit preparation does
    (``quant.fp32_upcast``). PEFT's own function would also cast the NF4 weights, which dequantizes them."""
    import torch

    NF4Tensor, _ = _torchao()
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and not isinstance(param, NF4Tensor) \
                and not isinstance(param.data, NF4Tensor):
            param.data = param.data.to(torch.float32)


@hookimpl
def qlora_model_loaded(model, config, for_training) -> None:
    if not config["quant.load_in_4bit"]:
        return
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return  # already quantized by another loader
    quantize_model(model, config["torchao.block_size"], config["torchao.scaler_block_size"])
    # Training and inference in the same numerics: the upcast (when asked for) applies to both.
    if config["quant.fp32_upcast"]:
        _upcast_unquantized(model)


@hookimpl(tryfirst=True)
def qlora_prepare_model(model, config) -> None:
    if not nf4_linears(model):
        return
    # The base frozen in its dtypes; the frozen embeddings' output carries gradients to the adapters.
    for param in model.parameters():
        param.requires_grad_(False)
    model.enable_input_require_grads()


@hookimpl
def qlora_plan_settings(settings, config) -> None:
    # torchao's NF4 is QLoRA's layout: 4-bit values, an 8-bit scale per 64, double quantization in blocks of 256.
    if settings.load_in_4bit:
        settings.quant_type = "nf4"
        settings.double_quant = True


@hookimpl
def qlora_bench_variants():
    return {
        PLUGIN: {"help": "the base model in torchao's NF4 (no bitsandbytes) instead of bitsandbytes' NF4",
                 "plugins": [PLUGIN], "ablation": False},
    }


@hookimpl
def qlora_dequantize_model(model, dtype):
    if not nf4_linears(model):
        return None
    return dequantize_nf4_model(model, dtype)


def dequantize_nf4_model(model, dtype: "torch.dtype"):
    """Replace every ``NF4Tensor`` weight of ``model`` by a plain weight in ``dtype`` holding the values the NF4
    layer computes with (torchao's ``get_original_weight``, what ``F.linear`` on it uses), cast the rest of the
    model to ``dtype``; in place, returns ``model``."""
    import torch

    for _, module in nf4_linears(model):
        dense = module.weight.get_original_weight().to(dtype)
        module.weight = torch.nn.Parameter(dense, requires_grad=False)
    model.to(dtype)
    return model
