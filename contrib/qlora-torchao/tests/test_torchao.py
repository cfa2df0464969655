"""qlora-torchao, installed (``pip install ./contrib/qlora-torchao``) and tested with qlora's own fixtures."""

from __future__ import annotations

import copy
import importlib.metadata as md
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from qlora_core import ConfigError, Job, load_trained, plan, resolve
from qlora_core import testing

import qlora_torchao

PLUGIN = "torchao-nf4"
QLORA = str(Path(sys.executable).parent / "qlora")  # the installed command line
NF4_LEVELS = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                           0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])


def nf4_tensor_type():
    NF4Tensor, _ = qlora_torchao._torchao()
    return NF4Tensor


def tiny_loss(model, tokenizer) -> float:
    """The mean next-token loss of ``model`` over the tiny dataset's texts."""
    enc = tokenizer([r["text"] for r in testing.TINY_ROWS], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**enc, labels=labels).loss.item()


def test_the_package_registers_its_plugin_as_an_entry_point():
    ep = {e.name: e for e in md.entry_points(group="qlora")}[PLUGIN]
    assert ep.value == "qlora_torchao" and ep.dist.name == "qlora-torchao"


def test_requested_it_replaces_the_bitsandbytes_quant_strategy(qlora_plugins):
    _, default = qlora_plugins()
    assert PLUGIN not in default.names() and default.implementers("qlora_quantization_config") == ["nf4"]
    _, asked = qlora_plugins(PLUGIN)
    assert "nf4" not in asked.names()
    assert asked.implementers("qlora_quantization_config") == [PLUGIN]
    assert asked.implementers("qlora_dequantize_model") == [PLUGIN]


def test_every_linear_but_the_head_is_nf4_within_the_nf4_error_bound(qlora_tiny_config, qlora_tokenizer):
    NF4Tensor = nf4_tensor_type()
    plain = AutoModelForCausalLM.from_pretrained(qlora_tiny_config["model"]["name_or_path"], dtype=torch.float32)
    job = Job(qlora_tiny_config, plugins=["no:rich-progress", PLUGIN])
    model = job.load_base_model(for_training=False)

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings()
    assert len(linears) == 2 * 7 + 1  # 7 per decoder layer, and the head
    for name, module in linears.items():
        assert isinstance(module.weight, NF4Tensor) == (module is not head), name
        if module is head:
            continue
        assert not module.weight.requires_grad
        original = plain.get_submodule(name).weight.detach()
        dense = module.weight.get_original_weight()
        # Each value is one of the 16 NF4 levels times its block's scale: off by at most half the widest gap
        # between neighbouring levels (0.139), plus the 8-bit quantization of the scale.
        absmax = original.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
        error = (dense - original).reshape(-1, 64).abs()
        widest = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
        assert (error <= (widest + 0.02) * absmax).all(), name
        assert 0 < error.mean() < 0.1 * absmax.mean()

    # The quantized model's loss is the unquantized one's to within the quantization noise.
    quantized, reference = tiny_loss(model, qlora_tokenizer), tiny_loss(plain, qlora_tokenizer)
    assert quantized != reference
    assert abs(quantized - reference) < 0.02 * reference


def test_a_short_run_trains_exports_and_the_adapter_loads_back(qlora_run, qlora_tokenizer):
    NF4Tensor = nf4_tensor_type()
    result = qlora_run(PLUGIN, "adamw", "merged-export", max_steps=6)
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3

    trained = qlora_run.job.model
    lora = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    assert all(isinstance(m.base_layer.weight, NF4Tensor) for m in trained.modules() if hasattr(m, "base_layer"))

    run_dir = result.adapter_dir.parent
    assert PLUGIN in yaml.safe_load((run_dir / "config.yaml").read_text())["plugins"]
    _, loaded, tokenizer, _ = load_trained(run_dir)
    bases = [m.base_layer for m in loaded.modules() if hasattr(m, "base_layer")]
    assert bases and all(isinstance(b.weight, NF4Tensor) for b in bases)
    trained.eval()
    assert tiny_loss(loaded, tokenizer) == pytest.approx(tiny_loss(trained, tokenizer), rel=1e-5)

    # merged-export: the dequantized base with the adapter merged, a plain model computing the same logits.
    report = json.loads((run_dir / "merged" / "qlora-merge.json").read_text())
    assert report["max_abs_diff"] < 1e-3 * report["logit_scale"] and report["adapter_effect"] > 0.1
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    assert not any(isinstance(p, NF4Tensor) for p in merged.parameters())
    assert tiny_loss(merged, tokenizer) == pytest.approx(tiny_loss(loaded, tokenizer), rel=1e-4)


