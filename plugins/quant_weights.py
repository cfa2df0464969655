"""Frozen 4-bit linear weights as the custom ops of the fast path see them.

A custom op's arguments can only be tensors and plain values, so the ops that compute with a frozen linear
layer's weight (the lean recomputation's output projections, :mod:`qlora_plugins.layers`; the fused LoRA op,
:mod:`qlora_plugins.fused_lora`) receive the weight tensor alone and find its bitsandbytes quantization state
here (:func:`quant_state_of`), by the weight's address; :func:`dense_weight` turns it into the dense matrix
they multiply with.
"""

from __future__ import annotations

import weakref
from typing import Any

#: Frozen linear layers whose weights custom ops receive, by their weight's address.
_BY_ADDRESS: dict[int, Any] = {}
_REGISTERED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register_quant_weight(module) -> None:
    """Let :func:`quant_state_of` find ``module.weight``'s quantization state from the weight tensor alone."""
    _REGISTERED.add(module)
    _BY_ADDRESS[module.weight.data_ptr()] = weakref.ref(module)


def quant_state_of(weight):
    """The bitsandbytes quantization state of a registered 4-bit weight (None for a plain weight)."""
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return state
    ref = _BY_ADDRESS.get(weight.data_ptr())
    module = ref() if ref is not None else None
    if module is None or module.weight.data_ptr() != weight.data_ptr():  # moved since it was registered
        _BY_ADDRESS.clear()
        for m in list(_REGISTERED):
            _BY_ADDRESS[m.weight.data_ptr()] = weakref.ref(m)
        ref = _BY_ADDRESS.get(weight.data_ptr())
        module = ref() if ref is not None else None
    if module is None:
        return None
    return getattr(module.weight, "quant_state", None)


def dense_weight(weight, dtype):
    """A frozen linear layer's weight as a dense matrix in ``dtype``: dequantized when it is a registered 4-bit
    weight (:func:`quant_state_of`; NF4 on CUDA by :mod:`qlora_plugins.nf4_kernel`'s single kernel when the
    ``fused-lora`` plugin switched it on, ``train.fast_dequant``), else the weight itself."""
    quant_state = quant_state_of(weight)
    if quant_state is None:
        return weight.to(dtype)
    if weight.is_cuda:
        from qlora_plugins import nf4_kernel

        if nf4_kernel.enabled:
            dense = nf4_kernel.dequantize_nf4(weight, quant_state)  # one kernel launch, the same bits
            if dense is not None:
                return dense.to(dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight, quant_state).to(dtype)


def computes_on_cuda(model) -> bool:
    """Whether ``model`` computes on CUDA: where its weights are, or its 4-bit weights' quantization states (a
    model loaded into CPU memory for FSDP keeps its weights there and its quantization states on the GPU it will
    compute on; a process that received its structure holds meta weights and the states on its GPU)."""
    if any(p.is_cuda for p in model.parameters()):
        return True
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        absmax = getattr(state, "absmax", None)
        if absmax is not None and absmax.is_cuda:
            return True
    return False

