"""Fused GPU kernels from liger-kernel: RMSNorm, rotary embeddings and the SwiGLU MLP as Triton kernels.

On by default; a no-op off CUDA, for architectures liger-kernel does not know, and when liger-kernel is not
installed (``pip install 'qlora[gpu]'``; a notice says so on CUDA). ``--plugin no:liger-kernels`` turns it off.
The output head and the loss are fused separately, by ``train.fused_cross_entropy`` (liger-kernel's fused
linear cross-entropy on CUDA when installed). Measured on an H200: docs/performance.md.
"""

from __future__ import annotations

from qlora_core import hookimpl


@hookimpl
def qlora_prepare_model(model, config) -> None:
    if not any(p.is_cuda for p in model.parameters()):
        return
    try:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    except ImportError:
        model._qlora_liger = "missing"  # the trainer says so when training starts
        return
    # The loss is qlora's own (train.fused_cross_entropy), so liger's loss patches stay off.
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    model._qlora_liger = "applied"


@hookimpl
def qlora_bench_variants():
    return {"qlora-liger": {"help": "without liger-kernel's RMSNorm/RoPE/SwiGLU", "plugins": ["no:liger-kernels"],
                            "ablation": True}}
