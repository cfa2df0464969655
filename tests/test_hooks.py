"""Every step of a run is a hook: each hook is called where its spec says, and what it returns is used.

Each test runs the tiny model for a few steps with a small plugin that uses one hook (or a few that belong
together) and checks an effect that only the hook's call, or its result, can have.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import pytest
import torch

from qlora_core import Job, TrainControl, cli

from conftest import loss_by_hand


def plugin_module(tmp_path, monkeypatch, body: str, name: str = "hooks_under_test") -> str:
    """Write ``body`` as an importable module and return its name (for ``--plugin module:Class``)."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return name


def plugin_of(job: Job, name: str):
    """The plugin object (the instance, for a class-based plugin) a job took part with."""
    return next(i.plugin for i in job.plugins.infos if i.name == name)


def with_eval(config) -> dict:
    """The config with a quarter of its 16 rows held out for evaluation."""
    return dict(config, data={**config["data"], "eval_fraction": 0.25})


def run_job(config, tmp_path, plugins, **train):
    cfg = dict(config, train={**config["train"], **train})
    job = Job(cfg, plugins=["no:rich-progress", *plugins], output_dir=tmp_path / "run")
    return job, job.run()


RECORDER = """
from qlora_core import hookimpl

class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def qlora_on_step_begin(self, run, step):
        self.calls.append(("step_begin", step, run.step))

    @hookimpl
    def qlora_on_after_backward(self, run, model, optimizer):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        self.calls.append(("after_backward", run.step + 1, all(g is not None for g in grads)))

    @hookimpl
    def qlora_on_step_end(self, run, metrics):
        self.calls.append(("step_end", run.step))

    @hookimpl
    def qlora_on_log(self, run, metrics):
        self.calls.append(("log", dict(metrics)))

    @hookimpl
    def qlora_on_epoch_end(self, run, epoch):
        self.calls.append(("epoch_end", epoch, run.step))
"""


def test_step_hooks_are_called_in_order_every_step(tiny_config, tmp_path, monkeypatch):
    mod = plugin_module(tmp_path, monkeypatch, RECORDER)
    # 16 rows, 4 per step: an epoch every 4 steps; logging every 3 steps and at the last.
    job, result = run_job(tiny_config, tmp_path, [f"{mod}:Recorder"], max_steps=8, logging_steps=3)
    calls = plugin_of(job, f"{mod}:Recorder").calls
    kinds = [c[0] for c in calls]
    assert kinds.count("step_begin") == kinds.count("after_backward") == kinds.count("step_end") == 8
    for step in range(1, 9):
        begin = calls.index(("step_begin", step, step - 1))
        assert calls[begin + 1] == ("after_backward", step, True)  # the step's gradients are there
        assert calls[begin + 2] == ("step_end", step)
    logged = [c[1] for c in calls if c[0] == "log"]
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [3, 6, 8]
    assert [c[1:] for c in calls if c[0] == "epoch_end"] == [(1, 4), (2, 8)]


def test_a_class_based_plugin_gets_one_instance_per_run(tiny_config, tmp_path, monkeypatch):
    mod = plugin_module(tmp_path, monkeypatch, RECORDER)
    first = Job(tiny_config, plugins=[f"{mod}:Recorder"])
    second = Job(tiny_config, plugins=[f"{mod}:Recorder"])
    a, b = plugin_of(first, f"{mod}:Recorder"), plugin_of(second, f"{mod}:Recorder")
    assert type(a).__name__ == "Recorder" and a is not b


