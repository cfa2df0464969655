"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and small datasets."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from qlora_core import IGNORE_INDEX
from qlora_core.testing import labelled_runs, write_jsonl  # noqa: F401  (tests import them from here)

torch.set_num_threads(1)

# Interrupts the run (as Ctrl-C would) after the step given in the environment, if any.
INTERRUPTER = """
import os
from qlora_core import hookimpl

@hookimpl
def qlora_on_step_end(run, metrics):
    if str(metrics["step"]) == os.environ.get("QLORA_TEST_INTERRUPT_AT"):
        raise KeyboardInterrupt
"""

# The fixtures every plugin author gets (qlora_core.testing, a pytest plugin through the pytest11 entry point),
# under the names this suite has long used.


@pytest.fixture(scope="session")
def smollm2_tokenizer(qlora_tokenizer):
    return qlora_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(qlora_tiny_model_dir) -> Path:
    """A 2-layer Llama (real architecture, random weights) saved with the real SmolLM2 tokenizer."""
    return qlora_tiny_model_dir


def loss_by_hand(model, batch):
    """The summed next-token cross-entropy over a batch's answer tokens from the model's full logits, and their
    number: what every loss path must equal."""
    from qlora_core import model_inputs

    logits = model(**model_inputs(batch)).logits
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), batch["labels"][:, 1:][keep],
                                             reduction="sum")
    return loss, int(keep.sum())


@pytest.fixture
def guanaco_file(qlora_tiny_dataset) -> Path:
    """A small memorizable guanaco-format dataset."""
    return qlora_tiny_dataset


@pytest.fixture
def tiny_config(qlora_tiny_config) -> dict:
    """A fast config on the tiny model (float32, CPU, few steps, no progress bar)."""
    return qlora_tiny_config
