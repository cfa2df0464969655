"""With every speed plugin turned off, the core loop trains with plain PyTorch + PEFT: no patched forward, no
custom op, the optimizer on the model's own parameters, the loss from the model's logits."""

from __future__ import annotations

import sys
import textwrap

import torch

from qlora_core import Job

from conftest import loss_by_hand

SPEED_PLUGINS = ("gradient-checkpointing", "fused-lora", "compile-layers", "liger-kernels", "fused-loss",
                 "varlen-packing", "flat-params")

WATCH = """
from qlora_core import hookimpl

class Watch:
    def __init__(self):
        self.optimizer_params = None

    @hookimpl
    def qlora_on_after_backward(self, run, model, optimizer):
        self.optimizer_params = [p for group in optimizer.param_groups for p in group["params"]]
"""


def _is_own_forward(module) -> bool:
    """The module's forward is its class's, not one a plugin installed on the instance."""
    return "forward" not in vars(module)


def test_the_core_alone_trains_with_plain_pytorch_and_peft(tiny_config, tmp_path, monkeypatch):
    (tmp_path / "watch_plugin.py").write_text(textwrap.dedent(WATCH))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("watch_plugin", None)
    cfg = dict(tiny_config, train={**tiny_config["train"], "max_steps": 6})
    job = Job(cfg, plugins=["adamw", "no:rich-progress", "watch_plugin:Watch",
                            *(f"no:{name}" for name in SPEED_PLUGINS)], output_dir=tmp_path / "run")
    assert not set(SPEED_PLUGINS) & set(job.plugins.names())
    result = job.run()
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]

    model = job.model
    assert all(_is_own_forward(m) for m in model.modules()), "a module's forward was replaced"
    trainable = [p for p in model.parameters() if p.requires_grad]
    watched = next(i.plugin for i in job.plugins.infos if i.name == "watch_plugin:Watch").optimizer_params
    assert {id(p) for p in watched} == {id(p) for p in trainable}  # no flat buffers: the adapters themselves

    job.load_data()
    batch = job._collate(job.train_examples[:2])
    loss, n = job._loss(model, batch)
    expected, expected_n = loss_by_hand(model, batch)
    assert n == expected_n and torch.allclose(loss, expected)
