"""The loss, packing and optimizer levers are plugins (``fused-loss``, ``varlen-packing``, ``flat-params``): with
them turned off a run trains on plain PyTorch and PEFT (the loss from the model's logits, packed rows, the
adapters stepped one tensor at a time), and their options are unknown keys."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from qlora_core import IGNORE_INDEX, ConfigError, Job, model_inputs

OFF = ["no:fused-loss", "no:varlen-packing", "no:flat-params"]


def test_the_tiny_model_trains_on_the_core_s_own_loss_with_the_speed_plugins_off(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(max_steps=12, learning_rate=5e-3, per_device_train_batch_size=16, warmup_steps=0,
                        lr_scheduler_type="constant", packing=True)
    job = Job(cfg, plugins=["adamw", "no:rich-progress", *OFF], output_dir=tmp_path / "run")
    assert not {"fused-loss", "varlen-packing", "flat-params"} & set(job.plugins.names())
    job.load_data()
    model = job.load_model()
    # The first step's examples (all 16 rows), as the run batches them: packed into rows by the core.
    batch = job._collate(job._step_examples(0, 16, 0, 1))
    assert "cu_seq_lens" not in batch and batch["input_ids"].shape[0] > 1
    assert job.hook.qlora_compute_loss(model=model, batch=batch, config=job.config) is None  # no plugin's loss
    model.train()
    with torch.no_grad():
        ours, n = job._loss(model, batch)
        logits = model(**model_inputs(batch)).logits
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    by_hand = F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="sum")
    assert n == int(keep.sum()) and float(ours) == pytest.approx(float(by_hand), rel=1e-6)

    result = job.run()
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert losses[0] == pytest.approx(float(by_hand) / n, rel=1e-5)  # the step trained on that loss
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0], losses
    assert "packed_filler_waste" in result.summary["padding_waste"]
    # The optimizer stepped the adapters as PEFT made them: each its own tensor, not a view into a shared buffer.
    trainable = [p for p in job.model.parameters() if p.requires_grad]
    assert trainable and all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in trainable)
    assert (result.output_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("plugin, setting", [("fused-loss", "train.fused_cross_entropy=false"),
                                             ("varlen-packing", "train.packing_attention=rows"),
                                             ("flat-params", "train.flat_params=false"),
                                             ("flat-params", "train.adapter_compute_copy=false")])
def test_an_option_of_a_plugin_that_is_off_is_an_unknown_key(tiny_config, plugin, setting):
    Job(tiny_config, overrides=[setting])  # known while the plugin takes part (a default)
    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}: unknown key"):
        Job(tiny_config, plugins=[f"no:{plugin}"], overrides=[setting])
