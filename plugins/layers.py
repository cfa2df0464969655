"""How the decoder layers run during training: recomputed or not, their saved inputs offloaded or not, compiled
or not (the engine of the ``gradient-checkpointing`` and ``compile-layers`` plugins).

Gradient checkpointing keeps only each decoder layer's input and recomputes the layer in the backward pass.
:func:`checkpoint_layers` does it with a custom autograd function instead of transformers' own checkpointing so
that it can also:

* **offload** the saved inputs to pinned CPU memory on a side CUDA stream, overlapped with the next layers'
  compute, and bring each back (prefetched one layer ahead) during the backward pass: the GPU then holds one
  layer's activations at a time, whatever the depth of the model;
* **checkpoint only some layers**: layers left out keep their activations (no recomputation, faster), so a
  memory budget can buy speed layer by layer (:func:`layers_within_budget`);
* **compile** (:func:`compile_layers`) each layer's own computation with ``torch.compile`` (the checkpointing
  and the copies stay outside the compiled graph);
* **recompute leanly**: the layer's output projection (the MLP's down projection) feeds only the residual sum
  that is the layer's output, and backward never reads that sum's value. So the recomputation skips its
  forward matmul (about a quarter of a Llama layer's forward FLOPs) and keeps only its backward. The first
  backward pass checks this on the real model: the lean recomputation, with the skipped output filled with
  NaN, must give the full recomputation's gradients, or the model keeps the full one.

Off CUDA the offload is a no-op (the input is kept as it is) and the rest works the same, so the CPU tests run
the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from qlora_plugins.quant_weights import dense_weight, register_quant_weight


def decoder_layers(model) -> list:
    """The decoder layers of a causal LM (under a PEFT wrapper too): the first ``nn.ModuleList`` of layers."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else getattr(inner, "model", inner)
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return list(layers)
    for module in inner.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and \
                type(module[0]).__name__.endswith(("DecoderLayer", "Block", "Layer")):
            return list(module)
    return []


