"""Gradient checkpointing: recompute each decoder layer's activations in the backward pass to save memory.

On by default; ``--plugin no:gradient-checkpointing`` trades memory for speed. The layers are recomputed by
qlora's own checkpointing (:mod:`qlora_plugins.layers`), which on CUDA also offloads the layers' saved inputs to
CPU memory asynchronously (``train.activation_offload``), and under ``train.gpu_memory_budget`` recomputes only
as many layers as the budget requires. Models whose decoder layers cannot be found use transformers' own
(non-reentrant) checkpointing. The recomputation skips the forward matmul of each layer's output projection,
whose value backward never reads (``train.lean_recompute``).

The plugin is a class: one instance per run keeps where the memory budget stands (measured on the first step
this process runs, applied after that step's backward pass).
"""

from __future__ import annotations

from qlora_core import Option, auto_on, hookimpl
from qlora_plugins.layers import (checkpoint_layers, layer_policy, layer_state, layers_within_budget,
                                  reserve_offload, set_checkpointed_layers)
from qlora_plugins.quant_weights import computes_on_cuda


def _peft_model(model):
    """The PEFT model under a distribution wrapper (DDP's and FSDP's ``module``), or ``model`` itself."""
    return getattr(model, "module", model)


def _device(run):
    import torch

    accelerator = run.accelerator
    return accelerator.device if accelerator is not None else torch.device(run.device)


class GradientCheckpointing:
    """The ``gradient-checkpointing`` plugin (see the module's docstring)."""

    def __init__(self) -> None:
        self._budget_pending = False  # the first step this process runs has not begun yet
        self._measuring = False  # this step measures one recomputed layer's activations for the budget

    @hookimpl
    def qlora_config_options(self):
        return [
            Option("train.activation_offload", "auto_bool", "auto",
                   "with gradient checkpointing: copy each layer's saved input to CPU memory while the next layers "
                   "compute, and back before its backward (auto: on CUDA)"),
            Option("train.lean_recompute", "bool", True,
                   "with gradient checkpointing: skip the forward matmul of each layer's output projection (MLP "
                   "down projection) in the recomputation, since backward never reads its output; checked against "
                   "the full recomputation on the first backward"),
            Option("train.gpu_memory_budget", "float", 0.0,
                   "GiB the step may use: layers beyond what gradient checkpointing needs to stay within it keep "
                   "their activations (faster); 0: recompute every layer (leanest)", minimum=0.0),
        ]

    @hookimpl
    def qlora_prepare_model(self, model, config) -> None:
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False
        offload = auto_on(config["train.activation_offload"], computes_on_cuda(model))
        if checkpoint_layers(model, offload=offload, lean=config["train.lean_recompute"]):
            return
        if not getattr(model, "supports_gradient_checkpointing", False):
            return
        # transformers 5.2x renamed the method; older releases (the GPU image's 5.17) only have the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The frozen embeddings give outputs without grad; the checkpointed layers still need a graph to the adapters.
        model.enable_input_require_grads()

    @hookimpl
    def qlora_on_train_start(self, run) -> None:
        model = _peft_model(run.model)
        # The largest micro-batch to expect (tokens), so that the offload's pinned CPU buffers are allocated once
        # rather than regrown as ragged batches bring longer ones.
        reserve_offload(model, run.max_micro_batch_tokens)
        policy = layer_policy(model)
        if policy is not None and run.device != "cpu":
            run.notice(f"decoder layers: {policy.describe()}")
        self._budget_pending = True
        self._measuring = False

    @hookimpl(trylast=True)
    def qlora_on_step_begin(self, run, step) -> None:
        if not self._budget_pending:
            return
        self._budget_pending = False
        self._measuring = self._start_budget(run.config, _peft_model(run.model), _device(run))

    @hookimpl(tryfirst=True)
    def qlora_on_after_backward(self, run, model, optimizer) -> None:
        if not self._measuring:
            return
        self._measuring = False
        self._apply_budget(run, _peft_model(model), _device(run))

    def _start_budget(self, config, model, device) -> bool:
        """Before the first step under ``train.gpu_memory_budget``: have the next backward pass measure one
        recomputed layer's activations, and measure the step's peak afresh. False when there is nothing to
        measure (no budget, not CUDA, no layer recomputed)."""
        import torch

        policy = layer_policy(model)
        if config["train.gpu_memory_budget"] <= 0 or device.type != "cuda" or not policy \
                or not policy.checkpointed:
            return False
        layer_state(model).measure_next = True
        torch.cuda.reset_peak_memory_stats(device)
        return True

    def _apply_budget(self, run, model, device) -> None:
        """After the first step's backward: keep the activations of as many layers as
        ``train.gpu_memory_budget`` allows, and tell the run."""
        import torch

        state, policy = layer_state(model), layer_policy(model)
        per_layer = state.layer_activation_bytes
        if not per_layer:
            return
        budget = run.config["train.gpu_memory_budget"] * 2**30
        peak = torch.cuda.max_memory_allocated(device)
        keep = layers_within_budget(policy.checkpointed, peak, per_layer, budget)
        set_checkpointed_layers(model, keep)
        run.notice(f"train.gpu_memory_budget {budget / 2**30:g} GiB: peak {peak / 2**30:.1f} GiB with every "
                   f"layer recomputed, {per_layer / 2**30:.2f} GiB per layer kept; "
                   f"{policy.checkpointed - keep} of {policy.layers} layers now keep their activations")

    @hookimpl
    def qlora_plan_settings(self, settings, config) -> None:
        settings.checkpointing = True
        # checkpointed inputs offloaded to CPU memory (train.activation_offload's auto is on for CUDA)
        settings.offload = auto_on(config["train.activation_offload"], True)

    @hookimpl
    def qlora_bench_variants(self):
        return {
            "qlora-lean-recompute": {"help": "the output projections recomputed in full (train.lean_recompute=false)",
                                     "set": ["train.lean_recompute=false"], "ablation": True},
            "qlora-offload": {"help": "checkpointed inputs kept on the GPU (no CPU offload)",
                              "set": ["train.activation_offload=false"], "ablation": True},
            "qlora-checkpointing": {"help": "no gradient checkpointing at all",
                                    "plugins": ["no:gradient-checkpointing"]},
            "qlora+budget": {"help": "train.gpu_memory_budget=40 GiB: layers that fit keep their activations",
                             "set": ["train.gpu_memory_budget=40"], "ablation": True},
        }
