"""The trainable parameters gathered into one buffer, so that the optimizer steps one tensor instead of hundreds:
the ``flat-params`` plugin (a default).

Llama-3-8B at r=16 on all linear layers has 448 LoRA tensors. An optimizer that loops over them (bitsandbytes'
8-bit AdamW launches a kernel per tensor, from Python) spends tens of milliseconds a step on launches for 42
million numbers. :class:`FlatParams` moves each parameter's data into a slice of one buffer per dtype and device
(the parameter stays the same object: its ``data`` becomes a view), gives each parameter a ``grad`` that is a
view into one gradient buffer (autograd adds into an existing gradient in place), and hands the optimizer one
parameter per buffer. Element-wise optimizers (AdamW in every form here) compute exactly what they did per tensor;
bitsandbytes' 8-bit states are quantized in blocks of 256, and every LoRA tensor of a real model is a multiple
of that, so the blocks are the same too. One difference: bitsandbytes keeps 32-bit states for tensors under 4,096
numbers, which a buffer never is (small adapters of toy models get 8-bit states).

With ``train.flat_params`` (the default) the plugin's :func:`qlora_core.hookspecs.qlora_optimizer_params` hands the
buffers to the optimizer and to gradient clipping; not under accelerate's DDP, which keeps per-tensor gradient
buckets of its own (a plugin's wrapper, such as the ``fsdp`` plugin's, leaves the adapters as they are). An
optimizer that needs each matrix's shape (Muon, LoRA+'s separate rates for A and B) needs
``train.flat_params: false``, or ``--plugin no:flat-params``.

With the fused 4-bit + LoRA op and a compute dtype narrower than the adapters' float32
(``train.adapter_compute_copy``), the plugin also keeps the adapters' copy in the compute dtype, refreshed once a
step after the optimizer, which the fused layers read instead of casting each matrix at each use; the copies are
removed when the run ends, however it ends.
"""

from __future__ import annotations

from typing import Any

from qlora_core import Option, hookimpl
from qlora_plugins.fused_lora import fused_count  # its fused layers read the adapters' compute copies


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


class FlatParamsPlugin:
    """The ``flat-params`` plugin. Its per-run state: :attr:`flat`, the run's :class:`FlatParams` (None when the
    run's optimizer steps the parameters as they are: the option off, DDP, or another plugin's choice)."""

    def __init__(self) -> None:
        self.flat: FlatParams | None = None

    @hookimpl
    def qlora_config_options(self):
        return [
            Option("train.flat_params", "bool", True,
                   "gather the trainable parameters and their gradients into one buffer per dtype, so the optimizer "
                   "and gradient clipping step one tensor instead of one per adapter matrix (not with DDP); set "
                   "false for an optimizer plugin that needs each matrix's shape"),
            Option("train.adapter_compute_copy", "bool", True,
                   "with train.flat_params and the fused LoRA op: keep the adapters' copy in the compute dtype "
                   "(bf16), refreshed once a step after the optimizer, instead of casting each float32 adapter "
                   "matrix at each use"),
        ]

    @hookimpl(trylast=True)
    def qlora_optimizer_params(self, params, model, config):
        import torch

        self.flat = None
        # DDP keeps per-tensor gradient buckets of its own; a plugin's wrapper (fsdp) leaves the adapters as they
        # are, so they can be gathered like an unwrapped model's.
        if not config["train.flat_params"] or isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return None
        self.flat = FlatParams(params)
        return self.flat.params

    @hookimpl(trylast=True)
    def qlora_on_train_start(self, run) -> None:
        import torch

        if self.flat is None:
            return
        # The adapters' copy for the fused op (one cast a step, not four per layer), made once the loop runs, so
        # that however the run ends qlora_on_train_end or qlora_on_train_failed removes it: a copy left on the
        # parameters would be read, stale, by a later run or forward that does not keep one.
        dtype = getattr(torch, run.compute_dtype)
        if run.config["train.adapter_compute_copy"] and dtype != torch.float32 and fused_count(run.model) > 0:
            self.flat.add_compute_copies(dtype)
        self.flat.sync_compute_copies()  # the parameters as they are now (a resumed checkpoint's, a callback's)

    @hookimpl(trylast=True)
    def qlora_on_after_backward(self, run, model, optimizer) -> None:
        if self.flat is not None:
            self.flat.collect()  # after every other plugin's change of the gradients, before clipping

    @hookimpl(tryfirst=True)
    def qlora_on_step_end(self, run, metrics) -> None:
        if self.flat is not None:
            self.flat.sync_compute_copies()  # the optimizer has stepped: before any other forward
            self.flat.zero_grad()

    @hookimpl
    def qlora_on_train_end(self, run, summary) -> None:
        if self.flat is not None:
            self.flat.drop_compute_copies()

    @hookimpl
    def qlora_on_train_failed(self, run, error, status) -> None:
        if self.flat is not None:
            self.flat.drop_compute_copies()

    @hookimpl
    def qlora_plan_settings(self, settings, config) -> None:
        from qlora_core import auto_on

        # the fused op (auto: on CUDA) reads the adapters' bf16 copy, kept beside the flat float32 buffer
        settings.adapter_copy = (settings.loss == "qlora" and settings.compute_dtype != "float32"
                                 and bool(config["train.adapter_compute_copy"]) and bool(config["train.flat_params"])
                                 and auto_on(config.get("train.fused_lora", False), True))

    @hookimpl
    def qlora_bench_variants(self):
        return {
            "qlora-flat-params": {"help": "the optimizer steps each adapter tensor separately "
                                          "(train.flat_params=false)",
                                  "set": ["train.flat_params=false"], "ablation": True},
            "qlora-adapter-copy": {"help": "the adapters cast to bf16 at each use instead of one kept copy "
                                           "refreshed each step (train.adapter_compute_copy=false)",
                                   "set": ["train.adapter_compute_copy=false"], "ablation": True},
        }
