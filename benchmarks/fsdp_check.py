"""GPU check of ``qlora run --plugin fsdp --nproc-per-node N``: speed, memory per GPU, plan estimate, reload.

The GPU machine has no pretrained weights and no network, so the model is a random-weight model of a real
architecture's shape (``plan_check.SHAPES``), saved as a bf16 checkpoint under ``--out`` (8B: ~16 GB, ~20 s),
with the real tokenizer of ``--tokenizer``; the data are rows of random words long enough to fill
``--seq`` tokens (the loss covers every token). Then:

1. ``qlora run CONFIG --plugin fsdp --nproc-per-node N`` (torchrun, one process per GPU), ``--steps`` steps of
   ``--batch`` sequences per GPU, no gradient accumulation, LoRA r=16 on all linear layers, dropout 0;
2. with ``--single``, the same config on one GPU without FSDP (``qlora run``), for the scaling ratio (the
   target: N=2 gives >= 1.8x the single GPU's tokens/s at the same per-GPU batch); the single run does the
   same per-GPU work as FSDP's defaults (layers not compiled);
3. ``qlora plan --gpus N --plugin fsdp``'s per-GPU estimate for the same config;
4. the adapter reloaded with plain PEFT onto the base in 4 bits on one GPU, and a greedy generation.

Prints one JSON object: tokens/s (all GPUs, steps after the first), peak memory of the busiest GPU, the plan's
estimate, the loss, the reload check, the versions.

    python benchmarks/fsdp_check.py --nproc 1 --shape smollm2-135m --tokenizer .gpu-tok     # smoke test
    python benchmarks/fsdp_check.py --nproc 2 --shape llama3-8b --seq 2048 --batch 4 --single
    python benchmarks/fsdp_check.py --nproc 2 --shape llama3-70b --seq 2048 --batch 1 --random-weights

Needs CUDA GPUs and bitsandbytes; without CUDA it stops with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 2 ** 30


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=None, help="GPUs / processes (default: every visible GPU)")
    parser.add_argument("--shape", default="smollm2-135m", help="a plan_check shape or a config.json path")
    parser.add_argument("--tokenizer", type=Path, default=Path.cwd() / ".gpu-tok", help="a tokenizer folder")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="sequences per GPU per step")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--optim", default="paged_adamw_8bit")
    parser.add_argument("--sharding", default="FULL_SHARD", help="fsdp.sharding_strategy")
    parser.add_argument("--cpu-offload", action="store_true", help="fsdp.cpu_offload=true")
    parser.add_argument("--single", action="store_true", help="also run one GPU without FSDP, for the ratio")
    parser.add_argument("--out", type=Path, default=Path("/tmp/qlora-fsdp-check"))
    parser.add_argument("--keep-model", action="store_true", help="reuse --out/model if it is there")
    parser.add_argument("--no-reload", action="store_true", help="skip the reload-and-generate check")
    parser.add_argument("--random-weights", action="store_true",
                        help="no checkpoint: every run builds the shape straight into 4 bits (--plugin random-weights;"
                             " what a 70B shape needs, its bf16 checkpoint being larger than the disk)")
    return parser.parse_args(argv)


def build_model(shape: dict[str, Any], tokenizer_dir: Path, dest: Path, weights: bool = True) -> Path:
    """A random bf16 checkpoint of ``shape`` with the tokenizer, built on the GPU and saved to ``dest``; without
    ``weights``, only config.json and the tokenizer (for ``--plugin random-weights``)."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(shape, vocab_size=max(shape["vocab_size"], len(tok)), bos_token_id=tok.bos_token_id,
                 eos_token_id=tok.eos_token_id)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(shape))
    if not weights:
        tok.save_pretrained(dest)
        return dest
    config = AutoConfig.from_pretrained(dest)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return dest


