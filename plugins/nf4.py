"""Quant strategy: the base model's linear layers in 4 bits through bitsandbytes (NF4 + double quant).

Reads the ``quant.*`` keys (the seed guide's ``BitsAndBytesConfig`` arguments) and, after loading, prepares the
4-bit model for training: every base weight frozen, the non-quantized ones (embeddings, head, norms) kept in
the compute dtype. ``quant.fp32_upcast: true`` runs PEFT's ``prepare_model_for_kbit_training`` instead, as the
guide does: it upcasts those weights to fp32, which on the H200 cost 2.2x the step time and 6 GiB more at the
Llama-3-8B shape (``qlora bench``) and breaks FSDP's flattening of mixed dtypes.

``quant.skip_modules`` keeps chosen linear layers out of 4 bits: they load as plain ``nn.Linear`` in the compute
dtype, frozen like every base weight, and get adapters when targeted. A name matches a linear layer when its
dotted parts appear, whole and in order, among the layer's (:func:`skip_matches`): ``down_proj`` and
``mlp.down_proj`` name every layer's MLP down projection, ``model.layers.0.mlp.down_proj`` one of them,
``model.layers.0`` or ``layers.0`` every linear layer of the first decoder layer (not of ``layers.10``); ``proj``
matches nothing (a part is matched whole). The names are resolved before the load against the model built on the
meta device (:func:`qlora_load_base_model`), and transformers gets the matching layers' full names together with
the modules it keeps out of 4 bits by default (the output head, tied weights), which a list of its own would
otherwise replace. A name matching no linear layer is a config error; after the load every matching layer is
checked to be unquantized (a loader that quantizes every layer, such as ``qlora bench``'s, is an error).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora_core import ConfigError, hookimpl

if TYPE_CHECKING:
    import torch


@hookimpl
def qlora_quantization_config(config, compute_dtype) -> dict[str, Any]:
    if not config["quant.load_in_4bit"]:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    skip_patterns(config)  # an empty name is an error before anything is loaded
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config["quant.bnb_4bit_quant_type"],
            bnb_4bit_use_double_quant=config["quant.bnb_4bit_use_double_quant"],
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=getattr(torch, config["quant.bnb_4bit_quant_storage"]),
            # None keeps transformers' default skips (the output head, tied weights); quant.skip_modules's
            # layers are added to them in qlora_load_base_model, once the model's module names are known.
            llm_int8_skip_modules=None,
        )
    }


def skip_patterns(config) -> list[str]:
    """``quant.skip_modules``, each name without surrounding spaces and dots; an empty name is a
    :class:`ConfigError`."""
    patterns = [p.strip().strip(".") for p in config.get("quant.skip_modules") or []]
    if any(not p for p in patterns):
        raise ConfigError(["quant.skip_modules: an empty name; give module names such as down_proj or "
                           "model.layers.0.mlp.down_proj"])
    return patterns


def skip_matches(name: str, pattern: str) -> bool:
    """Whether ``quant.skip_modules``'s ``pattern`` names the module ``name``: the pattern's dotted parts appear,
    whole and in order, among the name's (``layers.0`` matches ``model.layers.0.mlp.down_proj``, not
    ``model.layers.10.mlp.down_proj``; ``proj`` matches neither)."""
    return f".{pattern}." in f".{name}."


def _is_linear(module) -> bool:
    import torch

    # bitsandbytes' 4- and 8-bit layers subclass nn.Linear; GPT-2-style Conv1D layers are quantized too.
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def skipped_linears(model, patterns: list[str], model_name: str) -> list[str]:
    """The qualified names of ``model``'s linear layers that ``patterns`` match, in the model's order. Patterns
    that match none are a :class:`ConfigError` naming them all."""
    linears = [name for name, module in model.named_modules() if _is_linear(module)]
    missing = [p for p in patterns if not any(skip_matches(name, p) for name in linears)]
    if missing:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        example = next((n for n, m in model.named_modules() if _is_linear(m) and m is not head), None)
        hint = f"; e.g. {example} or {example.rsplit('.', 1)[-1]}" if example else ""
        raise ConfigError([f"quant.skip_modules: {', '.join(map(repr, missing))} "
                           f"match{'es' if len(missing) == 1 else ''} no linear layer of {model_name}{hint}"])
    return [name for name in linears if any(skip_matches(name, p) for p in patterns)]


def default_skips(model) -> set[str]:
    """The modules transformers keeps out of 4 bits when given no list of its own: its
    ``get_keys_to_not_convert`` (the output head, tied weights, the last module), and the output head by name
    where that function is not found."""
    keys: set[str] = set()
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # transformers 4.x
        try:
            from transformers.integrations import get_keys_to_not_convert
        except ImportError:
            get_keys_to_not_convert = None
    if get_keys_to_not_convert is not None:
        keys.update(get_keys_to_not_convert(model))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        keys.update(name for name, module in model.named_modules() if module is head)
    return keys


def _meta_model(name_or_path: str, kwargs: dict[str, Any]):
    """The model of ``name_or_path``'s config on the meta device: its module names, no weights."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    remote = bool(kwargs.get("trust_remote_code", False))
    hf_config = AutoConfig.from_pretrained(name_or_path, revision=kwargs.get("revision"), trust_remote_code=remote)
    with init_empty_weights(include_buffers=True), torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=remote)


