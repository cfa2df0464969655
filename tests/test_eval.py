"""``qlora eval`` and :func:`qlora_core.tools.evaluation.evaluate_run` on short runs of the tiny 4-bit Llama."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from qlora_core import cli
from qlora_core.framework.errors import UsageError
from qlora_core.tools.evaluation import (evaluate_run, exact_match_default, generate_answers, load_run_model,
                                   reference_answer)
from qlora_core import Job

from conftest import write_jsonl


def item_rows(numbers) -> list[dict]:
    return [{"text": f"### Human: What is the code of item {i}?### Assistant: The code of item {i} is {i * 7 % 10}."}
            for i in numbers]


def base_config(model_dir, data_path, **train) -> dict:
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data_path)},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 4,
                  "learning_rate": 1e-3, "logging_steps": 1, "max_seq_length": 64, "sample_max_new_tokens": 0,
                  "max_grad_norm": 1.0, "per_device_eval_batch_size": 3},
        "plugins": ["no:rich-progress"],
    }
    cfg["train"].update(train)
    return cfg


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A split folder: train.jsonl (16 rows) and test.jsonl (5 other rows, different lengths)."""
    path = tmp_path_factory.mktemp("eval-data")
    write_jsonl(path / "train.jsonl", item_rows(range(16)))
    write_jsonl(path / "test.jsonl", item_rows([20, 105, 3333, 41, 77777]))
    return path


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, data_dir, tmp_path_factory):
    """A short run whose held-out data is the folder's test split (evaluated at step 0 and at the end)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    Job(base_config(tiny_model_dir, data_dir, max_steps=4), output_dir=out).run()
    return out


@pytest.fixture(scope="module")
def memorized_run(tiny_model_dir, tmp_path_factory):
    """A run that memorizes 4 rows, eos included; its held-out data is the same 4 rows."""
    data = write_jsonl(tmp_path_factory.mktemp("memo-data") / "four.jsonl", item_rows([1, 2, 3, 4]))
    out = tmp_path_factory.mktemp("runs") / "memo"
    cfg = base_config(tiny_model_dir, data, max_steps=60, learning_rate=1e-2, lr_scheduler_type="constant",
                      warmup_steps=0)
    cfg["data"]["eval_path"] = str(data)
    cfg["plugins"].append("adamw")
    Job(cfg, output_dir=out).run()
    return out


# --------------------------------------------------------------------------- evaluate_run


def test_after_and_before_equal_the_runs_own_final_and_step_0_eval(trained_run):
    rows = [m for m in metrics(trained_run) if "eval_loss" in m]
    step0, final = rows[0], rows[-1]
    assert step0["step"] == 0 and final["step"] == 4
    result = evaluate_run(trained_run)
    assert result["num_examples"] == 5
    assert result["eval_split"] == "test"
    assert result["eval_tokens"] == final["eval_tokens"]
    assert result["after"]["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-5)
    assert result["before"]["eval_loss"] == pytest.approx(step0["eval_loss"], abs=1e-5)
    assert result["after"]["eval_perplexity"] == pytest.approx(final["eval_perplexity"], rel=1e-5)
    assert result["after"]["eval_loss"] < result["before"]["eval_loss"]
    assert result["exact_match"] is False and "exact_match" not in result["after"]


def test_other_data_split_and_max_samples(trained_run, data_dir, tmp_path):
    own = evaluate_run(trained_run)
    # The same rows given as --data give the same figures.
    same = evaluate_run(trained_run, data=str(data_dir / "test.jsonl"))
    assert same["num_examples"] == 5 and same["eval_split"] == "train"  # a single file is one split, "train"
    assert same["after"]["eval_loss"] == pytest.approx(own["after"]["eval_loss"], abs=1e-6)
    other = write_jsonl(tmp_path / "other.jsonl", item_rows([7, 8, 9000]))
    result = evaluate_run(trained_run, data=str(other))
    assert result["num_examples"] == 3 and result["eval_data"] == str(other)
    assert result["after"]["eval_loss"] != pytest.approx(own["after"]["eval_loss"], abs=1e-6)
    # A split of another dataset, and --max-samples.
    result = evaluate_run(trained_run, data=str(data_dir), split="train", max_samples=6)
    assert result["num_examples"] == 6 and result["eval_split"] == "train"
    # Without --data, --split names a split of the run's own data.
    assert evaluate_run(trained_run, split="train", max_samples=2)["num_examples"] == 2
    with pytest.raises(UsageError, match=r"no split 'nope'.*\(pass --split\)"):
        evaluate_run(trained_run, data=str(data_dir), split="nope")


def test_exact_match_rises_on_memorized_data(memorized_run):
    result = evaluate_run(memorized_run, exact_match=True, keep_examples=True)
    assert result["exact_match"] is True
    before, after = result["before"], result["after"]
    assert before["exact_match_total"] == after["exact_match_total"] == 4
    assert after["exact_match"] > before["exact_match"], (before["examples"], after["examples"])
    assert after["exact_match_correct"] == 4, after["examples"]
    assert after["examples"][0]["reference"] == "The code of item 1 is 7."
    assert after["eval_loss"] < before["eval_loss"]


def test_exact_match_defaults_to_the_default_task_only(tiny_model_dir, data_dir):
    assert exact_match_default(Job(None).config)
    assert not exact_match_default(Job(base_config(tiny_model_dir, data_dir)).config)
    cfg = base_config(tiny_model_dir, data_dir)
    cfg["data"]["eval_path"] = "embedded:secret-rules"
    assert exact_match_default(Job(cfg).config)


def test_reference_answer_drops_eos_and_end_of_turn(smollm2_tokenizer):
    eos = smollm2_tokenizer.eos_token
    assert reference_answer(f" The code is 7.{eos}", smollm2_tokenizer) == "The code is 7."
    assert reference_answer(" The code is 7.<|im_end|>\n", smollm2_tokenizer) == "The code is 7."
    assert reference_answer(" plain ", smollm2_tokenizer) == "plain"


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
def test_batched_generation_agrees_with_one_at_a_time(memorized_run, tmp_path, adapter):
    job = Job.from_run(memorized_run)
    job.load_data()
    model = load_run_model(job, memorized_run / "adapter")
    prompts = [f"### Human: What is the code of item {i}?### Assistant:" for i in (1, 22, 333333, 4, 55, 6666666)]
    prompts.append("### Human: Say something long about nothing in particular, please.### Assistant:")
    limits = [12, 5, 12, 20, 3, 12, 16]
    from contextlib import nullcontext

    with (nullcontext() if adapter else model.disable_adapter()):
        single = generate_answers(model, job.tokenizer, prompts, limits, batch_size=1)
        batched = generate_answers(model, job.tokenizer, prompts, limits, batch_size=4)
        whole = generate_answers(model, job.tokenizer, prompts, limits, batch_size=len(prompts))
        # One at a time is what the trainer's own Job.generate does.
        reference = [job.generate(p, n, model=model) for p, n in zip(prompts, limits)]
    assert single == reference
    assert batched == single
    assert whole == single
    assert any(a for a in single)


def test_the_formatted_held_out_rows_are_the_ones_evaluated(tiny_model_dir, data_dir, tmp_path):
    from qlora_core.loop.data import tokenize_example

    cfg = base_config(tiny_model_dir, data_dir / "train.jsonl")
    cfg["data"]["eval_fraction"] = 0.25
    job = Job(cfg)
    job.load_data()
    assert len(job.eval_formatted) == len(job.eval_examples) == 4
    again = [tokenize_example(ex, job.tokenizer, cfg["train"]["max_seq_length"]) for ex in job.eval_formatted]
    assert again == list(job.eval_examples)
    assert len({ex.prompt_and_answer()[0] for ex in job.eval_formatted}) == 4
    assert job.eval_split == "train (held-out fraction 0.25)"


# --------------------------------------------------------------------------- errors


def test_a_folder_that_is_not_a_run_is_a_usage_error(tmp_path, trained_run):
    with pytest.raises(UsageError, match="does not exist"):
        evaluate_run(tmp_path / "missing")
    with pytest.raises(UsageError, match="no config.yaml"):
        evaluate_run(tmp_path)
    no_adapter = tmp_path / "no-adapter"
    no_adapter.mkdir()
    shutil.copy(trained_run / "config.yaml", no_adapter / "config.yaml")
    (no_adapter / "run.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(UsageError, match=r"run.json says status 'failed'.*it has no adapter"):
        evaluate_run(no_adapter)


def test_a_run_without_held_out_data_asks_for_data(tmp_path, trained_run, data_dir):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "adapter", run / "adapter")
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    config["data"]["path"] = str(data_dir / "train.jsonl")  # one file: no test split
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UsageError, match="no held-out data.*pass --data"):
        evaluate_run(run)
    assert evaluate_run(run, data=str(data_dir / "test.jsonl"))["num_examples"] == 5


# --------------------------------------------------------------------------- the command line


def test_cli_prints_a_table(trained_run, capsys):
    assert cli.main(["eval", str(trained_run)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    # each phase is announced on stderr even when it is not a terminal (pytest's capture is not)
    phases = [line for line in captured.err.splitlines() if line.startswith("qlora eval: [")]
    assert [p.split("] ", 1)[1] for p in phases] == [
        "loading the data...", "loading the model and the adapter...",
        "eval loss before training (adapter disabled)...", "eval loss after training (adapter)..."]
    assert "eval loss" in out and "perplexity" in out
    assert "before (base)" in out and "after (adapter)" in out
    assert "exact match" not in out
    final = [m for m in metrics(trained_run) if "eval_loss" in m][-1]
    assert f"{final['eval_loss']:.4f}" in out


def test_cli_json_with_exact_match(memorized_run, capsys):
    assert cli.main(["eval", str(memorized_run), "--exact-match", "--json", "--max-samples", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_examples"] == 3
    assert result["after"]["exact_match_total"] == 3
    assert set(result["before"]) >= {"eval_loss", "eval_perplexity", "exact_match", "exact_match_correct"}
    assert "examples" not in result["after"]


def test_cli_table_shows_exact_match(memorized_run, capsys):
    assert cli.main(["eval", str(memorized_run), "--exact-match", "--max-samples", "2"]) == 0
    assert "2/2 (100.0%)" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["eval", "{tmp}/nope"], ["eval", "{tmp}"], ["eval", "{run}", "--max-samples", "0"]])
def test_cli_bad_run_dir_is_one_error_line_and_exit_2(argv, tmp_path, trained_run, capsys):
    argv = [a.format(tmp=tmp_path, run=trained_run) for a in argv]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
