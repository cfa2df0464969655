"""Quant strategy: the base model's linear layers in 4 bits through bitsandbytes (NF4 + double quant).

Reads the ``quant.*`` keys (the seed guide's ``BitsAndBytesConfig`` arguments) and, after loading, prepares the
4-bit model for training: every base weight frozen, the non-quantized ones (embeddings, head, norms) kept in
the compute dtype. ``quant.fp32_upcast: true`` runs PEFT's ``prepare_model_for_kbit_training`` instead, as the
guide does: it upcasts those weights to fp32, which on the H200 cost 2.2x the step time and 6 GiB more at the
Llama-3-8B shape (``qlora bench``) and breaks FSDP's flattening of mixed dtypes.
"""

from __future__ import annotations

from typing import Any

from qlora_core import hookimpl


@hookimpl
def qlora_quantization_config(config, compute_dtype) -> dict[str, Any]:
    if not config["quant.load_in_4bit"]:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config["quant.bnb_4bit_quant_type"],
            bnb_4bit_use_double_quant=config["quant.bnb_4bit_use_double_quant"],
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=getattr(torch, config["quant.bnb_4bit_quant_storage"]),
        )
    }


@hookimpl(tryfirst=True)
def qlora_prepare_model(model, config) -> None:
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return
    from peft import prepare_model_for_kbit_training

    from qlora_core.tools.inference import use_float32_kernels

    # bitsandbytes 0.50 repacks 4-bit weights on CPUs with AVX512-BF16 at the first eval-mode forward,
    # into a layout whose kernel has no autograd: training after an evaluation would then silently
    # stop gradients at every 4-bit layer. Training needs the differentiable layout.
    use_float32_kernels(model)

    if kbit_upcast(config):
        # Gradient checkpointing is its own plugin (on by default), so it is not switched on here.
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        prepare_kbit_lean(model)


def kbit_upcast(config) -> bool:
    """Whether the k-bit preparation upcasts the unquantized parameters (norms, embeddings, head) to float32,
    as PEFT's ``prepare_model_for_kbit_training`` does. FSDP cannot flatten a layer whose parameters mix
    bfloat16 and float32 ("Must flatten tensors with uniform dtype"), so the fsdp plugin turns it off. The one
    place this decision is read."""
    return bool(config["quant.fp32_upcast"])


def prepare_kbit_lean(model) -> None:
    """PEFT's k-bit preparation without its float32 upcast: freeze the base model and let the (frozen)
    embeddings' output carry gradients to the adapters; every parameter keeps its dtype."""
    for param in model.parameters():
        param.requires_grad_(False)
    model.enable_input_require_grads()