def test_on_after_backward_sees_the_gradients_before_the_optimizer_uses_them(tiny_config, tmp_path,
                                                                             monkeypatch):
    mod = plugin_module(tmp_path, monkeypatch, """
        from qlora_core import hookimpl

        @hookimpl
        def qlora_on_after_backward(run, model, optimizer):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.zero_()   # nothing left for the optimizer to apply
        """)
    job = Job(tiny_config, plugins=["adamw", "no:rich-progress", mod], output_dir=tmp_path / "run")
    job.load_model()
    before = {n: p.detach().clone() for n, p in job.model.named_parameters() if p.requires_grad}
    job.run()
    after = dict(job.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_the_lr_scheduler_hook_replaces_the_configured_schedule(tiny_config, tmp_path, monkeypatch):
    mod = plugin_module(tmp_path, monkeypatch, """
        import torch
        from qlora_core import hookimpl

        @hookimpl
        def qlora_lr_scheduler(optimizer, num_training_steps, config):
            assert num_training_steps == 3
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
        """)
    _, result = run_job(tiny_config, tmp_path, [mod])
    lrs = [m["learning_rate"] for m in result.metrics if "learning_rate" in m]
    assert lrs == pytest.approx([1e-3, 5e-4, 2.5e-4])


def test_collate_and_compute_loss_hooks_make_the_batches_and_the_loss(tiny_config, tmp_path, monkeypatch):
    mod = plugin_module(tmp_path, monkeypatch, """
        import torch
        from qlora_core import IGNORE_INDEX, collate, hookimpl, model_inputs

        class Loss:
            def __init__(self):
                self.batches = 0

            @hookimpl
            def qlora_collate(self, examples, config, pad_token_id):
                batch = collate(examples, pad_token_id)
                batch["marker"] = torch.tensor(len(examples))
                return batch

            @hookimpl
            def qlora_compute_loss(self, model, batch, config):
                assert "marker" in batch  # the batch the collate hook made
                self.batches += 1
                logits = model(**model_inputs(batch)).logits
                n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                # a loss of exactly 1.0 per answer token, its gradient zero
                return logits.sum() * 0.0 + float(n), n
        """)
    job, result = run_job(with_eval(tiny_config), tmp_path, [f"{mod}:Loss"])
    assert plugin_of(job, f"{mod}:Loss").batches >= 3 + 2  # three steps and the two evaluations
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert losses == [1.0, 1.0, 1.0]
    assert result.summary["eval_loss_after"] == pytest.approx(1.0)


def test_tokenizer_adapter_config_and_adapter_model_hooks(tiny_config, tmp_path, monkeypatch, tiny_model_dir):
    mod = plugin_module(tmp_path, monkeypatch, """
        from transformers import AutoTokenizer
        from qlora_core import hookimpl

        @hookimpl
        def qlora_load_tokenizer(name_or_path, config):
            tok = AutoTokenizer.from_pretrained(name_or_path)
            tok.loaded_by_plugin = True
            return tok

        @hookimpl
        def qlora_adapter_config(lora_config, model, config):
            lora_config.r = 2                     # the config's lora.r is 8
            lora_config.lora_alpha = 4

        @hookimpl
        def qlora_adapter_model(model, config):
            model.seen_by_plugin = type(model).__name__
        """)
    job = Job(tiny_config, plugins=[mod])
    assert getattr(job.load_tokenizer(), "loaded_by_plugin", False)
    model = job.load_model()
    assert model.seen_by_plugin == "PeftModelForCausalLM"
    ranks = {p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
    assert ranks == {2}


def test_optimizer_params_hook_chooses_what_the_optimizer_steps(tiny_config, tmp_path, monkeypatch):
    mod = plugin_module(tmp_path, monkeypatch, """
        from qlora_core import hookimpl

        @hookimpl
        def qlora_optimizer_params(params, model, config):
            return [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
        """)
    job = Job(tiny_config, plugins=["adamw", "no:rich-progress", mod], output_dir=tmp_path / "run")
    job.load_model()
    a_before = {n: p.detach().clone() for n, p in job.model.named_parameters() if "lora_A" in n}
    job.run()
    params = dict(job.model.named_parameters())
    assert all(torch.equal(a_before[n], params[n]) for n in a_before)  # not handed to the optimizer
    assert any(float(p.abs().sum()) > 0 for n, p in params.items() if "lora_B" in n)  # trained (from zero)


FAIL_AT_STEP_2 = """
from qlora_core import hookimpl

class Fail:
    error = RuntimeError
    def __init__(self):
        self.failed = []

    @hookimpl
    def qlora_on_step_end(self, run, metrics):
        if run.step == 2:
            raise self.error("boom at step 2")

    @hookimpl
    def qlora_on_train_failed(self, run, error, status):
        self.failed.append((status, str(error), run.step))

class Interrupt(Fail):
    error = KeyboardInterrupt
"""


@pytest.mark.parametrize("cls, status", [("Fail", "failed"), ("Interrupt", "interrupted")])
def test_on_train_failed_is_told_why_a_run_stopped(tiny_config, tmp_path, monkeypatch, cls, status):
    mod = plugin_module(tmp_path, monkeypatch, FAIL_AT_STEP_2)
    job = Job(tiny_config, plugins=["no:rich-progress", f"{mod}:{cls}"], output_dir=tmp_path / "run")
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        job.run()
    assert plugin_of(job, f"{mod}:{cls}").failed == [(status, "boom at step 2", 2)]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == status


def test_on_resume_gets_the_checkpoint_a_run_continues_from(tiny_config, tmp_path, monkeypatch):
    mod = plugin_module(tmp_path, monkeypatch, """
        from qlora_core import hookimpl

        STOP_AT = 3  # the first run stops there, as a crash would

        class Resumed:
            def __init__(self):
                self.seen = []

            @hookimpl
            def qlora_on_step_end(self, run, metrics):
                if run.step == STOP_AT:
                    raise KeyboardInterrupt

            @hookimpl
            def qlora_on_resume(self, run, checkpoint):
                self.seen.append((checkpoint.name, run.step))

            @hookimpl
            def qlora_on_train_start(self, run):
                self.seen.append(("start", run.step))
        """)
    cfg = dict(tiny_config, train={**tiny_config["train"], "max_steps": 4, "save_steps": 2})
    cfg["plugins"] = [f"{mod}:Resumed"]
    first = Job(cfg, plugins=["no:rich-progress"], output_dir=tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert plugin_of(first, f"{mod}:Resumed").seen == [("start", 0)]
    sys.modules[mod].STOP_AT = None
    again = Job(resume=tmp_path / "run")
    again.run()
    assert plugin_of(again, f"{mod}:Resumed").seen == [("step-0000002", 2), ("start", 2)]


CONTROL = """
from qlora_core import hookimpl

class Control:
    stop_at = save_at = evaluate_at = None

    @hookimpl
    def qlora_on_step_end(self, run, metrics):
        c = run.control
        c.should_stop = run.step == self.stop_at
        c.should_save = run.step == self.save_at
        c.should_evaluate = run.step == self.evaluate_at

class StopAt2(Control):
    stop_at = 2

class SaveAt1EvaluateAt2(Control):
    save_at, evaluate_at = 1, 2

class StopOnEvaluate:
    # asks to stop from the first evaluation during training, as an early-stopping plugin would
    @hookimpl
    def qlora_on_evaluate(self, run, metrics):
        run.control.should_stop = run.step > 0
"""


def test_a_callback_stops_the_run_after_a_step_which_then_ends_as_a_finished_run(tiny_config, tmp_path,
                                                                                  monkeypatch):
    mod = plugin_module(tmp_path, monkeypatch, CONTROL)
    _, result = run_job(with_eval(tiny_config), tmp_path, [f"{mod}:StopAt2"], max_steps=5)
    out = result.output_dir
    assert result.steps == 2 and result.summary["stopped_at_step"] == 2
    assert [m["step"] for m in result.metrics if "loss" in m] == [1, 2]
    assert result.metrics[-1]["step"] == 2 and "eval_loss" in result.metrics[-1]  # the evaluation after training
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "step-0000002").is_dir()  # resumable from where it stopped


def test_a_callback_asks_for_a_checkpoint_and_an_evaluation_now(tiny_config, tmp_path, monkeypatch):
    mod = plugin_module(tmp_path, monkeypatch, CONTROL)
    _, result = run_job(with_eval(tiny_config), tmp_path, [f"{mod}:SaveAt1EvaluateAt2"], max_steps=3,
                        save_strategy="no")
    checkpoints = sorted(p.name for p in (result.output_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-0000001", "step-0000003"]  # the one asked for, and the end (always written)
    assert [m["step"] for m in result.metrics if "eval_loss" in m] == [0, 2, 3]


def test_an_evaluation_callback_stops_the_run_early(tiny_config, tmp_path, monkeypatch):
    mod = plugin_module(tmp_path, monkeypatch, CONTROL)
    _, result = run_job(with_eval(tiny_config), tmp_path, [f"{mod}:StopOnEvaluate"], max_steps=6,
                        eval_steps=2)
    assert result.summary["stopped_at_step"] == 2 and result.steps == 2
    assert [m["step"] for m in result.metrics if "eval_loss" in m] == [0, 2, 2]  # before, at step 2, after


def test_train_control_starts_with_nothing_asked():
    assert TrainControl() == TrainControl(should_stop=False, should_save=False, should_evaluate=False)


def test_model_loaded_hook_is_told_whether_the_model_will_train(tiny_config, tmp_path, monkeypatch):
    mod = plugin_module(tmp_path, monkeypatch, """
        from qlora_core import hookimpl

        SEEN = []

        @hookimpl
        def qlora_model_loaded(model, config, for_training):
            SEEN.append(for_training)
        """)
    job = Job(tiny_config, plugins=[mod])
    job.load_model()
    job.load_base_model(for_training=False)
    assert sys.modules[mod].SEEN == [True, False]


def test_a_plugin_adds_a_qlora_command(tmp_path, monkeypatch, capsys):
    """An installed distribution's entry point adds ``qlora hello`` (the command line asks every installed
    plugin, as llm does)."""
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "qlora_hello.py").write_text(textwrap.dedent("""
        from qlora_core import UsageError, hookimpl

        def add_arguments(parser):
            parser.add_argument("--name", required=True)

        def main(args):
            if args.name == "nobody":
                raise UsageError("--name nobody: give a name")
            print(f"hello {args.name}")
            return 0

        @hookimpl
        def qlora_register_commands(register):
            register("hello", "say hello", add_arguments, main)
        """))
    dist = pkg / "qlora_hello-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qlora-hello\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[qlora]\nhello = qlora_hello\n")
    monkeypatch.syspath_prepend(str(pkg))
    assert cli.main(["hello", "--name", "world"]) == 0
    assert capsys.readouterr().out == "hello world\n"
    assert cli.main(["hello", "--name", "nobody"]) == 2
    assert capsys.readouterr().err == "error: --name nobody: give a name\n"


def test_the_default_loss_equals_the_loss_by_hand(tiny_config, tmp_path):
    """With the default plugins (the fused-loss plugin answers) the loss is the full logits' cross-entropy, which a
    loss plugin computes from the public ``model_inputs`` and ``IGNORE_INDEX`` (``loss_by_hand``)."""
    job = Job(tiny_config)
    job.load_data()
    model = job.load_model()
    batch = job._collate(job.train_examples[:2])
    ours, n = job._loss(model, batch)
    theirs, expected_n = loss_by_hand(model, batch)
    assert n == expected_n and float(ours) == pytest.approx(float(theirs), rel=1e-5)


MODES = """
from qlora_core import hookimpl

class Modes:
    def __init__(self):
        self.events = []

    @hookimpl
    def qlora_on_mode(self, run, mode):
        self.events.append((mode, run.step, run.optimizer is not None, run.model.training))

    @hookimpl
    def qlora_on_step_begin(self, run, step):
        self.events.append(("step", step))

    @hookimpl
    def qlora_on_evaluate(self, run, metrics):
        self.events.append(("evaluate", metrics["step"]))

    @hookimpl
    def qlora_on_save(self, run, path):
        self.events.append(("save", path.name))
"""


def test_on_mode_switches_to_eval_for_evaluations_checkpoints_and_exports_and_back(tiny_config, tmp_path,
                                                                                     monkeypatch):
    mod = plugin_module(tmp_path, monkeypatch, MODES)
    job, _ = run_job(with_eval(tiny_config), tmp_path, [f"{mod}:Modes"], max_steps=4, eval_steps=2,
                     save_strategy="steps", save_steps=2)
    events = [e[:2] for e in plugin_of(job, f"{mod}:Modes").events]
    assert events == [
        ("eval", 0), ("evaluate", 0),
        ("train", 0), ("step", 1), ("step", 2),
        ("eval", 2), ("evaluate", 2), ("save", "step-0000002"),  # one switch for the evaluation and the save
        ("train", 2), ("step", 3), ("step", 4),
        ("eval", 4), ("save", "step-0000004"), ("evaluate", 4), ("save", "adapter"),  # the end's checkpoint
    ]
    modes = [e for e in plugin_of(job, f"{mod}:Modes").events if e[0] in ("train", "eval")]
    assert all(has_optimizer for _, _, has_optimizer, _ in modes)


def test_a_resumed_run_is_switched_to_train_before_its_first_step(tiny_config, tmp_path, monkeypatch):
    mod = plugin_module(tmp_path, monkeypatch, MODES)
    job, first = run_job(tiny_config, tmp_path, [f"{mod}:Modes"], max_steps=4, save_strategy="steps",
                         save_steps=2)
    assert sorted(p.name for p in (first.output_dir / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    shutil.rmtree(first.output_dir / "checkpoints" / "step-0000004")  # resume from step 2
    resumed = Job(resume=first.output_dir, overrides=["train.max_steps=4"])
    # The resumed run reloads its plugins from plugins.json: find the recorder there.
    resumed.run()
    events = [e[:2] for e in plugin_of(resumed, f"{mod}:Modes").events]
    assert events[:2] == [("train", 2), ("step", 3)]
    assert events[-3:] == [("eval", 4), ("save", "step-0000004"), ("save", "adapter")]
