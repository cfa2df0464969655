"""The trainable parameters gathered into one buffer, so that the optimizer steps one tensor instead of hundreds.

Llama-3-8B at r=16 on all linear layers has 448 LoRA tensors. An optimizer that loops over them (bitsandbytes'
8-bit AdamW launches a kernel per tensor, from Python) spends tens of milliseconds a step on launches for 42
million numbers. :class:`FlatParams` moves each parameter's data into a slice of one buffer per dtype and device
(the parameter stays the same object: its ``data`` becomes a view), gives each parameter a ``grad`` that is a
view into one gradient buffer (autograd adds into an existing gradient in place), and hands the optimizer one
parameter per buffer. Element-wise optimizers (AdamW in every form here) compute exactly what they did per tensor;
bitsandbytes' 8-bit states are quantized in blocks of 256, and every LoRA tensor of a real model is a multiple
of that, so the blocks are the same too. One difference: bitsandbytes keeps 32-bit states for tensors under 4,096
numbers, which a buffer never is (small adapters of toy models get 8-bit states).

An optimizer that needs each matrix's shape (Muon, LoRA+'s separate rates for A and B) needs
``train.flat_params: false``.
"""

from __future__ import annotations

from typing import Any


class FlatParams:
    """``params`` moved into one data and one gradient buffer per (dtype, device); :attr:`params` are the
    buffers as parameters, for the optimizer and gradient clipping."""

    def __init__(self, params: list) -> None:
        import torch

        groups: dict[tuple, list] = {}
        for p in params:
            groups.setdefault((p.dtype, p.device), []).append(p)
        self.params: list = []
        self._links: list[tuple[Any, Any]] = []  # (parameter, its gradient view)
        self._grads: list = []
        self._members: list[tuple[Any, list]] = []  # (buffer, [(parameter, offset)])
        self._copies: list[tuple[Any, Any]] = []  # (buffer, its copy in the compute dtype)
        for (dtype, device), members in groups.items():
            total = sum(p.numel() for p in members)
            data = torch.empty(total, dtype=dtype, device=device)
            grad = torch.zeros(total, dtype=dtype, device=device)
            offset = 0
            placed = []
            with torch.no_grad():
                for p in members:
                    n = p.numel()
                    placed.append((p, offset))
                    data[offset:offset + n].copy_(p.detach().reshape(-1))
                    if p.grad is not None:
                        grad[offset:offset + n].copy_(p.grad.reshape(-1))
                    p.data = data[offset:offset + n].view_as(p)
                    self._links.append((p, grad[offset:offset + n].view_as(p)))
                    offset += n
            flat = torch.nn.Parameter(data, requires_grad=True)
            self.params.append(flat)
            self._grads.append(grad)
            self._members.append((flat, placed))
        self.zero_grad()

    def add_compute_copies(self, dtype) -> int:
        """Keep a copy of each floating-point buffer in ``dtype`` (the layers' compute dtype), with a view of
        it for each parameter as ``param.qlora_compute_copy``, refreshed by :meth:`sync_compute_copies`.

        LoRA matrices are kept in float32 and computed with in bf16: without the copy, each use casts each
        matrix anew (four casts per layer per pass, 1,800 small kernels a step at 8B); with it, one cast per
        step. Returns the number of parameters given a copy."""
        import torch

        count = 0
        for flat, placed in self._members:
            if not flat.dtype.is_floating_point or flat.dtype == dtype:
                continue
            copy = torch.empty(flat.numel(), dtype=dtype, device=flat.device)
            for p, offset in placed:
                p.qlora_compute_copy = copy[offset:offset + p.numel()].view(p.shape)
                count += 1
            self._copies.append((flat, copy))
        self.sync_compute_copies()
        return count

    def sync_compute_copies(self) -> None:
        """After the parameters changed (an optimizer step, a checkpoint loaded): cast them into the copies."""
        import torch

        with torch.no_grad():
            for flat, copy in self._copies:
                copy.copy_(flat)

    def drop_compute_copies(self) -> None:
        """Forget the copies (the end of a run): the layers cast the parameters themselves again."""
        for flat, placed in self._members:
            for p, _ in placed:
                if hasattr(p, "qlora_compute_copy"):
                    del p.qlora_compute_copy
        self._copies = []

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def zero_grad(self) -> None:
        """Zero the gradient buffers and (re)attach each parameter's view: anything that set a ``grad`` to
        None (``model.zero_grad()``) or replaced it is undone, so the next backward adds into the buffers."""
        for grad in self._grads:
            grad.zero_()
        for p, view in self._links:
            if p.grad is not view:
                p.grad = view
        for flat, grad in zip(self.params, self._grads):
            flat.grad = grad

    def collect(self) -> None:
        """Before the optimizer reads the buffers: a parameter whose gradient is no longer its view (something
        set it to None or replaced it) has it copied into the buffer (or zeroed there) and the view put back."""
        for p, view in self._links:
            grad = p.grad
            if grad is not view:
                if grad is None:
                    view.zero_()
                else:
                    view.copy_(grad)
                p.grad = view
