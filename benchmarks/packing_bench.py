"""Measure padding-free packing (``train.packing``) against padded and dense micro-batches on a GPU.

Builds a random-weight model of a real architecture's shape straight into 4 bits (``plan_check.build_direct``),
prepares it as ``qlora run`` does (``plan_check.prepare_like_qlora``: k-bit preparation, non-reentrant gradient
checkpointing, LoRA on all linear layers), and trains it with the trainer's pieces (accelerate's bf16 wrapper,
``qlora_core.trainer._token_loss_sum``, gradient clipping, paged AdamW 8-bit) in three modes, each on
micro-batches of ``--batch`` examples, one optimizer step per micro-batch:

- ``dense``: every example ``--max-len`` tokens long (no padding): the reference figure;
- ``padded``: ragged examples, lengths uniform in ``--min-len .. --max-len``, right-padded (``data.collate``);
- ``packed``: the same ragged examples packed into one row each (``data.collate_packed``).

Each mode runs ``--warmup`` steps, then ``--steps`` measured ones. It prints one JSON object: per mode the
tokens/s on real tokens, the tokens computed (real + padding), the padding waste and the peak memory; the
ratio of packed to dense tokens/s (the goal: within 10%); and the packing check on this GPU (the probe
``qlora_core.trainer.packed_attention_errors`` and the packed vs padded loss of one micro-batch).

    python benchmarks/packing_bench.py                         # Llama-3-8B shape, ~3 minutes on an H200
    python benchmarks/packing_bench.py --shape smollm2-135m    # quick
    python benchmarks/packing_bench.py --out packing.json

Needs a CUDA GPU and bitsandbytes; without CUDA it stops with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plan_check import (SHAPES, build_direct, gpu_model_folder, prepare_like_qlora, print_result,  # noqa: E402
                        versions)

GIB = 2 ** 30
MODES = ("dense", "padded", "packed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b", help=f"{', '.join(SHAPES)}, or a config.json path")
    parser.add_argument("--batch", type=int, default=4, help="examples per micro-batch")
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="steps per mode before measuring")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of dense,padded,packed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    wrong = [m for m in args.modes if m not in MODES]
    if wrong or not args.modes:
        parser.error(f"--modes: unknown {', '.join(wrong) or '(none)'}; choose from {', '.join(MODES)}")
    if not 1 <= args.min_len <= args.max_len:
        parser.error("--min-len must be between 1 and --max-len")
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be >= 1, --warmup >= 0")
    return args


def synthetic_batches(args: argparse.Namespace, vocab: int, dense: bool) -> list[list[Any]]:
    """``warmup + steps`` micro-batches of ``batch`` examples: random tokens, the second half of each the answer.

    The ragged lengths are uniform in ``min_len .. max_len`` and the same for every call with one seed, so the
    padded and packed modes train on the same examples.
    """
    import torch

    from qlora_core.data import IGNORE_INDEX, TokenizedExample

    gen = torch.Generator().manual_seed(args.seed)
    count = (args.warmup + args.steps) * args.batch
    if dense:
        lengths = [args.max_len] * count
    else:
        lengths = torch.randint(args.min_len, args.max_len + 1, (count,), generator=gen).tolist()
    examples = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2:]))
    return [examples[i:i + args.batch] for i in range(0, count, args.batch)]


def packing_check(model, accelerator, batch, device: str) -> dict[str, float]:
    """On this device and attention implementation: the probe's distances, and one micro-batch's loss padded
    and packed (the same examples; equal up to rounding when attention stays within each example)."""
    import torch

    from qlora_core.data import collate, collate_packed
    from qlora_core.errors import UsageError
    from qlora_core.trainer import _token_loss_sum, check_packed_attention, packed_attention_errors

    with accelerator.autocast():
        packed_err, crossed_err = packed_attention_errors(model)
        try:
            check_packed_attention(model)  # what a qlora run with train.packing does before training
            verdict: bool | str = True
        except UsageError as e:
            verdict = str(e)
        model.eval()
        with torch.no_grad():
            losses = []
            for collated in (collate(batch, pad_token_id=0), collate_packed(batch)):
                loss, n = _token_loss_sum(model, {k: v.to(device) for k, v in collated.items()})
                losses.append(float(loss) / n)
        model.train()
    return {"probe_packed_vs_alone": packed_err, "probe_crossed_vs_alone": crossed_err,
            "probe_ok": verdict, "loss_padded": losses[0], "loss_packed": losses[1],
            "loss_rel_diff": abs(losses[1] - losses[0]) / max(abs(losses[0]), 1e-12)}


def run_mode(mode: str, batches, model, optimizer, accelerator, params, args, device: str) -> dict[str, Any]:
    """Train on ``batches`` (warmup first, then the measured steps); the mode's figures."""
    import torch

    from qlora_core.data import collate, collate_packed, padding_waste, real_tokens
    from qlora_core.trainer import _token_loss_sum

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    real = computed = 0
    seconds = 0.0
    losses = []
    for i, examples in enumerate(batches):
        batch = collate_packed(examples) if mode == "packed" else collate(examples, pad_token_id=0)
        batch = {k: v.to(device) for k, v in batch.items()}
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with accelerator.autocast():
            loss_sum, n = _token_loss_sum(model, batch)
            accelerator.backward(loss_sum / max(1, n))
        accelerator.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            seconds += time.perf_counter() - t0
            real += real_tokens(batch)
            computed += batch["input_ids"].numel()
            losses.append(float(loss_sum.detach()) / max(1, n))
    measured = [x for b in batches[args.warmup:] for x in b]
    waste = padding_waste(measured, args.batch)
    return {
        "steps": len(batches) - args.warmup, "seconds": round(seconds, 3), "real_tokens": real,
        "computed_tokens": computed, "padding_tokens": computed - real,
        "padding_waste_pct": round(100.0 * (computed - real) / max(1, computed), 2),
        "padding_waste_pct_if_padded": round(100.0 * waste["padding_waste"], 2),
        "real_tokens_per_second": round(real / max(seconds, 1e-9), 1),
        "computed_tokens_per_second": round(computed / max(seconds, 1e-9), 1),
        "mean_loss": sum(losses) / max(1, len(losses)),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None,
    }


