"""A checkpoint loaded into 4 bits one tensor at a time (``qlora_plugins.quant_load``, through the nf4 plugin when
a loader asks for ``quantize_device``): the same model as transformers' own load, quantized on one device and
kept on another."""

from __future__ import annotations

import copy
import json
import shutil

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch

from qlora_core import Job

# A plugin asking the loaders to quantize on the CPU and keep the weights there: what the fsdp plugin asks with
# a GPU as quantize_device.
ASK = """
from qlora_core import hookimpl

@hookimpl
def qlora_model_load_kwargs(kwargs, config):
    kwargs["quantize_device"] = "cpu"
    with open({path!r}, "a") as f:
        f.write("asked\\n")

@hookimpl(trylast=True)
def qlora_model_loaded(model, config, for_training):
    with open({path!r}, "a") as f:
        f.write(type(model).__name__ + " " + str(getattr(model, "hf_quantizer", None) is None) + "\\n")
"""


def _state(model) -> dict:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            out[name] = ("4bit", module.weight.dtype, tuple(module.weight.shape),
                         bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state))
    for name, p in model.named_parameters():
        if type(p).__name__ != "Params4bit":
            out[name] = ("dense", p.dtype, tuple(p.shape), p.detach())
    return out


def _named(state: dict, suffix: str) -> str:
    (name,) = [n for n in state if n.endswith(suffix)]
    return name


def _load(cfg, tmp_path, plugins):
    job = Job(copy.deepcopy(cfg), plugins=plugins, output_dir=tmp_path / "run")
    return job.load_model()


def test_a_streamed_checkpoint_is_the_model_transformers_loads(tiny_config, tmp_path):
    ask = tmp_path / "ask.py"
    record = tmp_path / "record.txt"
    ask.write_text(ASK.format(path=str(record)))
    cfg = copy.deepcopy(tiny_config)
    cfg.setdefault("quant", {})["skip_modules"] = ["model.layers.1.mlp.down_proj"]
    plain = _state(_load(cfg, tmp_path / "a", ["no:rich-progress"]))
    streamed_model = _load(cfg, tmp_path / "b", ["no:rich-progress", str(ask)])
    streamed = _state(streamed_model)
    # the streamed load made the model (transformers' loader would have left its quantizer on it)
    assert record.read_text().splitlines() == ["asked", "LlamaForCausalLM True"]
    assert sorted(streamed) == sorted(plain)
    kinds = {v[0] for v in plain.values()}
    assert kinds == {"4bit", "dense"}
    # quant.skip_modules kept out of 4 bits (the names are under PEFT's wrapping: load_model adds the adapters)
    assert streamed[_named(streamed, "layers.1.mlp.down_proj.base_layer.weight")][0] == "dense"
    assert streamed[_named(streamed, "layers.0.mlp.down_proj.base_layer")][0] == "4bit"
    for name, (kind, dtype, shape, value) in plain.items():
        got = streamed[name]
        assert (got[0], got[1], got[2]) == (kind, dtype, shape), name
        assert torch.equal(got[3], value), name
    assert streamed_model.is_loaded_in_4bit
    assert streamed_model.config.quantization_config.load_in_4bit


def test_a_checkpoint_named_otherwise_is_left_to_transformers(tiny_config, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_config["model"]["name_or_path"], folder)
    weights = load_file(folder / "model.safetensors")
    weights["extra.scale"] = torch.ones(3)  # a tensor the model has no parameter for
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    ask = tmp_path / "ask.py"
    record = tmp_path / "record.txt"
    ask.write_text(ASK.format(path=str(record)))
    cfg = copy.deepcopy(tiny_config)
    cfg["model"]["name_or_path"] = str(folder)
    model = _load(cfg, tmp_path / "b", ["no:rich-progress", str(ask)])
    assert record.read_text().splitlines() == ["asked", "LlamaForCausalLM False"]  # transformers loaded it
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_the_shard_reader_reads_what_safetensors_wrote(tmp_path):
    from safetensors.torch import load_file, save_file

    from qlora_plugins.quant_load import ShardReader

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
               "d": torch.zeros(0, 4, dtype=torch.float16), "e": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    with ShardReader(tmp_path / "x.safetensors") as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        for key, value in load_file(tmp_path / "x.safetensors").items():
            got = reader.get_tensor(key)
            assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value), key
