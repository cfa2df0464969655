"""A local safetensors checkpoint loaded into 4 bits one tensor at a time, each linear weight quantized on one
device (a GPU, where bitsandbytes quantizes fast) and kept on another (the CPU, for a model that lives in CPU
memory: process 0 of a low-memory FSDP load, or ``fsdp.cpu_offload``).

Transformers' loader quantizes where it puts the weights: asked for a model in CPU memory it quantizes on the
CPU, about 26 million parameters a second on 2 cores with bitsandbytes 0.50 (an hour for a 70B model). Here
each tensor is read from its shard into its own memory (:class:`ShardReader`: no mapped pages of the checkpoint
stay resident), converted to the compute dtype on the quantizing device,
quantized there and its packed bytes moved to the keeping device; the quantization states stay where they were
made. At most one tensor is unquantized at a time, and the CPU holds the one 4-bit copy.

Used by the ``nf4`` plugin when the loader's kwargs carry ``quantize_device``. It handles checkpoints whose
tensor names are the model's own parameter names (what ``save_pretrained`` writes for the architectures in
transformers); any other (renamed keys, ``.bin`` files, a hub id) returns ``None`` and transformers loads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("qlora.nf4")


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a local checkpoint folder (its index's shards, or ``model.safetensors``), or an
    empty list."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


# safetensors' dtype names (its format's header) and torch's
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class ShardReader:
    """One safetensors file's tensors, each read into its own memory with a plain file read.

    ``safetensors.safe_open`` maps the file: every tensor read stays resident as mapped pages of the file until
    the file is closed, so a process reading a whole shard shows the shard's size in its resident memory. Read
    here instead, a tensor's bytes are the only memory it takes, and they go when the tensor does (the file's
    pages sit in the page cache, outside any process). The header is the format's own: an 8-byte little-endian
    length, then JSON naming each tensor's dtype, shape and byte range after the header."""

    def __init__(self, path: Path) -> None:
        import struct

        self.file = open(path, "rb")
        (size,) = struct.unpack("<Q", self.file.read(8))
        self.header = json.loads(self.file.read(size))
        self.header.pop("__metadata__", None)
        self.start = 8 + size

    def keys(self) -> list[str]:
        return list(self.header)

    def get_tensor(self, key: str):
        import torch

        entry = self.header[key]
        begin, end = entry["data_offsets"]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{key}: safetensors dtype {entry['dtype']} is not read here")
        buffer = bytearray(end - begin)
        self.file.seek(self.start + begin)
        self.file.readinto(buffer)
        if not buffer:
            return torch.empty(entry["shape"], dtype=getattr(torch, dtype))
        return torch.frombuffer(buffer, dtype=getattr(torch, dtype)).reshape(entry["shape"])

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def _skipped(name: str, skips: set[str]) -> bool:
    # transformers 5's rule for llm_int8_skip_modules: the name itself, a prefix up to a dot, or a suffix
    return any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skips)


def meta_model(name_or_path: str, kwargs: dict[str, Any]):
    """The model of ``name_or_path``'s ``config.json`` with its parameters on the meta device (no memory), in
    the load's dtype; buffers (rotary frequencies) are made as usual."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = kwargs.get("trust_remote_code", False)
    config = AutoConfig.from_pretrained(name_or_path, revision=kwargs.get("revision"), trust_remote_code=trust)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=kwargs["dtype"], trust_remote_code=trust)
    model.tie_weights()  # as from_pretrained does: a tied head is the embeddings' tensor, not a second one
    model.eval()  # as from_pretrained leaves it
    return model


def load_streamed(name_or_path: str, kwargs: dict[str, Any], skips: set[str] | None,
                  default_skips: Callable[[Any], set[str]]):
    """The model of the checkpoint folder ``name_or_path``, its linear layers (less ``skips``, the modules kept
    out of 4 bits, else ``default_skips`` of the meta model) quantized as ``kwargs["quantization_config"]`` asks
    on ``kwargs["quantize_device"]`` and kept, with every other weight, on ``kwargs["device_map"][""]``; or
    ``None`` when the folder is not a safetensors checkpoint named as the model's parameters."""
    import bitsandbytes as bnb
    import torch

    folder = Path(name_or_path)
    files = checkpoint_files(folder) if folder.is_dir() else []
    if not files:
        return None
    quant = kwargs["quantization_config"]
    dtype = kwargs["dtype"]
    work = torch.device(kwargs["quantize_device"])
    keep = torch.device((kwargs.get("device_map") or {}).get("", "cpu"))
    model = meta_model(name_or_path, kwargs)
    skips = default_skips(model) if skips is None else skips
    params = dict(model.named_parameters())  # tied weights once, under their first name
    by_file: dict[Path, list[str]] = {}
    for f in files:
        with ShardReader(f) as st:
            by_file[f] = st.keys()
    names = {key for keys in by_file.values() for key in keys}
    extra = sorted(k for k in names if k not in params)
    missing = sorted(k for k in params if k not in names)
    if extra or missing:
        log.info("nf4: the checkpoint's tensor names are not the model's (%s); transformers loads it, quantizing "
                 "where it puts the weights", (extra or missing)[0])
        return None
    storage = quant.bnb_4bit_quant_storage
    compute = quant.bnb_4bit_compute_dtype or dtype
    head = model.get_output_embeddings()
    fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    quantized: dict[str, Any] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and module is not head and not _skipped(name, skips):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute, compress_statistics=quant.bnb_4bit_use_double_quant,
                                  quant_type=quant.bnb_4bit_quant_type, quant_storage=storage, device="meta")
            setattr(parent, child, q)
            quantized[f"{name}.weight"] = q
    for f, keys in by_file.items():
        with ShardReader(f) as st:
            for key in keys:
                owner_name, _, pname = key.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                q = quantized.get(key)
                if q is not None:
                    w = st.get_tensor(key).to(work, dtype=dtype)  # as transformers: the load dtype, then 4 bits
                    p = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=quant.bnb_4bit_use_double_quant,
                                          quant_type=quant.bnb_4bit_quant_type, quant_storage=storage,
                                          module=q).to(work)  # .to() quantizes
                    del w
                    if p.device != keep:
                        p.data = p.data.to(keep)  # the packed bytes alone: the state stays where it was made
                    q.weight = p
                else:
                    value = st.get_tensor(key)
                    if value.is_floating_point():
                        value = value.to(torch.float32 if any(m in key for m in fp32) else dtype)
                    owner._parameters[pname] = torch.nn.Parameter(value.to(keep),
                                                                  requires_grad=params[key].requires_grad)
    for module in model.modules():
        for bname, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[bname] = b.to(keep)
    model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"nf4: parameters left on the meta device after the checkpoint: {leftover[:5]}")
    model.is_loaded_in_4bit = True  # what transformers' bitsandbytes quantizer sets after loading
    model.config.quantization_config = quant
    model.eval()
    return model