@dataclass
class _Offloader:
    """Copies saved layer inputs to pinned CPU buffers and back, on one side stream (CUDA only)."""

    stream: Any = None
    buffers: dict[int, Any] = field(default_factory=dict)  # layer index -> pinned CPU buffer (reused every step)
    # Tokens of the largest micro-batch expected (0: unknown): a buffer is allocated that large at once, not
    # regrown (pinned allocation is slow: about a second for 2 GiB) each time ragged batches bring a longer one.
    capacity_tokens: int = 0
    pending: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # prefetched: index -> (gpu tensor, event)

    def offload(self, index: int, x):
        """Start copying ``x`` to the CPU; returns what :meth:`fetch` needs later."""
        import torch

        if not x.is_cuda:
            return x
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=x.device)
        numel = x.numel()
        buf = self.buffers.get(index)
        if buf is None or buf.numel() < numel or buf.dtype != x.dtype:
            size = max(numel, self.capacity_tokens * x.shape[-1])
            buf = torch.empty(size, dtype=x.dtype, pin_memory=True)
            self.buffers[index] = buf
        cpu = buf[:numel].view(x.shape)
        self.stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(self.stream):
            cpu.copy_(x, non_blocking=True)
        x.record_stream(self.stream)  # x may be freed by the caller; its memory waits for the copy
        return (cpu, x.device)

    def prefetch(self, index: int, saved) -> None:
        """Start bringing layer ``index``'s input back to the GPU (before its backward needs it)."""
        import torch

        if not isinstance(saved, tuple) or index in self.pending:
            return
        cpu, device = saved
        compute = torch.cuda.current_stream(device)
        gpu = torch.empty(cpu.shape, dtype=cpu.dtype, device=device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            gpu.copy_(cpu, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        gpu.record_stream(compute)
        self.pending[index] = (gpu, event)

    def fetch(self, index: int, saved):
        import torch

        if not isinstance(saved, tuple):
            return saved
        if index not in self.pending:
            self.prefetch(index, saved)
        gpu, event = self.pending.pop(index)
        torch.cuda.current_stream(gpu.device).wait_event(event)
        return gpu


class _State:
    """What the layers of one model share: the offloader and the inputs saved in the current forward pass."""

    def __init__(self, offload: bool):
        self.offload = offload
        self.offloader = _Offloader()
        self.saved: dict[int, Any] = {}  # layer index -> saved input (on the GPU, or (cpu buffer, device))
        self.measure_next = False
        self.layer_activation_bytes: int | None = None
        # Lean recomputation: wanted (option), whether the check on the first backward passed (None: not run
        # yet), and the flags the output projections read while a layer is being recomputed.
        self.lean = False
        self.lean_ok: bool | None = None
        self.lean_active = False
        self.lean_fill_nan = False
        self.output_projections = 0
        self.layers: dict[int, Any] = {}  # layer index -> the decoder layer (for the lean check's parameters)


#: Names of a decoder layer's output projection: the MLP's last linear, whose output only joins the residual.
OUTPUT_PROJECTIONS = ("down_proj", "fc2", "w2", "dense_4h_to_h")


_OPS: Any = None


def _grad_only_ops():
    """Two custom ops (opaque to torch.compile, which traces the layers around them without a graph break):
    ``qlora::grad_only_linear`` allocates a frozen linear layer's output without computing it, and its
    backward, ``qlora::grad_only_linear_input_grad``, computes the input gradient ``dy @ W`` (W dequantized
    when 4-bit)."""
    global _OPS
    if _OPS is not None:
        return _OPS
    import torch

    @torch.library.custom_op("qlora::grad_only_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, int out_features, bool fill_nan) -> Tensor")
    def grad_only_linear(x, weight, out_features, fill_nan):
        shape = (*x.shape[:-1], out_features)
        if fill_nan:
            return torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)
        return torch.empty(shape, dtype=x.dtype, device=x.device)

    @grad_only_linear.register_fake
    def _(x, weight, out_features, fill_nan):
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.custom_op("qlora::grad_only_linear_input_grad", mutates_args=(),
                             schema="(Tensor dy, Tensor weight, int in_features) -> Tensor")
    def input_grad(dy, weight, in_features):
        w = dense_weight(weight, dy.dtype)
        return (dy.reshape(-1, dy.shape[-1]) @ w).view(*dy.shape[:-1], in_features)

    @input_grad.register_fake
    def _(dy, weight, in_features):
        return dy.new_empty((*dy.shape[:-1], in_features))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.in_features = inputs[0].shape[-1]

    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        return torch.ops.qlora.grad_only_linear_input_grad(dy, weight, ctx.in_features), None, None, None

    grad_only_linear.register_autograd(backward, setup_context=setup_context)
    _OPS = grad_only_linear
    return _OPS


def _grad_only(module, x, fill_nan: bool):
    """``module``'s output, allocated but not computed, with the backward of the real layer (its bias, frozen,
    changes no gradient)."""
    op = _grad_only_ops()
    compute = getattr(module, "compute_dtype", None) or x.dtype
    if getattr(module, "quant_state", None) is not None and getattr(module.weight, "quant_state", None) is None:
        # FSDP gathered the weight into a plain view: bitsandbytes keeps the state on the module and puts it back
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(module)
    return op(x.to(compute), module.weight, module.out_features, fill_nan).to(x.dtype)


def _lean_capable(module) -> bool:
    """A frozen linear layer whose backward :func:`_grad_only` can do: a bitsandbytes 4-bit one with its
    quantization state (which bitsandbytes also keeps on the module, for FSDP's gathered views), or a plain one.
    Checked when the model is prepared, before any FSDP wrapping."""
    import torch

    weight = getattr(module, "weight", None)
    if not isinstance(module, torch.nn.Linear) or weight is None or weight.requires_grad:
        return False
    if hasattr(module, "_hf_hook"):  # accelerate's CPU offload moves the weight in and out
        return False
    if type(weight).__name__ == "Params4bit":
        return getattr(weight, "quant_state", None) is not None
    return weight.dim() == 2 and tuple(weight.shape) == (module.out_features, module.in_features)


def _mark_output_projection(module, state: _State) -> None:
    """Give the frozen linear ``module`` a forward that, during a lean recomputation, only builds the backward
    (its bias, frozen, does not change any gradient either)."""
    if getattr(module, "_qlora_lean_state", None) is not None:
        module._qlora_lean_state = state
        return
    _grad_only_ops()  # registered now: torch.compile cannot trace the registration
    original = module.forward
    module._qlora_lean_state = state
    register_quant_weight(module)

    def forward(x, *args, **kwargs):
        lean_state = module._qlora_lean_state
        if lean_state.lean_active and not args and not kwargs:
            return _grad_only(module, x, lean_state.lean_fill_nan)
        return original(x, *args, **kwargs)

    module.forward = forward


def _output_projections(layer) -> list:
    """The frozen base linears of ``layer``'s output projections (under PEFT's LoRA wrapper, its base layer)."""
    import torch

    found = []
    for name, module in layer.named_modules():
        if name.rsplit(".", 1)[-1] not in OUTPUT_PROJECTIONS:
            continue
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear):
            found.append(base)
    return found


