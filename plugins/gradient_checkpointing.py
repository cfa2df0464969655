"""Gradient checkpointing (non-reentrant): recompute activations in the backward pass to save memory.

On by default; ``--plugin no:gradient-checkpointing`` trades memory for speed.
"""

from __future__ import annotations

from qlora_core import hookimpl


@hookimpl
def qlora_prepare_model(model, config) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        return
    # transformers 5.2x renamed the method; older releases (the GPU image's 5.17) only have the old name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # The frozen embeddings give outputs without grad; the checkpointed layers still need a graph to the adapters.
    model.enable_input_require_grads()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
