"""A plugin for the tests (``--plugin PATH/schedulefree_probe.py``): records, into ``RUN_DIR/probe.jsonl``, whether
the schedule-free optimizer is in train mode at each hook of the run, and into ``RUN_DIR/probe-weights.pt`` the
adapters' values after the last step (y, still in train mode) with the x that schedule-free's definition gives
for them, ``x = (y - (1 - beta1) * z) / beta1``, where the optimizer holds each adapter's own ``z``."""

import json

import torch

from qlora_core import hookimpl


def _optimizer(run):
    return getattr(run.optimizer, "optimizer", run.optimizer)


def _record(run, hook, **fields):
    row = {"hook": hook, "step": run.step, "train_mode": _optimizer(run).param_groups[0]["train_mode"], **fields}
    with open(run.output_dir / "probe.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


@hookimpl
def qlora_on_mode(run, mode):
    with open(run.output_dir / "probe.jsonl", "a") as f:
        f.write(json.dumps({"hook": "qlora_on_mode", "step": run.step, "mode": mode}) + "\n")


@hookimpl
def qlora_on_step_begin(run, step):
    _record(run, "qlora_on_step_begin")


@hookimpl
def qlora_on_after_backward(run):
    _record(run, "qlora_on_after_backward")


@hookimpl
def qlora_on_step_end(run, metrics):
    _record(run, "qlora_on_step_end")
    if run.step != run.max_steps:
        return
    optimizer = _optimizer(run)
    beta1 = optimizer.param_groups[0]["betas"][0]
    y, x = {}, {}
    for name, p in run.model.named_parameters():
        if p.requires_grad:
            y[name] = p.detach().clone()
            if p in optimizer.state:  # each adapter is its own optimizer parameter (train.flat_params: false)
                x[name] = (y[name] - (1 - beta1) * optimizer.state[p]["z"]) / beta1
    torch.save({"y": y, "x": x}, run.output_dir / "probe-weights.pt")


@hookimpl
def qlora_on_evaluate(run, metrics):
    _record(run, "qlora_on_evaluate")


@hookimpl
def qlora_on_sample(run, stage):
    _record(run, "qlora_on_sample", stage=stage)


@hookimpl
def qlora_on_save(run, path):
    _record(run, "qlora_on_save", path=path.name)


@hookimpl
def qlora_export(run, output_dir):
    _record(run, "qlora_export")
    return None