def _checkpoint_function():
    import torch

    class CheckpointedLayer(torch.autograd.Function):
        """Runs a decoder layer without keeping its activations; recomputes it in the backward pass."""

        @staticmethod
        def forward(ctx, hidden, run: Callable, state: _State, index: int, *tensors):
            ctx.run, ctx.state, ctx.index = run, state, index
            ctx.save_for_backward(*tensors)  # small extras (rotary cos/sin, masks): kept on the GPU
            ctx.rng_cpu = torch.get_rng_state()
            ctx.rng_cuda = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
            ctx.autocast = _autocast_state(hidden.device.type)
            with torch.no_grad():
                out = run(hidden, *tensors)
            state.saved[index] = state.offloader.offload(index, hidden.detach()) if state.offload \
                else hidden.detach()
            return out

        @staticmethod
        def backward(ctx, grad_out):
            state, index = ctx.state, ctx.index
            hidden = state.offloader.fetch(index, state.saved.pop(index))
            # While this layer recomputes, bring the previous layer's input back.
            if state.offload and index - 1 in state.saved:
                state.offloader.prefetch(index - 1, state.saved[index - 1])
            tensors = ctx.saved_tensors
            hidden = hidden.detach().requires_grad_(True)
            if state.lean and state.output_projections and state.lean_ok is None:
                return (_check_lean(ctx, state, hidden, grad_out), None, None, None) + (None,) * len(tensors)
            measure = state.measure_next and hidden.is_cuda
            before = torch.cuda.memory_allocated(hidden.device) if measure else 0
            out = _recompute(ctx, hidden, lean=bool(state.lean and state.lean_ok and not measure))
            if measure:  # what this layer keeps for backward when it is not checkpointed
                state.layer_activation_bytes = torch.cuda.memory_allocated(hidden.device) - before
                state.measure_next = False
            torch.autograd.backward(out, grad_out)
            return (hidden.grad, None, None, None) + (None,) * len(tensors)

    return CheckpointedLayer


def _recompute(ctx, hidden, lean: bool, fill_nan: bool = False):
    """Run the layer again, recording its graph, with the RNG state and autocast of its first run; ``lean``:
    the output projections only build their backward."""
    import torch

    state = ctx.state
    with torch.random.fork_rng(devices=[hidden.device] if hidden.is_cuda else [], device_type=hidden.device.type):
        torch.set_rng_state(ctx.rng_cpu)
        if ctx.rng_cuda is not None:
            torch.cuda.set_rng_state(ctx.rng_cuda, hidden.device)
        state.lean_active, state.lean_fill_nan = lean, fill_nan
        try:
            with torch.enable_grad(), _autocast(hidden.device.type, ctx.autocast):
                return ctx.run(hidden, *ctx.saved_tensors)
        finally:
            state.lean_active = state.lean_fill_nan = False


