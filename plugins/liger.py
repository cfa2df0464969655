"""Fused GPU kernels from liger-kernel: RMSNorm, rotary embeddings and the SwiGLU MLP as Triton kernels.

Not on by default: with qlora's default ``train.compile`` (each decoder layer compiled), torch.compile fuses the
same operations itself, and measured on an H200 (Llama-3-8B shape, docs/performance.md) the run was faster and
leaner without these kernels (14,954 vs 14,212 tokens/s, 6.94 vs 7.31 GiB peak). ``--plugin liger-kernels``
is for runs without compilation (``train.compile: false``). A no-op off CUDA, for architectures liger-kernel
does not know, and when liger-kernel is not installed (``pip install 'qlora[gpu]'``; a notice says so). The
output head and the loss are fused separately, by ``train.fused_cross_entropy`` (liger-kernel's fused linear
cross-entropy on CUDA when installed).
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
