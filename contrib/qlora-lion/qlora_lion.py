"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") as a qlora optimizer, from
lucidrains' ``lion-pytorch``: ``--plugin lion`` or ``train.optim: lion``.

Lion steps every weight by the same amount, the sign of an interpolation of the gradient and its momentum, so
its updates are larger than AdamW's at the same learning rate: the paper uses a learning rate 3-10x smaller than
AdamW's and a weight decay 3-10x larger, keeping their product (Lion decays by ``lr * weight_decay``, as AdamW).
Here the learning rate is ``train.learning_rate * lion.lr_scale`` (0.3 by default), and the weight decay
``lion.weight_decay``, by default ``train.weight_decay / lion.lr_scale`` (the same decay per step as AdamW's).
"""

from __future__ import annotations

from qlora_core import ConfigError, Option, hookimpl

PLUGIN = "lion"


def _at_most_one(value: float) -> str | None:
    return None if value <= 1 else f"must be <= 1 (got {value!r})"


def lion_settings(config) -> dict:
    """The Lion optimizer's arguments from the config: ``lr``, ``betas``, ``weight_decay``."""
    scale = config["lion.lr_scale"]
    weight_decay = config["lion.weight_decay"]
    if weight_decay is None:
        weight_decay = config["train.weight_decay"] / scale
    return {"lr": config["train.learning_rate"] * scale,
            "betas": (config["lion.beta1"], config["lion.beta2"]),
            "weight_decay": weight_decay}


@hookimpl
def qlora_config_options():
    return [
        Option("lion.lr_scale", "float", 0.3,
               "Lion's learning rate is train.learning_rate times this (Lion wants 3-10x less than AdamW)",
               exclusive_minimum=0.0, check=_at_most_one),
        Option("lion.beta1", "float", 0.9, "interpolation of momentum and gradient whose sign is the update",
               minimum=0.0, check=_at_most_one),
        Option("lion.beta2", "float", 0.99, "decay of the momentum", minimum=0.0, check=_at_most_one),
        Option("lion.weight_decay", "float", None,
               "decoupled weight decay, applied as lr * weight_decay (null: train.weight_decay / lion.lr_scale)",
               minimum=0.0, nullable=True),
    ]


@hookimpl
def qlora_configure(config, device):
    if config["train.learning_rate"] <= 0:
        raise ConfigError([f"train.learning_rate: Lion needs a learning rate > 0 "
                           f"(got {config['train.learning_rate']!r})"])
    # The weight decay taken from train.weight_decay is written into the run's config.yaml as the value used.
    if config["lion.weight_decay"] is None:
        config.set("lion.weight_decay", lion_settings(config)["weight_decay"])


@hookimpl
def qlora_optimizer(params, config):
    from lion_pytorch import Lion

    return Lion(params, **lion_settings(config))


@hookimpl
def qlora_plan_settings(settings, config):
    # One float32 momentum per trainable parameter (AdamW keeps two).
    settings.optimizer = PLUGIN
    settings.optimizer_bytes = 4