def _check_lean(ctx, state: _State, hidden, grad_out):
    """The first lean recomputation, checked: the gradients of the full recomputation (input and this layer's
    parameters) against the lean one's with the skipped outputs filled with NaN. If any differs or is not
    finite, the model keeps the full recomputation. Then the layer's backward runs as usual."""
    import torch

    layer = state.layers.get(ctx.index)
    params = [p for p in layer.parameters() if p.requires_grad] if layer is not None else []
    inputs = [hidden, *params]
    full = torch.autograd.grad(_recompute(ctx, hidden, lean=False), inputs, grad_out, allow_unused=True)
    lean = torch.autograd.grad(_recompute(ctx, hidden, lean=True, fill_nan=True), inputs, grad_out,
                               allow_unused=True)
    ok = True
    for a, b in zip(full, lean):
        if (a is None) != (b is None):
            ok = False
        elif a is not None:
            a32, b32 = a.float(), b.float()
            scale = a32.abs().max().clamp_min(1e-30)
            if not bool(torch.isfinite(b32).all()) or float((a32 - b32).abs().max() / scale) > 0.05:
                ok = False
    state.lean_ok = ok
    del full, lean
    torch.autograd.backward(_recompute(ctx, hidden, lean=ok), grad_out)
    return hidden.grad


def _autocast_state(device_type: str):
    import torch

    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast(device_type: str, dtype):
    import contextlib

    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


_FUNCTION: Any = None


def _wrap(layer, index: int, state: _State) -> None:
    """Give ``layer`` a forward that checkpoints it (when ``layer._qlora_checkpoint`` is set and gradients are
    being recorded) and otherwise runs ``layer._qlora_inner`` (its own forward, or a compiled one)."""
    global _FUNCTION
    import torch

    if _FUNCTION is None:
        _FUNCTION = _checkpoint_function()
    if getattr(layer, "_qlora_original_forward", None) is None:
        layer._qlora_original_forward = layer.forward
        layer._qlora_inner = layer._qlora_original_forward
    layer._qlora_state = state
    state.layers[index] = layer

    def forward(hidden_states, *args, **kwargs):
        # The compiled forward is for training; generation (KV cache, one token at a time) runs the plain one.
        inner = layer._qlora_inner if layer.training else layer._qlora_original_forward
        if not (layer._qlora_checkpoint and layer.training and torch.is_grad_enabled()):
            return inner(hidden_states, *args, **kwargs)
        # A recomputed layer must not append its keys and values to a KV cache a second time: training needs
        # no cache, so a checkpointed call gets none.
        for name in ("cache", "past_key_values", "past_key_value"):  # the name changed across transformers
            if kwargs.get(name) is not None:
                kwargs[name] = None
        # Tensors among the keyword arguments (rotary cos/sin, masks) go through the autograd function as
        # inputs; the rest (flags) are bound in the closure.
        names, tensors = [], []
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                names.append((k, None))
                tensors.append(v)
            elif isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) for t in v):
                names.append((k, len(v)))
                tensors.extend(v)
        others = {k: v for k, v in kwargs.items() if k not in {n for n, _ in names}}

        def run(h, *ts):
            kw, i = dict(others), 0
            for k, n in names:
                if n is None:
                    kw[k] = ts[i]
                    i += 1
                else:
                    kw[k] = tuple(ts[i:i + n])
                    i += n
            out = inner(h, *args, **kw)
            layer._qlora_returns_tuple = isinstance(out, tuple)
            return out[0] if isinstance(out, tuple) else out

        if not hidden_states.requires_grad:  # e.g. frozen embeddings: the function must still see a gradient
            hidden_states = hidden_states.detach().requires_grad_(True)
        out = _FUNCTION.apply(hidden_states, run, layer._qlora_state, index, *tensors)
        return (out,) if layer._qlora_returns_tuple else out

    layer.forward = forward


@dataclass
class LayerPolicy:
    """What the decoder layers do: how many are recomputed, whether their inputs are offloaded,
    whether layers are compiled."""

    layers: int
    checkpointed: int
    offload: bool
    compiled: bool
    lean: bool | None = False  # lean recomputation: wanted and not yet checked (None), passed, or not used

    def describe(self) -> str:
        parts = [f"{self.checkpointed} of {self.layers} decoder layers recomputed in backward"]
        if self.checkpointed and self.offload:
            parts.append("their inputs offloaded to CPU memory asynchronously")
        if self.checkpointed and self.lean is not False:
            parts.append("the output projections' forward skipped in the recomputation"
                         + (" (checked on the first backward)" if self.lean is None else ""))
        if self.compiled:
            parts.append("each layer compiled")
        return ", ".join(parts)


