"""``quant.skip_modules``: chosen linear layers of the base model kept out of 4 bits, in the compute dtype, on the
tiny model (loading, the output head, the name rule, errors, a trained run's resume, merge and evaluation) and in
``qlora plan``'s weight estimate."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from qlora_core import ConfigError, Job, cli, evaluate_run, plan
from qlora_core.tools.plan import GIB, skipped_linears
from qlora_core.tools.shapes import SHAPES, write_config_folder
from conftest import INTERRUPTER

LAYER = "model.layers.0.mlp.down_proj"

# Records, at every load of the base model, the class of the layer kept out of 4 bits, and, once the adapters
# are added for training, whether its base weight is frozen and its adapter trainable.
RECORDER = """
import json
from qlora_core import hookimpl

def _write(**row):
    with open({path!r}, "a") as f:
        f.write(json.dumps(row) + "\\n")

@hookimpl(trylast=True)
def qlora_model_loaded(model, config, for_training):
    _write(for_training=for_training, type=type(model.get_submodule({layer!r})).__name__)

@hookimpl
def qlora_adapter_model(model, config):
    layer = model.base_model.model.get_submodule({layer!r})
    _write(adapted=True, base=type(layer.base_layer).__name__, frozen=not layer.base_layer.weight.requires_grad,
           trainable=all(p.requires_grad for p in layer.lora_A.parameters()))
