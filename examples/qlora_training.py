"""The QLoRA guide's complete training script, written against qlora's Python API.

Every step of the guide's Workflow 1, in order, with the guide's settings; runnable as it is on the
embedded default model and task (offline, on a CPU in a few minutes), and on any model and dataset with
--model / --data:

    python examples/qlora_training.py                                  # embedded SmolLM2 + secret-rules
    python examples/qlora_training.py --model meta-llama/Llama-2-13b-hf \\
        --data timdettmers/openassistant-guanaco --max-steps 1000      # the guide's own run (GPU, online)
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--data", default="embedded:secret-rules")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--eval-samples", type=int, help="held-out examples evaluated (default 64 on the embedded "
                                                           "model, else 500)")
    parser.add_argument("--output", default="runs/qlora-training")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change any config key, as qlora run --set does (repeatable)")
    args = parser.parse_args()
    small = args.model.startswith("embedded:")

    from qlora_core import Job

    config = {
        # Step 2: configure quantization: NF4, double quantization, bf16 compute where the GPU has it.
        "quant": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                  "bnb_4bit_compute_dtype": "auto"},
        "model": {"name_or_path": args.model},
        # Step 4: configure LoRA: r=16, alpha=2r, all linear layers.
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.05, "bias": "none"},
        # Step 1: the dataset (guanaco format: "### Human: ... ### Assistant: ..."), with a held-out split.
        "data": {"path": args.data, "max_eval_samples": args.eval_samples or (64 if small else 500)},
        # Step 5: train with the guide's TrainingArguments.
        "train": {
            "per_device_train_batch_size": 8 if small else 4,
            "gradient_accumulation_steps": 1 if small else 4,   # effective batch = 16 in the guide
            "warmup_steps": 4 if small else 100,
            "max_steps": args.max_steps,
            "learning_rate": 1e-3 if small else 2e-4,           # a 135M model learns faster than 13B
            "logging_steps": 5 if small else 10,
            "save_strategy": "steps",
            "save_steps": 20 if small else 100,
            "eval_steps": 20 if small else 100,
            "optim": "paged_adamw_8bit",                          # 8-bit paged optimizer
            "max_grad_norm": 1.0 if small else 0.3,
            "max_seq_length": 512,
        },
    }
    job = Job(config, overrides=args.overrides, output_dir=args.output, overwrite=True)

    job.load_data()
    # Step 3: load in 4 bits, prepare for k-bit training, enable gradient checkpointing
    # (the nf4 and gradient-checkpointing plugins); then add the LoRA adapters (all-linear plugin).
    model = job.load_model()
    model.print_trainable_parameters()

    result = job.train()
    print(f"eval loss {result.summary['eval_loss_before']:.4f} -> {result.summary['eval_loss_after']:.4f}")
    # Save LoRA adapters: done by the adapter-export plugin.
    print(f"adapter: {result.adapter_dir}")


if __name__ == "__main__":
    main()
