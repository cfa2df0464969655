"""Attention over packed examples with no padding and no filler, variable-length attention: the ``varlen-packing``
plugin (a default).

With ``train.packing`` and ``train.packing_attention: varlen`` (``auto``: on CUDA, when torch has the kernel and
the model's attention is plain causal attention) a micro-batch is one row: the examples end to end, their
boundaries given by ``cu_seq_lens`` (the cumulative lengths, ``[0, n1, n1 + n2, ...]``; the plugin's
:func:`qlora_core.hookspecs.qlora_collate` makes them with ``collate_packed(..., varlen=True)``). Each example
attends causally within itself only, and costs what it would alone: no square of the row, no filler segment,
no mask. On CUDA this is torch's flash-attention kernel for variable lengths
(``torch.nn.attention.varlen.varlen_attn``); elsewhere each example runs through ``scaled_dot_product_attention``
on its own (the reference, slow but exact). With ``rows``, or ``--plugin no:varlen-packing``, the core packs
into rows of up to ``train.max_seq_length`` tokens instead (block-diagonal masks, filler segments).

It is an attention implementation registered with transformers (:data:`NAME`): set on the model for training
(when the adapters are added, :func:`use_varlen`; the model's own is put back when the run ends), it handles a
forward that carries ``cu_seq_lens_q`` (the packed micro-batches) and hands every other forward (padded batches,
generation) to transformers' own sdpa attention. While a packed forward runs (:func:`packed_forward`, entered by
hooks on the model's decoder whenever its call carries ``cu_seq_lens_q``), its mask function makes no mask: the
boundaries are in ``cu_seq_lens``.
"""

from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager
from typing import Any

from qlora_core import Option, UsageError, collate_packed, hookimpl

#: The attention implementation's name in transformers' registry.
NAME = "qlora_varlen"

_active = 0  # > 0 while a packed forward runs: its mask function makes no mask
_kernel_kwargs: dict[str, Any] | None = None
_longest: int | None = None  # the longest an example can be (train.max_seq_length); None: the row's length


def cuda_kernel_available() -> bool:
    """Whether torch has the variable-length flash-attention kernel and a GPU it runs on (compute 8.0+)."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported(model, longest: int | None = None) -> str | None:
    """Why the varlen attention cannot stand in for ``model``'s own (None if it can): it is plain causal
    softmax attention, with no logit soft-capping, attention sinks or attention dropout, and no sliding window
    (one that no example can outgrow, ``longest`` tokens at most, changes nothing)."""
    config = model.config
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping (attn_logit_softcapping)"
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ()) or (
        window and getattr(config, "use_sliding_window", True))
    if sliding and not _within(window, longest):
        return f"sliding-window attention (sliding_window={window}) that examples of {longest} tokens outgrow"
    if getattr(config, "attention_dropout", 0.0):
        return f"attention dropout ({config.attention_dropout})"
    return None


def _within(window: int | None, longest: int | None) -> bool:
    """Whether a sliding window of ``window`` tokens never cuts an example of up to ``longest`` tokens."""
    return window is not None and longest is not None and longest <= window


def register() -> None:
    """Register the attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, _mask)


def use_varlen(model, longest: int | None = None) -> str:
    """Switch ``model`` to the varlen attention, its decoder's calls that carry ``cu_seq_lens_q`` run as packed
    forwards; returns the implementation it had (for :func:`restore`). ``longest``: no example is longer
    (``train.max_seq_length``); the kernel is sized by it."""
    global _longest
    _longest = longest
    register()
    if cuda_kernel_available():
        _kernel_options()
    before = model.config._attn_implementation
    _set(model, NAME)
    _hook_decoder(model)
    return before


def restore(model, implementation: str) -> None:
    """Put ``model``'s own attention implementation back (what :func:`use_varlen` returned)."""
    _set(model, implementation)
    _unhook_decoder(model)


@contextmanager
def attention_of(model, longest: int | None = None):
    """``model`` on the varlen attention while the block runs, its own attention back afterwards."""
    before = use_varlen(model, longest)
    try:
        yield
    finally:
        restore(model, before)


