"""A long CPU run: resident memory flat after warm-up, disk bounded, every checkpoint valid.

Trains the tiny random Llama of qlora's test fixtures (two decoder layers, the real SmolLM2 tokenizer) for
``--steps`` steps (2,000 by default), a checkpoint every ``--save-steps`` (50) with ``train.save_total_limit``
``--keep`` (3). A plugin samples, at every logging step, the process's resident memory (``VmRSS``) and the run
folder's size on disk, and after every checkpoint checks the checkpoint against its manifest and the folder's
checkpoint count. Prints a table of the samples (or ``--json``) and the verdicts:

- memory: the largest resident memory after warm-up (the first 10% of the steps) against the one at the end of
  warm-up;
- disk: the run folder's largest size against the size with ``--keep`` checkpoints;
- checkpoints: every one written was whole when written, and never more than ``--keep`` at a time.

    python benchmarks/soak.py [--steps 2000] [--save-steps 50] [--keep 3] [--output DIR] [--json]

Not a test: it takes minutes. Measured figures: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROBE = '''
import json, os
from pathlib import Path
from qlora_core import hookimpl

def _rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")

def _size_mib(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20

@hookimpl
def qlora_on_log(run, metrics):
    with open(os.environ["QLORA_SOAK_LOG"], "a") as f:
        f.write(json.dumps({"step": metrics["step"], "rss_mib": _rss_mib(),
                            "disk_mib": _size_mib(run.output_dir)}) + "\\n")

@hookimpl
def qlora_on_save(run, path):
    from qlora_core.loop.checkpoint import checkpoint_dirs, verify_checkpoint
    if Path(path).parent.name != "checkpoints":
        return
    with open(os.environ["QLORA_SOAK_LOG"], "a") as f:
        f.write(json.dumps({"checkpoint": Path(path).name, "problem": verify_checkpoint(Path(path)),
                            "count": len(checkpoint_dirs(run.output_dir))}) + "\\n")
'''


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None, help="the run folder (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import os

    import torch
    from transformers import AutoTokenizer

    from qlora_core import Job, testing

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="qlora-soak-"))
    out = args.output or work / "run"
    log = work / "soak.jsonl"
    os.environ["QLORA_SOAK_LOG"] = str(log)
    probe = work / "soak_probe.py"
    probe.write_text(PROBE)
    tokenizer = AutoTokenizer.from_pretrained(testing._smollm2_folder(), gguf_file=testing.SMOLLM2_GGUF)
    model_dir = testing.tiny_llama(work / "tiny", tokenizer)
    data = testing.write_jsonl(work / "train.jsonl", testing.TINY_ROWS)
    config = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data)},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "plugins": [str(probe), "no:rich-progress"],
        "train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": args.steps,
                  "learning_rate": 1e-4, "logging_steps": max(1, args.steps // 100), "max_seq_length": 64,
                  "sample_max_new_tokens": 0, "save_steps": args.save_steps, "save_total_limit": args.keep},
    }
    started = time.perf_counter()
    Job(config, output_dir=out, overwrite=True).run()
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    samples = [r for r in rows if "rss_mib" in r]
    saves = [r for r in rows if "checkpoint" in r]
    warm = [s for s in samples if s["step"] <= args.steps // 10]
    after = [s for s in samples if s["step"] > args.steps // 10]
    ckpt_mib = max((s["disk_mib"] for s in samples), default=0.0)
    report = {
        "steps": args.steps, "save_steps": args.save_steps, "keep": args.keep, "wall_seconds": wall,
        "rss_mib_end_of_warmup": warm[-1]["rss_mib"] if warm else None,
        "rss_mib_max_after_warmup": max((s["rss_mib"] for s in after), default=None),
        "rss_mib_last": samples[-1]["rss_mib"] if samples else None,
        "disk_mib_max": ckpt_mib, "disk_mib_last": samples[-1]["disk_mib"] if samples else None,
        "checkpoints_written": len(saves),
        "checkpoints_invalid": [s for s in saves if s["problem"]],
        "max_checkpoints_at_once": max((s["count"] for s in saves), default=0),
        "samples": samples,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.steps} steps in {wall:.0f} s, {len(saves)} checkpoints written "
              f"(every {args.save_steps}, keep {args.keep})")
        print(f"resident memory: {report['rss_mib_end_of_warmup']:.1f} MiB at the end of warm-up, at most "
              f"{report['rss_mib_max_after_warmup']:.1f} MiB after it, {report['rss_mib_last']:.1f} MiB at the end")
        print(f"run folder on disk: at most {report['disk_mib_max']:.2f} MiB, {report['disk_mib_last']:.2f} MiB "
              f"at the end; at most {report['max_checkpoints_at_once']} checkpoints at once")
        print(f"checkpoints failing their manifest: {len(report['checkpoints_invalid'])}")
    bad = report["checkpoints_invalid"] or report["max_checkpoints_at_once"] > args.keep
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
