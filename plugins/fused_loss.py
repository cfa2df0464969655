"""The output head and the loss on the answer positions only, fused: the ``fused-loss`` plugin (a default).

The loss covers the answer tokens; the prompt's logits are never needed, and with a large vocabulary the
logits are most of a step's memory (batch x sequence x vocabulary). For the causal LMs whose logits are exactly
``lm_head(decoder(...).last_hidden_state)`` (Llama, Mistral, Qwen2, Qwen3) the plugin's
:func:`qlora_core.hookspecs.qlora_compute_loss` runs the decoder, then the head on the answer positions alone.
With ``train.fused_cross_entropy`` (the default) the head and the cross-entropy run together chunk by chunk
(:func:`linear_cross_entropy_sum`), so not even the answers' logits are kept: the logits of a chunk of positions
are made, turned into the loss and the gradients at once, and freed before the next chunk. A Llama-3
vocabulary (128,256) at 8,192 positions is 3.9 GiB of fp32 logits per copy, several copies in the plain path;
here it is one chunk's worth. On CUDA with liger-kernel installed its Triton kernel does the same work
(``LigerFusedLinearCrossEntropyLoss``); elsewhere the chunked PyTorch function below does, on any device.

Under a DDP or FSDP wrapper the wrapper's forward must run (it synchronises gradients, FSDP gathers the
sharded weights there): :func:`install_loss_forward` gives the causal LM a forward that computes the summed loss
itself when asked, so the loss goes inside the wrapper's forward and the logits are never made.

For other architectures, and with ``--plugin no:fused-loss``, the core computes the loss from the model's
logits (``torch.nn.functional.cross_entropy`` over the answer tokens).
"""

from __future__ import annotations

from typing import Any

from qlora_core import IGNORE_INDEX, Option, hookimpl, model_inputs

# --------------------------------------------------------------------------- the fused head + loss

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


# --------------------------------------------------------------------------- the head on the answer positions

# Causal LMs whose logits are exactly ``lm_head(decoder(...).last_hidden_state)``: no soft-capping or scaling.
_PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _plain_head_model(model) -> Any:
    """The causal LM under a PEFT wrapper when its head can be applied to chosen positions only, else None.

    Not under DDP/FSDP wrappers (they have a ``module``): their gradient synchronisation and FSDP's gathering
    of sharded weights run through the wrapper's forward.
    """
    if hasattr(model, "module"):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(inner, "config", None), "model_type", None) not in _PLAIN_HEAD_MODELS:
        return None
    if not (hasattr(inner, "get_decoder") and hasattr(inner, "get_output_embeddings")):
        return None
    return inner


def _fusable_head(head) -> bool:
    """Whether the output head is a plain linear layer the fused head + loss can take the weight of."""
    import torch

    return type(head) is torch.nn.Linear and head.bias is None


def _answer_loss_sum(causal, inputs: dict[str, Any], labels, fused: bool):
    """The summed next-token loss of a plain-head causal LM, its head run on the answer positions only (with
    ``fused`` and a plain linear head, chunk by chunk: :func:`linear_cross_entropy_sum`)."""
    import torch.nn.functional as F

    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden = causal.get_decoder()(**inputs).last_hidden_state
    head = causal.get_output_embeddings()
    selected = hidden[:, :-1][keep]
    if fused and _fusable_head(head):
        return linear_cross_entropy_sum(selected, head.weight, targets[keep])
    return F.cross_entropy(head(selected).float(), targets[keep], reduction="sum")


def _loss_forward_installed(model) -> bool:
    inner = getattr(model, "module", None)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return bool(getattr(inner, "_qlora_loss_forward", False))


def install_loss_forward(model) -> bool:
    """Give the causal LM under ``model`` (a PEFT model, before a DDP/FSDP wrapper) a forward that, called with
    ``qlora_token_loss_sum=True`` and ``labels``, returns only the summed token loss (the answer positions through
    the fused head and cross-entropy, :func:`linear_cross_entropy_sum`); any other call runs the model's own
    forward. False for architectures whose head is not a plain linear layer."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    causal = _plain_head_model(inner)
    if causal is None or getattr(causal, "_qlora_loss_forward", False):
        return causal is not None
    if not _fusable_head(causal.get_output_embeddings()):
        return False
    original = causal.forward

    def forward(*args, qlora_token_loss_sum: bool = False, **kwargs):
        if not qlora_token_loss_sum:
            return original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        # Everything the trainer passed (model_inputs: ids, masks, positions, packed bounds) goes to the decoder.
        labels = kwargs.pop("labels")
        return CausalLMOutputWithPast(loss=_answer_loss_sum(causal, dict(kwargs, use_cache=False), labels,
                                                           fused=True))

    causal.forward = forward
    causal._qlora_loss_forward = True
    return True


def token_loss_sum(model, batch, fused: bool = True) -> "tuple[Any, int] | None":
    """Sum of the next-token cross-entropy over the batch's answer tokens, and their number, without the
    prompt's logits; None for a model this plugin cannot serve (the core's loss then).

    :param model: the model as trained: a PEFT model, or a DDP/FSDP wrapper (``module``) whose causal LM has
        :func:`install_loss_forward`'s forward.
    :param batch: a micro-batch on the model's device (``input_ids``, ``labels``, ...).
    :param fused: the head and the loss chunk by chunk (:func:`linear_cross_entropy_sum`); under a wrapper
        only the fused loss runs inside its forward, so without ``fused`` a wrapped model gets None.
    """
    causal = _plain_head_model(model)
    if causal is not None:
        loss = _answer_loss_sum(causal, model_inputs(batch), batch["labels"], fused)
    elif fused and _loss_forward_installed(model):
        # Under FSDP/DDP the wrapper's forward must run (it gathers the sharded weights): the loss is computed
        # inside it, with the fused head, and the logits are never made.
        loss = model(**model_inputs(batch), labels=batch["labels"], qlora_token_loss_sum=True).loss
    else:
        return None
    return loss, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# --------------------------------------------------------------------------- hooks


@hookimpl
def qlora_config_options():
    return [
        Option("train.fused_cross_entropy", "bool", True,
               "compute the output head and the loss chunk by chunk, never holding the vocabulary's logits "
               "(liger-kernel's kernel on CUDA when installed)"),
    ]


@hookimpl
def qlora_adapter_model(model, config) -> None:
    if config["train.fused_cross_entropy"]:
        install_loss_forward(model)  # a DDP/FSDP wrapper's forward must run: the fused loss goes inside


@hookimpl(trylast=True)
def qlora_compute_loss(model, batch, config):
    return token_loss_sum(model, batch, config["train.fused_cross_entropy"])


@hookimpl
def qlora_plan_settings(settings, config) -> None:
    # The trainer's own loop: head and loss fused (under FSDP or DDP inside the wrapper's forward).
    settings.fused_loss = bool(config["train.fused_cross_entropy"]) and settings.loss == "qlora"


@hookimpl
def qlora_bench_variants():
    return {
        "qlora-fused-loss": {"help": "without the fused head + cross-entropy (answer logits materialized)",
                             "set": ["train.fused_cross_entropy=false"], "ablation": True},
    }
