"""The ``random-weights`` plugin: a base model built from config.json alone, straight into 4 bits, the same on
every build; a run trains on it, and its adapter applies to a rebuilt base for generation."""

from __future__ import annotations

import shutil

import pytest
import torch

from qlora_core import cli
from qlora_core import Job


@pytest.fixture
def config_only_dir(tiny_model_dir, tmp_path):
    """The tiny Llama's folder without its weights: config.json and the tokenizer only."""
    folder = tmp_path / "shape"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(folder.glob("*.safetensors"))
    return folder


def test_a_run_trains_on_random_weights_built_into_4_bits(tiny_config, config_only_dir, tmp_path):
    cfg = dict(tiny_config, model={"name_or_path": str(config_only_dir)})
    job = Job(cfg, plugins=["random-weights"], output_dir=tmp_path / "run")
    base = job.load_base_model(for_training=False)
    assert type(base.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"  # the nf4 plugin's quantization
    again = Job(cfg, plugins=["random-weights"]).load_base_model(for_training=False)
    for (name, a), (_, b) in zip(base.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name  # seed 0: every build (every process) the same model
    result = Job(cfg, plugins=["random-weights"], output_dir=tmp_path / "run").run()
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert len(losses) == 3 and losses[-1] < losses[0]
    # The adapter onto a rebuilt base (the run's plugins come back with it): generation works.
    rebuilt = Job.from_run(tmp_path / "run")
    assert "random-weights" in rebuilt.config.plugins
    model = rebuilt.load_model()
    assert model is not None


def test_the_weights_seed_is_a_setting(tiny_config, config_only_dir):
    cfg = dict(tiny_config, model={"name_or_path": str(config_only_dir)})
    default = Job(cfg, plugins=["random-weights"]).load_base_model(for_training=False)
    other = Job(cfg, plugins=["random-weights"], overrides=["random_weights.seed=1"]).load_base_model(
        for_training=False)
    embedding = default.get_input_embeddings().weight
    assert embedding.shape == other.get_input_embeddings().weight.shape
    assert not torch.equal(embedding, other.get_input_embeddings().weight)


def test_random_weights_without_a_config_json_is_one_clear_error(tiny_config, config_only_dir, tmp_path, capsys):
    empty = config_only_dir
    (empty / "config.json").unlink()  # a tokenizer, no architecture
    config = tmp_path / "run.yaml"
    import yaml

    cfg = dict(tiny_config, model={"name_or_path": str(empty)})
    config.write_text(yaml.safe_dump(cfg))
    code = cli.main(["run", str(config), "--plugin", "random-weights", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error:") and "config.json" in err
    assert not (tmp_path / "out" / "adapter").exists()
