"""Real architectures' shapes with random weights, built straight into 4 bits on the device.

``qlora bench`` and the GPU benchmarks need an 8B or 70B model without its checkpoint (a 70B bf16 checkpoint is
140 GB: it fits neither the disk nor the time of a benchmark run). Speed and memory depend on the shape, not on
the weight values, so :func:`build_direct` makes the model of a ``config.json`` on the meta device and replaces
every linear layer but the output head by a bitsandbytes ``Linear4bit`` quantized from random weights drawn on
the device one layer at a time (one layer's bf16 weight is all that is ever unquantized). Embeddings, norms and
the head are drawn in the compute dtype.
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


def write_config_folder(config: dict[str, Any], folder: Path) -> Path:
    """A model folder with only ``config.json`` (enough for ``qlora plan`` and :func:`build_direct`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def build_direct(model_dir: Path | str, device: str, compute_dtype, quant_type: str = "nf4",
                 double_quant: bool = True, seed: int = 0, quant_storage=None, load_in_4bit: bool = True):
    """The model of ``model_dir``'s config with random weights, its linear layers (not the head) in 4 bits.

    Marked ``is_loaded_in_4bit`` as transformers' loader does, so PEFT treats it as the quantized model it is.
    With ``load_in_4bit=False`` every weight is drawn in ``compute_dtype`` (the unquantized reference).
    """
    import bitsandbytes as bnb
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    storage = quant_storage or torch.uint8
    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    head = model.get_output_embeddings()
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and module is not head] if load_in_4bit else []
    for name, module in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                              quant_storage=storage, device="meta")
        w = torch.empty(module.out_features, module.in_features, dtype=compute_dtype, device=device)
        w.normal_(0.0, std, generator=gen)
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type,
                                     quant_storage=storage, module=q).to(device)  # .to() quantizes
        del w
        if module.bias is not None:
            q.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=compute_dtype, device=device),
                                        requires_grad=False)
        setattr(parent, child, q)
    # The parameters still on the meta device: embeddings, norms, head (tied ones once).
    done: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            if id(p) not in done:
                data = torch.empty(p.shape, dtype=p.dtype, device=device)
                if p.dim() == 1:  # norm weights
                    data.fill_(1.0)
                else:
                    data.normal_(0.0, std, generator=gen)
                done[id(p)] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
            setattr(module, pname, done[id(p)])
    for module in model.modules():
        for bname, b in list(module.named_buffers(recurse=False)):
            if b is not None:
                module._buffers[bname] = b.to(device)
    if getattr(config, "tie_word_embeddings", False) and head is not None:
        head.weight = model.get_input_embeddings().weight
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"parameters left on the meta device: {leftover[:5]}")
    if load_in_4bit:
        model.is_loaded_in_4bit = True  # what transformers' bitsandbytes quantizer sets after loading
    model.eval()
    return model
