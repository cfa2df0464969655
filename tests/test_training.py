"""The training loop, the run folder and the exported adapter, on a tiny random Llama in 4 bits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from qlora_core import cli
from qlora_core.framework.errors import UsageError
from qlora_plugins.nf4 import use_float32_kernels
from qlora_core import Job

from conftest import write_jsonl

SGD_PLUGIN = """
import torch
from qlora_core import hookimpl

@hookimpl
def qlora_optimizer(params, config):
    return torch.optim.SGD(params, lr=config["train.learning_rate"])
"""


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_base_model_is_loaded_in_nf4_with_lora_on_all_linear_layers(tiny_config, tmp_path):
    import bitsandbytes as bnb

    job = Job(tiny_config, output_dir=tmp_path / "run")
    model = job.load_model()
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    weight = linear4[0].weight
    assert weight.quant_state.quant_type == "nf4"
    assert weight.quant_state.nested  # double quantization
    targets = set(model.peft_config["default"].target_modules)
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)


def test_listed_target_modules_are_used_and_a_wrong_name_is_reported(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["lora"]["target_modules"] = ["q_proj", "v_proj"]
    model = Job(cfg, output_dir=tmp_path / "a").load_model()
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    cfg["lora"]["target_modules"] = ["q_proj", "query"]
    with pytest.raises(UsageError, match="lora.target_modules: no linear layer named query"):
        Job(cfg, output_dir=tmp_path / "b").load_model()


def test_loss_decreases_on_a_memorizable_batch(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(max_steps=25, learning_rate=5e-3, per_device_train_batch_size=16, warmup_steps=0,
                        lr_scheduler_type="constant", max_grad_norm=1.0)
    cfg["plugins"] = ["adamw"]
    result = Job(cfg, output_dir=tmp_path / "run").run()
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert len(losses) == 25
    assert losses[-1] < 0.5 * losses[0], losses


def test_training_after_an_evaluation_still_updates_the_first_layers(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["eval_fraction"] = 0.25  # an evaluation runs before the first step
    cfg["train"]["max_steps"] = 1
    job = Job(cfg, output_dir=tmp_path / "run")
    job.load_model()
    before = trainable(job.model)
    job.run()
    after = trainable(job.model)
    first = [n for n in before if ".layers.0." in n and "lora_B" in n]
    assert first
    for n in first:
        assert (after[n] - before[n]).abs().max() > 0, n


def test_gradient_accumulation_gives_the_same_update_as_the_big_batch(tiny_config, tmp_path):
    # Answers of very different lengths: normalising per micro-batch instead of per accumulated step
    # would weight the tokens differently and change the update.
    rows = [{"text": f"### Human: q{i}?### Assistant: " + " ".join(["word"] * (1 + 12 * (i % 2)))} for i in range(4)]
    data = write_jsonl(tmp_path / "ragged.jsonl", rows)
    sgd = tmp_path / "sgd_plugin.py"
    sgd.write_text(SGD_PLUGIN)
    base = copy.deepcopy(tiny_config)
    base["data"]["path"] = str(data)
    base["plugins"] = [str(sgd)]
    base["train"].update(max_steps=1, learning_rate=0.5, max_grad_norm=0.0, warmup_steps=0,
                         lr_scheduler_type="constant")
    params = {}
    for bs, ga in [(4, 1), (2, 2), (1, 4)]:
        cfg = copy.deepcopy(base)
        cfg["train"].update(per_device_train_batch_size=bs, gradient_accumulation_steps=ga)
        job = Job(cfg, output_dir=tmp_path / f"run-{bs}x{ga}")
        job.load_model()
        before = trainable(job.model)
        result = job.run()
        params[(bs, ga)] = (before, trainable(job.model), result.metrics[0]["loss"])
    ref_before, ref_after, ref_loss = params[(4, 1)]
    moved = max(float((ref_after[n] - ref_before[n]).abs().max()) for n in ref_after)
    assert moved > 1e-4  # the step really changed the adapters
    for key in [(2, 2), (1, 4)]:
        before, after, loss = params[key]
        for n in ref_after:
            torch.testing.assert_close(before[n], ref_before[n])
            torch.testing.assert_close(after[n], ref_after[n], rtol=1e-4, atol=1e-6)
        assert loss == pytest.approx(ref_loss, rel=1e-5)


def test_run_folder_holds_config_metrics_plugins_and_adapter(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["eval_fraction"] = 0.25
    out = tmp_path / "run"
    result = Job(cfg, output_dir=out).run()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "tokenizer_config.json").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lora"]["r"] == 8 and saved["train"]["max_steps"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for r in train_rows:
        assert {"step", "loss", "learning_rate", "tokens_per_second"} <= set(r)
        assert r["tokens_per_second"] > 0
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3]
    plugins = {p["name"]: p for p in json.loads((out / "plugins.json").read_text())}
    assert plugins["nf4"]["version"] == "0.1.0" and plugins["nf4"]["default"]
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert result.summary["eval_loss_before"] == evals[0]["eval_loss"]


def test_non_empty_output_folder_is_never_overwritten_silently(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    code = cli.main(["run", str(config), "--output", str(out)])
    assert code == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_bad_data_is_reported_before_the_model_loads(tiny_config, tmp_path, capsys):
    data = write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}])
    config = tmp_path / "c.yaml"
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["path"] = str(data)
    config.write_text(yaml.safe_dump(cfg))
    code = cli.main(["run", str(config), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "question, answer" in err and "guanaco" in err and "alpaca" in err


def test_a_requested_builtin_format_is_enforced_not_detected(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    job = Job(cfg, plugins=["chat-format"], output_dir=tmp_path / "out")
    with pytest.raises(UsageError, match=r"format 'chat' needs messages \(missing: messages\)"):
        job.load_data()


def test_missing_data_path_is_a_usage_error(tiny_config, tmp_path, capsys):
    code = cli.main(["run", "--set", f"model.name_or_path={tiny_config['model']['name_or_path']}",
                     "--set", "data.path=./nowhere/train.jsonl", "--output", str(tmp_path / "out")])
    assert code == 2
    assert "data path './nowhere/train.jsonl' does not exist" in capsys.readouterr().err


def test_exported_adapter_reloads_with_plain_peft_and_gives_the_same_logits(tiny_config, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    out = tmp_path / "run"
    cfg = copy.deepcopy(tiny_config)
    cfg["train"]["learning_rate"] = 1e-2
    job = Job(cfg, output_dir=out)
    job.run()
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    inputs = tok("### Human: What is the code of item 3?### Assistant:", return_tensors="pt")
    job.model.eval()
    with torch.no_grad():
        trained = job.model(**inputs).logits
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_config["model"]["name_or_path"], quantization_config=bnb,
                                                dtype=torch.float32, device_map={"": "cpu"})
    # On CPUs with AVX512-BF16, bitsandbytes would switch eval-mode forwards to a bf16 kernel; compare
    # like with like (the trainer keeps the float32 kernel, see plugins/nf4.py).
    use_float32_kernels(base)
    with torch.no_grad():
        plain = base(**inputs).logits
    reloaded = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        again = reloaded(**inputs).logits
    assert (trained - plain).abs().max() > 1e-3  # training changed the model
    torch.testing.assert_close(again, trained, rtol=1e-4, atol=1e-4)


def test_epochs_decide_the_steps_when_max_steps_is_unset(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    # 16 rows, micro-batches of 4, 2 per step: 2 steps an epoch.
    cfg["train"].update(max_steps=-1, num_train_epochs=2, per_device_train_batch_size=4,
                        gradient_accumulation_steps=2)
    result = Job(cfg, output_dir=tmp_path / "run").run()
    steps = [m for m in result.metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert steps[-1]["epoch"] == pytest.approx(2.0)


FAILING_CALLBACK = """
from qlora_core import hookimpl