PROBE = '''
import json, sys
from qlora_core import hookimpl

@hookimpl
def qlora_on_train_end(run, summary):
    from torchao.quantization import NF4Tensor
    weights = [type(m.weight).__name__ for m in run.model.modules() if hasattr(m, "base_layer")]
    loaded = sorted(n for n, m in sys.modules.items() if n.split(".")[0] == "bitsandbytes" and m is not None)
    with open(OUT, "w") as f:
        json.dump({"weights": weights, "bitsandbytes_modules": loaded,
                   "blocked": sys.modules.get("bitsandbytes", "absent") is None}, f)
'''


def test_a_cli_run_with_bitsandbytes_unimportable_trains_in_torchao_nf4(qlora_tiny_config, tmp_path):
    # bitsandbytes made unimportable for the whole process, before anything else is imported.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None\n")
    probe_out = tmp_path / "probe.json"
    probe = tmp_path / "probe_plugin.py"
    probe.write_text(f"OUT = {str(probe_out)!r}\n" + textwrap.dedent(PROBE))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(qlora_tiny_config))
    out = tmp_path / "run"
    env = {"PYTHONPATH": str(shim), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(Path.home())}
    cmd = [QLORA, "run", str(config),
           "--plugin", PLUGIN, "--plugin", "adamw", "--plugin", str(probe), "--set", "train.max_steps=4",
           "--output", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    found = json.loads(probe_out.read_text())
    assert found["blocked"] and found["bitsandbytes_modules"] == []
    assert len(found["weights"]) == 14 and set(found["weights"]) == {"NF4Tensor"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 4 and losses[-1] < losses[0]
    used = {p["name"] for p in json.loads((out / "plugins.json").read_text())}
    assert PLUGIN in used and "nf4" not in used and "paged-adamw-8bit" not in used
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_the_shim_really_blocks_bitsandbytes(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None\n")
    proc = subprocess.run([sys.executable, "-c", "import bitsandbytes"], env={"PYTHONPATH": str(shim)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr


@pytest.mark.parametrize("override, key", [
    ("quant.bnb_4bit_quant_type=fp4", "quant.bnb_4bit_quant_type"),
    ("quant.bnb_4bit_use_double_quant=false", "quant.bnb_4bit_use_double_quant"),
    ("train.lean_recompute=true", "train.lean_recompute"),
])
def test_settings_it_cannot_honour_are_config_errors_naming_the_key(qlora_tiny_config, override, key):
    with pytest.raises(ConfigError) as err:
        Job(qlora_tiny_config, plugins=["no:rich-progress", PLUGIN], overrides=[override])
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(key + ":")
    assert PLUGIN in err.value.problems[0]


def test_the_lean_recomputation_is_switched_off_unless_asked_for(qlora_tiny_config):
    job = Job(qlora_tiny_config, plugins=["no:rich-progress", PLUGIN])
    assert job.config["train.lean_recompute"] is False
    assert Job(qlora_tiny_config, plugins=["no:rich-progress"]).config["train.lean_recompute"] is True


def test_scaler_block_size_divides_the_block_count():
    assert qlora_torchao.scaler_block_size_for(4096 * 4096, 64, 256) == 256  # a Llama-3-8B attention weight
    assert qlora_torchao.scaler_block_size_for(576 * 576, 64, 256) == 216    # SmolLM2's: 5184 blocks
    assert qlora_torchao.scaler_block_size_for(64 * 64, 64, 256) == 64       # fewer blocks than 256
    for numel in (576 * 576, 576 * 1536, 192 * 576, 64 * 32):
        size = qlora_torchao.scaler_block_size_for(numel, 64, 256)
        assert (numel // 64) % size == 0 and size <= 256


def test_plan_counts_the_weights_in_4_bits(qlora_plugins):
    def planned(*overrides):
        config, plugins = qlora_plugins(PLUGIN, overrides=overrides)
        return plan(config=config, plugins=plugins)

    torchao, plain = planned(), planned("quant.load_in_4bit=false")
    assert torchao.settings.load_in_4bit and torchao.settings.quant_type == "nf4" and torchao.settings.double_quant
    # Half a byte per linear weight where the unquantized plan counts two (bfloat16), plus the constants.
    assert plain.memory.quantized_weights == 0 and torchao.memory.quant_constants > 0
    assert 4 * torchao.memory.quantized_weights == plain.memory.other_weights - torchao.memory.other_weights


def test_it_offers_a_bench_variant_beside_the_defaults():
    proc = subprocess.run([QLORA, "bench", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert PLUGIN in proc.stdout
