"""The ``fused-lora`` plugin: LoRA on a 4-bit linear layer as one operation, the frozen base matmul and the
adapter in the same forward and backward (``train.fused_lora``), its NF4 weights dequantized in one kernel
launch (``train.fast_dequant``, :mod:`qlora_plugins.nf4_kernel`).

On by default; ``--plugin no:fused-lora`` leaves every LoRA layer to PEFT's forward and the NF4 weights to
bitsandbytes' dequantization.

PEFT computes a LoRA layer on a bitsandbytes ``Linear4bit`` as ``base(x).clone() + lora_B(lora_A(dropout(x)))
* scaling``: the base output is copied, the adapter's output is made, scaled and added, each a pass over an
output-sized tensor (for Llama-3-8B's MLP, 8,192 tokens x 14,336 features = 224 MiB each), and the backward pass
mirrors them. :func:`fuse_lora_layers` gives each such layer a forward that computes

    y = x @ dequant(W).T + scaling * (dropout(x) @ A.T) @ B.T

with the adapter's product written first and the base matrix multiply accumulating into it (``addmm_``, whose
epilogue reads the output while the matmul's compute hides it: one pass over the output fewer than adding the
adapter afterwards: +1.3 to 2.6% tokens/s at 8B), and a backward that does the same for the input gradient
(``dx = dy @ dequant(W) + scaling * (dy @ B) @ A``) and computes the adapter's gradients from small rank-r
products. Same maths (bf16 products, rounded at other points than PEFT's: the GPU check's gradients agree
within 1.1%), no output-sized temporaries. The adapters come in bf16 from their kept copy
(``param.qlora_compute_copy``, made by the ``flat-params`` plugin under ``train.adapter_compute_copy``) when
there is one. Layers it does not cover (several adapters, DoRA and other variants, a merged or disabled adapter,
inputs not in the compute dtype) and evaluation (the model in eval mode) keep PEFT's own forward. A fused
layer's forward function carries ``_qlora_fused = True`` (:func:`fused_count` counts them; the ``flat-params``
plugin reads it to know whether the adapters' compute copy is read).

The forward and the backward are custom ops (``qlora::lora_4bit``, ``qlora::lora_4bit_backward``) that
torch.compile traces around without a graph break and without looking inside. Two earlier forms failed on the
H200 inside compiled layers: an autograd function traced by torch.compile gave wrong adapter gradients, and the
same function kept out of the graph received a flattened input at its graph break (``benchmarks/fused_check.py``,
docs/performance.md). The ops dequantize the weight through :func:`qlora_plugins.quant_weights.dense_weight`.
"""

from __future__ import annotations

from typing import Any

from qlora_core import Option, auto_on, hookimpl
from qlora_plugins import nf4_kernel
from qlora_plugins.quant_weights import computes_on_cuda, dense_weight, register_quant_weight

_OPS: Any = None


def _ops():
    """``qlora::lora_4bit`` (forward) and ``qlora::lora_4bit_backward``, registered once (why custom ops: the
    module's docstring)."""
    global _OPS
    if _OPS is not None:
        return _OPS
    import torch

    @torch.library.custom_op("qlora::lora_4bit", mutates_args=(),
                             schema="(Tensor x, Tensor xd, Tensor weight, Tensor? bias, Tensor lora_a, "
                                    "Tensor lora_b, Tensor? a_c, Tensor? b_c, float scaling, bool same) -> Tensor")
    def lora_4bit(x, xd, weight, bias, lora_a, lora_b, a_c, b_c, scaling, same):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xd2 = x2 if same else xd.reshape(-1, shape[-1])
        a, b = _in_dtype(lora_a, a_c, x.dtype), _in_dtype(lora_b, b_c, x.dtype)
        # The adapter's product first (it writes y), then the base matmul accumulates into it (its epilogue
        # reads y, hidden under the matmul's compute): one pass over y less than adding the adapter afterwards.
        xa = (xd2 @ a.t()).mul_(scaling)  # (n, r)
        y = xa @ b.t() if bias is None else torch.addmm(bias.to(x.dtype), xa, b.t())
        y.addmm_(x2, dense_weight(weight, x.dtype).t())
        return y.view(*shape[:-1], y.shape[-1])

    @lora_4bit.register_fake
    def _(x, xd, weight, bias, lora_a, lora_b, a_c, b_c, scaling, same):
        return x.new_empty((*x.shape[:-1], lora_b.shape[0]))

    @torch.library.custom_op("qlora::lora_4bit_backward", mutates_args=(),
                             schema="(Tensor dy, Tensor xd, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor? a_c, "
                                    "Tensor? b_c, float scaling, bool same, bool[4] needs) "
                                    "-> (Tensor, Tensor, Tensor, Tensor)")
    def lora_4bit_backward(dy, xd, weight, lora_a, lora_b, a_c, b_c, scaling, same, needs):
        n_in = xd.shape[-1]
        dy2 = dy.reshape(-1, dy.shape[-1])
        xd2 = xd.reshape(-1, n_in)
        a, b = _in_dtype(lora_a, a_c, dy.dtype), _in_dtype(lora_b, b_c, dy.dtype)
        dyb = dy2 @ b  # (n, r)
        empty = dy.new_empty(0)
        dx = dxd = da = db = empty
        if needs[0]:
            if same:  # as in the forward: the adapter's part first, the base matmul accumulating into it
                dx = (dyb * scaling) @ a
                dx.addmm_(dy2, dense_weight(weight, dy.dtype))
            else:
                dx = dy2 @ dense_weight(weight, dy.dtype)
            dx = dx.view(*dy.shape[:-1], n_in)
        if needs[1] and not same:
            dxd = (dyb @ a).mul_(scaling).view(*dy.shape[:-1], n_in)
        if needs[2]:
            da = (dyb.t() @ xd2).mul_(scaling).to(lora_a.dtype)
        if needs[3]:
            db = (dy2.t() @ (xd2 @ a.t())).mul_(scaling).to(lora_b.dtype)
        return dx, dxd, da, db

    @lora_4bit_backward.register_fake
    def _(dy, xd, weight, lora_a, lora_b, a_c, b_c, scaling, same, needs):
        n_in = xd.shape[-1]
        empty = dy.new_empty(0)
        dx = dy.new_empty((*dy.shape[:-1], n_in)) if needs[0] else empty
        dxd = dy.new_empty((*dy.shape[:-1], n_in)) if needs[1] and not same else empty
        da = lora_a.new_empty(lora_a.shape) if needs[2] else empty
        db = lora_b.new_empty(lora_b.shape) if needs[3] else empty
        return dx, dxd, da, db

    def setup_context(ctx, inputs, output):
        x, xd, weight, bias, lora_a, lora_b, a_c, b_c, scaling, same = inputs
        ctx.save_for_backward(x if same else xd, weight, lora_a, lora_b, a_c, b_c)
        ctx.scaling, ctx.same = scaling, same

    def backward(ctx, dy):
        xd, weight, lora_a, lora_b, a_c, b_c = ctx.saved_tensors
        need = ctx.needs_input_grad
        needs = [bool(need[0]), bool(need[1]), bool(need[4]), bool(need[5])]
        dx, dxd, da, db = torch.ops.qlora.lora_4bit_backward(dy, xd, weight, lora_a, lora_b, a_c, b_c,
                                                             ctx.scaling, ctx.same, needs)
        return (dx if needs[0] else None, dxd if needs[1] and not ctx.same else None, None, None,
                da if needs[2] else None, db if needs[3] else None, None, None, None, None)

    lora_4bit.register_autograd(backward, setup_context=setup_context)
    _OPS = lora_4bit
    return _OPS


