"""Using a finished run: load_trained, generate (API and `qlora generate`), merge (API, `qlora merge` and the
merged-export plugin), on the tiny random Llama in 4 bits."""

from __future__ import annotations

import io
import json
import re
import shutil

import pytest
import torch

from qlora_core import cli
from qlora_core.loop import generation
from qlora_core.tools import inference
from qlora_core.framework.errors import UsageError
from qlora_plugins.nf4 import dequantize_4bit_model, use_float32_kernels
from qlora_core import Job

from conftest import write_jsonl

QUESTION = "What is the code of item 3?"


def run_config(model_dir, data_file, steps=4) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data_file)},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": steps,
                  "learning_rate": 1e-2, "logging_steps": 1, "max_seq_length": 64, "sample_max_new_tokens": 0,
                  "max_grad_norm": 1.0},
    }


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [{"text": f"### Human: What is the code of item {i}?### Assistant: The code of item {i} is {i * 7 % 10}."}
            for i in range(16)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, data_file):
    """One short run with a high learning rate, shared by the tests of this module (which only read it)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    Job(run_config(tiny_model_dir, data_file), output_dir=out).run()
    return out


@pytest.fixture(scope="module")
def trained(run_dir):
    """(job, model, tokenizer, fmt) of the shared run, loaded once."""
    return inference.load_trained(run_dir)


def logits_of(model, tok, text):
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.float()


def plain_base_4bit(model_dir):
    """The tiny base in NF4 as the run loads it, with the float32 4-bit kernel (see plugins/nf4.py)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.float32,
                                                device_map={"": "cpu"})
    use_float32_kernels(base)
    return base.eval()


def greedy(model, tok, prompt, n):
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def assert_plain_model(model):
    import bitsandbytes as bnb

    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None


# --------------------------------------------------------------------------- loading


def test_load_trained_gives_the_4bit_base_with_the_adapter_and_the_run_format(trained):
    import bitsandbytes as bnb
    from peft import PeftModel

    _, model, tok, fmt = trained
    assert isinstance(model, PeftModel) and not model.training
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(not m.support_avx512bf16_for_cpu for m in linears)
    assert fmt.name == "guanaco"
    prompt, special = inference.format_prompt(fmt, tok, QUESTION)
    assert prompt == f"### Human: {QUESTION}### Assistant:" and special


def test_the_format_comes_from_config_plugin_or_columns_and_falls_back_without_data(tiny_model_dir, tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi"}])
    job = Job(run_config(tiny_model_dir, alpaca))
    tok = job.load_tokenizer()
    assert inference.run_format(job, tok).name == "alpaca"
    named = Job(run_config(tiny_model_dir, alpaca) | {"data": {"path": str(alpaca), "format": "guanaco"}})
    assert inference.run_format(named, tok).name == "guanaco"
    assert inference.run_format(Job(run_config(tiny_model_dir, alpaca), plugins=["chat-format"]), tok).name == "chat"
    alpaca.unlink()  # the data is gone: the tokenizer's chat template decides
    assert inference.run_format(job, tok).name == "chat"
    prompt, special = inference.format_prompt(inference.run_format(job, tok), tok, "hi")
    assert prompt.endswith("<|im_start|>assistant\n") and not special


def copy_run(run_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst)
    return dst


def test_a_folder_that_is_not_a_finished_run_is_refused_with_the_reason(run_dir, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        inference.check_finished_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.yaml"):
        inference.check_finished_run(tmp_path / "empty")
    failed = copy_run(run_dir, tmp_path)
    shutil.rmtree(failed / "adapter")
    with pytest.raises(UsageError, match="no adapter/ folder"):
        inference.check_finished_run(failed)
    (failed / "run.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: disk full"}))
    with pytest.raises(UsageError, match="status 'failed' \\(RuntimeError: disk full\\); it has no adapter"):
        inference.check_finished_run(failed)
    (failed / "checkpoints" / "step-2").mkdir(parents=True)
    with pytest.raises(UsageError, match=re.escape(f"finish it first: qlora run --resume {failed}")):
        inference.check_finished_run(failed)


# --------------------------------------------------------------------------- generate


def test_generate_is_model_generate_greedy_and_streams_the_answer(trained):
    _, model, tok, fmt = trained
    prompt, special = inference.format_prompt(fmt, tok, QUESTION)
    stream = io.StringIO()
    answer = generation.generate(model, tok, prompt, 12, stream_to=stream, add_special_tokens=special)
    assert answer and answer == greedy(model, tok, prompt, 12)
    assert stream.getvalue().endswith("\n") and stream.getvalue().strip() == answer
    assert not stream.getvalue()[0].isspace()
    assert generation.generate(model, tok, prompt, 12) == answer  # no stream: same text


def test_sampling_is_used_when_a_temperature_is_given(trained):
    _, model, tok, fmt = trained
    prompt, _ = inference.format_prompt(fmt, tok, QUESTION)
    torch.manual_seed(0)
    answers = {generation.generate(model, tok, prompt, 8, temperature=5.0, top_p=1.0) for _ in range(3)}
    assert len(answers) > 1
    with pytest.raises(UsageError, match="top-p"):
        generation.generate(model, tok, prompt, 8, temperature=1.0, top_p=0)


