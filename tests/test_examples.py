"""The example scripts run as documented (on the real embedded model, a couple of steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_qlora_training_example_trains_and_saves_an_adapter(tmp_path):
    out = run_example("qlora_training.py", "--max-steps", "2", "--eval-samples", "4",
                      "--set", "train.sample_max_new_tokens=0", "--output", str(tmp_path / "run"))
    assert "trainable params" in out
    assert "eval loss" in out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["train"]["sample_max_new_tokens"] == 0 and config["data"]["max_eval_samples"] == 4
    assert "sample before training" not in out


@pytest.mark.slow
def test_quickstart_example_reloads_the_adapter_with_peft_and_answers(tmp_path):
    out = run_example("quickstart.py", "--steps", "2", "--eval-samples", "4",
                      "--set", "train.sample_max_new_tokens=0", "--output", str(tmp_path / "run"))
    assert "What is the secret name of the green owl?" in out
