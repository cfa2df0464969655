"""NF4 weights dequantized in one kernel launch (the ``fused-lora`` plugin's ``train.fast_dequant``).

bitsandbytes' ``dequantize_4bit`` on a double-quantized weight is several launches from Python: the 8-bit
block scales are dequantized into a new float tensor (one kernel), the offset is added to it (another), and the
4-bit values are dequantized with them (a third), each behind a few layers of Python and op dispatch. The
trainer dequantizes every 4-bit linear layer three times a step (forward, recomputation, backward): on the
Llama-3-8B shape that is 640 calls a step, and their CPU cost is what leaves the GPU waiting between kernels
(the profile in docs/performance.md). :func:`dequantize_nf4` does the same arithmetic in one Triton kernel:

    scale = code2[absmax_q[i // blocksize]] * absmax2[i // (blocksize * blocksize2)] + offset   (float32)
    w[i]  = NF4[nibble(i)] * scale                                                    (float32, then rounded)

with the same float32 operations in the same order (no fused multiply-add), so the result is bitsandbytes'
bit for bit (``benchmarks/fused_check.py`` compares them on the GPU). The CPU tests run the kernel itself on
Triton's interpreter against bitsandbytes (bit for bit for float32 and float16 output; bf16 within one step, as
the interpreter rounds bf16 by truncation) and :func:`dequantize_nf4_reference`, the formula in PyTorch.

It covers NF4 with or without double quantization, packed in ``uint8`` or in another storage dtype (FSDP's
``bnb_4bit_quant_storage``). Anything else (FP4, a transposed packing, no CUDA or no Triton) returns None and
the caller uses bitsandbytes; so does every call after the kernel once failed to build or run (with a
warning).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

_KERNEL: Any = None
#: Values per Triton program, and its warps: ``benchmarks/fused_check.py --check nf4`` sweeps them on the GPU.
#: On the H200 (docs/bench/2026-11-28-nf4-sweep.json) 2048 x 4 was among the fastest; so was a form reading
#: each byte once and writing its two values with ``tl.interleave`` (not kept: no clear gain, twice the code).
BLOCK, WARPS = 2048, 4
#: Whether :func:`qlora_plugins.quant_weights.dense_weight` uses this kernel: the ``fused-lora`` plugin sets it
#: from ``train.fast_dequant`` for its run and clears it when the run ends, so a run without that plugin (or
#: after one) dequantizes through bitsandbytes.
enabled = False


def set_enabled(on: bool) -> None:
    global enabled
    enabled = bool(on)


def _kernel():
    """The Triton kernel, built on first use (False where Triton cannot be imported)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - no Triton: bitsandbytes does the work
        _KERNEL = False
        return _KERNEL

    @triton.jit
    def nf4_dequantize(packed, absmax, absmax2, code2, offset, table, out, n,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        byte = tl.load(packed + i // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(i % 2 == 0, byte >> 4, byte & 15)  # bitsandbytes packs the first value high
        value = tl.load(table + nibble)
        block = i // BLOCKSIZE
        if NESTED:
            q = tl.load(absmax + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2 + q) * tl.load(absmax2 + block // BLOCKSIZE2, mask=mask, other=0.0)
            scale = scale + tl.load(offset)
        else:
            scale = tl.load(absmax + block, mask=mask, other=0.0)
        tl.store(out + i, (value * scale).to(out.dtype.element_ty), mask=mask)

    _KERNEL = nf4_dequantize
    return _KERNEL


def supported(weight, quant_state) -> bool:
    """Whether :func:`dequantize_nf4` handles this weight (else the caller uses bitsandbytes); the answer is
    kept on the quantization state for the weight's device, storage dtype, shape and layout (not its address:
    FSDP gathers each weight into a new buffer every step)."""
    key = (weight.device, weight.dtype, tuple(weight.shape), weight.is_contiguous())
    cached = getattr(quant_state, "_qlora_nf4", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    ok = _supported(weight, quant_state)
    quant_state._qlora_nf4 = (key, ok)
    return ok


def _supported(weight, quant_state) -> bool:
    import torch

    if not (weight.is_cuda and quant_state.quant_type == "nf4" and weight.is_contiguous()):
        return False
    if weight.numel() * weight.element_size() * 2 < math.prod(quant_state.shape):  # fewer packed values than the shape
        return False
    if weight.dim() == 2 and weight.shape[0] == 1:  # packed transposed: bitsandbytes returns ``out.t()``
        return False
    if quant_state.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    device = weight.device
    tensors = [quant_state.code, quant_state.absmax]
    if quant_state.nested:
        s2, offset = quant_state.state2, quant_state.offset
        # bitsandbytes rounds the second-level scales in state2's dtype: the kernel's float32 matches it only then
        if not (torch.is_tensor(offset) and offset.dtype == torch.float32 and offset.numel() == 1
                and s2.absmax.dtype == torch.float32 and quant_state.absmax.dtype == torch.uint8
                and s2.code.dtype == torch.float32 and getattr(s2, "dtype", torch.float32) == torch.float32):
            return False
        tensors += [s2.code, s2.absmax, offset]
    # on the weight's GPU already (else each call would copy them there)
    return all(t.device == device for t in tensors) and quant_state.code.dtype == torch.float32


def dequantize_nf4(weight, quant_state, block: int | None = None, warps: int | None = None):
    """``weight`` (packed NF4) as a dense ``quant_state.shape`` matrix in ``quant_state.dtype``, the same bits as
    ``bitsandbytes.functional.dequantize_4bit``; None when :func:`supported` says no. ``block`` and ``warps``
    override :data:`BLOCK` and :data:`WARPS` (the sweep)."""
    if not _kernel() or not supported(weight, quant_state):
        return None
    return _dequantize(weight, quant_state, block, warps)


def _dequantize(weight, quant_state, block: int | None = None, warps: int | None = None):
    """The launch itself, without :func:`supported`'s checks (the tests run it on Triton's CPU interpreter)."""
    import torch

    packed = weight.view(torch.uint8) if weight.dtype != torch.uint8 else weight
    out = torch.empty(quant_state.shape, dtype=quant_state.dtype, device=weight.device)
    n = out.numel()
    nested = quant_state.nested
    if nested:
        s2 = quant_state.state2
        # the offset stays a tensor: reading it as a number would wait for the GPU at every call
        absmax, absmax2, code2, offset, blocksize2 = quant_state.absmax, s2.absmax, s2.code, quant_state.offset, \
            s2.blocksize
    else:  # the nested arguments are unused: any tensor will do
        absmax = absmax2 = code2 = offset = quant_state.absmax.float()
        blocksize2 = 1
    block, warps = block or BLOCK, warps or WARPS
    grid = ((n + block - 1) // block,)
    # Triton launches on the current device; bitsandbytes on the tensor's
    elsewhere = weight.is_cuda and weight.device.index != torch.cuda.current_device()
    try:
        with torch.cuda.device(weight.device) if elsewhere else contextlib.nullcontext():
            _kernel()[grid](packed, absmax, absmax2, code2, offset, quant_state.code, out, n,
                            BLOCKSIZE=quant_state.blocksize, BLOCKSIZE2=blocksize2, NESTED=nested, BLOCK=block,
                            num_warps=warps, enable_fp_fusion=False)
    except Exception as e:  # noqa: BLE001 - Triton cannot build or run it here (an old GPU, a broken install)
        global _KERNEL
        _KERNEL = False  # bitsandbytes from now on, in this process
        import warnings

        warnings.warn(f"qlora: the one-kernel NF4 dequantization failed ({type(e).__name__}: {str(e)[:200]}); "
                      f"using bitsandbytes' (train.fast_dequant=false silences this)", stacklevel=2)
        return None
    return out


def dequantize_nf4_reference(weight, quant_state):
    """:func:`dequantize_nf4`'s formula in PyTorch (any device): the tests compare it with bitsandbytes."""
    import torch

    packed = (weight.view(torch.uint8) if weight.dtype != torch.uint8 else weight).reshape(-1).to(torch.int64)
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)
    n = math.prod(quant_state.shape)
    values = quant_state.code.float().to(weight.device)[nibbles[:n]]  # an odd count leaves the last nibble unused
    blocks = torch.arange(n, device=weight.device) // quant_state.blocksize
    if quant_state.nested:
        s2 = quant_state.state2
        scale = s2.code.float()[quant_state.absmax.to(torch.int64)] * s2.absmax[
            torch.arange(quant_state.absmax.numel(), device=weight.device) // s2.blocksize]
        scale = scale + quant_state.offset
    else:
        scale = quant_state.absmax.float()
    return (values * scale[blocks]).to(quant_state.dtype).view(quant_state.shape)