def layer_state(model) -> "_State | None":
    """The state the model's wrapped decoder layers share (on the model, or on the base under a PEFT wrapper)."""
    state = getattr(model, "_qlora_layer_state", None)
    if state is None and hasattr(model, "get_base_model"):
        state = getattr(model.get_base_model(), "_qlora_layer_state", None)
    return state


def _wrapped_layers(model) -> list:
    """The decoder layers, each given the dispatching forward of :func:`_wrap` (once)."""
    layers = decoder_layers(model)
    if not layers:
        return []
    state = layer_state(model) or _State(offload=False)
    model._qlora_layer_state = state
    for i, layer in enumerate(layers):
        if getattr(layer, "_qlora_state", None) is not state:
            _wrap(layer, i, state)
            layer._qlora_checkpoint = False
            layer._qlora_returns_tuple = False
    return layers


def checkpoint_layers(model, offload: bool = False, lean: bool = False) -> bool:
    """Recompute every decoder layer in the backward pass, its input kept (or offloaded when ``offload``);
    ``lean``: the output projections only build their backward in the recomputation (checked on the first
    backward). False when the model's decoder layers cannot be found (the caller falls back to transformers'
    own)."""
    layers = _wrapped_layers(model)
    if not layers:
        return False
    state = layer_state(model)
    state.offload = offload
    state.lean, state.lean_ok = lean, None
    count = 0
    for layer in layers:
        layer._qlora_checkpoint = True
        if lean:
            for module in _output_projections(layer):
                if _lean_capable(module):
                    _mark_output_projection(module, state)
                    count += 1
    state.output_projections = count
    return True


def reserve_offload(model, tokens: int) -> None:
    """Size the offload buffers for micro-batches of up to ``tokens`` tokens (batch x sequence)."""
    state = layer_state(model)
    if state is not None:
        state.offloader.capacity_tokens = tokens


def compile_layers(model) -> bool:
    """Compile each decoder layer's own forward with ``torch.compile`` (for training)."""
    import torch

    layers = _wrapped_layers(model)
    for layer in layers:
        if layer._qlora_inner is layer._qlora_original_forward:
            layer._qlora_inner = torch.compile(layer._qlora_original_forward)
    return bool(layers)


def layer_policy(model) -> LayerPolicy | None:
    """What the decoder layers do now (None if they were never configured)."""
    state = layer_state(model)
    layers = decoder_layers(model)
    if state is None or not layers:
        return None
    checkpointed = sum(bool(getattr(layer, "_qlora_checkpoint", False)) for layer in layers)
    compiled = any(getattr(layer, "_qlora_inner", None) is not getattr(layer, "_qlora_original_forward", None)
                   for layer in layers)
    lean = state.lean_ok if state.lean and state.output_projections else False
    return LayerPolicy(layers=len(layers), checkpointed=checkpointed, offload=state.offload and checkpointed > 0,
                       compiled=compiled, lean=lean)


def set_checkpointed_layers(model, count: int) -> None:
    """Recompute only the first ``count`` decoder layers (the others keep their activations)."""
    for i, layer in enumerate(decoder_layers(model)):
        if hasattr(layer, "_qlora_checkpoint"):
            layer._qlora_checkpoint = i < count


def layers_within_budget(n_layers: int, peak_all_checkpointed: float, layer_activation_bytes: float,
                         budget_bytes: float, margin: float = 0.9) -> int:
    """How many layers must stay checkpointed so that the peak stays within ``budget_bytes``.

    Each layer that is not recomputed keeps its activations (``layer_activation_bytes``) on top of the peak
    measured with every layer recomputed; ``margin`` leaves room for what varies between steps.
    """
    if layer_activation_bytes <= 0:
        return n_layers
    room = budget_bytes * margin - peak_all_checkpointed
    free = int(max(0.0, room) // layer_activation_bytes)
    return max(0, n_layers - min(n_layers, free))
