"""Generating an answer to a formatted prompt: greedy by default, until an end-of-turn token or the token limit,
streamed as it is produced. The sample answers before and after training, ``qlora generate`` and ``qlora eval``'s
exact match use it.
"""

from __future__ import annotations

from typing import Any, TextIO

from qlora_core.framework.errors import UsageError


def _streamer(tokenizer: Any, stream: TextIO) -> Any:
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.started:  # the answer's first token often carries a space (" The ..."): not shown
                text = text.lstrip()
                self.started = bool(text)
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in ([configured] if isinstance(configured, int) else list(configured or [])) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(value)
    return ids


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 256, stream_to: TextIO | None = None,
             temperature: float = 0.0, top_p: float = 1.0, add_special_tokens: bool = True) -> str:
    """The model's answer to an already formatted prompt, until eos or ``max_new_tokens``.

    Greedy when ``temperature`` is 0, else sampled with ``temperature`` and ``top_p``. With ``stream_to``
    (a text stream such as ``sys.stdout``), the answer is written there as it is produced, then a newline.

    :returns: the answer text, special tokens removed, surrounding whitespace stripped.
    """
    import torch

    if temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (got {temperature:g})")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (got {top_p:g})")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    from qlora_core.loop.model import input_device

    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).to(input_device(model))
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "use_cache": True,
                              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": _eos_ids(model, tokenizer)}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stream_to is not None:
        kwargs["streamer"] = _streamer(tokenizer, stream_to)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(**enc, **kwargs)
    finally:
        if was_training:
            model.train()
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
