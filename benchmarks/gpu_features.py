"""Every memory and speed option of the QLoRA guide, each trained for a few steps on a GPU.

Variants: the default (bf16, NF4 + double quant, paged 8-bit AdamW, gradient checkpointing), paged 32-bit
AdamW, fp16 compute (with loss scaling), fp32 compute, no gradient checkpointing, and CPU offload with a
GPU budget too small for the model. The model is a random-weight one in a real shape with the real
tokenizer (TOKENIZER_DIR, as for gpu_smoke.py). Prints one JSON object per variant.

    python benchmarks/gpu_features.py --tokenizer DIR [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import traceback
from pathlib import Path

import torch

from gpu_smoke import build_random_model

VARIANTS = {
    "default": ([], []),
    "paged-adamw-32bit": (["paged-adamw-32bit"], []),
    "fp16": ([], [("quant.bnb_4bit_compute_dtype", "float16")]),
    "fp32": ([], [("quant.bnb_4bit_compute_dtype", "float32")]),
    "no-gradient-checkpointing": (["no:gradient-checkpointing"], []),
    # The 4-bit model takes about 107 MiB (57 of them the bf16 embeddings, tied to the head): budgets that
    # hold the embeddings and some of the 30 layers; the rest run on the CPU.
    "cpu-offload": (["cpu-offload"], [("offload.gpu_memory", "80MiB"), ("offload.cpu_memory", "8GiB")]),
    "cpu-offload-tight": (["cpu-offload"], [("offload.gpu_memory", "60MiB"), ("offload.cpu_memory", "8GiB")]),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("/tmp/qlora-gpu-features"))
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    args = parser.parse_args()

    from qlora_core.loop.job import Job
    from qlora_plugins.gradient_checkpointing import layer_policy

    shutil.rmtree(args.out, ignore_errors=True)
    model_dir = build_random_model(args.tokenizer, args.out / "model")
    for name, (plugins, overrides) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        torch.cuda.reset_peak_memory_stats()
        row: dict = {"variant": name}
        try:
            job = Job(None, plugins=plugins,
                      overrides=[("model.name_or_path", str(model_dir)), ("train.max_steps", args.steps),
                                 ("train.sample_max_new_tokens", 0), ("train.logging_steps", args.steps),
                                 ("data.max_eval_samples", 16), *overrides],
                      output_dir=args.out / name)
            result = job.run()
            losses = [m["loss"] for m in result.metrics if "loss" in m]
            base = job.model.get_base_model()
            policy = layer_policy(job.model)  # the gradient-checkpointing plugin's own checkpointing, if it ran
            placement = {n: p.device.type for n, p in base.named_parameters()}
            row.update(ok=True, compute_dtype=str(job.compute_dtype), optimizer=type(
                       job.plugins.hook.qlora_optimizer(params=[torch.nn.Parameter(torch.zeros(1, device="cuda"))],
                                                        config=job.config)).__name__,
                       gradient_checkpointing=bool(policy is not None and policy.checkpointed)
                       or bool(getattr(base, "is_gradient_checkpointing", False)),
                       layers=policy.describe() if policy is not None else None,
                       parameters_on_cpu=sum(1 for d in placement.values() if d == "cpu"),
                       parameters_on_gpu=sum(1 for d in placement.values() if d == "cuda"),
                       loss_first=losses[0], loss_last=losses[-1],
                       eval_loss_before=result.summary["eval_loss_before"],
                       eval_loss_after=result.summary["eval_loss_after"],
                       tokens_per_second=round(result.summary["tokens_per_second"], 1),
                       peak_gpu_memory_gib=round(result.summary.get("peak_gpu_memory_gib", 0.0), 3))
            del job, result, base
        except Exception as e:  # report and go on with the next variant
            row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
