"""The loss of a micro-batch: a plugin's :func:`~qlora_core.hookspecs.qlora_compute_loss`, else the core's
cross-entropy over the answer tokens from the model's logits; and the check that packed examples do not attend to
each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from qlora_core.framework.errors import UsageError
from qlora_core.loop.data import IGNORE_INDEX, TokenizedExample, collate_packed

if TYPE_CHECKING:
    import torch


def model_inputs(batch) -> dict[str, Any]:
    """The model's keyword arguments for a micro-batch made by ``collate`` (padded) or ``collate_packed``.

    No cache: training never reuses one, and with one transformers does not look for packed sequences in
    ``position_ids`` (it would let packed examples attend to each other).
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    if "cu_seq_lens" in batch:  # one packed row, its examples' bounds for a variable-length attention
        inputs["cu_seq_lens_q"] = inputs["cu_seq_lens_k"] = batch["cu_seq_lens"]
    return inputs


def token_loss_sum(model, batch) -> "tuple[torch.Tensor, int]":
    """The core's loss, when no plugin's :func:`~qlora_core.hookspecs.qlora_compute_loss` answers: the sum of the
    next-token cross-entropy over the batch's answer tokens, from the model's logits, and their number."""
    import torch.nn.functional as F

    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    logits = model(**model_inputs(batch)).logits
    loss = F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="sum")
    return loss, int(keep.sum())


def compute_loss(hook: Any, config: Any, model, batch) -> "tuple[torch.Tensor, int]":
    """A micro-batch's summed answer-token loss and its answer tokens: a plugin's
    :func:`~qlora_core.hookspecs.qlora_compute_loss`, else :func:`token_loss_sum`."""
    found = hook.qlora_compute_loss(model=model, batch=batch, config=config)
    if found is not None:
        loss, n = found
        return loss, int(n)
    return token_loss_sum(model, batch)


def _probe_at(batch, probe: list[int]) -> tuple[int, int]:
    """Where a micro-batch holds the probe example's tokens: (row, first position), the last place they occur."""
    found = None
    n = len(probe)
    for r, row in enumerate(batch["input_ids"].tolist()):
        for start in range(len(row) - n + 1):
            if row[start:start + n] == probe:
                found = (r, start)
    if found is None:
        raise UsageError("train.packing: the run's micro-batches do not hold the packing check's probe example as "
                         "it was given (a collate plugin changed its tokens); set train.packing=false")
    return found


def packed_attention_errors(model, collate: "Callable[[Sequence[TokenizedExample]], Any] | None" = None
                            ) -> tuple[float, float]:
    """How far a packed example's logits are from the same example's logits alone.

    A probe example (4 random tokens) is run alone, packed after a 16-token example, and as the continuation of
    that example (one sequence, positions not restarting: the probe sees the other example's tokens, whatever
    the attention implementation). :returns: the relative distances of the packed logits and of the crossed
    logits from the lone ones; the first is rounding noise when attention stays within each example, the second
    is what crossing changes. ``collate`` makes the micro-batches from the examples (a run passes its own, so
    the check probes the batching it trains with); by default ``collate_packed``'s one row.
    """
    import torch

    collate = collate or collate_packed
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    vocab = inner.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    first, probe = (torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (16, 4))
    from qlora_core.loop.model import input_device

    device = input_device(model)
    alone = collate([TokenizedExample(probe, probe)])
    packed = collate([TokenizedExample(first, first), TokenizedExample(probe, probe)])
    crossed = collate([TokenizedExample(first + probe, first + probe)])
    was_training = model.training
    model.eval()  # no dropout
    try:
        with torch.no_grad():
            out = []
            for b in (alone, packed, crossed):
                row, start = _probe_at(b, probe)
                logits = model(**model_inputs({k: v.to(device) for k, v in b.items()})).logits
                out.append(logits[row, start:start + len(probe)].float())
    except TypeError as e:
        raise UsageError(f"train.packing: the model does not take packed inputs (position_ids): {e}") from None
    finally:
        if was_training:
            model.train()
    scale = out[0].norm().clamp_min(1e-12)
    return float((out[1] - out[0]).norm() / scale), float((out[2] - out[0]).norm() / scale)


def check_packed_attention(model, collate: "Callable[[Sequence[TokenizedExample]], Any] | None" = None) -> None:
    """Refuse ``train.packing`` for a model whose attention would cross the packed examples.

    transformers keeps attention within each packed example from the restarting ``position_ids``: sdpa, eager
    and flex attention through a block-diagonal causal mask built by its masking utilities, flash attention
    through its variable-length kernel (cu_seqlens from the positions). A model built otherwise (remote code,
    an attention implementation that ignores both) would silently train on crossed attention. ``collate``: as
    for :func:`packed_attention_errors`.
    """
    packed, crossed = packed_attention_errors(model, collate)
    name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    attn = getattr(getattr(model, "config", None), "_attn_implementation", "?")
    if not crossed >= 1e-3:  # also NaN
        raise UsageError(f"train.packing: could not check that {name} with {attn} attention keeps packed examples "
                         f"apart (its logits hardly depend on the context: {crossed:.3g}); set train.packing=false")
    if not packed <= 0.1 * crossed:
        raise UsageError(f"train.packing: {name} with {attn} attention lets packed examples attend to each other "
                         f"(probe: {packed:.3g} from the example alone, crossing would give {crossed:.3g}); "
                         f"set train.packing=false")
