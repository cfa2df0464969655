"""The embedded default job, for real: SmolLM2-135M-Instruct in NF4 on the shipped dataset, a few steps."""

from __future__ import annotations

import json

import pytest

from qlora_core import cli


@pytest.mark.slow
def test_default_job_runs_end_to_end_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["run", "--output", str(out), "--set", "train.max_steps=4", "--set", "train.logging_steps=1",
                     "--set", "data.max_eval_samples=16", "--set", "train.eval_steps=0",
                     "--set", "train.sample_max_new_tokens=16"])
    printed = capsys.readouterr().out
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [0, 4]
    # The base model cannot do the task; four steps already teach it the answers' form.
    assert evals[0]["eval_loss"] > 2.0
    assert evals[1]["eval_loss"] < 0.75 * evals[0]["eval_loss"]
    assert "sample before training" in printed and "after training" in printed
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["peft_type"] == "LORA"
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