def _in_dtype(param, copy, dtype):
    """An adapter matrix in the compute dtype: its kept copy (``param.qlora_compute_copy``) when the run keeps
    one, else cast now."""
    return copy if copy is not None else param.to(dtype)


def _copy_in(param, dtype):
    """``param``'s compute-dtype copy kept for the run (``qlora_compute_copy``), if it has one in ``dtype``."""
    copy = getattr(param, "qlora_compute_copy", None)
    return copy if copy is not None and copy.dtype == dtype else None


def _fused_forward(layer):
    """The forward :func:`fuse_lora_layers` installs on one PEFT ``Linear4bit`` LoRA layer."""
    import torch

    original = layer.forward
    op = _ops()  # registered now: torch.compile cannot trace the registration

    def forward(x, *args, **kwargs):
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
        name = active[0]
        dropout = layer.lora_dropout[name]
        same = isinstance(dropout, torch.nn.Identity) or not getattr(dropout, "p", 0.0)
        xd = x if same else dropout(x)
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        return op(x, xd, base.weight, base.bias, a, b, _copy_in(a, x.dtype), _copy_in(b, x.dtype),
                  float(layer.scaling[name]), same)

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
            register_quant_weight(module.base_layer)
            module.forward = _fused_forward(module)
            count += 1
    return count


def fused_count(model) -> int:
    """How many of ``model``'s layers run the fused forward (0 when the plugin is off or fused nothing)."""
    return sum(1 for module in model.modules() if getattr(module.forward, "_qlora_fused", False))


def on_cuda(model) -> bool:
    """Whether the run computes on CUDA (:func:`qlora_plugins.quant_weights.computes_on_cuda`)."""
    return computes_on_cuda(model)


@hookimpl
def qlora_config_options():
    return [
        Option("train.fused_lora", "auto_bool", "auto",
               "compute each 4-bit linear layer and its LoRA adapter in one custom op, without PEFT's output-sized "
               "temporaries (auto: on CUDA, where it was measured faster: docs/performance.md)"),
        Option("train.fast_dequant", "bool", True,
               "dequantize NF4 weights for the fused LoRA op and the lean recomputation in one Triton kernel on "
               "CUDA (bitsandbytes' arithmetic, bit for bit) instead of bitsandbytes' three launches; false: "
               "bitsandbytes"),
    ]


@hookimpl
def qlora_adapter_model(model, config) -> None:
    nf4_kernel.set_enabled(config["train.fast_dequant"])
    if auto_on(config["train.fused_lora"], on_cuda(model)):
        fuse_lora_layers(model)


@hookimpl
def qlora_on_train_end(run, summary) -> None:
    nf4_kernel.set_enabled(False)  # the kernel is this run's choice: the next run (or none) makes its own


@hookimpl
def qlora_on_train_failed(run, error, status) -> None:
    nf4_kernel.set_enabled(False)


@hookimpl
def qlora_bench_variants():
    return {
        "qlora-fused-lora": {"help": "PEFT's LoRA forward instead of the fused 4-bit + LoRA op (and so, by "
                                     "train.compile's auto, compiled layers: the previous defaults)",
                             "set": ["train.fused_lora=false"], "ablation": True},
        "qlora-fast-dequant": {"help": "bitsandbytes' dequantization (three launches) instead of qlora's single "
                                       "NF4 kernel (train.fast_dequant=false)", "set": ["train.fast_dequant=false"],
                               "ablation": True},
    }