def measure(args: argparse.Namespace, model_dir: Path, device: str = "cuda") -> dict[str, Any]:
    """Build and prepare the model, check packing on ``device``, then train each mode; the figures."""
    import bitsandbytes as bnb
    import torch
    from accelerate import Accelerator

    cuda = device == "cuda"
    t0 = time.perf_counter()
    model = build_direct(model_dir, device, torch.bfloat16 if cuda else torch.float32)
    model, _ = prepare_like_qlora(model, args.r, 2.0 * args.r, args.lora_dropout, not args.no_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (bnb.optim.PagedAdamW8bit if cuda else bnb.optim.AdamW8bit)(params, lr=2e-4, weight_decay=0.0)
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    model = accelerator.prepare_model(model, device_placement=False)
    optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    result: dict[str, Any] = {"build_seconds": round(time.perf_counter() - t0, 1),
                              "attn_implementation": model.config._attn_implementation}
    vocab = model.get_output_embeddings().weight.shape[0]
    ragged = synthetic_batches(args, vocab, dense=False)
    result["packing_check"] = packing_check(model, accelerator, ragged[0], device)
    model.train()
    modes: dict[str, Any] = {}
    for mode in args.modes:
        batches = synthetic_batches(args, vocab, dense=True) if mode == "dense" else ragged
        try:
            modes[mode] = run_mode(mode, batches, model, optimizer, accelerator, params, args, device)
        except torch.OutOfMemoryError as e:
            optimizer.zero_grad(set_to_none=True)
            modes[mode] = {"out_of_memory": str(e).splitlines()[0]}
    result["modes"] = modes
    speed = {m: modes[m].get("real_tokens_per_second") for m in modes}
    if speed.get("dense") and speed.get("packed"):
        result["packed_over_dense"] = round(speed["packed"] / speed["dense"], 3)
        result["packed_within_10pct_of_dense"] = speed["packed"] >= 0.9 * speed["dense"]
    if speed.get("padded") and speed.get("packed"):
        result["packed_over_padded"] = round(speed["packed"] / speed["padded"], 3)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = gpu_model_folder("packing_bench", args.shape)
    if model_dir is None:
        return 2
    import torch

    result: dict[str, Any] = {
        "shape": args.shape, "batch": args.batch, "lengths": f"uniform {args.min_len}..{args.max_len}",
        "dense_length": args.max_len, "warmup": args.warmup, "steps": args.steps, "r": args.r,
        "gradient_checkpointing": not args.no_checkpointing, "gpu": torch.cuda.get_device_name(0),
        "versions": versions(),
    }
    result.update(measure(args, model_dir, "cuda"))
    print_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
