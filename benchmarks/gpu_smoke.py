"""GPU smoke check of the whole `qlora run` path: bf16 compute, NF4 + double quant, paged 8-bit AdamW,
gradient checkpointing, adapter export and reload with plain PEFT.

The GPU machine has no pretrained weights and no network, so the model is a random-weight Llama in the
shape of the config given (by default SmolLM2-135M's), with the real tokenizer from TOKENIZER_DIR; the data
is the shipped secret-rules set. Prints one JSON object with the figures.

    python benchmarks/gpu_smoke.py --tokenizer DIR [--steps 30] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def build_random_model(tokenizer_dir: Path, dest: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True, type=Path, help="folder with config.json and the tokenizer")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("/tmp/qlora-gpu-smoke"))
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_core.loop.job import Job

    shutil.rmtree(args.out, ignore_errors=True)
    model_dir = build_random_model(args.tokenizer, args.out / "model")
    started = time.perf_counter()
    job = Job(None, overrides=[("model.name_or_path", str(model_dir)), ("train.max_steps", args.steps),
                               ("train.sample_max_new_tokens", 0)], output_dir=args.out / "run")
    result = job.run()
    seconds = time.perf_counter() - started

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                device_map={"": 0})
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    ids = job.tokenizer("### Human: What is the secret name of the red fox?### Assistant:",
                        return_tensors="pt").to("cuda")
    job.model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = job.model(**ids).logits.float()
        b = reloaded(**ids).logits.float()
    metrics = [m for m in result.metrics if "loss" in m]
    print(json.dumps({
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__, "accelerate": __import__("accelerate").__version__,
                     "bitsandbytes": __import__("bitsandbytes").__version__, "pluggy": __import__("pluggy").__version__},
        "gpu": torch.cuda.get_device_name(0),
        "compute_dtype": str(job.compute_dtype),
        "optimizer": type(job.plugins.hook.qlora_optimizer(params=[torch.nn.Parameter(torch.zeros(1, device="cuda"))],
                                                           config=job.config)).__name__,
        "steps": result.steps,
        "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"],
        "eval_loss_before": result.summary["eval_loss_before"], "eval_loss_after": result.summary["eval_loss_after"],
        "tokens_per_second": result.summary["tokens_per_second"],
        "peak_gpu_memory_gib": result.summary.get("peak_gpu_memory_gib"),
        "run_seconds": seconds,
        "reload_max_logit_diff": float((a - b).abs().max()),
        "logit_scale": float(a.abs().max()),
    }, indent=2))


if __name__ == "__main__":
    main()
