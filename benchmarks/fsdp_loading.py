"""Loading under ``--plugin fsdp`` on the CPU (gloo): what each process holds while the 4-bit model is loaded
and wrapped, for N = 1, 2, 4 processes.

A Llama of a few hundred MB in 4 bits (6 layers of width 2048, MLP 5632, vocabulary 8192, untied head; float32
storage, as FSDP needs on the CPU) is built by the ``random-weights`` plugin, or loaded from a float32
checkpoint saved once under ``--out`` (``--checkpoint``). Each of N processes started by torchrun runs the job's
loading (``Job.load_model``: base model, k-bit preparation, adapters) and the fsdp plugin's wrapping
(``qlora_distribute_model``), and measures, after each stage:

- ``weights``: bytes of the model's materialized (non-meta) parameters and buffers, each storage counted once;
- ``quant_state``: bytes of the bitsandbytes quantization states (absmax, code, nested statistics) it holds;
- ``VmHWM``: the process's resident-memory peak so far (``/proc/self/status``), and ``VmRSS`` before loading.

The launcher samples the resident memory of all N processes together every 20 ms: the machine's CPU peak.
Prints one table row per N and process, then one JSON line per N.

    python benchmarks/fsdp_loading.py                       # N = 1, 2, 4, random weights
    python benchmarks/fsdp_loading.py --nproc 2 --checkpoint
    python benchmarks/fsdp_loading.py --set fsdp.low_memory_loading=false   # every process loads the whole model
    python benchmarks/fsdp_loading.py --train 3        # then 3 steps of a global batch of 4 on each N: the losses
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MIB = 1024 * 1024

SHAPE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
         "intermediate_size": 5632, "num_hidden_layers": 6, "num_attention_heads": 16, "num_key_value_heads": 4,
         "head_dim": 128, "vocab_size": 8192, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
         "hidden_act": "silu", "tie_word_embeddings": False, "initializer_range": 0.02, "bos_token_id": 1,
         "eos_token_id": 2, "rope_theta": 10000.0}


def status_kib(field: str, pid: str = "self") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def held_bytes(model) -> tuple[int, int]:
    """(parameter and buffer bytes not on the meta device, each storage once; quantization-state bytes)."""
    import torch

    seen: set = set()
    weights = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        weights += t.untyped_storage().nbytes()
    quant = 0
    states = {}
    for module in model.modules():
        for state in (getattr(module, "quant_state", None), getattr(getattr(module, "weight", None), "quant_state", None)):
            if state is not None:
                states[id(state)] = state
    for state in states.values():
        for value in state.as_dict().values():
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                key = (value.untyped_storage().data_ptr(), value.device)
                if key not in seen:
                    seen.add(key)
                    quant += value.untyped_storage().nbytes()
    return weights, quant


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    rss0 = status_kib("VmRSS")
    from types import SimpleNamespace

    from accelerate import PartialState

    from qlora_core import Job

    PartialState(cpu=True)  # the process group, as the run's Accelerator makes it (gloo on the CPU)
    cfg = json.loads(Path(args.config).read_text())
    job = Job(cfg, plugins=args.plugins.split(","), overrides=args.set, output_dir=args.work + "/run")
    stages = {}

    def stage(name, model):
        weights, quant = held_bytes(model)
        stages[name] = {"weights_mib": weights / MIB, "quant_state_mib": quant / MIB,
                        "vmhwm_mib": status_kib("VmHWM") / 1024}

    t0 = time.perf_counter()
    model = job.load_model()
    stage("loaded", model)
    load_s = time.perf_counter() - t0
    wrapped = job.hook.qlora_distribute_model(model=model, accelerator=SimpleNamespace(device=torch.device("cpu")),
                                              config=job.config)
    stage("wrapped", wrapped)
    import torch.distributed as dist

    rank = dist.get_rank()
    peak = max(s["weights_mib"] + s["quant_state_mib"] for s in stages.values())
    print("ROW " + json.dumps({"rank": rank, "world": dist.get_world_size(), "rss_before_mib": rss0 / 1024,
                               "load_s": round(load_s, 1), "peak_weights_mib": peak, "stages": stages}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def tree_rss_kib(root: int) -> int:
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += status_kib("VmRSS", str(pid))
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return total


def prepare(out: Path, checkpoint: bool) -> Path:
    """The model folder (config.json, the tokenizer; with ``checkpoint`` float32 weights) and a run config."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_core import testing

    folder = out / ("checkpoint" if checkpoint else "shape")
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tok = AutoTokenizer.from_pretrained(testing._smollm2_folder(), gguf_file=testing.SMOLLM2_GGUF)
        tok.save_pretrained(folder)
        if checkpoint:
            import torch

            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**{k: v for k, v in SHAPE.items() if k != "architectures"})).save_pretrained(
                folder, safe_serialization=True)
        (folder / "config.json").write_text(json.dumps(SHAPE, indent=2) + "\n")
    data = out / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"### Human: row {i}### Assistant: answer {i}"}) + "\n"
                            for i in range(16)))
    cfg = {"model": {"name_or_path": str(folder)}, "data": {"path": str(data)},
           "train": {"max_steps": 1, "per_device_train_batch_size": 1}}
    path = out / ("config-checkpoint.json" if checkpoint else "config.json")
    path.write_text(json.dumps(cfg))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--checkpoint", action="store_true", help="load a saved float32 checkpoint, not random weights")
    parser.add_argument("--set", action="append", default=[], help="a config override for every process")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "qlora-fsdp-loading"))
    parser.add_argument("--train", type=int, default=0, metavar="STEPS",
                        help="then train STEPS steps of a global batch of 4 on each N (qlora run --nproc-per-node) "
                             "and compare the losses with N = 1's")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--plugins", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = prepare(out, args.checkpoint)
    plugins = "fsdp" if args.checkpoint else "fsdp,random-weights"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("LOCAL_RANK", None)
    print(f"{'N':>2} {'rank':>4} {'loaded MiB':>11} {'wrapped MiB':>12} {'quant_state':>11} {'peak MiB':>9} "
          f"{'VmRSS0':>7} {'VmHWM':>7} {'load s':>6}")
    for n in args.nproc:
        work = tempfile.mkdtemp(dir=out)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               __file__, "--worker", "--config", str(config), "--work", work, "--plugins", plugins]
        for s in args.set:
            cmd += ["--set", s]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        peak = [0]

        def sample():
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss_kib(proc.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, stderr = proc.communicate()
        sampler.join()
        if proc.returncode != 0:
            sys.exit(f"error: N={n} failed:\n{stderr[-3000:]}")
        rows = sorted((json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("ROW ")),
                      key=lambda r: r["rank"])
        for r in rows:
            s = r["stages"]
            print(f"{n:>2} {r['rank']:>4} {s['loaded']['weights_mib']:>11.1f} {s['wrapped']['weights_mib']:>12.1f} "
                  f"{s['wrapped']['quant_state_mib']:>11.1f} {r['peak_weights_mib']:>9.1f} "
                  f"{r['rss_before_mib']:>7.0f} {s['wrapped']['vmhwm_mib']:>7.0f} {r['load_s']:>6.1f}")
        print(json.dumps({"nproc": n, "machine_rss_peak_mib": round(peak[0] / 1024),
                          "max_peak_weights_mib": round(max(r["peak_weights_mib"] for r in rows), 1),
                          "set": args.set}), flush=True)
    if args.train:
        train(args, config, plugins, env, out)


def train(args, config: Path, plugins: str, env: dict, out: Path) -> None:
    """``args.train`` steps of a global batch of 4 sequences on each N (4 / N per process), the losses per step
    and their largest relative difference from N = 1's. The model: the same layers with random weights and the
    tokenizer's vocabulary (49152; the loading model's 8192 cannot embed the data's tokens)."""
    if not (out / "shape" / "config.json").is_file():
        prepare(out, False)  # the tokenizer's folder
    shape = out / "shape-train"
    shape.mkdir(exist_ok=True)
    for f in (out / "shape").glob("*"):
        if f.name != "config.json" and f.is_file():
            shutil.copy(f, shape / f.name)
    (shape / "config.json").write_text(json.dumps(dict(SHAPE, vocab_size=49152), indent=2) + "\n")
    plugins = "fsdp,random-weights"
    losses: dict[int, list[float]] = {}
    for n in args.nproc:
        run_dir = Path(tempfile.mkdtemp(dir=out)) / "run"
        cmd = [sys.executable, "-m", "qlora_core", "run", str(config), "--nproc-per-node", str(n),
               "--set", f"model.name_or_path={shape}",
               "--output", str(run_dir), "--set", f"train.max_steps={args.train}",
               "--set", f"train.per_device_train_batch_size={4 // n}", "--set", "train.logging_steps=1",
               "--set", "lora.lora_dropout=0",  # the dropout masks are drawn per process
               "--set", "train.sample_max_new_tokens=0", "--set", "train.save_strategy=\"no\""]
        for name in plugins.split(","):
            cmd += ["--plugin", name]
        for s in args.set:
            cmd += ["--set", s]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"error: training on N={n} failed:\n{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        losses[n] = [r["loss"] for r in rows if "loss" in r]
        summary = json.loads((run_dir / "run.json").read_text()).get("summary", {})
        first = losses[min(losses)]
        diff = max(abs(a - b) / abs(b) for a, b in zip(losses[n], first))
        print(json.dumps({"nproc": n, "train_steps": args.train, "global_batch": 4, "losses": losses[n],
                          "max_relative_difference_from_first": diff,
                          "peak_cpu_memory_loading_gib": summary.get("peak_cpu_memory_loading_gib"),
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
