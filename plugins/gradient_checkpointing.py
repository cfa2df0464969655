"""Gradient checkpointing: recompute each decoder layer's activations in the backward pass to save memory.

On by default; ``--plugin no:gradient-checkpointing`` trades memory for speed. The layers are recomputed by
qlora's own checkpointing (:mod:`qlora_core.layers`), which on CUDA also offloads the layers' saved inputs to
CPU memory asynchronously (``train.activation_offload``), and under ``train.gpu_memory_budget`` recomputes only
as many layers as the budget requires. Models whose decoder layers cannot be found use transformers' own
(non-reentrant) checkpointing. The recomputation skips the forward matmul of each layer's output projection,
whose value backward never reads (``train.lean_recompute``).
"""

from __future__ import annotations

from qlora_core import hookimpl


@hookimpl
def qlora_plan_settings(settings, config) -> None:
    from qlora_core import auto_on

    settings.checkpointing = True  # qlora plan keeps it only where the model supports checkpointing
    # auto offloads on CUDA, which is what qlora plan estimates for
    settings.offload = auto_on(config.get("train.activation_offload", "auto"), True)


@hookimpl
def qlora_bench_variants():
    return {
        "qlora-lean-recompute": {"help": "the output projections recomputed in full (train.lean_recompute=false)",
                                 "set": ["train.lean_recompute=false"], "ablation": True},
        # compiled layers (train.compile), here until compiling has a plugin of its own
        "qlora+compile": {"help": "with torch.compile of the decoder layers (off by default around the fused LoRA "
                                  "op)", "set": ["train.compile=true"], "ablation": True},
        "qlora-offload": {"help": "checkpointed inputs kept on the GPU (no CPU offload)",
                          "set": ["train.activation_offload=false"], "ablation": True},
        "qlora+budget": {"help": "train.gpu_memory_budget=40 GiB: layers that fit keep their activations",
                         "set": ["train.gpu_memory_budget=40"], "ablation": True},
        "qlora-checkpointing": {"help": "no gradient checkpointing at all", "plugins": ["no:gradient-checkpointing"]},
    }


@hookimpl
def qlora_prepare_model(model, config) -> None:
    from qlora_core import auto_on
    from qlora_core.layers import checkpoint_layers

    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    offload = auto_on(config["train.activation_offload"], any(p.is_cuda for p in model.parameters()))
    if checkpoint_layers(model, offload=offload, lean=config["train.lean_recompute"]):
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        return
    # transformers 5.2x renamed the method; older releases (the GPU image's 5.17) only have the old name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # The frozen embeddings give outputs without grad; the checkpointed layers still need a graph to the adapters.
    model.enable_input_require_grads()