@hookimpl(wrapper=True)
def qlora_load_base_model(name_or_path, kwargs, config):
    """Resolve ``quant.skip_modules`` against the model's module names before the weights are read, and hand
    transformers the matching layers' full names with its default skips. Around the other loaders: when none
    made the model and the kwargs carry ``quantize_device``, a local safetensors checkpoint is loaded one tensor
    at a time, quantized there and kept on ``device_map``'s device (:func:`qlora_plugins.quant_load.load_streamed`);
    otherwise transformers loads it."""
    quant = kwargs.get("quantization_config")
    in_4bit = getattr(quant, "load_in_4bit", False) and hasattr(quant, "llm_int8_skip_modules")
    patterns = skip_patterns(config)
    if patterns and in_4bit:
        meta = _meta_model(name_or_path, kwargs)
        names = skipped_linears(meta, patterns, config["model.name_or_path"])
        # Full names match themselves alone under transformers' rule (4.x: equal names; 5.x: a prefix up to a dot
        # or a suffix), and a list replaces transformers' defaults: they are added back.
        quant.llm_int8_skip_modules = sorted(set(names) | default_skips(meta))
        del meta
    model = yield
    if model is None and in_4bit and kwargs.get("quantize_device") is not None:
        from qlora_plugins.quant_load import load_streamed

        skips = None if quant.llm_int8_skip_modules is None else set(quant.llm_int8_skip_modules)
        model = load_streamed(name_or_path, kwargs, skips, default_skips)
    return model


def check_skipped(model, config) -> None:
    """Every linear layer ``quant.skip_modules`` names, and the output head, is unquantized in the loaded model;
    a :class:`ConfigError` names the first that is not."""
    patterns = skip_patterns(config)
    if not patterns:
        return
    names = skipped_linears(model, patterns, config["model.name_or_path"])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [n for n, m in model.named_modules() if head is not None and m is head]
    for name in [*names, *heads]:
        weight = getattr(model.get_submodule(name), "weight", None)
        if type(weight).__name__ in ("Params4bit", "Int8Params") or getattr(weight, "quant_state", None) is not None:
            raise ConfigError([f"quant.skip_modules: {name} was loaded in 4 bits: what built the base model (a "
                               f"qlora_load_base_model plugin such as random-weights, or qlora bench) does not "
                               f"keep quant.skip_modules unquantized"])


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
    check_skipped(model, config)
    if not for_training:
        import torch

        # As PEFT's k-bit preparation does for training: the parameters that are not quantized (norms,
        # embeddings, head, quant.skip_modules's layers) in float32. A no-op when the compute dtype is float32
        # (CPU).
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
