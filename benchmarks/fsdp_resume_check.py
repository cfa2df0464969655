"""GPU check that an FSDP run killed mid-way resumes across all its ranks.

1. ``qlora run CONFIG --plugin fsdp --nproc-per-node N`` with a checkpoint every 2 steps (model and data as
   ``fsdp_check.py`` makes them: a random-weight model of a real shape, rows of random words);
2. as soon as the step-4 checkpoint is complete, the launcher and every rank are killed (SIGKILL to the
   process group: no clean-up runs);
3. ``qlora run --resume RUN_DIR --nproc-per-node N`` continues from the newest checkpoint to the end.

Prints one JSON object: the checkpoint the kill came after, the checkpoint resumed from, the losses of the steps
after the resume, those of steps logged before the kill and done again after it (same data order, adapter and
optimizer state: they should agree to bf16 noise), and the run's final status.

    python benchmarks/fsdp_resume_check.py --nproc 2 --shape llama3-8b --tokenizer .gpu-tok

Needs CUDA GPUs; without them, one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--tokenizer", type=Path, default=Path.cwd() / ".gpu-tok")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kill-after", type=int, default=4, help="kill once this step's checkpoint exists")
    parser.add_argument("--out", type=Path, default=Path("/tmp/qlora-fsdp-resume"))
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < args.nproc:
        print(f"error: fsdp_resume_check needs {args.nproc} CUDA GPUs; run it on the GPU machine", file=sys.stderr)
        return 2
    import yaml
    from fsdp_check import build_model, run_config, write_data
    from plan_check import shape_config

    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    model_dir = build_model(shape_config(args.shape), args.tokenizer, out / "model")
    data = write_data(args.tokenizer, out / "data.jsonl", max(64, 2 * args.nproc * args.batch * args.steps), args.seq)
    ns = argparse.Namespace(batch=args.batch, steps=args.steps, seq=args.seq, optim="paged_adamw_8bit",
                            sharding="FULL_SHARD", cpu_offload=False)
    cfg = run_config(ns, model_dir, data)
    cfg["train"].update(save_strategy="steps", save_steps=2)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = out / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(out / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "qlora_core", "run", str(out / "config.yaml"), "--plugin",
                                  "fsdp", "--nproc-per-node", str(args.nproc), "--output", str(run_dir)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        target = run_dir / "checkpoints" / f"step-{args.kill_after:07d}"
        deadline = time.time() + 400
        while not target.is_dir() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = losses(run_dir)
    result = {"shape": args.shape, "nproc": args.nproc, "steps": args.steps,
              "killed_with_checkpoint": target.name if target.is_dir() else None,
              "steps_logged_before_kill": sorted(before),
              "status_after_kill": json.loads((run_dir / "run.json").read_text()).get("status")
              if (run_dir / "run.json").is_file() else None}
    shutil.copy(run_dir / "metrics.jsonl", out / "metrics-before-kill.jsonl")
    started = time.perf_counter()
    with open(out / "resume.log", "w") as log:
        code = subprocess.call([sys.executable, "-m", "qlora_core", "run", "--resume", str(run_dir),
                                "--nproc-per-node", str(args.nproc)], stdout=log, stderr=subprocess.STDOUT, env=env)
    after = losses(run_dir)
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    resumed_from = run.get("resumed_from_step") or 0
    redone = sorted(s for s in set(before) & set(after) if s > resumed_from)  # logged before the kill, then redone
    result.update({"resume_exit_code": code, "resume_seconds": round(time.perf_counter() - started, 1),
                   "resumed_from_step": run.get("resumed_from_step"), "final_status": run.get("status"),
                   "steps_logged_after_resume": sorted(after),
                   "losses_after_resume": {s: after[s] for s in sorted(after) if s > resumed_from},
                   "redone_steps_loss_before_and_after": {s: [before[s], after[s]] for s in redone},
                   "adapter_written": (run_dir / "adapter" / "adapter_model.safetensors").is_file()})
    if code != 0:
        result["resume_log_tail"] = (out / "resume.log").read_text().splitlines()[-30:]
    print(json.dumps(result, indent=2))
    return 0 if code == 0 and run.get("status") == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
