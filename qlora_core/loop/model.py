"""The model of a run: its tokenizer, the base model loaded (quantized and placed by the plugins) and prepared,
and the LoRA adapters added.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_core.framework.config import Config
from qlora_core.framework.errors import UsageError
from qlora_core.framework.hub import offline_unless_reachable, unreachable_note

if TYPE_CHECKING:
    import torch


def input_device(model, default: Any = None) -> "torch.device":
    """Where the model takes its inputs: the device of its input embeddings (a model placed across GPU and
    CPU by ``device_map`` may start on either), else ``default``."""
    import torch

    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        device = next(p.device for p in model.parameters())
    if device.type == "meta":  # offloaded: accelerate's hooks bring the weights to the execution device
        return torch.device(default) if default is not None else torch.device("cuda")
    return device


def parameter_count(model) -> int:
    """Parameters of a model as loaded, counting each 4-bit weight by its original shape (bitsandbytes packs
    two values a byte, so ``numel()`` would halve them)."""
    import torch

    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += torch.Size(state.shape).numel() if state is not None else p.numel()
    return total


def check_local_model(config: Config, model_path: str) -> None:
    """Refuse a model named by a local path (``/...``, ``./...``, ``../...``, ``~/...``) that is not a folder, before
    transformers takes it for a hub id ("Repo id must be in the form ...")."""
    text = str(model_path)
    if text.startswith(("/", "./", "../", "~")) and not Path(text).expanduser().is_dir():
        what = "is a file, not a folder" if Path(text).expanduser().exists() else "does not exist"
        raise UsageError(f"model folder {text!r} {what} (check model.name_or_path: a local folder with "
                         f"config.json and the weights, or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct)")
    if not Path(text).expanduser().is_dir():
        offline_unless_reachable()  # a hub id: fail at once, not after half a minute of retries, when offline


_REMOTE_CODE_WARNED: set[str] = set()


def warn_remote_code(config: Config) -> None:
    """``model.trust_remote_code`` is off unless the config sets it; when it is on, say once per model whose code
    will run in this process."""
    import sys

    name = str(config["model.name_or_path"])
    if config["model.trust_remote_code"] and name not in _REMOTE_CODE_WARNED:
        _REMOTE_CODE_WARNED.add(name)
        print(f"warning: model.trust_remote_code is true: the Python code that comes with model {name!r} runs in "
              f"this process (set it to false unless you trust that code)", file=sys.stderr)


def load_tokenizer(config: Config, hook: Any, model_path: str, path: str | Path | None = None) -> Any:
    """The model's tokenizer (or the one saved in ``path``, e.g. a run's adapter folder), with a pad token: a
    plugin's :func:`~qlora_core.hookspecs.qlora_load_tokenizer`, else transformers' ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    revision = config["model.revision"] if path is None else None
    if path is None:
        check_local_model(config, model_path)
    warn_remote_code(config)
    path = model_path if path is None else path
    try:
        tok = hook.qlora_load_tokenizer(name_or_path=str(path), config=config)
        if tok is None:
            tok = AutoTokenizer.from_pretrained(path, revision=revision,
                                                trust_remote_code=config["model.trust_remote_code"])
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load the tokenizer of model {config['model.name_or_path']!r}: "
                         f"{unreachable_note(str(e).strip().splitlines()[0])} (check model.name_or_path)") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(config: Config, hook: Any, model_path: str, device: str, compute_dtype: Any,
                    for_training: bool = True) -> Any:
    """Load the base model, quantized by the quant plugin; for training, also prepared by the plugins
    (k-bit preparation, gradient checkpointing)."""
    from accelerate import PartialState
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    cfg = config
    check_local_model(cfg, model_path)
    warn_remote_code(cfg)
    kwargs: dict[str, Any] = {
        "dtype": compute_dtype,
        # Each process loads onto its own GPU (LOCAL_RANK under torchrun / accelerate launch).
        "device_map": {"": PartialState().device} if device == "cuda" else {"": "cpu"},
        "revision": cfg["model.revision"],
        "trust_remote_code": cfg["model.trust_remote_code"],
    }
    kwargs.update(hook.qlora_quantization_config(config=cfg, compute_dtype=compute_dtype) or {})
    hook.qlora_model_load_kwargs(kwargs=kwargs, config=cfg)
    try:
        model = hook.qlora_load_base_model(name_or_path=model_path, kwargs=kwargs, config=cfg)
        if model is None:
            # quantize_device is for the loaders of the plugins: transformers quantizes where it puts the weights
            model = AutoModelForCausalLM.from_pretrained(
                model_path, **{k: v for k, v in kwargs.items() if k != "quantize_device"})
    except (OSError, SafetensorError) as e:
        raise UsageError(f"could not load model {cfg['model.name_or_path']!r}: "
                         f"{unreachable_note(str(e).strip().splitlines()[0])} (check model.name_or_path)") from None
    hook.qlora_model_loaded(model=model, config=cfg, for_training=for_training)
    if for_training:
        hook.qlora_prepare_model(model=model, config=cfg)
    return model


def add_adapters(config: Config, hook: Any, model) -> Any:
    """The prepared base model wrapped with LoRA adapters (PEFT's ``get_peft_model``): the targets from the
    plugins' :func:`~qlora_core.hookspecs.qlora_adapter_targets` (else ``lora.target_modules``), the
    ``LoraConfig`` adjusted by :func:`~qlora_core.hookspecs.qlora_adapter_config`, the wrapped model handed to
    :func:`~qlora_core.hookspecs.qlora_adapter_model`; the adapters drawn from ``train.seed``."""
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = config
    targets = hook.qlora_adapter_targets(model=model, config=cfg) or cfg["lora.target_modules"]
    lora = LoraConfig(r=cfg["lora.r"], lora_alpha=cfg["lora.lora_alpha"], lora_dropout=cfg["lora.lora_dropout"],
                      target_modules=targets, bias=cfg["lora.bias"], task_type="CAUSAL_LM")
    hook.qlora_adapter_config(lora_config=lora, model=model, config=cfg)
    torch.manual_seed(cfg["train.seed"])
    peft_model = get_peft_model(model, lora)
    hook.qlora_adapter_model(model=peft_model, config=cfg)
    return peft_model
