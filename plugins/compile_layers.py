"""Compiled decoder layers: each layer's own forward through ``torch.compile`` for training (``train.compile``).

On by default, and ``auto`` compiles on CUDA unless the ``fused-lora`` plugin fused the 4-bit LoRA layers: around
the fused op the layers measured faster uncompiled (11,478 compiled against 11,831 tokens/s on the Llama-3-8B
shape: docs/performance.md). The checkpointing and its copies (the ``gradient-checkpointing`` plugin) stay outside
the compiled graph; without that plugin the layers are compiled all the same. Generation and evaluation run the
layers' plain forward. ``--plugin no:compile-layers`` leaves every layer to eager PyTorch.
"""

from __future__ import annotations

from qlora_core import Option, auto_on, hookimpl
from qlora_plugins.fused_lora import fused_count, on_cuda
from qlora_plugins.layers import compile_layers


@hookimpl
def qlora_config_options():
    return [
        Option("train.compile", "auto_bool", "auto",
               "compile each decoder layer with torch.compile (auto: on CUDA without train.fused_lora; with the fused "
               "op the layers were measured faster uncompiled: docs/performance.md)"),
    ]


@hookimpl(trylast=True)
def qlora_adapter_model(model, config) -> None:
    # trylast: after the fused-lora plugin has (or has not) fused the layers, which decides what auto means.
    fused = fused_count(model) > 0
    if auto_on(config["train.compile"], on_cuda(model) and not fused):
        compile_layers(model)


@hookimpl
def qlora_bench_variants():
    return {
        "qlora+compile": {"help": "with torch.compile of the decoder layers (off by default around the fused LoRA "
                                  "op)", "set": ["train.compile=true"], "ablation": True},
    }