def _set(model, implementation: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(implementation)
            return
        except (ValueError, TypeError, AttributeError):
            pass
    for module in model.modules():  # older transformers: every (sub)config the attention layers read
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = implementation


@contextmanager
def packed_forward():
    """While it is open, the varlen implementation's mask function makes no mask (the forward is packed)."""
    global _active
    _active += 1
    try:
        yield
    finally:
        _active -= 1


# The decoders whose calls enter packed_forward() when they carry cu_seq_lens_q: decoder -> [hook handles, users].
_hooked: "weakref.WeakKeyDictionary[Any, list]" = weakref.WeakKeyDictionary()


def _decoder(model):
    """The module that makes the attention masks and runs the decoder layers (``get_decoder()``), else ``model``.
    Every path to the layers goes through it: the model's forward, and the head-on-the-answers loss that calls
    the decoder directly."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    getter = getattr(inner, "get_decoder", None)
    decoder = getter() if callable(getter) else None
    return decoder if decoder is not None else inner


def _hook_decoder(model) -> None:
    decoder = _decoder(model)
    if decoder in _hooked:
        _hooked[decoder][1] += 1
        return
    entered: list[bool] = []  # one entry per call in progress: whether it opened a packed forward

    def before(module, args, kwargs):
        global _active
        packed = kwargs.get("cu_seq_lens_q") is not None
        _active += packed
        entered.append(packed)

    def after(module, args, kwargs, output):  # also when the forward raised (always_call)
        global _active
        if entered and entered.pop():
            _active -= 1

    handles = [decoder.register_forward_pre_hook(before, with_kwargs=True),
               decoder.register_forward_hook(after, with_kwargs=True, always_call=True)]
    _hooked[decoder] = [handles, 1]


def _unhook_decoder(model) -> None:
    decoder = _decoder(model)
    entry = _hooked.get(decoder)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        for handle in entry[0]:
            handle.remove()
        del _hooked[decoder]


def _mask(*args, **kwargs):
    if _active:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs):
    """transformers' attention-function contract: ``query`` (batch, heads, tokens, head_dim), ``key``/``value``
    with their own number of heads; returns (batch, tokens, heads, head_dim) and no weights."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        if _active:  # its mask function made no mask: without the bounds the examples would attend to each other
            raise RuntimeError("a packed forward reached the attention without cu_seq_lens_q; whatever called the "
                               "model dropped it")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"varlen attention takes one packed row, got a batch of {query.shape[0]}")
    if dropout and module.training:
        raise ValueError("varlen attention has no attention dropout; set train.packing_attention=rows")
    for name in ("softcap", "s_aux"):  # what some architectures add to plain attention
        if kwargs.get(name) is not None:
            raise ValueError(f"varlen attention does not implement {name}; set train.packing_attention=rows")
    window = kwargs.get("sliding_window")
    if window is not None and not _within(window, _longest):
        raise ValueError(f"varlen attention does not implement a sliding window ({window} tokens) that the examples "
                         f"can outgrow; set train.packing_attention=rows")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key/value head serves a group of query heads
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if q.is_cuda:
        out = _cuda(q, k, v, cu, scaling)
    else:
        out = _reference(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def _kernel_options() -> dict[str, Any]:
    """How this torch's ``varlen_attn`` is told to be causal and given the scale (its keywords changed between
    releases); read once, outside any compiled code."""
    global _kernel_kwargs
    if _kernel_kwargs is None:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        kw: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        _kernel_kwargs = {**kw, "scale": "scale" in params}
    return _kernel_kwargs


def _cuda(q, k, v, cu, scaling: float):
    from torch.nn.attention.varlen import varlen_attn

    kw = dict(_kernel_options())
    if kw.pop("scale"):
        kw["scale"] = scaling
    elif abs(scaling - q.shape[-1] ** -0.5) > 1e-9:
        raise ValueError("this torch's varlen_attn takes no scale; the model's attention scaling is not 1/sqrt(d)")
    # An upper bound on the examples' lengths is what the kernel needs (its extra blocks exit at once); a fixed
    # one (train.max_seq_length) does not change from batch to batch, so compiled layers are not recompiled.
    longest = _longest if _longest is not None else q.shape[0]
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, longest, longest, **kw)


