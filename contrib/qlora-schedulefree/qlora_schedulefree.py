"""Schedule-free AdamW (Facebook Research's ``schedulefree`` package) as a qlora optimizer: ``--plugin schedulefree``
or ``train.optim: schedulefree``.

Schedule-free AdamW needs no decaying learning-rate schedule: it keeps two sets of weights, the point ``y`` at
which gradients are taken and the average ``x`` that is evaluated and saved, and it holds ``y`` in the model's
parameters while training and ``x`` otherwise. The loop's ``qlora_on_mode`` hook switches between them: the
optimizer's ``eval()`` before every evaluation, sample answer, checkpoint and export, ``train()`` before the steps
go on. So evaluations, checkpoints and the exported adapter hold ``x``, and a resumed run goes back to ``y`` from
the checkpoint's ``x`` and optimizer state (which holds ``z``, the base sequence of the average).

The schedule: the loop's learning rate is constant, after a linear warmup of ``schedulefree.warmup_steps`` (null:
``train.warmup_steps``). The warmup is the loop's scheduler's, not the optimizer's own ``warmup_steps`` (left at
0), with the same arithmetic as the library's: step ``k`` (from 0) uses ``lr * min(1, (k + 1) / warmup)``; so the
``learning_rate`` in ``metrics.jsonl`` is the one each step used. ``train.lr_scheduler_type`` is not used.
"""

from __future__ import annotations

from typing import Any

from qlora_core import Option, hookimpl

PLUGIN = "schedulefree"


def _below_one(value: float) -> str | None:
    return None if value < 1 else f"must be < 1 (got {value!r})"


def warmup_factor(warmup_steps: int):
    """The learning-rate factor of step ``k`` (0-based): schedule-free's own linear warmup, then 1."""

    def factor(k: int) -> float:
        return min(1.0, (k + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return factor


def inner_optimizer(optimizer: Any) -> Any:
    """The optimizer itself, under accelerate's wrapper (``AcceleratedOptimizer.optimizer``) if there is one."""
    return getattr(optimizer, "optimizer", optimizer)


class ScheduleFree:
    """The ``schedulefree`` plugin; one instance per run. :attr:`ignored_schedule`: the run's
    ``train.lr_scheduler_type`` when it asked for a decay that schedule-free replaces (told once training
    starts)."""

    def __init__(self) -> None:
        self.ignored_schedule: str | None = None

    @hookimpl
    def qlora_config_options(self):
        return [
            Option("schedulefree.beta1", "float", 0.9,
                   "interpolation between the average x and the base sequence z at which gradients are taken "
                   "(AdamW's momentum)", exclusive_minimum=0.0, check=_below_one),
            Option("schedulefree.beta2", "float", 0.999, "decay of the squared-gradient average", minimum=0.0,
                   check=_below_one),
            Option("schedulefree.eps", "float", 1e-8, "added to the denominator", exclusive_minimum=0.0),
            Option("schedulefree.weight_decay", "float", None,
                   "weight decay, taken at y (null: train.weight_decay)", minimum=0.0, nullable=True),
            Option("schedulefree.warmup_steps", "int", None,
                   "steps of linear warmup to train.learning_rate, then constant (null: train.warmup_steps)",
                   minimum=0, nullable=True),
            Option("schedulefree.r", "float", 0.0, "polynomial weighting of the average by step**r", minimum=0.0),
            Option("schedulefree.weight_lr_power", "float", 2.0,
                   "weighting of the average by max learning rate**power (during warmup)", minimum=0.0),
        ]

    @hookimpl
    def qlora_configure(self, config, device):
        # The defaults taken from train.* are written into the run's config.yaml as the values used.
        if config["schedulefree.weight_decay"] is None:
            config.set("schedulefree.weight_decay", config["train.weight_decay"])
        if config["schedulefree.warmup_steps"] is None:
            config.set("schedulefree.warmup_steps", config["train.warmup_steps"])
        if config["train.lr_scheduler_type"] not in ("constant", "constant_with_warmup"):
            self.ignored_schedule = config["train.lr_scheduler_type"]
        # The flat-params plugin's compute-dtype copy of the adapters (for the fused op on CUDA) is refreshed
        # after each optimizer step only, not when the weights switch between y and x: with it, evaluations and
        # samples would read y. Without it, the fused layers cast the adapters as they are.
        if "train.adapter_compute_copy" in config and config["train.adapter_compute_copy"]:
            config.set("train.adapter_compute_copy", False)

    @hookimpl
    def qlora_optimizer(self, params, config):
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, lr=config["train.learning_rate"],
                                 betas=(config["schedulefree.beta1"], config["schedulefree.beta2"]),
                                 eps=config["schedulefree.eps"], weight_decay=config["schedulefree.weight_decay"],
                                 warmup_steps=0,  # the loop's scheduler warms up (see qlora_lr_scheduler)
                                 r=config["schedulefree.r"], weight_lr_power=config["schedulefree.weight_lr_power"])

    @hookimpl
    def qlora_lr_scheduler(self, optimizer, num_training_steps, config):
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(optimizer, warmup_factor(config["schedulefree.warmup_steps"]))

    @hookimpl
    def qlora_on_mode(self, run, mode):
        from schedulefree import AdamWScheduleFree

        optimizer = inner_optimizer(run.optimizer)
        if not isinstance(optimizer, AdamWScheduleFree):
            return  # another plugin's optimizer (never in a run this plugin is in, as the optimizer is one choice)
        if mode == "train":
            optimizer.train()  # the parameters become y, where the gradients are taken
        else:
            optimizer.eval()  # the parameters become x, the average: what is evaluated, saved and exported

    @hookimpl
    def qlora_on_train_start(self, run):
        if self.ignored_schedule is not None:
            run.notice(f"schedulefree: the learning rate is constant after {run.config['schedulefree.warmup_steps']} "
                       f"warmup steps; train.lr_scheduler_type={self.ignored_schedule} is not used")

    @hookimpl
    def qlora_plan_settings(self, settings, config):
        # z and the squared-gradient average, both float32 (y/x live in the parameters themselves).
        settings.optimizer = PLUGIN
        settings.optimizer_bytes = 8
