"""Fused GPU kernels from liger-kernel: RMSNorm, rotary embeddings and the SwiGLU MLP as Triton kernels.

On by default; a no-op off CUDA, for architectures liger-kernel does not know, and when liger-kernel is not
installed (``pip install 'qlora[gpu]'``; a notice says so when training starts on CUDA). ``--plugin
no:liger-kernels`` turns it off. The output head and the loss are fused separately, by
``train.fused_cross_entropy`` (liger-kernel's fused linear cross-entropy on CUDA when installed). Measured on an
H200: docs/performance.md.

The plugin is a class: one instance per run remembers whether liger-kernel was missing, to say so once training
starts.
"""

from __future__ import annotations

from qlora_core import hookimpl

MISSING_NOTICE = "liger-kernel is not installed: training without its fused kernels (pip install 'qlora[gpu]')"


class LigerKernels:
    """The ``liger-kernels`` plugin (see the module's docstring)."""

    def __init__(self) -> None:
        self.missing = False  # on CUDA without liger-kernel installed

    @hookimpl
    def qlora_prepare_model(self, model, config) -> None:
        from qlora_plugins.quant_weights import computes_on_cuda

        if not computes_on_cuda(model):
            return
        try:
            from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
        except ImportError:
            self.missing = True  # said when training starts
            return
        # The loss is qlora's own (train.fused_cross_entropy), so liger's loss patches stay off.
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)

    @hookimpl
    def qlora_on_train_start(self, run) -> None:
        if self.missing:
            run.notice(MISSING_NOTICE)

    @hookimpl
    def qlora_bench_variants(self):
        return {
            "qlora-liger": {"help": "without liger-kernel's RMSNorm/RoPE/SwiGLU", "plugins": ["no:liger-kernels"],
                            "ablation": True},
        }