def _reference(q, k, v, cu, scaling: float):
    """Each example through sdpa on its own, causal: the definition varlen attention must meet."""
    import torch
    import torch.nn.functional as F

    bounds = [int(b) for b in cu.tolist()]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        seg = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, heads, n, head_dim)
        outs.append(F.scaled_dot_product_attention(*seg, is_causal=True, scale=scaling)[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


# --------------------------------------------------------------------------- the plugin


def varlen_chosen(model, config, device: str) -> bool:
    """Whether ``model``'s packed micro-batches go through the varlen attention (``train.packing`` and
    ``train.packing_attention``; ``auto``: on CUDA when torch has the kernel and the model's attention is plain
    causal attention). :raises UsageError: ``varlen`` asked for a model it cannot stand in for."""
    if not config["train.packing"]:
        return False
    mode = config["train.packing_attention"]
    if mode == "rows":
        return False
    why = unsupported(model, config["train.max_seq_length"])
    if mode == "auto":
        return device == "cuda" and why is None and cuda_kernel_available()
    if why is not None:
        raise UsageError(f"train.packing_attention: varlen attention cannot stand in for this model's: it has "
                         f"{why}; set train.packing_attention=rows")
    return True


class VarlenPacking:
    """The ``varlen-packing`` plugin. Its per-run state: the model it switched to the varlen attention, and that
    model's own attention implementation, put back when the run ends."""

    def __init__(self) -> None:
        self.device = "cpu"
        self.model: Any = None
        self.implementation: str | None = None

    @hookimpl
    def qlora_config_options(self):
        return [
            Option("train.packing_attention", "str", "auto",
                   "with train.packing, how attention keeps packed examples apart: varlen (each micro-batch one "
                   "row, the examples end to end, torch's variable-length flash attention; no filler, no mask), "
                   "rows (rows of up to train.max_seq_length tokens, block-diagonal masks, filler segments), auto "
                   "(varlen on CUDA when torch has the kernel and the model's attention is plain causal attention, "
                   "else rows)",
                   choices=("auto", "varlen", "rows")),
        ]

    @hookimpl
    def qlora_configure(self, config, device) -> None:
        self.device = device

    @hookimpl
    def qlora_adapter_model(self, model, config) -> None:
        # Decided here, before training starts, so that a model varlen cannot serve is refused before any run
        # folder is made; the model trains on it for the whole run (the packing check included).
        self._restore()  # a model made earlier in this job
        if varlen_chosen(model, config, self.device):
            self.implementation = use_varlen(model, longest=config["train.max_seq_length"])
            self.model = model

    @hookimpl(trylast=True)
    def qlora_collate(self, examples, config, pad_token_id):
        if self.model is None or not config["train.packing"]:
            return None
        return collate_packed(examples, config["train.max_seq_length"], pad_token_id, varlen=True)

    @hookimpl
    def qlora_on_train_start(self, run) -> None:
        if self.model is not None:
            run.notice("packing: each micro-batch is one row, the examples end to end (varlen attention: no "
                       "filler, no mask)")

    @hookimpl
    def qlora_on_train_end(self, run, summary) -> None:
        self._restore()

    @hookimpl
    def qlora_on_train_failed(self, run, error, status) -> None:
        self._restore()

    def _restore(self) -> None:
        """Generation and evaluation after the run get the model's own attention back."""
        if self.model is not None:
            restore(self.model, self.implementation)
            self.model = self.implementation = None

    @hookimpl
    def qlora_bench_variants(self):
        return {
            "qlora+packing": {"help": "padding-free packing of each micro-batch (train.packing; varlen attention "
                                      "on CUDA)", "set": ["train.packing=true"]},
            "qlora+packing-rows": {"help": "packing into rows of max_seq_length with filler and block-diagonal masks",
                                   "set": ["train.packing=true", "train.packing_attention=rows"]},
        }