@hookimpl
def qlora_on_step_end(run, metrics):
    if metrics["step"] == 2:
        raise RuntimeError("disk full")
"""


def test_a_failed_run_is_marked_failed_and_leaves_no_adapter(tiny_config, tmp_path):
    plugin = tmp_path / "fail_at_two.py"
    plugin.write_text(FAILING_CALLBACK)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="disk full"):
        Job(tiny_config, plugins=[str(plugin)], output_dir=out).run()
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "failed" and "disk full" in status["error"]
    assert not (out / "adapter").exists()
    assert len([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]) == 1


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_alpaca_data_in_csv_parquet_and_json_files_is_detected_and_loaded(tiny_config, tmp_path, suffix):
    import datasets

    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(10)]
    path = tmp_path / f"alpaca{suffix}"
    table = datasets.Dataset.from_list(rows)
    {".csv": table.to_csv, ".parquet": table.to_parquet, ".json": table.to_json}[suffix](str(path))
    cfg = copy.deepcopy(tiny_config)
    cfg["data"] = {"path": str(path), "eval_fraction": 0.2}
    job = Job(cfg, output_dir=tmp_path / "run")
    train, evals = job.load_data()
    assert job.format.name == "alpaca"
    assert (len(train), len(evals)) == (8, 2)


def test_a_data_folder_with_train_and_test_files_gives_both_splits(tiny_config, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    row = {"text": "### Human: hi?### Assistant: hello."}
    write_jsonl(folder / "train.jsonl", [row] * 6)
    write_jsonl(folder / "test.jsonl", [row] * 3)
    cfg = copy.deepcopy(tiny_config)
    cfg["data"] = {"path": str(folder)}
    train, evals = Job(cfg, output_dir=tmp_path / "run").load_data()
    assert (len(train), len(evals)) == (6, 3)


NOTICES = """
from qlora_core import hookimpl

SEEN = []

@hookimpl
def qlora_on_notice(run, message):
    SEEN.append(message)
