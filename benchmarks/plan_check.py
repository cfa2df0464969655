"""Check ``qlora plan``'s memory estimate against a measured GPU training step.

Builds a random-weight model of a real architecture's shape straight into 4 bits on the GPU (no checkpoint on
disk, no network, no pretrained weights): the model is made on the meta device, every linear layer but the
output head becomes a bitsandbytes ``Linear4bit`` quantized from random bf16 weights drawn on the GPU one layer
at a time, and the rest (embeddings, norms, head) is drawn in bf16. Then the same pipeline as ``qlora run``:
PEFT's ``prepare_model_for_kbit_training`` (fp32 upcast of the non-quantized weights), non-reentrant gradient
checkpointing, LoRA on all linear layers but the head (PEFT), accelerate's bf16 autocast wrapper, paged AdamW
8-bit (bitsandbytes), the trainer's loss (the ``fused-loss`` plugin's ``token_loss_sum``) and gradient clipping; it
runs a few steps on random token ids and prints one JSON object with the measured peak
(``torch.cuda.max_memory_allocated``), the memory after loading, and ``qlora_core.tools.plan.plan``'s estimate for the
same settings, with the ratio.

    python benchmarks/plan_check.py --shape llama3-8b --seq 2048 --batch 4 [--out FILE]
    python benchmarks/plan_check.py --shape smollm2-135m --no-checkpointing
    python benchmarks/plan_check.py --shape llama3-8b --loss hf      # transformers' own loss (labels=inputs)

``--build checkpoint`` instead saves a random bf16 checkpoint to /tmp and loads it with
``from_pretrained(quantization_config=...)`` (what ``qlora run`` does; 8B: ~16 GB written). The default
``--build direct`` falls back to it by itself if the direct build fails.

Needs a CUDA GPU and bitsandbytes; without CUDA it stops with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qlora_core.framework.errors import UsageError
from qlora_core.tools.shapes import SHAPES, write_config_folder  # noqa: F401 (re-exported)
from qlora_core.tools.shapes import shape_config as _shape_config
from qlora_plugins.random_weights import build_direct

GIB = 2 ** 30


def shape_config(shape: str) -> dict[str, Any]:
    """The ``config.json`` contents of a named shape, or of a ``config.json`` file / folder path."""
    try:
        return _shape_config(shape)
    except UsageError as e:
        raise SystemExit(f"error: {e}") from None


def build_via_checkpoint(model_dir: Path, device: str, compute_dtype, quant_type: str = "nf4",
                         double_quant: bool = True, seed: int = 0):
    """Save a random ``compute_dtype`` checkpoint of the config into ``model_dir`` and load it in 4 bits, the
    way ``qlora run`` loads a model (``from_pretrained`` with a ``BitsAndBytesConfig``)."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    model.save_pretrained(model_dir, safe_serialization=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=compute_dtype,
                                                device_map={"": device})


