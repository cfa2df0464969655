"""qlora-loftq, installed (``pip install ./contrib/qlora-loftq``) and tested with qlora's fixtures."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_core import ConfigError, Job, evaluate_run, load_trained, testing

PLUGIN = "loftq"
QLORA = str(Path(sys.executable).parent / "qlora")  # the installed command line


def effective_weights(model) -> dict[str, torch.Tensor]:
    """What each adapted linear layer of a PEFT model computes with, ``x -> x W^T``, read through its forward
    (no bias in the tiny Llama): the 4-bit base plus the scaled adapter."""
    found = {}
    model.eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and hasattr(module, "get_base_layer"):
                base = module.get_base_layer()
                eye = torch.eye(base.in_features)
                found[name.removeprefix("base_model.model.")] = module(eye).T.float()
    return found


def adapted_model(config, plugins=(), overrides=(), tmp_path=None):
    job = Job(config, plugins=["no:rich-progress", *plugins], overrides=list(overrides),
              output_dir=tmp_path)
    job.load_tokenizer()
    return job.load_model()


def relative_errors(model, weights_file: Path) -> dict[str, float]:
    original = load_file(str(weights_file))
    return {name: float((w - original[name + ".weight"]).norm() / original[name + ".weight"].norm())
            for name, w in effective_weights(model).items()}


def tiny_loss(model, tokenizer) -> float:
    enc = tokenizer([r["text"] for r in testing.TINY_ROWS], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model.eval()
    with torch.no_grad():
        return model(**enc, labels=labels).loss.item()


def test_the_package_registers_its_plugin_as_an_entry_point():
    ep = {e.name: e for e in md.entry_points(group="qlora")}[PLUGIN]
    assert ep.value == "qlora_loftq" and ep.dist.name == "qlora-loftq"


@pytest.mark.parametrize("r,alpha", [(8, 16.0), (4, 4.0)])
def test_each_adapter_is_the_best_rank_r_correction_of_its_4bit_error(qlora_tiny_config, qlora_tiny_model_dir,
                                                                       r, alpha):
    config = {**qlora_tiny_config, "lora": {"r": r, "lora_alpha": alpha, "lora_dropout": 0.0}}
    weights = qlora_tiny_model_dir / "model.safetensors"
    plain = relative_errors(adapted_model(config), weights)
    loftq = relative_errors(adapted_model(config, [PLUGIN]), weights)
    original = load_file(str(weights))
    assert set(loftq) == set(plain) and len(loftq) == 14  # 7 linear layers in each of the 2 decoder layers
    quantized = adapted_model(config)  # B = 0: the plain QLoRA start is the 4-bit weight itself
    base = effective_weights(quantized)
    for name, error in loftq.items():
        w = original[name + ".weight"]
        # Eckart-Young: the best any rank-r correction can do is the norm of the residual's tail singular values.
        tail = torch.linalg.svdvals(w - base[name])[r:].square().sum().sqrt() / w.norm()
        assert error == pytest.approx(float(tail), rel=1e-3, abs=1e-6), name
        assert error < 0.95 * plain[name], name


def test_the_loftq_start_is_closer_to_the_unquantized_model(qlora_tiny_config, qlora_tokenizer):
    full = tiny_loss(adapted_model(qlora_tiny_config, overrides=["quant.load_in_4bit=false"]), qlora_tokenizer)
    qlora = tiny_loss(adapted_model(qlora_tiny_config), qlora_tokenizer)
    loftq = tiny_loss(adapted_model(qlora_tiny_config, [PLUGIN]), qlora_tokenizer)
    assert abs(loftq - full) < 0.7 * abs(qlora - full), (full, qlora, loftq)


def test_a_run_records_its_figures_and_its_adapter_reloads_on_the_same_base(qlora_run, qlora_tokenizer):
    result = qlora_run(PLUGIN, overrides=["data.eval_fraction=0.25"], max_steps=3)
    run_dir = Path(result.output_dir)
    stats = json.loads((run_dir / "loftq.json").read_text())
    assert len(stats["layers"]) == 14 and 0 < stats["error_after"] < stats["error_before"]
    assert all(v["error_after"] < v["error_before"] for v in stats["layers"].values())
    # The saved adapter is relative to the same 4-bit weights every reload quantizes again: evaluating the
    # finished run from its folder gives the loss the run measured at its end.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    assert evaluate_run(run_dir)["after"]["eval_loss"] == pytest.approx(last, rel=1e-5)
    _, model, _, _ = load_trained(run_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.dtype.is_floating_point)


def test_weights_from_another_folder_and_sharded_checkpoints(qlora_tiny_config, qlora_tiny_model_dir, tmp_path):
    tensors = load_file(str(qlora_tiny_model_dir / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    from_folder = relative_errors(adapted_model(qlora_tiny_config, [PLUGIN]),
                                  qlora_tiny_model_dir / "model.safetensors")
    from_shards = relative_errors(adapted_model(qlora_tiny_config, [PLUGIN], [f"loftq.weights={tmp_path}"]),
                                  qlora_tiny_model_dir / "model.safetensors")
    assert from_shards == pytest.approx(from_folder, rel=1e-6)


def test_weights_of_another_model_are_refused(qlora_tiny_config, qlora_tokenizer, tmp_path):
    other = testing.tiny_llama(tmp_path / "other", qlora_tokenizer, hidden_size=128)
    with pytest.raises(ConfigError, match="not this model's checkpoint"):
        adapted_model(qlora_tiny_config, [PLUGIN], [f"loftq.weights={other}"])


@pytest.mark.parametrize("override,message", [
    ("quant.load_in_4bit=false", "loftq: initialises the adapters against a 4-bit base"),
    ("loftq.weights=/nonexistent/weights", "loftq.weights: '/nonexistent/weights' does not exist"),
])
def test_bad_settings_end_with_one_error_line(qlora_tiny_config, tmp_path, override, message):
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(qlora_tiny_config))
    out = tmp_path / "out"
    proc = subprocess.run([QLORA, "run", str(config), "--plugin", PLUGIN, "--set", override, "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "adapter").exists()