def test_qlora_generate_prints_the_answer_to_the_formatted_prompt(run_dir, trained, capsys):
    _, model, tok, fmt = trained
    expected = greedy(model, tok, fmt.prompt(QUESTION, tok), 10)
    assert cli.main(["generate", str(run_dir), "--prompt", QUESTION, "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_qlora_generate_interactive_answers_each_line_until_an_empty_one(run_dir, trained, capsys, monkeypatch):
    _, model, tok, fmt = trained
    questions = [QUESTION, "What is the code of item 5?"]
    expected = [greedy(model, tok, fmt.prompt(q, tok), 6) for q in questions]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(questions) + "\n\nWhat is never asked?\n"))
    assert cli.main(["generate", str(run_dir), "--interactive", "--max-new-tokens", "6"]) == 0
    assert [line.strip() for line in capsys.readouterr().out.splitlines()] == expected
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\nexit\n{QUESTION}\n"))
    assert cli.main(["generate", str(run_dir), "-i", "--max-new-tokens", "6"]) == 0
    assert [line.strip() for line in capsys.readouterr().out.splitlines()] == expected[:1]


def test_qlora_generate_mistakes_are_one_error_line(run_dir, tmp_path, capsys):
    assert cli.main(["generate", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--prompt" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a qlora run folder" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- merge


def test_dequantize_gives_the_weights_transformers_own_dequantize_gives(tiny_model_dir):
    mine = dequantize_4bit_model(plain_base_4bit(tiny_model_dir), torch.float32)
    theirs = plain_base_4bit(tiny_model_dir).dequantize(dtype=torch.float32)
    assert_plain_model(mine)
    ours, ref = mine.state_dict(), theirs.state_dict()
    assert ours.keys() == ref.keys()
    for name, tensor in ref.items():
        assert torch.equal(ours[name], tensor.to(ours[name].dtype)), name


def test_qlora_merge_writes_a_plain_model_with_the_logits_of_base_4bit_plus_adapter(run_dir, tiny_model_dir,
                                                                                     trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert cli.main(["merge", str(run_dir), "--output", str(out), "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert f"merged model: {out}" in printed and "max |logit difference|" in printed
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    report = json.loads((out / inference.MERGE_REPORT_FILE).read_text())
    assert report["max_abs_diff"] < 1e-3 < report["adapter_effect"] and report["format"] == "guanaco"

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert_plain_model(merged)
    assert merged.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(out)
    _, model, _, fmt = trained
    text = fmt.prompt(QUESTION, tok) + " The code of item 3 is 1."
    with_adapter = logits_of(model, tok, text)
    torch.testing.assert_close(logits_of(merged, tok, text), with_adapter, rtol=1e-4, atol=1e-4)
    without = logits_of(plain_base_4bit(tiny_model_dir), tok, text)
    assert (with_adapter - without).abs().max() > 1e-2  # the adapter, hence the merge, changed the model


def test_merge_in_bfloat16_saves_bfloat16_weights_close_to_base_4bit_plus_adapter(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    report = inference.merge(run_dir, tmp_path / "bf16", dtype="bfloat16")
    assert report.dtype == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert report.max_abs_diff < 0.05 * report.logit_scale


def test_merge_refuses_a_non_empty_output_the_run_itself_and_a_folder_that_is_not_a_run(run_dir, tmp_path,
                                                                                       capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["merge", str(run_dir), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not empty" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    for inside in (run_dir, run_dir / "adapter", run_dir.parent):
        assert cli.main(["merge", str(run_dir), "--output", str(inside), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "would replace the run" in err and len(err.splitlines()) == 1
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert cli.main(["merge", str(tmp_path / "taken"), "--output", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a qlora run folder" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_merge_overwrite_replaces_the_output_folder(run_dir, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    inference.merge(run_dir, out, dtype="float32", overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_merged_export_plugin_writes_a_merged_model_and_leaves_the_trained_model_intact(tiny_model_dir, data_file,
                                                                                       tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    job = Job(run_config(tiny_model_dir, data_file, steps=3), plugins=["merged-export"], output_dir=out)
    result = job.run()
    assert out / "merged" in result.exports and out / "adapter" in result.exports
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    tok = AutoTokenizer.from_pretrained(out / "merged")
    text = f"### Human: {QUESTION}### Assistant: The code of item 3 is 1."
    job.model.eval()
    trained_logits = logits_of(job.model, tok, text)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert_plain_model(merged)
    torch.testing.assert_close(logits_of(merged, tok, text), trained_logits, rtol=1e-4, atol=1e-4)
    # adapter-export (before or after this exporter) saved the trained adapter unchanged.
    again = PeftModel.from_pretrained(plain_base_4bit(tiny_model_dir), out / "adapter").eval()
    torch.testing.assert_close(logits_of(again, tok, text), trained_logits, rtol=1e-4, atol=1e-4)
    report = json.loads((out / "merged" / inference.MERGE_REPORT_FILE).read_text())
    assert report["adapter"] == str(out / "adapter") and report["max_abs_diff"] < 1e-3
    assert not any(p.name.endswith(".partial") for p in out.iterdir())


def test_merged_export_reads_merge_dtype(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(UsageError, match="merge.dtype"):
        Job(run_config(tiny_model_dir, data_file) | {"merge": {"dtype": "int8"}}, plugins=["merged-export"])
    job = Job(run_config(tiny_model_dir, data_file), plugins=["merged-export"])
    assert job.config["merge.dtype"] == "auto"
    assert inference.resolve_dtype(job.config["merge.dtype"], job) == torch.float32  # the CPU compute dtype
