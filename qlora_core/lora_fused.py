"""LoRA on a 4-bit linear layer as one autograd function: the frozen base matmul and the adapter in the same
forward and backward.

PEFT computes a LoRA layer on a bitsandbytes ``Linear4bit`` as ``base(x).clone() + lora_B(lora_A(dropout(x)))
* scaling``: the base output is copied, the adapter's output is made, scaled and added, each a pass over an
output-sized tensor (for Llama-3-8B's MLP, 8,192 tokens x 14,336 features = 224 MiB each), and the backward pass
mirrors them. :func:`fuse_lora_layers` gives each such layer a forward that computes

    y = x @ dequant(W).T + scaling * (dropout(x) @ A.T) @ B.T

with the adapter's product accumulated into the base output by the matrix multiply itself (``addmm_``), and a
backward that does the same for the input gradient (``dx = dy @ dequant(W) + scaling * (dy @ B) @ A``) and
computes the adapter's gradients from small rank-r products. Same maths (the bf16 products autocast would make),
no output-sized temporaries. Layers it does not cover (several adapters, DoRA and other variants, a merged or
disabled adapter, inputs not in the compute dtype) and evaluation (the model in eval mode) keep PEFT's own
forward. Inside compiled layers the function runs outside torch.compile's graphs: traced, it gave wrong adapter
gradients on the H200 (``benchmarks/fused_check.py``).
"""

from __future__ import annotations

from typing import Any

_FUNCTION: Any = None


def _dequantize(weight, quant_state, dtype):
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data if hasattr(weight, "data") else weight, quant_state).to(dtype)


def _function():
    import torch

    class LoRA4bitLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, xd, weight, quant_state, bias, lora_a, lora_b, scaling: float, same: bool):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            xd2 = x2 if same else xd.reshape(-1, shape[-1])
            a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
            xa = xd2 @ a.t()
            y = x2 @ _dequantize(weight, quant_state, x.dtype).t()
            if bias is not None:
                y += bias.to(y.dtype)
            y.addmm_(xa, b.t(), alpha=scaling)
            ctx.save_for_backward(xd2, xa, lora_a, lora_b)
            ctx.weight, ctx.quant_state, ctx.scaling, ctx.same, ctx.shape = weight, quant_state, scaling, same, shape
            return y.view(*shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, dy):
            xd2, xa, lora_a, lora_b = ctx.saved_tensors
            s = ctx.scaling
            dy2 = dy.reshape(-1, dy.shape[-1])
            a, b = lora_a.to(dy.dtype), lora_b.to(dy.dtype)
            dyb = dy2 @ b  # (n, r)
            dx = dxd = None
            if ctx.needs_input_grad[0]:
                dx = dy2 @ _dequantize(ctx.weight, ctx.quant_state, dy.dtype)
                if ctx.same:
                    dx.addmm_(dyb, a, alpha=s)
                dx = dx.view(ctx.shape)
            if ctx.needs_input_grad[1] and not ctx.same:
                dxd = (dyb @ a).mul_(s).view(ctx.shape)
            da = (dyb.t() @ xd2).mul_(s).to(lora_a.dtype) if ctx.needs_input_grad[5] else None
            db = (dy2.t() @ xa).mul_(s).to(lora_b.dtype) if ctx.needs_input_grad[6] else None
            return dx, dxd, None, None, None, da, db, None, None

    return LoRA4bitLinear


def _apply(*args):
    """The fused function, kept out of torch.compile's graphs (traced, it gave wrong adapter gradients)."""
    return _FUNCTION.apply(*args)


try:
    import torch as _torch

    _apply = _torch.compiler.disable(_apply)
except (ImportError, AttributeError):  # pragma: no cover - torch without torch.compiler
    pass


def _fused_forward(layer):
    """The forward :func:`fuse_lora_layers` installs on one PEFT ``Linear4bit`` LoRA layer."""
    import torch

    original = layer.forward

    def forward(x, *args, **kwargs):
        global _FUNCTION
        base = layer.base_layer
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        compute = getattr(base, "compute_dtype", None)
        # In training mode only (the no-grad first pass of a checkpointed layer included): evaluation and
        # generation keep PEFT's forward and bitsandbytes' inference kernels.
        if (args or kwargs or not layer.training or layer.disable_adapters
                or layer.merged or len(active) != 1 or active[0] in getattr(layer, "lora_variant", {})
                or (compute is not None and x.dtype != compute) or getattr(base.weight, "quant_state", None) is None
                or getattr(getattr(base, "_qlora_lean_state", None), "lean_active", False)):
            # (a lean recomputation of an output projection: PEFT's forward, whose base only builds its backward)
            return original(x, *args, **kwargs)
        if _FUNCTION is None:
            _FUNCTION = _function()
        name = active[0]
        dropout = layer.lora_dropout[name]
        same = isinstance(dropout, torch.nn.Identity) or not getattr(dropout, "p", 0.0)
        xd = x if same else dropout(x)
        return _apply(x, xd, base.weight, base.weight.quant_state, base.bias, layer.lora_A[name].weight,
                               layer.lora_B[name].weight, float(layer.scaling[name]), same)

    forward._qlora_fused = True
    return forward


def fuse_lora_layers(model) -> int:
    """Give every PEFT LoRA layer on a bitsandbytes 4-bit linear the fused forward; returns how many."""
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear4bit) and not getattr(module.forward, "_qlora_fused", False):
            module.forward = _fused_forward(module)
            count += 1
    return count
