"""The hooks that set up a run, and the ones at its end, each with an effect a short real run shows.

One plugin file (``PLUGIN`` below) is a whole run's worth of choices: it checks the config, names the model and
the data by aliases, brings its own dataset format, loads the base model unquantized with eager attention through
its own loader, puts the adapters on two projections only, records the sample answers, writes an export of its
own and reads the summary. One run of the tiny model with it (``qlora_run_with_plugin``) is shared by the tests
below, one per hook, each asserting what only that hook's call or result can have done. ``qlora merge`` of that
run exercises the plugin's dequantization, and a second short run a distribution wrapper.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qlora_core import Job, merge, testing

PLUGIN = '''
"""A run's set-up and ending, every choice this plugin's own (a test plugin of tests/test_hooks_more.py)."""
import json
from pathlib import Path

import torch

from qlora_core import FormattedExample, hookimpl

MODEL_DIR = {model_dir!r}
DATA = {{"alias:qa-train": {train!r}, "alias:qa-eval": {eval!r}}}
SEEN = {{}}  # hook name -> what each call saw


def saw(hook, **what):
    SEEN.setdefault(hook, []).append(what)


@hookimpl
def qlora_configure(config, device):
    saw("qlora_configure", device=device, max_steps=config["train.max_steps"])
    config.set("train.max_steps", 2)  # the config asks for 3


@hookimpl
def qlora_resolve_model(name_or_path, config):
    saw("qlora_resolve_model", name=name_or_path)
    return MODEL_DIR if name_or_path == "alias:tiny-llama" else None


@hookimpl
def qlora_resolve_data(path, config):
    saw("qlora_resolve_data", path=path)
    return DATA.get(path)


class QuestionAnswer:
    """Rows with ``question`` and ``answer`` columns."""

    name = "qa"
    fields = ("question", "answer")

    def matches(self, columns):
        return "question" in columns and "answer" in columns

    def prompt(self, user_text, tokenizer):
        return f"Question: {{user_text}}\\nAnswer:"

    def format(self, example, tokenizer):
        prompt = self.prompt(example["question"], tokenizer)
        answer = " " + example["answer"] + tokenizer.eos_token
        return FormattedExample(prompt + answer, ((len(prompt), len(prompt) + len(answer)),))


@hookimpl
def qlora_dataset_formats(config):
    return [QuestionAnswer()]


@hookimpl
def qlora_quantization_config(config, compute_dtype):
    saw("qlora_quantization_config", compute_dtype=compute_dtype)
    return {{}}  # unquantized: the base stays in nn.Linear layers


@hookimpl
def qlora_model_load_kwargs(kwargs, config):
    kwargs["attn_implementation"] = "eager"


@hookimpl
def qlora_load_base_model(name_or_path, kwargs, config):
    from transformers import AutoModelForCausalLM

    saw("qlora_load_base_model", name=name_or_path, kwargs=sorted(kwargs))
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    model.loaded_by_plugin = True
    return model


@hookimpl
def qlora_adapter_targets(model, config):
    return ["q_proj", "v_proj"]


@hookimpl
def qlora_on_sample(run, stage, prompt, completion, reference):
    saw("qlora_on_sample", stage=stage, prompt=prompt, completion=completion, reference=reference)


@hookimpl
def qlora_export(run, model, tokenizer, output_dir):
    target = output_dir / "lora-shapes"
    target.mkdir()
    shapes = {{n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}}
    (target / "shapes.json").write_text(json.dumps({{"step": run.step, "shapes": shapes}}))
    return target


@hookimpl
def qlora_on_train_end(run, summary):
    saw("qlora_on_train_end", summary=dict(summary),
        exported=(run.output_dir / "lora-shapes" / "shapes.json").is_file())


@hookimpl
def qlora_dequantize_model(model, dtype):
    # The base this plugin loaded is already plain: cast it, and mark the merged model's config.
    if not getattr(model, "loaded_by_plugin", False):
        return None
    saw("qlora_dequantize_model", model=type(model).__name__, dtype=dtype)
    model.config.dequantized_by = "hooks-more"
    return model.to(dtype)
'''

QUESTIONS = [{"question": f"What is the code of item {i}?", "answer": f"The code of item {i} is {i * 7 % 10}."}
             for i in range(20)]


def plugin_of(job: Job, name: str):
    """The plugin object (here a module) a job took part with."""
    return next(i.plugin for i in job.plugins.infos if i.name == name)


@pytest.fixture(scope="module")
def qlora_run_with_plugin(tmp_path_factory, qlora_tiny_model_dir):
    """One short run of the tiny model with ``PLUGIN``: ``(job, result, SEEN)``."""
    root = tmp_path_factory.mktemp("hooks-more")
    train = testing.write_jsonl(root / "qa-train.jsonl", QUESTIONS[:16])
    held_out = testing.write_jsonl(root / "qa-eval.jsonl", QUESTIONS[16:])
    plugin = root / "hooks_more_plugin.py"
    plugin.write_text(PLUGIN.format(model_dir=str(qlora_tiny_model_dir), train=str(train), eval=str(held_out)))
    config = {
        "model": {"name_or_path": "alias:tiny-llama"},
        "data": {"path": "alias:qa-train", "eval_path": "alias:qa-eval"},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 3,
                  "learning_rate": 1e-3, "logging_steps": 1, "max_seq_length": 64, "sample_max_new_tokens": 6},
    }
    job = Job(config, plugins=["no:rich-progress", str(plugin)], output_dir=root / "run")
    result = job.run()
    return job, result, plugin_of(job, "hooks_more_plugin").SEEN


def test_configure_sees_the_validated_config_and_its_change_holds(qlora_run_with_plugin):
    job, result, seen = qlora_run_with_plugin
    assert seen["qlora_configure"] == [{"device": "cpu", "max_steps": 3}]
    assert result.steps == 2 and [m["step"] for m in result.metrics if "loss" in m] == [1, 2]
    assert "max_steps: 2" in (result.output_dir / "config.yaml").read_text()


def test_resolve_model_maps_an_alias_to_the_folder_loaded(qlora_run_with_plugin, qlora_tiny_model_dir):
    job, _, seen = qlora_run_with_plugin
    assert [c["name"] for c in seen["qlora_resolve_model"]] == ["alias:tiny-llama"]  # asked once per job
    assert job.model_path() == str(qlora_tiny_model_dir)
    assert seen["qlora_load_base_model"][0]["name"] == str(qlora_tiny_model_dir)


def test_resolve_data_maps_the_training_and_the_eval_path(qlora_run_with_plugin):
    job, _, seen = qlora_run_with_plugin
    assert [c["path"] for c in seen["qlora_resolve_data"]] == ["alias:qa-train", "alias:qa-eval"]
    assert len(job.train_examples) == 16 and len(job.eval_examples) == 4


def test_dataset_formats_offers_the_format_the_data_is_read_in(qlora_run_with_plugin):
    job, _, _ = qlora_run_with_plugin
    assert job.format.name == "qa"
    trained = testing.labelled_runs(job.train_examples[3], job.tokenizer)
    assert trained == [" The code of item 3 is 1." + job.tokenizer.eos_token]


def test_quantization_config_chooses_an_unquantized_base(qlora_run_with_plugin):
    job, _, seen = qlora_run_with_plugin
    assert seen["qlora_quantization_config"] == [{"compute_dtype": torch.float32}]
    assert "nf4" not in job.plugins.names()  # a requested quant strategy replaces the default
    base = job.model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == torch.float32


def test_model_load_kwargs_adds_an_argument_of_from_pretrained(qlora_run_with_plugin):
    job, _, seen = qlora_run_with_plugin
    assert "attn_implementation" in seen["qlora_load_base_model"][0]["kwargs"]  # added before the load
    assert job.model.get_base_model().config._attn_implementation == "eager"  # sdpa otherwise


def test_load_base_model_makes_the_model_that_is_trained(qlora_run_with_plugin):
    job, _, seen = qlora_run_with_plugin
    assert len(seen["qlora_load_base_model"]) == 1
    assert {"dtype", "device_map"} <= set(seen["qlora_load_base_model"][0]["kwargs"])
    assert getattr(job.model.get_base_model(), "loaded_by_plugin", False)


def test_adapter_targets_choose_the_modules_with_adapters(qlora_run_with_plugin):
    job, result, _ = qlora_run_with_plugin
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in job.model.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "v_proj"}  # all-linear would adapt the MLP and o_proj too


def test_on_sample_gets_the_answer_before_and_after_training(qlora_run_with_plugin):
    job, _, seen = qlora_run_with_plugin
    samples = seen["qlora_on_sample"]
    assert [s["stage"] for s in samples] == ["before", "after"]
    first_held_out = QUESTIONS[16]
    for s in samples:
        assert s["prompt"] == f"Question: {first_held_out['question']}\nAnswer:"
        assert s["reference"] == first_held_out["answer"]
    # The "after" answer is the trained model's own greedy answer.
    assert samples[1]["completion"] == job.generate(samples[1]["prompt"], 6)


def test_export_writes_a_folder_the_run_reports(qlora_run_with_plugin):
    job, result, _ = qlora_run_with_plugin
    folder = result.output_dir / "lora-shapes"
    assert folder in result.exports and result.adapter_dir in result.exports
    written = json.loads((folder / "shapes.json").read_text())
    assert written["step"] == 2
    trainable = {n: list(p.shape) for n, p in job.model.named_parameters() if p.requires_grad}
    assert written["shapes"] == trainable and len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_on_train_end_gets_the_summary_after_the_exports(qlora_run_with_plugin):
    _, result, seen = qlora_run_with_plugin
    [end] = seen["qlora_on_train_end"]
    assert end["exported"]
    summary = end["summary"]
    assert summary["steps"] == 2 and summary["eval_loss_before"] is not None
    assert summary["eval_loss_after"] == result.metrics[-1]["eval_loss"]
    assert summary == json.loads((result.output_dir / "run.json").read_text())["summary"]


def test_merge_dequantizes_the_base_through_the_run_quant_strategy(qlora_run_with_plugin, tmp_path):
    _, result, _ = qlora_run_with_plugin
    report = merge(result.output_dir, tmp_path / "merged", dtype="float32")
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_config["dequantized_by"] == "hooks-more"  # set by the plugin's qlora_dequantize_model only
    assert report.max_abs_diff < 1e-3 and report.adapter_effect > report.max_abs_diff


DISTRIBUTE = '''
import contextlib

import torch

from qlora_core import hookimpl


class Wrapper(torch.nn.DataParallel):
    """DataParallel on the CPU (or one GPU) runs the module as it is; this one counts its forwards."""

    forwards = 0

    def forward(self, *args, **kwargs):
        type(self).forwards += 1
        return super().forward(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        yield  # one process: nothing to synchronise


class Distribute:
    def __init__(self):
        self.seen = []

    @hookimpl
    def qlora_distribute_model(self, model, accelerator, config):
        self.seen.append((type(model).__name__, accelerator.num_processes))
        on_gpu = accelerator.device.type == "cuda"
        return Wrapper(model, device_ids=[accelerator.device.index or 0] if on_gpu else None)

    @hookimpl
    def qlora_on_train_start(self, run):
        self.seen.append(type(run.model).__name__)
'''


def test_distribute_model_wraps_the_model_that_trains(qlora_run, tmp_path, monkeypatch):
    (tmp_path / "distribute_under_test.py").write_text(textwrap.dedent(DISTRIBUTE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "distribute_under_test", raising=False)
    result = qlora_run("distribute_under_test:Distribute", max_steps=2)
    plugin = plugin_of(qlora_run.job, "distribute_under_test:Distribute")
    assert plugin.seen == [("PeftModelForCausalLM", 1), "Wrapper"]
    import distribute_under_test

    assert distribute_under_test.Wrapper.forwards == 2  # the loss of each step ran through the wrapper
    assert result.steps == 2 and (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()