def prepare_like_qlora(model, r: int, lora_alpha: float, lora_dropout: float, checkpointing: bool):
    """What ``qlora run``'s default plugins and trainer do to the loaded model: nf4's k-bit preparation,
    gradient-checkpointing's non-reentrant checkpointing, all-linear's targets, then PEFT's LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if checkpointing:  # as the gradient-checkpointing plugin does (transformers 5.2x renamed the method)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.config.use_cache = False
    head = model.get_output_embeddings()
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and m is not head})
    lora = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM")
    torch.manual_seed(42)
    return get_peft_model(model, lora), targets


def estimate(model_dir: Path, args) -> dict[str, Any]:
    """``qlora_core.tools.plan.plan``'s figures for the same settings."""
    from qlora_core.tools.plan import plan

    overrides = [
        ("model.name_or_path", str(model_dir)), ("lora.r", args.r), ("lora.lora_alpha", 2.0 * args.r),
        ("lora.lora_dropout", args.lora_dropout), ("quant.bnb_4bit_use_double_quant", not args.no_double_quant),
        ("quant.bnb_4bit_compute_dtype", "bfloat16"), ("train.per_device_train_batch_size", args.batch),
        ("train.max_seq_length", args.seq), ("train.gradient_accumulation_steps", 1),
    ]
    plugins = [] if not args.no_checkpointing else ["no:gradient-checkpointing"]
    from qlora_core import resolve

    config, plugin_set = resolve({}, plugins, overrides)
    result = plan(model_dir, config, gpus=1, plugins=plugin_set, loss="transformers" if args.loss == "hf" else "qlora")
    return result.to_dict()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b", help=f"{', '.join(SHAPES)}, or a config.json path")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--loss", choices=("qlora", "hf"), default="qlora",
                        help="qlora: the trainer's loop (accelerate's bf16 wrapper, its loss on fp32 logits); hf: "
                             "torch.autocast and the model's own loss (labels=inputs), its output kept through "
                             "backward as the guide's recipe does")
    parser.add_argument("--build", choices=("direct", "checkpoint"), default="direct")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, model_dir: Path, device: str = "cuda") -> dict[str, Any]:
    """Build, prepare and train ``args.steps`` steps on ``device``; the figures (memory ones on CUDA only)."""
    import bitsandbytes as bnb
    import torch
    from accelerate import Accelerator

    from qlora_core.loop.loss import token_loss_sum as _token_loss_sum
    from qlora_plugins.fused_loss import token_loss_sum

    cuda = device == "cuda"
    dtype = torch.bfloat16

    def allocated() -> float | None:
        return torch.cuda.memory_allocated() / GIB if cuda else None

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    result: dict[str, Any] = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    build = args.build
    model = None
    if build == "direct":
        try:
            model = build_direct(model_dir, device, dtype, double_quant=not args.no_double_quant)
        except Exception as e:  # noqa: BLE001 - fall back to the slower, standard path
            result["direct_build_error"] = f"{type(e).__name__}: {e}"
            import gc

            model = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            build = "checkpoint"
    if model is None:
        model = build_via_checkpoint(model_dir, device, dtype, double_quant=not args.no_double_quant)
    sync()
    result["build"] = build
    result["build_seconds"] = round(time.perf_counter() - t0, 1)
    result["weights_after_load_gib"] = allocated()
    result["n_params"] = sum(p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
                             for p in model.parameters())

    model, targets = prepare_like_qlora(model, args.r, 2.0 * args.r, args.lora_dropout, not args.no_checkpointing)
    sync()
    result["lora_targets"] = targets
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["weights_after_prepare_gib"] = allocated()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (bnb.optim.PagedAdamW8bit if cuda else bnb.optim.AdamW8bit)(params, lr=2e-4, weight_decay=0.0)
    accelerator = None
    if args.loss == "qlora":  # the trainer's wrapping: bf16 autocast, outputs converted to fp32
        # One accelerate state per process: on the CPU (the tests) it is the trainer's float32 one.
        accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
        model = accelerator.prepare_model(model, device_placement=False)
        optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    model.train()
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator(device=device).manual_seed(0)
    steps = []
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, vocab, (args.batch, args.seq), device=device, generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        sync()
        t = time.perf_counter()
        before = allocated()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if accelerator is not None:  # qlora's trainer
            # the fused-loss plugin's head on the answer positions, else the core's loss from the logits
            found = token_loss_sum(model, batch)
            loss_sum, n = found if found is not None else _token_loss_sum(model, batch)
            loss = loss_sum / n
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 0.3)
        else:  # the guide's style: the model's own loss, its output kept until after backward
            with torch.autocast(device, dtype=dtype):
                out = model(**batch)
            loss = out.loss
            loss.backward()
            del out
            torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        seconds = time.perf_counter() - t
        steps.append({"step": step, "loss": float(loss.detach()), "seconds": round(seconds, 3),
                      "tokens_per_second": round(args.batch * args.seq / seconds, 1),
                      "allocated_before_gib": before,
                      "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None})
        del loss
    result["steps_detail"] = steps
    result["tokens_per_second"] = steps[-1]["tokens_per_second"]
    if not all(math.isfinite(s["loss"]) for s in steps):
        result["warning"] = "non-finite loss"
    if cuda:
        result["measured_peak_gib"] = max(s["peak_allocated_gib"] for s in steps)
        result["allocated_between_steps_gib"] = steps[-1]["allocated_before_gib"]
        result["reserved_peak_gib"] = torch.cuda.max_memory_reserved() / GIB
    return result


def gpu_model_folder(script: str, shape: str) -> Path | None:
    """A new temporary model folder with ``shape``'s config, when this machine can measure; else ``None``, after
    printing why (no torch, no CUDA GPU, no bitsandbytes) as one ``error:`` line."""
    config_json = shape_config(shape)
    problem = None
    try:
        import torch

        if not torch.cuda.is_available():
            problem = "needs a CUDA GPU (torch.cuda.is_available() is False); run it on the GPU machine"
        else:
            import bitsandbytes  # noqa: F401
    except ImportError as e:
        problem = f"needs {e.name or e}"
    if problem:
        print(f"error: {script} {problem}", file=sys.stderr)
        return None
    return write_config_folder(config_json, Path(tempfile.mkdtemp(prefix=f"qlora-{script}-")) / "model")


def versions() -> dict[str, str]:
    """The versions of the libraries the measurement depends on."""
    return {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "accelerate", "bitsandbytes")}


def print_result(result: dict[str, Any], out: Path | None) -> None:
    """Print the figures as one JSON object, and write them to ``out`` too when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = gpu_model_folder("plan_check", args.shape)
    if model_dir is None:
        return 2
    import torch

    result: dict[str, Any] = {
        "shape": args.shape, "seq": args.seq, "batch": args.batch, "steps": args.steps, "r": args.r,
        "lora_dropout": args.lora_dropout, "gradient_checkpointing": not args.no_checkpointing,
        "double_quant": not args.no_double_quant, "loss": args.loss, "gpu": torch.cuda.get_device_name(0),
        "versions": versions(),
    }
    try:
        result.update(measure(args, model_dir, "cuda"))
    except torch.cuda.OutOfMemoryError as e:
        result["out_of_memory"] = str(e).splitlines()[0]
        result["measured_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    try:
        est = estimate(model_dir, args)
        result["estimate"] = est
        key = "peak_without_checkpointing_gib" if args.no_checkpointing else "peak_with_checkpointing_gib"
        result["estimated_peak_gib"] = est[key]
        if result.get("measured_peak_gib") and "out_of_memory" not in result:
            result["ratio_estimate_over_measured"] = est[key] / result["measured_peak_gib"]
    except Exception as e:  # noqa: BLE001 - the measurement is still worth printing
        result["estimate_error"] = f"{type(e).__name__}: {e}"

    print_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
