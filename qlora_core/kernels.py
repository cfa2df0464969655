"""Fused pieces of the training step that never materialize the whole vocabulary's logits.

:func:`linear_cross_entropy_sum` is the output head and the next-token cross-entropy in one: the logits of a
chunk of positions are made, turned into the loss and the gradients at once, and freed before the next chunk. A
Llama-3 vocabulary (128,256) at 8,192 positions is 3.9 GiB of fp32 logits per copy, several copies in the
plain path; here it is one chunk's worth. On CUDA with liger-kernel installed its Triton kernel does the same
work (``LigerFusedLinearCrossEntropyLoss``); elsewhere the chunked PyTorch function below does, on any device.
"""

from __future__ import annotations

from typing import Any

#: Positions per chunk of the PyTorch path: a chunk's fp32 logits are ``chunk x vocab x 4`` bytes
#: (4,096 x 128,256 x 4 = 2 GiB would be too many; 1,024 make 0.5 GiB).
DEFAULT_CHUNK = 1024

_liger: Any = None


def _liger_loss() -> Any:
    """Liger's fused linear cross-entropy (sum reduction), or None where it cannot run."""
    global _liger
    if _liger is None:
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            _liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        except Exception:  # noqa: BLE001 - no liger-kernel / no triton: the PyTorch path
            _liger = False
    return _liger or None


def _chunked_loss(hidden, weight, targets, chunk: int):
    import torch

    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = (hidden[start:start + chunk] @ weight.t()).float()
        t = targets[start:start + chunk]
        loss += (torch.logsumexp(logits, dim=-1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
    return loss


def _chunked_forward_backward(hidden, weight, targets, chunk: int, need_weight_grad: bool):
    import torch

    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start:start + chunk]
        t = targets[start:start + chunk]
        logits = (h @ weight.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
        # d(loss)/d(logits) = softmax - onehot, computed in place over the chunk's logits
        probs = logits.sub_(lse[:, None]).exp_()
        probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
        g = probs.to(hidden.dtype)
        grad_hidden[start:start + chunk] = g @ weight
        if grad_weight is not None:
            grad_weight += (g.t() @ h).float()
        del logits, probs, g
    return loss, grad_hidden, grad_weight


class _ChunkedLinearCrossEntropy:
    """An autograd function (made lazily, torch is imported only when used)."""

    fn: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.fn is None:
            import torch

            class Fn(torch.autograd.Function):
                @staticmethod
                def forward(ctx, hidden, weight, targets, chunk):
                    need_w = weight.requires_grad
                    loss, gh, gw = _chunked_forward_backward(hidden, weight, targets, chunk, need_w)
                    ctx.save_for_backward(gh, gw if gw is not None else torch.empty(0))
                    ctx.need_w = need_w
                    ctx.weight_dtype = weight.dtype
                    return loss

                @staticmethod
                def backward(ctx, grad_loss):
                    gh, gw = ctx.saved_tensors
                    grad_hidden = gh * grad_loss.to(gh.dtype)
                    grad_weight = (gw * grad_loss).to(ctx.weight_dtype) if ctx.need_w else None
                    return grad_hidden, grad_weight, None, None

            cls.fn = Fn
        return cls.fn


def linear_cross_entropy_sum(hidden, weight, targets, chunk: int = DEFAULT_CHUNK, use_liger: bool | None = None):
    """``cross_entropy(hidden @ weight.T, targets, reduction="sum")`` without keeping the logits.

    :param hidden: ``(n, h)`` inputs of the output head (the positions whose next token is predicted).
    :param weight: ``(V, h)`` the head's weight (no bias); its gradient is computed only if it requires one.
    :param targets: ``(n,)`` next-token ids (no ignored positions: select them before).
    :param use_liger: liger-kernel's Triton kernel (None: on CUDA when installed).
    :returns: the summed loss, a float32 scalar; the gradients of ``hidden`` (and ``weight``) are computed in
        the forward pass, chunk by chunk, and scaled by the incoming gradient in the backward pass.
    """
    import torch

    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return _chunked_loss(hidden, weight, targets, chunk)  # evaluation: no gradients to compute
    if use_liger is None:
        use_liger = hidden.is_cuda
    if use_liger:
        liger = _liger_loss()
        if liger is not None:
            return liger(weight, hidden, targets).float()
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0).float()
    return _ChunkedLinearCrossEntropy.get().apply(hidden, weight, targets, chunk)
