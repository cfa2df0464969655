"""The QLoRA guide's Quick Start, written against qlora's Python API, on the embedded default model.

Steps as in the guide: load the model in 4 bits (NF4, double quantization), prepare it for k-bit
training, add LoRA on all linear layers, train with paged 8-bit AdamW, save the adapter, then load it
back with plain PEFT for inference.

    python examples/quickstart.py [--steps 20] [--eval-samples 32] [--output runs/quickstart]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-samples", type=int, default=32, help="held-out examples evaluated before and after")
    parser.add_argument("--output", default="runs/quickstart")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change any config key, as qlora run --set does (repeatable)")
    args = parser.parse_args()

    from qlora_core import Job

    job = Job(
        {
            "model": {"name_or_path": "embedded:smollm2-135m-instruct"},
            "quant": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
            "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.05},
            "data": {"path": "embedded:secret-rules", "max_eval_samples": args.eval_samples},
            "train": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                      "max_steps": args.steps, "learning_rate": 1e-3, "warmup_steps": 2, "logging_steps": 5,
                      "optim": "paged_adamw_8bit"},
        },
        overrides=args.overrides,
        output_dir=args.output,
        overwrite=True,
    )
    job.load_data()                   # tokenizer + dataset, formatted and masked
    model = job.load_model()          # 4-bit base, k-bit preparation, checkpointing, LoRA
    model.print_trainable_parameters()
    result = job.train()              # the loop; writes the run folder and the adapter
    print("eval loss:", result.summary["eval_loss_before"], "->", result.summary["eval_loss_after"])

    # Load for inference, exactly as the guide does, with plain transformers + PEFT.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=job.compute_dtype)
    base = AutoModelForCausalLM.from_pretrained(job.model_path(), quantization_config=bnb, dtype=job.compute_dtype,
                                                device_map="auto")
    tuned = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.adapter_dir)
    prompt = job.format.prompt("What is the secret name of the green owl?", tokenizer)
    inputs = tokenizer(prompt, return_tensors="pt").to(tuned.device)
    with torch.no_grad():
        out = tuned.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(prompt + tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    main()
