"""Quant strategy: the base model's linear layers in 4 bits through bitsandbytes (NF4 + double quant).

Reads the ``quant.*`` keys (the seed guide's ``BitsAndBytesConfig`` arguments) and, after loading, prepares the
4-bit model for training: every base weight frozen, the non-quantized ones (embeddings, head, norms) kept in
the compute dtype. ``quant.fp32_upcast: true`` runs PEFT's ``prepare_model_for_kbit_training`` instead, as the
guide does: it upcasts those weights to fp32, which on the H200 cost 2.2x the step time and 6 GiB more at the
Llama-3-8B shape (``qlora bench``) and breaks FSDP's flattening of mixed dtypes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora_core import hookimpl

if TYPE_CHECKING:
    import torch


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


def _quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


@hookimpl
def qlora_model_loaded(model, config, for_training) -> None:
    if not _quantized(model):
        return
    # bitsandbytes 0.50 repacks 4-bit weights on CPUs with AVX512-BF16 at the first eval-mode forward,
    # into a layout whose kernel has no autograd: training after an evaluation would then silently
    # stop gradients at every 4-bit layer. Training needs the differentiable layout, and a model loaded
    # for evaluation, generation or merging the numerics the run's own evaluations ran in.
    use_float32_kernels(model)
    if not for_training:
        import torch

        # As PEFT's k-bit preparation does for training: the parameters that are not quantized (norms,
        # embeddings, head) in float32. A no-op when the compute dtype is float32 (CPU).
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and param.__class__.__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)


@hookimpl(tryfirst=True)
def qlora_prepare_model(model, config) -> None:
    if not _quantized(model):
        return
    from peft import prepare_model_for_kbit_training

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


def use_float32_kernels(model: Any) -> None:
    """Keep bitsandbytes' float32 4-bit kernel on CPUs with AVX512-BF16: in eval mode bitsandbytes would
    otherwise repack the weights for a bf16 kernel (less exact, and a layout that cannot be dequantized
    exactly). The run trained and evaluated through the float32 kernel (qlora_model_loaded above)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@hookimpl
def qlora_bench_variants():
    return {
        "qlora+fp32-upcast": {"help": "with the guide's fp32 upcast of the non-4-bit weights",
                              "set": ["quant.fp32_upcast=true"], "ablation": True},
    }


@hookimpl
def qlora_dequantize_model(model, dtype):
    if not _quantized(model):
        return None
    return dequantize_4bit_model(model, dtype)


def dequantize_4bit_model(model: Any, dtype: "torch.dtype") -> Any:
    """Replace every bitsandbytes ``Linear4bit`` of ``model`` by an ``nn.Linear`` in ``dtype`` holding the
    weights the 4-bit layer computes with (``bitsandbytes.functional.dequantize_4bit``), cast the rest of the
    model to ``dtype``, and drop the model's quantization settings, so it saves and loads as a plain model.
    In place; returns ``model``."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit

    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = module.weight
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # Repacked for the AVX512-BF16 kernel by an eval-mode forward: undo it (bitsandbytes' own inverse;
            # the scales went through bf16). qlora's loaders keep the float32 kernel, so this is a fallback.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
            weight.data, weight.quant_state = data, state
        dense = dequantize_4bit(data, state).to(dtype)
        with torch.device("meta"):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight = torch.nn.Parameter(dense, requires_grad=False)
        if module.bias is not None:
            linear.bias = torch.nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        hook = getattr(module, "_hf_hook", None)
        if hook is not None:
            from accelerate.hooks import add_hook_to_module, remove_hook_from_module

            remove_hook_from_module(module)
            add_hook_to_module(linear, hook)
        model.set_submodule(name, linear)
    # What transformers' quantizer.remove_quantization_config does, plus the 4-bit flag.
    for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.is_loaded_in_4bit = False
    model.is_loaded_in_8bit = False
    model.to(dtype)
    return model