"""


def _config(tiny_config, skip, **quant):
    cfg = copy.deepcopy(tiny_config)
    cfg["quant"] = {"skip_modules": skip, **quant}
    return cfg


def _plain_linears(model) -> set[str]:
    return {name for name, module in model.named_modules() if type(module) is torch.nn.Linear}


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("skip, expected", [
    ([], set()),
    ([LAYER], {LAYER}),
    (["down_proj"], {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}),
    (["layers.1."], {f"model.layers.1.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                     "mlp.down_proj")}),
    (["mlp.up_proj", "model.layers.1.self_attn.q_proj"],
     {"model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"}),
], ids=["none", "one-layer", "suffix", "decoder-layer", "two-names"])
def test_named_layers_load_unquantized_in_the_compute_dtype_and_the_head_stays(tiny_config, tiny_model_dir, skip,
                                                                                 expected):
    import bitsandbytes as bnb

    job = Job(_config(tiny_config, skip, bnb_4bit_compute_dtype="bfloat16"), plugins=["no:rich-progress"])
    model = job.load_base_model(for_training=True)
    assert _plain_linears(model) == expected | {"lm_head"}
    for name in expected:
        weight = model.get_submodule(name).weight
        assert weight.dtype == torch.bfloat16 and not weight.requires_grad
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 - len(expected) and all(not m.weight.requires_grad for m in quantized)
    # the head is still the tied embedding matrix, not a 4-bit copy of it
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # qlora plan counts the same layers out of 4 bits
    shape = plan(tiny_model_dir, {"quant": {"skip_modules": skip}}).shape
    assert {name for name, *_ in skipped_linears(shape, skip)} == expected


def test_a_part_is_matched_whole(tiny_config):
    with pytest.raises(ConfigError, match=r"'proj', 'layers\.2' match no linear layer"):
        Job(_config(tiny_config, ["down_proj", "proj", "layers.2"]), plugins=["no:rich-progress"]).load_base_model()


def test_a_loader_that_quantizes_every_layer_is_an_error(tiny_config):
    """The random-weights plugin builds every linear layer in 4 bits: the layers named stay checked after the load."""
    job = Job(_config(tiny_config, [LAYER]), plugins=["no:rich-progress", "random-weights"])
    with pytest.raises(ConfigError, match=f"quant.skip_modules: {LAYER} was loaded in 4 bits"):
        job.load_base_model()


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("value, message", [
    ("[foo]", "quant.skip_modules: 'foo' matches no linear layer of {model}; e.g. model.layers.0.self_attn.q_proj"),
    ('[down_proj, ""]', "quant.skip_modules: an empty name"),
])
def test_a_name_matching_no_linear_layer_is_one_error_line(command, value, message, tiny_config, tiny_model_dir,
                                                           tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    out = tmp_path / "out"
    extra = ["--output", str(out)] if command == "run" else []
    assert cli.main([command, str(config), "--set", f"quant.skip_modules={value}", *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid config: ")
    assert message.format(model=tiny_model_dir) in lines[0]
    assert "Traceback" not in captured.err and not (out / "adapter").exists()


# --------------------------------------------------------------------------- a trained run


def test_a_run_trains_the_kept_layer_and_resumes_merges_and_evaluates_with_it(tiny_config, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    interrupter = tmp_path / "interrupter.py"
    interrupter.write_text(INTERRUPTER)
    record = tmp_path / "loads.jsonl"
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER.format(layer=LAYER, path=str(record)))
    cfg = _config(tiny_config, [LAYER])
    cfg["plugins"] = [str(interrupter), str(recorder), "merged-export", "no:rich-progress"]
    cfg["data"]["eval_fraction"] = 0.25
    cfg["data"]["max_eval_samples"] = 4
    cfg["train"].update(max_steps=4, save_steps=2, per_device_train_batch_size=2)
    out = tmp_path / "run"

    monkeypatch.setenv("QLORA_TEST_INTERRUPT_AT", "3")
    with pytest.raises(KeyboardInterrupt):
        Job(cfg, output_dir=out).run()
    monkeypatch.delenv("QLORA_TEST_INTERRUPT_AT")
    assert cli.main(["run", "--resume", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert yaml.safe_load((out / "config.yaml").read_text())["quant"]["skip_modules"] == [LAYER]

    # Every load of the base (training, the resumed training, the merge's) kept the layer a plain linear layer;
    # in training it was frozen, with a trainable adapter.
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    loads = [row for row in rows if "type" in row]
    assert sum(load["for_training"] for load in loads) == 2 and any(not load["for_training"] for load in loads)
    assert all(load["type"] == "Linear" for load in loads), loads
    adapted = [row for row in rows if row.get("adapted")]
    assert adapted == [{"adapted": True, "base": "Linear", "frozen": True, "trainable": True}] * 2

    # The layer got an adapter, and training moved it (lora_B starts at zero).
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if f"{LAYER}.lora_B" in k]
    assert len(lora_b) == 1 and lora_b[0].abs().max() > 0

    # The merged model is plain, and computes what base + adapter computed.
    merged = out / "merged"
    report = json.loads((merged / "qlora-merge.json").read_text())
    assert report["max_abs_diff"] < 1e-3 and report["adapter_effect"] > report["max_abs_diff"]
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())

    # Evaluation reloads the base the same way.
    result = evaluate_run(out, max_samples=4, exact_match=False)
    assert torch.isfinite(torch.tensor([result["before"]["eval_loss"], result["after"]["eval_loss"]])).all()
    assert result["after"]["eval_loss"] != result["before"]["eval_loss"]
    evaluated = [json.loads(line) for line in record.read_text().splitlines()][len(rows):]
    assert evaluated and all(load["type"] == "Linear" and not load["for_training"] for load in evaluated)


# --------------------------------------------------------------------------- qlora plan


def test_plan_counts_the_kept_layers_at_compute_dtype_bytes(tmp_path):
    folder = write_config_folder(SHAPES["llama3-8b"], tmp_path / "llama3-8b")
    skip = ["down_proj", "model.layers.0"]
    base = plan(folder, {})
    kept = plan(folder, {"quant": {"skip_modules": skip}})

    # the expected layers, read off the shape: every down_proj and the first decoder layer's seven
    layers = [(name, i, o) for name, i, o, _ in base.shape.linears
              if name.endswith(".down_proj") or name.startswith("model.layers.0.")]
    n_params = sum(i * o for _, i, o in layers)
    assert len(layers) == 32 + 6
    bits = 8 / 64 + 32 / (64 * 256)  # double quant's constants per parameter
    per_layer_tables = 64 + 1028  # each 4-bit layer's code tables

    b, k = base.with_checkpointing, kept.with_checkpointing
    assert k.quantized_weights - b.quantized_weights == pytest.approx(-0.5 * n_params, rel=1e-12)
    assert k.other_weights - b.other_weights == pytest.approx(2 * n_params, rel=1e-12)  # bf16
    assert k.quant_constants - b.quant_constants == pytest.approx(-(n_params * bits / 8 + len(layers)
                                                                    * per_layer_tables), rel=1e-9)
    grown = (2 - 0.5 - bits / 8) * n_params - len(layers) * per_layer_tables
    weights = ("quantized_weights", "quant_constants", "other_weights")
    assert sum(getattr(k, w) - getattr(b, w) for w in weights) == pytest.approx(grown, rel=1e-9)
    assert k.total - b.total == pytest.approx(grown, rel=1e-9)  # gate/up stay: the largest 4-bit layer is as big
    assert k.detail["skipped_layers"] == len(layers) and k.detail["skipped_weight_bytes"] == 2 * n_params
    note = next(n for n in kept.notes if n.startswith("quant.skip_modules:"))
    assert f"{len(layers)} linear layers ({n_params:,} parameters) kept in bfloat16" in note
    assert f"{grown / GIB:.2f} GiB more than in 4 bits" in note
    assert kept.to_dict()["settings"]["skip_modules"] == skip
    assert not any(n.startswith("quant.skip_modules:") for n in base.notes)

    # with the fp32 upcast the kept layers are fp32, as PEFT's k-bit preparation makes them
    up = plan(folder, {"quant": {"skip_modules": skip, "fp32_upcast": True}}).with_checkpointing
    up_base = plan(folder, {"quant": {"fp32_upcast": True}}).with_checkpointing
    assert up.other_weights - up_base.other_weights == pytest.approx(4 * n_params, rel=1e-12)
