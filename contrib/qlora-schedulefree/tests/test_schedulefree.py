"""qlora-schedulefree, installed (``pip install -e ./contrib/qlora-schedulefree``) and tested with qlora's fixtures:
short real runs of the tiny model, with a probe plugin that records the optimizer's mode at each hook."""

from __future__ import annotations

import copy
import importlib.metadata as md
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora_core import ConfigError, Job

PLUGIN = "schedulefree"
PROBE = str(Path(__file__).with_name("schedulefree_probe.py"))


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    """An adapter folder's weights, keyed by the model's parameter names (PEFT drops the adapter's name)."""
    return {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
            for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


def probe_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "probe.jsonl").read_text().splitlines()]


def losses(result) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in result.metrics if "loss" in m}


@pytest.fixture
def eval_config(qlora_tiny_config) -> dict:
    """The tiny config with held-out data, evaluations and checkpoints every 2 steps, and short sample answers."""
    cfg = copy.deepcopy(qlora_tiny_config)
    cfg["data"]["eval_fraction"] = 0.25
    cfg["train"].update(eval_steps=2, save_strategy="steps", save_steps=2, sample_max_new_tokens=2)
    return cfg


def test_the_package_registers_its_plugin_as_an_entry_point():
    ep = {e.name: e for e in md.entry_points(group="qlora")}[PLUGIN]
    assert ep.value == "qlora_schedulefree:ScheduleFree" and ep.dist.name == "qlora-schedulefree"


def test_requesting_it_replaces_the_default_optimizer(qlora_plugins):
    _, plugins = qlora_plugins()
    assert PLUGIN not in plugins.names()  # installed, but in no run that does not ask for it
    for how in ({"plugins": [PLUGIN]}, {"overrides": ["train.optim=schedulefree"]}):
        config, plugins = qlora_plugins(*how.get("plugins", ()), overrides=how.get("overrides", ()))
        assert plugins.implementers("qlora_optimizer") == [PLUGIN]
        assert "paged-adamw-8bit" not in plugins.names()
        assert config["schedulefree.beta1"] == 0.9 and config["schedulefree.warmup_steps"] is None


@pytest.mark.parametrize("override, message", [
    ("schedulefree.beta1=1.0", "schedulefree.beta1: must be < 1 (got 1.0)"),
    ("schedulefree.beta1=0", "schedulefree.beta1: must be > 0"),
    ("schedulefree.beta2=-0.5", "schedulefree.beta2: must be >= 0"),
    ("schedulefree.warmup_steps=-1", "schedulefree.warmup_steps: must be >= 0"),
    ("schedulefree.weight_decay=much", "schedulefree.weight_decay: must be a number"),
])
def test_a_bad_option_value_is_a_config_error(qlora_plugins, override, message):
    with pytest.raises(ConfigError) as err:
        qlora_plugins(PLUGIN, overrides=[override])
    assert message in str(err.value)


def test_the_loops_warmup_is_the_librarys_own(qlora_plugins):
    """The loop's scheduler (warmup, then constant) with the optimizer's warmup at 0 steps the weights exactly as
    schedule-free's built-in warmup_steps does."""
    from schedulefree import AdamWScheduleFree

    config, plugins = qlora_plugins(PLUGIN, overrides=["schedulefree.warmup_steps=3", "schedulefree.weight_decay=0.1"])
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(50, generator=gen)
    grads = [torch.randn(50, generator=gen) for _ in range(6)]

    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizer = plugins.hook.qlora_optimizer(params=[ours], config=config)
    scheduler = plugins.hook.qlora_lr_scheduler(optimizer=optimizer, num_training_steps=6, config=config)
    reference = AdamWScheduleFree([theirs], lr=config["train.learning_rate"], warmup_steps=3, weight_decay=0.1)
    rates = []
    for g in grads:
        for opt, p in ((optimizer, ours), (reference, theirs)):
            opt.train()
            p.grad = g.clone()
            opt.step()
        rates.append(scheduler.get_last_lr()[0])
        scheduler.step()
    optimizer.eval(), reference.eval()
    assert torch.equal(ours, theirs)
    lr = config["train.learning_rate"]
    assert rates == pytest.approx([lr / 3, 2 * lr / 3, lr, lr, lr, lr])