def write_data(tokenizer_dir: Path, path: Path, rows: int, seq: int) -> Path:
    """Rows of random words, each longer than ``seq`` tokens, in the guanaco format."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = [w for w in (tok.decode([i]).strip() for i in range(1000, 6000)) if w.isalpha()][:2000]
    rng = random.Random(0)
    lines = []
    for _ in range(rows):
        answer = " ".join(rng.choice(words) for _ in range(seq + 64))
        lines.append(json.dumps({"text": f"### Human: Say something.### Assistant: {answer}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_config(args, model_dir: Path, data: Path) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data), "train_on_prompt": True},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        "train": {"per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1,
                  "max_steps": args.steps, "max_seq_length": args.seq, "logging_steps": 1, "save_strategy": "no",
                  "sample_max_new_tokens": 0, "optim": args.optim, "learning_rate": 1e-4},
        "fsdp": {"sharding_strategy": args.sharding, "cpu_offload": args.cpu_offload},
    }


def qlora_run(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Exit code, wall seconds, and the peak resident memory of the run's processes together in GiB, sampled
    every 50 ms (``fsdp_loading.tree_rss_kib``)."""
    import threading

    from fsdp_loading import tree_rss_kib

    started = time.perf_counter()
    peak = [0]
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "qlora_core", *cmd], stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))

        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss_kib(proc.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        sampler.join()
    return code, time.perf_counter() - started, peak[0] / 2**20


def figures(run_dir: Path) -> dict[str, Any]:
    """Tokens/s over the steps after the first (all processes' tokens over rank 0's step times), the peak."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    timed = steps[1:] or steps
    tokens = sum(r["tokens"] for r in timed)
    seconds = sum(r["tokens"] / r["tokens_per_second"] for r in timed)
    summary = json.loads((run_dir / "run.json").read_text()).get("summary", {})
    return {"tokens_per_second": tokens / seconds, "tokens_per_step": timed[-1]["tokens"],
            "seconds_per_step": seconds / len(timed), "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib"),
            "peak_gpu_memory_loading_gib": summary.get("peak_gpu_memory_loading_gib"),
            "peak_cpu_memory_loading_gib": summary.get("peak_cpu_memory_loading_gib"),
            "peak_cpu_memory_gib": summary.get("peak_cpu_memory_gib"),
            "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"]}


def reload_and_generate(model_dir: Path, adapter: Path, random_weights: bool = False) -> dict[str, Any]:
    """The adapter onto the base in 4 bits (the usual uint8 storage) on one GPU, with plain PEFT; a greedy answer.
    With ``random_weights`` the base is built again as the random-weights plugin built it (seed 0)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if random_weights:
        from qlora_plugins.random_weights import build_direct

        base = build_direct(model_dir, "cuda:0", torch.bfloat16, seed=0)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                    device_map={"": 0})
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    tok = AutoTokenizer.from_pretrained(adapter)
    ids = tok("### Human: Say something.### Assistant:", return_tensors="pt").to("cuda")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    return {"lora_modules": len(lora_b), "lora_b_trained": bool(any(float(p.abs().max()) > 0 for p in lora_b)),
            "generated_tokens": int(out.shape[1] - ids["input_ids"].shape[1]),
            "generated": tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)[:120]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        return fail("fsdp_check needs torch")
    if not torch.cuda.is_available():
        return fail("fsdp_check needs CUDA GPUs (torch.cuda.is_available() is False); run it on the GPU machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        return fail(f"fsdp_check needs bitsandbytes ({e})")
    if not (args.tokenizer / "tokenizer_config.json").is_file():
        return fail(f"--tokenizer {str(args.tokenizer)!r} is not a tokenizer folder (no tokenizer_config.json)")
    nproc = args.nproc or torch.cuda.device_count()
    if not 1 <= nproc <= torch.cuda.device_count():
        return fail(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} GPUs")
    from plan_check import shape_config

    import yaml

    from qlora_core.tools.plan import plan

    out = args.out
    model_dir = out / "model"
    if not (args.keep_model and (model_dir / "config.json").is_file()):
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        build_model(shape_config(args.shape), args.tokenizer, model_dir, weights=not args.random_weights)
        build_seconds = time.perf_counter() - started
    else:
        build_seconds = 0.0
    for stale in ("fsdp", "single"):
        shutil.rmtree(out / stale, ignore_errors=True)
    data = write_data(args.tokenizer, out / "data.jsonl", max(64, 2 * nproc * args.batch * args.steps), args.seq)
    cfg = run_config(args, model_dir, data)
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))

    result: dict[str, Any] = {
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "accelerate",
                                                            "bitsandbytes")},
        "gpu": torch.cuda.get_device_name(0), "nproc": nproc, "shape": args.shape, "seq": args.seq,
        "batch_per_gpu": args.batch, "steps": args.steps, "optim": args.optim, "sharding": args.sharding,
        "cpu_offload": args.cpu_offload, "model_build_seconds": round(build_seconds, 1),
    }
    extra = ["--plugin", "random-weights"] if args.random_weights else []
    code, seconds, rss = qlora_run(["run", str(config), "--plugin", "fsdp", *extra, "--nproc-per-node", str(nproc),
                                    "--output", str(out / "fsdp")], out / "fsdp.log")
    if code != 0:
        tail = (out / "fsdp.log").read_text().splitlines()[-40:]
        print(json.dumps({**result, "fsdp_exit_code": code, "fsdp_log_tail": tail}, indent=2))
        return 1
    result["fsdp"] = {**figures(out / "fsdp"), "wall_seconds": round(seconds, 1),
                      "sampled_machine_rss_peak_gib": round(rss, 2)}
    estimate = plan(model_dir, cfg, gpus=nproc, plugins=["fsdp"])  # config.json is all it reads
    result["plan_gib_per_gpu"] = estimate.memory.total / GIB
    loading = getattr(estimate, "loading", None)
    if loading is not None:
        result["plan_loading"] = loading.to_dict()
    peak = result["fsdp"]["peak_gpu_memory_gib"]
    result["measured_over_plan"] = peak / result["plan_gib_per_gpu"] if peak else None
    if args.single:
        single_config = out / "config-single.yaml"
        # The per-GPU work FSDP does today (layers not compiled), on one GPU without FSDP.
        single = {k: v for k, v in cfg.items() if k != "fsdp"}
        single["train"] = dict(single["train"], compile=False)
        single_config.write_text(yaml.safe_dump(single))
        code, seconds, rss = qlora_run(["run", str(single_config), *extra, "--output", str(out / "single")],
                                       out / "single.log")
        if code == 0:
            result["single"] = {**figures(out / "single"), "wall_seconds": round(seconds, 1),
                                "sampled_machine_rss_peak_gib": round(rss, 2)}
            result["speedup_over_single"] = result["fsdp"]["tokens_per_second"] / \
                result["single"]["tokens_per_second"]
        else:
            result["single"] = {"exit_code": code, "log_tail": (out / "single.log").read_text().splitlines()[-20:]}
    if not args.no_reload:
        result["reload"] = reload_and_generate(model_dir, out / "fsdp" / "adapter", args.random_weights)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
