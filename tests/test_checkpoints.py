"""Checkpoints, resume, and running out of GPU memory, on the tiny model."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import yaml

from qlora_core import cli
from qlora_core.loop.checkpoint import checkpoint_dirs
from qlora_core.framework.errors import UsageError
from qlora_core import Job
from conftest import INTERRUPTER, assert_same_losses

# Makes every forward with more than two sequences run out of (simulated) GPU memory.
OOM_ABOVE_TWO = """
import torch
from qlora_core import hookimpl

def _limit(module, args, kwargs):
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is not None and ids.shape[0] > 2:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

@hookimpl
def qlora_prepare_model(model, config):
    # On the decoder, which every loss path runs through.
    model.get_decoder().register_forward_pre_hook(_limit, with_kwargs=True)
"""

NOTICES = """
from qlora_core import hookimpl

SEEN = []

@hookimpl
def qlora_on_notice(run, message):
    SEEN.append(message)
"""


@pytest.fixture
def ckpt_config(tiny_config, tmp_path):
    plugin = tmp_path / "interrupter.py"
    plugin.write_text(INTERRUPTER)
    cfg = copy.deepcopy(tiny_config)
    cfg["plugins"] = [str(plugin)]
    cfg["data"]["eval_fraction"] = 0.25
    cfg["lora"]["lora_dropout"] = 0.1  # dropout draws random numbers: resume must restore the RNGs
    cfg["train"].update(max_steps=6, save_steps=2, eval_steps=2, logging_steps=1, per_device_train_batch_size=2,
                        gradient_accumulation_steps=2, warmup_steps=2)
    return cfg


def test_checkpoints_hold_adapter_optimizer_scheduler_rng_position_and_config(ckpt_config, tmp_path):
    out = tmp_path / "run"
    Job(ckpt_config, output_dir=out).run()
    dirs = checkpoint_dirs(out)
    # Every train.save_steps steps, and at the last step whatever the strategy (a finished run can train on).
    assert [d.name for d in dirs] == ["step-0000002", "step-0000004", "step-0000006"]
    for d in dirs:
        for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "optimizer.pt",
                     "scheduler.pt", "rng.json", "state.json", "config.yaml", "plugins.json", "manifest.json"):
            assert (d / name).is_file(), name
    state = json.loads((dirs[1] / "state.json").read_text())
    assert state["step"] == 4 and state["examples_seen"] == 16
    assert yaml.safe_load((dirs[-1] / "config.yaml").read_text())["lora"]["r"] == 8
    assert {p["name"] for p in json.loads((dirs[-1] / "plugins.json").read_text())} >= {"nf4", "adapter-export"}


def test_save_total_limit_keeps_the_newest(ckpt_config, tmp_path):
    ckpt_config["train"].update(save_steps=1, save_total_limit=2)
    out = tmp_path / "run"
    Job(ckpt_config, output_dir=out).run()
    assert [d.name for d in checkpoint_dirs(out)] == ["step-0000005", "step-0000006"]


def test_epoch_strategy_saves_at_epoch_ends(ckpt_config, tmp_path):
    # 12 training rows, 4 examples a step: an epoch ends every 3 steps.
    ckpt_config["train"].update(save_strategy="epoch", max_steps=7)
    out = tmp_path / "run"
    Job(ckpt_config, output_dir=out).run()
    assert [d.name for d in checkpoint_dirs(out)] == ["step-0000003", "step-0000006", "step-0000007"]


def test_resumed_run_ends_with_the_same_losses_as_the_uninterrupted_one(ckpt_config, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full"
    Job(ckpt_config, output_dir=full).run()

    cut = tmp_path / "cut"
    monkeypatch.setenv("QLORA_TEST_INTERRUPT_AT", "5")
    with pytest.raises(KeyboardInterrupt):
        Job(ckpt_config, output_dir=cut).run()
    assert json.loads((cut / "run.json").read_text())["status"] == "interrupted"
    assert not (cut / "adapter").exists()
    monkeypatch.delenv("QLORA_TEST_INTERRUPT_AT")

    assert cli.main(["run", "--resume", str(cut)]) == 0
    capsys.readouterr()
    assert_same_losses(full, cut)
    status = json.loads((cut / "run.json").read_text())
    assert status["status"] == "completed" and status["resumed_from_step"] == 4
    assert (cut / "adapter" / "adapter_model.safetensors").is_file()


def test_a_partly_written_checkpoint_is_ignored(ckpt_config, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("QLORA_TEST_INTERRUPT_AT", "5")
    with pytest.raises(KeyboardInterrupt):
        Job(ckpt_config, output_dir=out).run()
    # A crash while writing the step-6 checkpoint would leave this behind.
    partial = out / "checkpoints" / ".step-0000006.partial"
    shutil.copytree(out / "checkpoints" / "step-0000004", partial)
    assert [d.name for d in checkpoint_dirs(out)] == ["step-0000002", "step-0000004"]
    monkeypatch.delenv("QLORA_TEST_INTERRUPT_AT")
    job = Job(resume=out)
    job.run()
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] == 4


def test_resume_without_a_checkpoint_is_a_one_line_error(ckpt_config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv("QLORA_TEST_INTERRUPT_AT", "1")  # stopped before its first checkpoint (step 2)
    with pytest.raises(KeyboardInterrupt):
        Job(ckpt_config, output_dir=out).run()
    assert cli.main(["run", "--resume", str(out)]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err
    assert cli.main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a qlora run folder" in capsys.readouterr().err


def test_out_of_memory_with_auto_find_batch_size_halves_the_micro_batch_and_gives_the_same_step(
        tiny_config, tmp_path):
    oom = tmp_path / "oom_above_two.py"
    oom.write_text(OOM_ABOVE_TWO)
    notices = tmp_path / "notices.py"
    notices.write_text(NOTICES)
    base = copy.deepcopy(tiny_config)
    base["train"].update(max_steps=2, max_grad_norm=0.0)
    base["plugins"] = ["adamw"]

    small = copy.deepcopy(base)
    small["train"].update(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    ref = Job(small, output_dir=tmp_path / "ref")
    ref.run()

    big = copy.deepcopy(base)
    big["train"].update(per_device_train_batch_size=4, gradient_accumulation_steps=1, auto_find_batch_size=True)
    big["plugins"] += [str(oom), str(notices)]
    job = Job(big, output_dir=tmp_path / "auto")
    result = job.run()
    assert result.steps == 2
    seen = [m for m in job.plugins.pm.get_plugin("notices").SEEN if "GPU memory" in m]
    assert seen == ["out of GPU memory at step 1: micro-batch 4 -> 2, gradient accumulation -> 2 "
                    "(the effective batch is unchanged); going on"]
    for (name, p), (_, q) in zip(ref.model.named_parameters(), job.model.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_out_of_memory_without_auto_find_batch_size_stops_with_the_remedies(tiny_config, tmp_path, capsys):
    oom = tmp_path / "oom_above_two.py"
    oom.write_text(OOM_ABOVE_TWO)
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(per_device_train_batch_size=4, max_steps=3)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert cli.main(["run", str(config), "--plugin", str(oom), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    for remedy in ("auto_find_batch_size", "per_device_train_batch_size", "gradient_accumulation_steps",
                   "lora.r", "cpu-offload"):
        assert remedy in err
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_resume_refuses_a_config_or_plugins():
    with pytest.raises(UsageError, match="--resume continues a run with its own config.yaml"):
        Job({"lora": {"r": 4}}, resume="runs/x")


def test_a_run_folder_keeps_working_with_keys_of_a_plugin_it_left_out(tiny_config, tmp_path):
    """A run folder whose config.yaml holds a key that only a plugin the run turned off declares (as a folder
    written when the core still declared it) is evaluated and resumed; a user's config with it is refused."""
    from qlora_core import ConfigError, resolve

    cfg = dict(tiny_config, train={**tiny_config["train"], "save_steps": 1, "max_steps": 2})
    cfg["plugins"] = ["no:fused-lora", "no:rich-progress"]
    Job(cfg, output_dir=tmp_path / "run").run()
    path = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    assert "fused_lora" not in saved["train"]
    saved["train"]["fused_lora"] = "auto"
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    assert "train.fused_lora" not in Job.from_run(tmp_path / "run").config.options
    result = Job(resume=tmp_path / "run", overrides=["train.max_steps=3"]).run()
    assert result.steps == 3
    with pytest.raises(ConfigError, match=r"train\.fused_lora: unknown key"):
        resolve(saved)
