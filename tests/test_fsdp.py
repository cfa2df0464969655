"""FSDP across processes (``--plugin fsdp``): on the CPU, two processes over gloo train the tiny Llama in 4 bits
exactly like one process with the same global batch; plus the plugin's config rules, wrapping plan and launcher."""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from qlora_core import cli
from qlora_core.cli.commands.run import launch_command
from qlora_core.framework.errors import UsageError
from qlora_core import Job

from qlora_plugins import fsdp


def losses(run_dir) -> list[tuple[int, str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], "loss" if "loss" in r else "eval_loss", r.get("loss", r.get("eval_loss"))) for r in rows]


def qlora(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    return subprocess.run([sys.executable, "-m", "qlora_core", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def qlora_run(cfg: dict, tmp_path, out: str, *args) -> tuple:
    """``qlora run`` on ``cfg`` (written to ``tmp_path/out.yaml``) into ``tmp_path/out``, with ``args``; it must
    succeed."""
    config = tmp_path / f"{out}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    done = qlora("run", str(config), *args, "--output", str(tmp_path / out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, tmp_path / out


@pytest.fixture
def fsdp_config(tiny_config) -> dict:
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["eval_fraction"] = 0.25
    cfg["train"].update(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, save_steps=2,
                        optim="adamw")
    return cfg


def test_two_processes_train_as_one_process_does_and_resume(fsdp_config, tmp_path):
    done, out = qlora_run(fsdp_config, tmp_path, "fsdp", "--plugin", "fsdp", "--plugin", "no:rich-progress",
                          "--nproc-per-node", "2")
    assert done.stdout.count("run folder:") == 1  # rank 0 only

    # One process, no FSDP, the same global batch (2 per process x 2 processes): the same losses.
    single = copy.deepcopy(fsdp_config)
    single["train"]["per_device_train_batch_size"] = 4
    one = Job(single, plugins=["no:rich-progress"], output_dir=tmp_path / "one").run()
    expected = losses(one.output_dir)
    got = losses(out)
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in expected]  # one row each: rank 0 wrote them
    assert [v for *_, v in got] == pytest.approx([v for *_, v in expected], rel=1e-5)
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one.output_dir.iterdir())

    # The adapter is a plain PEFT adapter: it loads on the CPU onto the unquantized base, and equals the
    # single process's.
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(fsdp_config["model"]["name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert sum(1 for n, _ in model.named_parameters() if "lora_" in n) == 28
    mine, theirs = load_file(str(out / "adapter" / "adapter_model.safetensors")), \
        load_file(str(one.output_dir / "adapter" / "adapter_model.safetensors"))
    assert sorted(mine) == sorted(theirs)
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], atol=1e-5, rtol=1e-4)

    # Resume from the step-2 checkpoint on two processes: steps 3 and 4 come out as in the run itself.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000004")  # the end's checkpoint: resume from step 2
    done = qlora("run", "--resume", str(resumed), "--nproc-per-node", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((resumed / "run.json").read_text())["resumed_from_step"] == 2
    assert [v for *_, v in losses(resumed)] == pytest.approx([v for *_, v in got], rel=1e-5)


def test_fsdp_stores_4bit_weights_in_the_compute_dtype_without_upcast(tiny_config, tmp_path):
    job = Job(tiny_config, plugins=["fsdp"], output_dir=tmp_path / "run")
    assert job.config["quant.bnb_4bit_quant_storage"] == "float32"  # the CPU computes in float32
    assert job.config["quant.fp32_upcast"] is False
    plain = Job(tiny_config, output_dir=tmp_path / "plain")
    assert plain.config["quant.bnb_4bit_quant_storage"] == "uint8" and plain.config["quant.fp32_upcast"] is False
    # The same value set explicitly is no contradiction.
    Job(tiny_config, plugins=["fsdp"], overrides=["quant.bnb_4bit_quant_storage=float32"])


@pytest.mark.parametrize("setting, named", [("quant.bnb_4bit_quant_storage=uint8", "quant.bnb_4bit_quant_storage"),
                                            ("quant.fp32_upcast=true", "quant.fp32_upcast"),
                                            ("lora.bias=all", "lora.bias")])
def test_a_setting_that_contradicts_fsdp_is_a_one_line_error(tiny_config, tmp_path, capsys, setting, named):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    code = cli.main(["run", str(config), "--plugin", "fsdp", "--set", setting, "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: fsdp: ") and named in err[0]
    assert not (tmp_path / "run").exists()


def test_fsdp_and_cpu_offload_do_not_combine(tiny_config):
    with pytest.raises(UsageError, match="fsdp.cpu_offload"):
        Job(tiny_config, plugins=["fsdp", "cpu-offload"])


def test_the_wrapping_plan_shards_decoder_layers_and_keeps_adapters_whole(tiny_config, tmp_path):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    job = Job(tiny_config, plugins=["fsdp"], output_dir=tmp_path / "run")
    model = job.load_model()
    assert fsdp.decoder_layer_class(model) is LlamaDecoderLayer
    kwargs = fsdp.wrap_kwargs(model, job.config, torch.device("cpu"))
    assert kwargs["auto_wrap_policy"].keywords["transformer_layer_cls"] == {LlamaDecoderLayer}
    adapters = kwargs["ignored_states"]
    assert len(adapters) == 2 * 7 * 2  # lora_A and lora_B of 7 linears in 2 layers
    assert {p for m in adapters for p in m.parameters()} == {p for p in model.parameters() if p.requires_grad}
    assert kwargs["sharding_strategy"].name == "FULL_SHARD" and not kwargs["cpu_offload"].offload_params
    # Norms and 4-bit weights share one dtype, so FSDP can flatten each layer.
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.float32}
    job.config.set("fsdp.wrap_class", "LlamaBlock")
    with pytest.raises(UsageError, match="no module of class 'LlamaBlock'.*LlamaDecoderLayer"):
        fsdp.wrap_kwargs(model, job.config, torch.device("cpu"))


def _run_args(**given) -> argparse.Namespace:
    args = dict(config=None, plugin=[], overrides=[], output=None, overwrite=False, resume=None, nproc_per_node=2)
    args.update(given)
    return argparse.Namespace(**args)


def test_the_launcher_forwards_the_arguments_to_torchrun():
    cmd = launch_command(_run_args(config="c.yaml", plugin=["fsdp", "adamw"], overrides=["lora.r=8"],
                                   overwrite=True), "runs/x")
    assert cmd[:6] == [sys.executable, "-m", "qlora_core.cli.launch", "--standalone", "--nproc-per-node=2", "-m"]
    assert cmd[6:] == ["qlora_core", "run", "c.yaml", "--plugin", "fsdp", "--plugin", "adamw", "--set", "lora.r=8",
                       "--output", "runs/x", "--overwrite"]
    resume = launch_command(_run_args(resume="runs/x", overrides=["train.max_steps=9"]), None)
    assert resume[8:] == ["--set", "train.max_steps=9", "--resume", "runs/x"]


def test_the_launcher_reports_errors_once_before_starting_processes(tiny_config, tmp_path, capsys, monkeypatch):
    started = []
    from qlora_core.cli.commands import run as run_command

    monkeypatch.setattr(run_command, "_run_forwarding_signals", lambda cmd: started.append(cmd) or 0)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert cli.main(["run", str(config), "--set", "lora.r=0", "--nproc-per-node", "2"]) == 2
    assert cli.main(["run", str(config), "--output", str(tmp_path / "full"), "--nproc-per-node", "2"]) == 2
    assert cli.main(["run", str(config), "--nproc-per-node", "0"]) == 2
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.main(["run", str(config), "--nproc-per-node", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in err] == ["error"] * 4
    assert "lora.r" in err[0] and "not empty" in err[1] and "at least 1" in err[2] and "torchrun" in err[3]
    assert started == []
    monkeypatch.delenv("LOCAL_RANK")
    assert cli.main(["run", str(config), "--nproc-per-node", "2", "--output", str(tmp_path / "new")]) == 0
    assert started and started[0][-2:] == ["--output", str(tmp_path / "new")]


def test_accelerate_launch_runs_the_same_job(fsdp_config, tmp_path):
    """The ordinary launcher works too: ``accelerate launch -m qlora_core run ...`` (its --multi_gpu mode spawns
    the processes through torch.distributed; on this CPU machine they talk over gloo)."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(fsdp_config))
    out = tmp_path / "acc"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "qlora_core", "run", str(config), "--plugin", "fsdp", "--plugin", "no:rich-progress",
                           "--output", str(out)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # rank 0 only
    assert json.loads((out / "plugins.json").read_text())  # the run's record, written once
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [s for s, kind, _ in losses(out) if kind == "loss"] == [1, 2, 3, 4]


def test_under_fsdp_the_loss_runs_inside_the_wrapper_through_the_fused_head(fsdp_config, tmp_path):
    """FSDP's forward must run (it gathers the sharded weights), so the fused head and loss run inside it: the
    vocabulary's logits are never made. A one-process FSDP run (in its own interpreter: it starts a process
    group) counts the fused loss's calls; its recomputation is the lean one; its losses are the unwrapped run's."""
    script = tmp_path / "spy.py"
    script.write_text(
        "import json, sys\n"
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from qlora_plugins import fused_loss\n"
        "from qlora_core.loop.job import Job\n"
        "calls = []\n"
        "real = fused_loss.linear_cross_entropy_sum\n"
        "def spy(*a, **k):\n"
        "    calls.append(1)\n"
        "    return real(*a, **k)\n"
        "fused_loss.linear_cross_entropy_sum = spy\n"
        "job = Job(json.load(open(sys.argv[1])), plugins=['fsdp'], output_dir=sys.argv[2])\n"
        "result = job.run()\n"
        "from qlora_plugins.layers import layer_policy\n"
        "print(json.dumps({'calls': len(calls), 'wrapped': job.distributed_by_plugin,\n"
        "                  'lean': layer_policy(job.model).lean,\n"
        "                  'losses': [m['loss'] for m in result.metrics if 'loss' in m]}))\n")
    cfg = copy.deepcopy(fsdp_config)
    cfg["train"].update(max_steps=2, save_strategy="no")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "cfg.json"), str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["wrapped"] and len(out["losses"]) == 2
    assert out["calls"] >= 2 * 2  # every training micro-batch (2 a step) went through the fused loss
    assert out["lean"] is True  # the lean recomputation passed its check on FSDP's gathered 4-bit weights
    one = Job(cfg, output_dir=tmp_path / "one").run()  # no FSDP: the same losses
    assert out["losses"] == pytest.approx([m["loss"] for m in one.metrics if "loss" in m], rel=1e-5)


def test_two_processes_train_on_random_weights_built_on_each(fsdp_config, tmp_path):
    """--plugin random-weights under FSDP (how a 70B shape runs across GPUs without a checkpoint): each process
    builds the same 4-bit model in FSDP's storage dtype from config.json alone, and the run trains."""
    folder = tmp_path / "shape"
    shutil.copytree(fsdp_config["model"]["name_or_path"], folder,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cfg = copy.deepcopy(fsdp_config)
    cfg["model"]["name_or_path"] = str(folder)
    cfg["train"].update(max_steps=2, save_strategy="no")
    _, out = qlora_run(cfg, tmp_path, "out", "--plugin", "fsdp", "--plugin", "random-weights", "--nproc-per-node", "2")
    assert [k for _, k, _ in losses(out)].count("loss") == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_two_processes_under_ddp_train_as_one_process_does(fsdp_config, tmp_path):
    """Without the fsdp plugin, several processes train under accelerate's DDP: the loss runs inside DDP's
    forward (the fused head too), and 2 processes give the losses of 1 with the same global batch."""
    cfg = copy.deepcopy(fsdp_config)
    # Sample answers on: the main process generates with the module DDP wraps (the wrapper has no generate).
    cfg["train"].update(max_steps=3, save_strategy="no", sample_max_new_tokens=4)
    done, two = qlora_run(cfg, tmp_path, "two", "--nproc-per-node", "2")
    assert "sample" in done.stdout and "Traceback" not in done.stderr
    assert "bnb_4bit_quant_storage" not in done.stdout + done.stderr  # an FSDP note, and this is no FSDP run
    _, one = qlora_run(cfg, tmp_path, "one", "--set", "train.gradient_accumulation_steps=4")
    got, expected = losses(two), losses(one)
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in expected]
    assert [v for *_, v in got] == pytest.approx([v for *_, v in expected], rel=1e-5)


def test_a_mistake_the_workers_find_ends_in_one_error_line(fsdp_config, tmp_path):
    """Data that only the training processes read (the launcher checks config, plugins and folder): each
    worker stops with the same error, and the launcher prints it once, with exit code 2 and no traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "### Human: hi### Assistant: \xff\xfe"}\n')
    cfg = copy.deepcopy(fsdp_config)
    cfg["data"]["path"] = str(bad)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(cfg))
    done = qlora("run", str(config), "--output", str(tmp_path / "out"), "--nproc-per-node", "2", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.jsonl" in errors[0] and "UTF-8" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr


def test_the_launcher_names_a_worker_that_died_without_a_word(monkeypatch, capsys):
    from types import SimpleNamespace

    from qlora_core.cli import launch

    failures = {0: SimpleNamespace(exitcode=2, pid=11), 1: SimpleNamespace(exitcode=-9, pid=12)}
    assert launch._failed(failures, {0: ["error: bad data"]}) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: bad data",
                   "error: training process 1 (pid 12) exited with code -9 (killed by SIGKILL); its output is above"]
    # One worker's error, the other stopped by the agent (SIGTERM) before it said anything: the error alone.
    assert launch._failed({0: SimpleNamespace(exitcode=-15, pid=7), 1: SimpleNamespace(exitcode=2, pid=8)},
                          {1: ["error: bad data"]}) == 2
    assert capsys.readouterr().err.splitlines() == ["error: bad data"]
    assert launch._failed({1: SimpleNamespace(exitcode=1, pid=5)}, {}) == 1
    assert launch._failed({0: SimpleNamespace(exitcode=143, pid=5), 1: SimpleNamespace(exitcode=143, pid=6)},
                          {0: ["stopped"], 1: ["stopped"]}) == 143
    assert capsys.readouterr().err.splitlines()[-1] == "stopped"  # the same line from both, printed once


def test_flat_gradients_are_all_reduced_in_their_own_buffer():
    """With train.flat_params the adapters' gradients are views tiling one buffer: the averager reduces that
    buffer in place (no flatten-and-copy-back); anything else (separate tensors, part of a buffer) takes the
    flattening path."""
    import torch

    from plugins.fsdp import _one_buffer
    from qlora_plugins.flat_params import FlatParams

    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((4, 8), (8, 4), (3,))]
    flat = FlatParams(params)
    grads = [p.grad for p in params]
    assert _one_buffer(grads) is flat.params[0].grad
    assert _one_buffer(grads[:2]) is None  # part of the buffer
    assert _one_buffer([torch.zeros(4, 8), torch.zeros(8, 4)]) is None  # separate tensors


_DEQUANTIZE = """
import json, sys
import torch
torch.set_num_threads(1)
from types import SimpleNamespace
from accelerate import PartialState
import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel
from qlora_core import Job

PartialState(cpu=True)
cfg, plugins, out = json.load(open(sys.argv[1])), sys.argv[2].split(","), sys.argv[3]
job = Job(cfg, plugins=plugins, output_dir=out + "/run")
model = job.load_model()
loaded = sum(t.numel() * t.element_size() for t in model.parameters() if t.device.type != "meta")
wrapped = job.hook.qlora_distribute_model(model=model, accelerator=SimpleNamespace(device=torch.device("cpu")),
                                          config=job.config)
dense = {}
with FullyShardedDataParallel.summon_full_params(wrapped):
    for name, module in wrapped.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            key = name.replace("_fsdp_wrapped_module.", "")
            dense[key] = bnbf.dequantize_4bit(module.weight.data, module.quant_state).clone()
torch.save({"dense": dense, "loaded_bytes": loaded}, f"{out}/rank{dist.get_rank()}.pt")
"""


@pytest.mark.parametrize("plugins", ["fsdp", "fsdp,random-weights"])
def test_low_memory_loading_gives_every_process_the_one_process_4bit_weights(fsdp_config, tmp_path, plugins):
    """Under two processes process 0 alone loads and quantizes (a checkpoint, or random-weights' build); process
    1 builds on the meta device and holds no weights until FSDP hands it its shard. After wrapping, every
    process's dequantized 4-bit weights (gathered with summon_full_params) equal a one-process load's exactly:
    the quantization state crossed bit for bit."""
    script = tmp_path / "dequantize.py"
    script.write_text(_DEQUANTIZE)
    cfg = copy.deepcopy(fsdp_config)
    if "random-weights" in plugins:
        folder = tmp_path / "shape"
        shutil.copytree(cfg["model"]["name_or_path"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
        cfg["model"]["name_or_path"] = str(folder)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    results = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        out.mkdir()
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                               str(script), str(tmp_path / "cfg.json"), plugins, str(out)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[n] = [torch.load(out / f"rank{r}.pt") for r in range(n)]
    one = results[1][0]
    assert len(one["dense"]) == 2 * 7
    for rank, got in enumerate(results[2]):
        assert sorted(got["dense"]) == sorted(one["dense"])
        for key, value in one["dense"].items():
            assert torch.equal(got["dense"][key], value), (rank, key)
    assert results[2][0]["loaded_bytes"] == one["loaded_bytes"]  # process 0 loaded the whole model
    assert results[2][1]["loaded_bytes"] < one["loaded_bytes"] / 50  # process 1: the adapters, nothing else



def test_cpu_offload_without_a_gpu_is_a_one_line_error(tiny_config, tmp_path, capsys):
    """On the CPU the weights are in CPU memory already, and FSDP's offload needs an accelerator to copy to."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    code = cli.main(["run", str(config), "--plugin", "fsdp", "--set", "fsdp.cpu_offload=true",
                     "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: fsdp: fsdp.cpu_offload") and "GPU" in err[0]
    assert not (tmp_path / "run").exists()
