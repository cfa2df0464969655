"""Adapter targeting: LoRA on every linear layer except the output head, or the listed modules."""

from __future__ import annotations

from qlora_core import hookimpl
from qlora_core import ConfigError


def linear_module_names(model) -> list[str]:
    """Short names (``q_proj``, ``down_proj``, ...) of the model's linear layers, output head excluded."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for full_name, module in model.named_modules():
        # bitsandbytes' 4- and 8-bit layers subclass torch.nn.Linear.
        if isinstance(module, torch.nn.Linear) and module is not head:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


@hookimpl
def qlora_adapter_targets(model, config) -> list[str]:
    linear = linear_module_names(model)
    wanted = config["lora.target_modules"]
    if wanted == "all-linear":
        return linear
    if isinstance(wanted, str):
        wanted = [wanted]
    missing = [name for name in wanted if name not in linear]
    if missing:
        raise ConfigError([
            f"lora.target_modules: no linear layer named {', '.join(missing)} in the model; "
            f"its linear layers are {', '.join(linear)}"
        ])
    return list(wanted)
