"""Evaluate a finished run: held-out loss and perplexity with and without its adapter, and exact match.

:func:`evaluate_run` is what ``qlora eval RUN_DIR`` does. It rebuilds the run's job from its
``config.yaml`` (same plugins, same data rules), loads the base model the way the run did (4-bit through the
quant plugin) with the run's adapter on top, and measures on the held-out data:

- the mean loss per answer token and its perplexity, exactly as the trainer's own evaluation computes
  them (so the "after" figure equals the run's final ``eval_loss`` in ``metrics.jsonl``), with the adapter
  and without it (PEFT's ``disable_adapter()``: the base model, i.e. the run's step-0 figure);
- optionally exact match: the share of held-out examples whose greedy answer, generated from the example's
  prompt, equals the reference answer (both stripped; the reference without its eos token).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from qlora_core.framework.errors import UsageError
from qlora_core.tools.inference import check_finished_run, load_run_model
from qlora_core.framework.types import FormattedExample

#: The built-in default task; its answers are a function of the question, so exact match is on by default.
DEFAULT_TASK = "embedded:secret-rules"

#: Tokens generated beyond the reference answer's length before a generation is cut off (a longer answer
#: cannot match anyway; the margin lets an answer tokenized differently from the reference still match).
EXTRA_NEW_TOKENS = 16


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


# --------------------------------------------------------------------------- the run and its data


def _overrides(data: str | None, split: str | None, max_samples: int | None) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = []
    if data is not None:
        pairs.append(("data.eval_path", str(data)))
        # A split named for the run's own eval data means nothing for another dataset: its default is used.
        pairs.append(("data.eval_split", split))
    elif split is not None:
        pairs.append(("data.eval_split", split))
    if max_samples is not None:
        pairs.append(("data.max_eval_samples", max_samples))
    return pairs


# --------------------------------------------------------------------------- the model


def autocast_for(job: Any) -> Any:
    """The mixed-precision context the trainer evaluates in: autocast to the compute dtype on a GPU with
    bfloat16/float16 compute (as ``accelerate`` does for the run), nothing otherwise."""
    import torch

    if job.device == "cuda" and job.compute_dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type="cuda", dtype=job.compute_dtype)
    return nullcontext()


# --------------------------------------------------------------------------- generation


def reference_answer(answer: str, tokenizer: Any) -> str:
    """The reference an answer span is compared with: without the eos token (or another special token such as
    a chat template's end of turn) the format appended, stripped."""
    specials = sorted({t for t in (getattr(tokenizer, "all_special_tokens", None) or []) if t}
                      | ({tokenizer.eos_token} if tokenizer.eos_token else set()), key=len, reverse=True)
    text = answer.rstrip()
    changed = True
    while changed:
        changed = False
        for tok in specials:
            if text.endswith(tok):
                text = text[: -len(tok)].rstrip()
                changed = True
    return text.strip()


@contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    saved = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = saved


def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: Sequence[int] | int,
                     add_special_tokens: Sequence[bool] | bool = True, batch_size: int = 8,
                     context: Any = None) -> list[str]:
    """Greedy answers to ``prompts``, ``batch_size`` at a time with left padding (``batch_size=1``: one at a
    time, no padding). Each answer is cut at its own ``max_new_tokens`` and decoded without special tokens,
    stripped, as :meth:`Job.generate` does. Prompts are grouped by length to keep padding small."""
    import torch

    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    specials = [add_special_tokens] * n if isinstance(add_special_tokens, bool) else list(add_special_tokens)
    device = next(p.device for p in model.parameters())
    lengths = [len(tokenizer(p, add_special_tokens=s)["input_ids"]) for p, s in zip(prompts, specials)]
    # Same add_special_tokens together, then by length: batches of equal-length prompts need no padding.
    order = sorted(range(n), key=lambda i: (specials[i], lengths[i], i))
    answers: list[str] = [""] * n
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    with torch.no_grad(), _left_padding(tokenizer), (context if context is not None else nullcontext()):
        i = 0
        while i < n:
            batch = [order[i]]
            while len(batch) < batch_size and i + len(batch) < n \
                    and specials[order[i + len(batch)]] == specials[order[i]]:
                batch.append(order[i + len(batch)])
            i += len(batch)
            enc = tokenizer([prompts[j] for j in batch], return_tensors="pt", padding=True,
                            add_special_tokens=specials[batch[0]]).to(device)
            out = model.generate(**enc, max_new_tokens=max(limits[j] for j in batch), do_sample=False,
                                 use_cache=True, pad_token_id=pad_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for row, j in enumerate(batch):
                answers[j] = tokenizer.decode(new[row, : limits[j]], skip_special_tokens=True).strip()
    if was_training:
        model.train()
    return answers


def score_exact_match(model: Any, job: Any, examples: Sequence[FormattedExample], batch_size: int,
                context: Any = None) -> dict[str, Any]:
    """Greedy-generate each example's answer from its prompt; the share equal to the reference."""
    tok = job.tokenizer
    prompts, references, limits, specials = [], [], [], []
    for ex in examples:
        prompt, answer = ex.prompt_and_answer()
        ref = reference_answer(answer, tok)
        prompts.append(prompt)
        references.append(ref)
        specials.append(ex.add_special_tokens)
        limits.append(len(tok(answer, add_special_tokens=False)["input_ids"]) + EXTRA_NEW_TOKENS)
    answers = generate_answers(model, tok, prompts, limits, specials, batch_size=batch_size, context=context)
    correct = sum(a == r for a, r in zip(answers, references))
    return {"exact_match": correct / max(1, len(examples)), "exact_match_correct": correct,
            "exact_match_total": len(examples),
            "examples": [{"prompt": p, "reference": r, "answer": a}
                         for p, r, a in zip(prompts, references, answers)]}


# --------------------------------------------------------------------------- the evaluation


def exact_match_default(config: Any) -> bool:
    """On for the built-in default task (its answers are a function of the question), off otherwise."""
    return (config["data.eval_path"] or config["data.path"]) == DEFAULT_TASK


def evaluate_run(run_dir: str | Path, data: str | None = None, split: str | None = None,
                 max_samples: int | None = None, exact_match: bool | None = None, *,
                 batch_size: int | None = None, progress: Callable[[str], None] | None = None,
                 keep_examples: bool = False) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` before (its base model) and after (with its adapter) training.

    :param data: held-out data to use instead of the run's own (``data.eval_path``: a file, folder, hub id or
        ``embedded:`` name); its ``split`` (default: test, then validation, then train).
    :param split: the split of ``data``; without ``data``, a split of the run's ``data.path``
        (``data.eval_split``).
    :param max_samples: evaluate on at most this many examples (``data.max_eval_samples``; -1: all).
    :param exact_match: also score greedy answers by exact match; ``None``: only on the default task.
    :param batch_size: generation batch size (default ``train.per_device_eval_batch_size``).
    :param progress: called with a short message as each phase starts.
    :param keep_examples: keep every prompt, reference and answer under ``before/after["examples"]``.
    :returns: ``{"run_dir", "eval_data", "eval_split", "num_examples", "eval_tokens", "exact_match",
        "before": {...}, "after": {...}}``, each side with ``eval_loss``, ``eval_perplexity`` and, when
        exact match is on, ``exact_match`` (a fraction), ``exact_match_correct`` and ``exact_match_total``.
    :raises UsageError: a folder that is not a run, a run without an adapter, or no held-out data.
    """
    import torch

    from qlora_core.loop.job import Job

    run_dir = Path(run_dir)
    adapter_dir = check_finished_run(run_dir)
    job = Job.from_run(run_dir, overrides=_overrides(data, split, max_samples))
    cfg = job.config
    if cfg["train.num_threads"] > 0:
        torch.set_num_threads(cfg["train.num_threads"])

    _say(progress, "loading the data")
    job.load_tokenizer()
    try:
        job.load_data()
    except UsageError as e:  # the trainer's advice names the config key; here the option is --split
        raise UsageError(str(e).replace("(set data.eval_split)", "(pass --split)")) from None
    if not job.eval_examples:
        raise UsageError(f"run {str(run_dir)!r} has no held-out data (its config sets no data.eval_path, "
                         f"data.eval_split or data.eval_fraction and {cfg['data.path']!r} has no test or "
                         f"validation split); pass --data")
    do_exact = exact_match_default(cfg) if exact_match is None else bool(exact_match)
    examples = job.eval_formatted if do_exact else []

    _say(progress, "loading the model and the adapter")
    model = load_run_model(job, adapter_dir)
    gen_bs = batch_size or cfg["train.per_device_eval_batch_size"]

    def measure(side: str) -> dict[str, Any]:
        _say(progress, f"eval loss {side}")
        with autocast_for(job):
            ev = job.evaluate(model)
        result: dict[str, Any] = {"eval_loss": ev["eval_loss"], "eval_perplexity": ev["eval_perplexity"]}
        if do_exact:
            _say(progress, f"exact match {side} ({len(examples)} generations)")
            em = score_exact_match(model, job, examples, gen_bs, context=autocast_for(job))
            if not keep_examples:
                em.pop("examples")
            result.update(em)
        result["_tokens"] = ev["eval_tokens"]
        return result

    with model.disable_adapter():
        before = measure("before training (adapter disabled)")
    after = measure("after training (adapter)")
    tokens = after.pop("_tokens")
    before.pop("_tokens")
    return {
        "run_dir": str(run_dir),
        "eval_data": cfg["data.eval_path"] or cfg["data.path"],
        "eval_split": job.eval_split,
        "num_examples": len(job.eval_examples),
        "eval_tokens": tokens,
        "exact_match": do_exact,
        "before": before,
        "after": after,
    }
