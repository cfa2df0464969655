"""Real architectures' shapes: their ``config.json`` contents, by name, and a model folder holding one.

``qlora bench`` and the GPU benchmarks need an 8B or 70B model without its checkpoint (a 70B bf16 checkpoint is
140 GB: it fits neither the disk nor the time of a benchmark run). Speed and memory depend on the shape, not on
the weight values: the ``random-weights`` plugin builds the model of such a folder with random weights,
straight into 4 bits on the device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_core.framework.errors import UsageError

_LLAMA3 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "head_dim": 128, "vocab_size": 128256,
    "rope_theta": 500000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "bos_token_id": 128000, "eos_token_id": 128001, "attention_bias": False, "mlp_bias": False,
    "initializer_range": 0.02,
}

#: Named shapes, as ``config.json`` contents (the weights are random; the shape is what counts).
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama3-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "rope_theta": 100000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
    },
}


def shape_config(shape: str) -> dict[str, Any]:
    """The ``config.json`` contents of a named shape, or of a ``config.json`` file or model folder."""
    if shape in SHAPES:
        return dict(SHAPES[shape])
    path = Path(shape)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise UsageError(f"{path} is not valid JSON: {e}") from None
    raise UsageError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)} or a config.json path")


def parameter_count(config: dict[str, Any]) -> int:
    """About how many parameters a decoder of this ``config.json`` has: its attention and MLP projections, and
    the embeddings (twice when the output head is not tied to them)."""
    h = int(config.get("hidden_size", 0))
    layers = int(config.get("num_hidden_layers", 0))
    heads = int(config.get("num_attention_heads", 1) or 1)
    head_dim = int(config.get("head_dim") or (h // heads if heads else 0))
    kv = int(config.get("num_key_value_heads", heads) or heads) * head_dim
    inter = int(config.get("intermediate_size", 4 * h))
    per_layer = 2 * h * heads * head_dim + 2 * h * kv + 3 * h * inter
    embed = int(config.get("vocab_size", 0)) * h
    return layers * per_layer + embed * (1 if config.get("tie_word_embeddings") else 2)


def write_config_folder(config: dict[str, Any], folder: Path) -> Path:
    """A model folder with only ``config.json`` (enough for ``qlora plan`` and the ``random-weights`` plugin)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