def test_a_short_run_trains_with_it(qlora_run):
    result = qlora_run(PLUGIN, max_steps=6, warmup_steps=2)
    assert result.steps == 6
    loss = losses(result)
    assert loss[6] < loss[1]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    used = json.loads((result.output_dir / "plugins.json").read_text())
    assert [p["name"] for p in used if "qlora_optimizer" in p["hooks"]] == [PLUGIN]
    # The learning rate each step used: warmup over 2 steps, then constant (no linear decay).
    lr = {m["step"]: m["learning_rate"] for m in result.metrics if "learning_rate" in m}
    assert lr == pytest.approx({1: 5e-4, 2: 1e-3, 3: 1e-3, 4: 1e-3, 5: 1e-3, 6: 1e-3})
    # The values taken from train.* are recorded as used.
    saved = yaml.safe_load((result.output_dir / "config.yaml").read_text())
    assert saved["schedulefree"]["warmup_steps"] == 2 and saved["schedulefree"]["weight_decay"] == 0.0
    assert saved["train"]["adapter_compute_copy"] is False


def test_eval_mode_exactly_while_evaluating_sampling_saving_and_exporting(qlora_run, eval_config):
    result = qlora_run(PLUGIN, PROBE, config=eval_config, max_steps=4)
    rows = probe_rows(result.output_dir)
    by_hook: dict[str, list[dict]] = {}
    for row in rows:
        by_hook.setdefault(row["hook"], []).append(row)

    for hook in ("qlora_on_step_begin", "qlora_on_after_backward", "qlora_on_step_end"):
        assert [r["step"] for r in by_hook[hook]] == ([0, 1, 2, 3] if hook != "qlora_on_step_end" else [1, 2, 3, 4])
        assert all(r["train_mode"] for r in by_hook[hook]), hook
    # Before training, at step 2 and after: evaluations; checkpoints at step 2 and at the end, and the adapter export.
    assert [r["step"] for r in by_hook["qlora_on_evaluate"]] == [0, 2, 4]
    assert [r["stage"] for r in by_hook["qlora_on_sample"]] == ["before", "after"]
    assert [r["path"] for r in by_hook["qlora_on_save"]] == ["step-0000002", "step-0000004", "adapter"]
    assert len(by_hook["qlora_export"]) == 1
    for hook in ("qlora_on_evaluate", "qlora_on_sample", "qlora_on_save", "qlora_export"):
        assert not any(r["train_mode"] for r in by_hook[hook]), hook
    # One switch per change: eval first, train for steps 1-2, eval at step 2 (evaluation and checkpoint), train
    # for steps 3-4, eval after training.
    modes = [(r["step"], r["mode"]) for r in rows if r["hook"] == "qlora_on_mode"]
    assert modes == [(0, "eval"), (0, "train"), (2, "eval"), (2, "train"), (4, "eval")]


def test_the_saved_adapter_holds_the_average_x_not_the_training_point_y(qlora_run, eval_config):
    result = qlora_run(PLUGIN, PROBE, config=eval_config, max_steps=4, flat_params=False)
    probe = torch.load(result.output_dir / "probe-weights.pt")
    saved = adapter_weights(result.adapter_dir)
    assert set(saved) == set(probe["x"]) == set(probe["y"]) and saved
    for name, value in saved.items():
        torch.testing.assert_close(value, probe["x"][name], rtol=1e-5, atol=1e-6)
    moved = max((saved[n] - probe["y"][n]).abs().max().item() for n in saved)
    assert moved > 1e-4  # y and x really differ: the export is not the training weights


def test_resuming_from_a_checkpoint_continues_the_same_run(qlora_run, eval_config):
    cfg = copy.deepcopy(eval_config)
    cfg["train"]["sample_max_new_tokens"] = 0
    whole = qlora_run(PLUGIN, config=cfg, max_steps=4)
    finished = adapter_weights(whole.adapter_dir)
    assert (whole.output_dir / "checkpoints" / "step-0000002" / "optimizer.pt").is_file()

    # Continue from the step-2 checkpoint (the end's left out): steps 3 and 4 again, from its x and the
    # optimizer's z.
    shutil.rmtree(whole.output_dir / "checkpoints" / "step-0000004")
    resumed = Job(resume=whole.output_dir).run()
    assert resumed.steps == 4
    again = losses(resumed)
    assert again[3] == pytest.approx(losses(whole)[3], rel=1e-5)
    assert again[4] == pytest.approx(losses(whole)[4], rel=1e-5)
    for name, value in adapter_weights(resumed.adapter_dir).items():
        torch.testing.assert_close(value, finished[name], rtol=1e-4, atol=1e-6)
