"""Optimizers: paged AdamW in 8 or 32 bits (bitsandbytes), unpaged 8-bit AdamW, and torch's AdamW.

Each is its own plugin (``paged-adamw-8bit``, the default, ``paged-adamw-32bit``, ``adamw-8bit``, ``adamw``),
picked with ``--plugin NAME`` or ``train.optim: paged_adamw_32bit``. ``adamw-8bit`` keeps the same 8-bit states
without paging them (nothing to page when they fit: for LoRA they are small).
"""

from __future__ import annotations

from qlora_core import hookimpl


class AdamWPlugin:
    """An AdamW optimizer plugin: ``name`` is its plugin name, ``kind`` the bitsandbytes class or ``"torch"``,
    ``state_bytes`` what its two states keep per trainable parameter (1 byte each in 8 bits, 4 in 32).

    Paging moves optimizer states between GPU and CPU memory under pressure; on the CPU there is nothing
    to page, so there the same optimizer runs unpaged (bitsandbytes would fall back to that itself).
    """

    def __init__(self, name: str, kind: str, state_bytes: int, bench_variant: tuple[str, str] | None = None):
        self.name = name
        self.kind = kind
        self.state_bytes = state_bytes
        self.bench_variant = bench_variant  # (name, help) of the qlora bench variant that requests it

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

    @hookimpl
    def qlora_plan_settings(self, settings, config) -> None:
        # Paged states live in CUDA managed memory, which max_memory_allocated does not count; they are counted
        # anyway (an upper bound, and small for LoRA).
        settings.optimizer = self.name
        settings.optimizer_bytes = self.state_bytes

    @hookimpl
    def qlora_bench_variants(self):
        if self.bench_variant is None:
            return {}
        name, help_text = self.bench_variant
        return {name: {"help": help_text, "plugins": [self.name]}}

    def __repr__(self) -> str:
        return f"AdamWPlugin({self.name!r}, {self.kind!r}, {self.state_bytes})"


paged_adamw_8bit = AdamWPlugin("paged-adamw-8bit", "PagedAdamW8bit", 2)
paged_adamw_32bit = AdamWPlugin("paged-adamw-32bit", "PagedAdamW32bit", 8)
adamw_8bit = AdamWPlugin("adamw-8bit", "AdamW8bit", 2,
                        bench_variant=("qlora+adamw-8bit", "bitsandbytes' 8-bit AdamW without paging"))
adamw = AdamWPlugin("adamw", "torch", 8,
                    bench_variant=("qlora+torch-adamw", "torch's AdamW (32-bit states, multi-tensor kernels)"))