"""


def test_settings_against_the_guide_are_warned_about_at_start(tiny_config, tmp_path):
    plugin = tmp_path / "notices.py"
    plugin.write_text(NOTICES)
    cfg = copy.deepcopy(tiny_config)
    cfg["lora"].update(r=64, lora_alpha=16)  # the guide's own Quick Start, against its own advice
    cfg["train"]["max_steps"] = 1
    job = Job(cfg, plugins=[str(plugin)], output_dir=tmp_path / "run")
    job.run()
    seen = job.plugins.pm.get_plugin("notices").SEEN
    assert any("lora_alpha = 2 x r = 128" in m for m in seen), seen


def test_parameters_are_counted_at_their_original_size_in_4_bits(tiny_config, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    job = Job(tiny_config, output_dir=tmp_path / "run")
    job.load_model()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert job.num_parameters == sum(p.numel() for p in plain.parameters())


def test_a_job_runs_after_an_accelerator_of_another_precision_in_the_same_process(tiny_config, tmp_path):
    """A float32 job after a bf16 Accelerator (a notebook's earlier work) in one fresh process."""
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from accelerate import Accelerator\n"
        "from qlora_core import Job\n"
        "Accelerator(cpu=True, mixed_precision='bf16')\n"
        "result = Job(json.loads(sys.argv[1]), output_dir=sys.argv[2]).run()\n"
        "print('steps', result.steps)\n")
    cfg = dict(tiny_config, plugins=["no:rich-progress"])
    done = subprocess.run([sys.executable, "-c", script, json.dumps(cfg), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("steps 3")


def test_loss_on_answer_positions_only_equals_the_full_logits_loss(tiny_config, tmp_path):
    import torch.nn.functional as F

    from qlora_core.loop.data import collate
    from qlora_plugins.fused_loss import _plain_head_model, token_loss_sum

    job = Job(tiny_config, output_dir=tmp_path / "run")
    job.load_data()
    model = job.load_model()
    assert _plain_head_model(model) is not None  # the fast path is the one under test
    batch = collate(job.train_examples[:4], job.tokenizer.pad_token_id)
    loss, n = token_loss_sum(model, batch)
    loss.backward()
    fast = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    full = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
    full.backward()
    assert n == int(keep.sum())
    torch.testing.assert_close(loss, full)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast[k], p.grad, msg=k)


def test_flat_params_train_exactly_as_one_tensor_at_a_time(tiny_config, tmp_path):
    """train.flat_params (the default) gathers the adapters into one buffer for the optimizer: with torch's
    AdamW (element-wise, 32-bit states, weight decay, clipping) the losses and adapters are those of stepping
    each tensor separately, and the model's parameters remain the adapters that were trained and saved."""
    from safetensors.torch import load_file

    runs = {}
    for flat in (True, False):
        job = Job(tiny_config, plugins=["adamw"], output_dir=tmp_path / f"flat-{flat}",
                  overrides=[f"train.flat_params={str(flat).lower()}", "train.max_steps=4",
                             "train.weight_decay=0.1", "train.max_grad_norm=0.3"])
        job.load_model()
        before = trainable(job.model)
        result = job.run()
        plugin = next(i.plugin for i in job.plugins.infos if i.name == "flat-params")
        runs[flat] = (before, trainable(job.model), [m["loss"] for m in result.metrics if "loss" in m],
                      plugin.flat)
    before, after, losses, flat = runs[True]
    ref_before, ref_after, ref_losses, none = runs[False]
    assert none is None and flat is not None and len(flat.params) == 1  # one fp32 buffer
    assert flat.numel == sum(t.numel() for t in after.values())
    assert max(float((after[n] - before[n]).abs().max()) for n in after) > 1e-4
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for n in ref_after:
        torch.testing.assert_close(after[n], ref_after[n], rtol=1e-5, atol=1e-7)
    saved = load_file(str(tmp_path / "flat-True" / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(after)
    for key, tensor in saved.items():
        match = [n for n in after if n.replace(".default", "").endswith(key.removeprefix("base_model.model."))]
        assert len(match) == 1, key
        torch.testing.assert_close(tensor.float(), after[match[0]].float())


def test_flat_params_collect_gradients_that_were_replaced_or_cleared():
    from qlora_plugins.flat_params import FlatParams

    a = torch.nn.Parameter(torch.ones(2, 3))
    b = torch.nn.Parameter(torch.full((4,), 2.0))
    flat = FlatParams([a, b])
    assert flat.params[0].data_ptr() == a.data_ptr()  # the parameters are views into the buffer
    ((a * 3).sum() + (b * b).sum()).backward()  # autograd adds into the buffer's views
    torch.testing.assert_close(flat.params[0].grad, torch.tensor([3.0] * 6 + [4.0] * 4))
    a.grad = None  # e.g. model.zero_grad(set_to_none=True)
    b.grad = torch.full((4,), 7.0)  # or a gradient replaced by other code
    flat.collect()
    torch.testing.assert_close(flat.params[0].grad, torch.tensor([0.0] * 6 + [7.0] * 4))
    torch.optim.SGD(flat.params, lr=1.0).step()
    torch.testing.assert_close(b.detach(), torch.full((4,), -5.0))
    flat.zero_grad()
    assert float(flat.params[0].grad.abs().sum()) == 0.0 and a.grad is not None
