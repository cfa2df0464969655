"""Optimizers: paged AdamW in 8 or 32 bits (bitsandbytes), unpaged 8-bit AdamW, and torch's AdamW.

Each is its own plugin (``paged-adamw-8bit``, the default, ``paged-adamw-32bit``, ``adamw-8bit``, ``adamw``),
picked with ``--plugin NAME`` or ``train.optim: paged_adamw_32bit``. ``adamw-8bit`` keeps the same 8-bit states
without paging them (nothing to page when they fit: for LoRA they are small).
"""

from __future__ import annotations

from qlora_core import hookimpl


class AdamWPlugin:
    """An AdamW optimizer plugin; ``kind`` names the bitsandbytes class or ``"torch"``.

    Paging moves optimizer states between GPU and CPU memory under pressure; on the CPU there is nothing
    to page, so there the same optimizer runs unpaged (bitsandbytes would fall back to that itself).
    """

    def __init__(self, kind: str):
        self.kind = kind

    @hookimpl
    def qlora_optimizer(self, params, config):
        kwargs = {"lr": config["train.learning_rate"], "weight_decay": config["train.weight_decay"]}
        if self.kind == "torch":
            import torch

            return torch.optim.AdamW(params, **kwargs)
        import bitsandbytes as bnb

        kind = self.kind
        if all(p.device.type == "cpu" for p in params):
            kind = kind.removeprefix("Paged")
        return getattr(bnb.optim, kind)(params, **kwargs)

    def __repr__(self) -> str:
        return f"AdamWPlugin({self.kind!r})"


paged_adamw_8bit = AdamWPlugin("PagedAdamW8bit")
paged_adamw_32bit = AdamWPlugin("PagedAdamW32bit")
adamw_8bit = AdamWPlugin("AdamW8bit")
adamw = AdamWPlugin("torch")
