"""The QLoRA guide's recipe as ``qlora bench`` variants: its code as written, measured beside qlora's trainer.

* ``seed``: the guide's code (Quick Start and Workflow 1) in a plain loop: ``gradient_checkpointing_enable()``,
  ``prepare_model_for_kbit_training``, ``LoraConfig(target_modules="all-linear")``, bitsandbytes' paged AdamW
  8-bit, bf16 autocast and the model's own loss (``labels=input_ids``), gradient clipping;
* ``seed-trainer``: the same model code trained by transformers' ``Trainer`` with the guide's
  ``TrainingArguments`` (the guide uses TRL's ``SFTTrainer``, a ``Trainer`` subclass).

The model is the bench's shape with random weights, built straight into 4 bits as the ``random-weights`` plugin
builds it, from the bench's seed; the data are the sequences every variant trains on, in the same order.

It takes part in no run (no default, no run hook): ``qlora bench`` asks every installed plugin for variants.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from qlora_core import TokenizedExample, bench_memory, bench_rows, bench_step_done, collate, hookimpl

GIB = 2 ** 30


@hookimpl
def qlora_bench_variants():
    return {
        "seed": {"help": "the guide's recipe: transformers + PEFT + bitsandbytes, prepare_model_for_kbit_training, "
                         "gradient checkpointing, paged AdamW 8-bit", "run": run_seed, "ablation": True},
        "seed-trainer": {"help": "the guide's recipe through transformers' Trainer and TrainingArguments (bf16, "
                                 "paged_adamw_8bit, gradient_checkpointing), as the guide runs it",
                         "run": run_seed_trainer, "ablation": True},
    }


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _padded(rows: list[list[int]], device: str) -> dict[str, Any]:
    """A recipe batch: the rows right-padded by qlora's ``collate``, every real token a label."""
    return {k: v.to(device) for k, v in collate([TokenizedExample(r, list(r)) for r in rows], 0).items()}


def _build(args: dict[str, Any], model_dir: Path, device: str):
    """The shape's model with random weights straight into 4 bits; its build time and weights' memory."""
    import torch

    from qlora_plugins.random_weights import build_direct

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build_direct(model_dir, device, dtype, seed=args["seed"])
    _sync()
    allocated = torch.cuda.memory_allocated() / GIB if device == "cuda" else None
    return model, dtype, time.perf_counter() - t0, allocated


def _seed_model(args: dict[str, Any], model_dir: Path, device: str):
    """The built model prepared as the guide's code does it (checkpointing, k-bit preparation, all-linear LoRA)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model, dtype, build_seconds, weights = _build(args, model_dir, device)
    model.gradient_checkpointing_enable()
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=args["r"], lora_alpha=2 * args["r"], lora_dropout=args["lora_dropout"],
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(args["seed"])
    return get_peft_model(model, lora), dtype, build_seconds, weights


def run_seed(args: dict[str, Any], model_dir: Path, device: str) -> dict[str, Any]:
    """The guide's recipe, as its code is written (Quick Start and Workflow 1), for ``steps`` steps."""
    import bitsandbytes as bnb
    import torch

    model, dtype, build_seconds, weights = _seed_model(args, model_dir, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (bnb.optim.PagedAdamW8bit if device == "cuda" else bnb.optim.AdamW8bit)(
        params, lr=args["learning_rate"], weight_decay=0.0)
    rows = bench_rows(args, model.get_output_embeddings().weight.shape[0])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    steps = []
    for step in range(args["warmup"] + args["steps"]):
        batch = _padded(rows[step * args["batch"]:(step + 1) * args["batch"]], device)
        _sync()
        t = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(out.loss)
        del out
        _sync()
        steps.append({"loss": loss, "seconds": time.perf_counter() - t,
                      "tokens": int(batch["attention_mask"].sum())})
        bench_step_done(step + 1)
    return {"build_seconds": build_seconds, "weights_gib": weights, "steps": steps, **bench_memory()}


def run_seed_trainer(args: dict[str, Any], model_dir: Path, device: str) -> dict[str, Any]:
    """The guide's recipe through transformers' ``Trainer`` (the guide runs TRL's ``SFTTrainer``, a subclass),
    with its ``TrainingArguments``: bf16, paged AdamW 8-bit, gradient checkpointing. The examples go in the
    same order as the other variants' (no shuffling)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, dtype, build_seconds, weights = _seed_model(args, model_dir, device)
    total = args["warmup"] + args["steps"]
    rows = bench_rows(args, model.get_output_embeddings().weight.shape[0])

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    steps: list[dict[str, Any]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            _sync()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync()
            steps.append({"seconds": time.perf_counter() - self.t})
            bench_step_done(len(steps))

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = float(logs["loss"])

    out = Path(tempfile.mkdtemp(prefix="qlora-bench-trainer-"))
    atexit.register(shutil.rmtree, out, True)  # the run folder of a measurement: nothing in it is kept
    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args["batch"], gradient_accumulation_steps=1,
        max_steps=total, learning_rate=args["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=args["max_grad_norm"], bf16=device == "cuda", gradient_checkpointing=True,
        optim="paged_adamw_8bit" if device == "cuda" else "adamw_torch", logging_steps=1, save_strategy="no",
        report_to=[], remove_unused_columns=False, dataloader_num_workers=0, seed=args["seed"],
        disable_tqdm=True, use_cpu=device == "cpu")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = InOrder(model=model, args=training_args, train_dataset=rows,
                      data_collator=lambda batch: _padded(batch, "cpu"),
                      callbacks=[Timer()])
    trainer.train()
    for i, step in enumerate(steps):
        step["tokens"] = sum(len(r) for r in rows[i * args["batch"]:(i + 1) * args["batch"]])
        step.setdefault("loss", float("nan"))
    return {"build_seconds": build_seconds, "weights_gib": weights, "steps": steps, **bench_memory()}
