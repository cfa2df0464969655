"""FSDP: train a model too big for one GPU across several, its 4-bit base weights sharded like any others.

The QLoRA guide's Workflows 2 and 3, on PyTorch's FullyShardedDataParallel (``torch.distributed.fsdp``):

    qlora run config.yaml --plugin fsdp --nproc-per-node 8            # one host: qlora starts torchrun
    torchrun --nnodes 2 --nproc-per-node 8 ... -m qlora_core run config.yaml --plugin fsdp   # several hosts

What it does, and why:

- ``quant.bnb_4bit_quant_storage`` becomes the compute dtype (the guide's "CRITICAL for FSDP"): FSDP flattens
  each layer's parameters into one tensor of one dtype, and packed 4-bit weights stored as bfloat16 flatten
  with the bfloat16 norms. An explicit contradicting setting is an error.
- ``quant.fp32_upcast`` becomes false: PEFT's k-bit preparation upcasts the norms to float32, which FSDP
  cannot flatten with the bfloat16 weights ("Must flatten tensors with uniform dtype"); the lean preparation
  keeps every dtype.
- Each decoder layer (its class found in the model, or ``fsdp.wrap_class``) is one FSDP unit; the embeddings,
  final norm and head form the root unit. The frozen base weights are sharded: each process holds 1/N of them.
- The LoRA adapters are left out of the sharding (FSDP's ``ignored_states``): they are a fraction of a percent
  of the model, each process keeps them whole, in float32, and their gradients are averaged across processes
  (one all-reduce, in :func:`qlora_core.hookspecs.qlora_on_after_backward`) once each step's backward passes
  are done, as DDP does at the last micro-batch. So the optimizer, gradient clipping,
  checkpoints and the exported adapter work on whole tensors, the same on 1 or N processes, and a checkpoint
  resumes on any number of processes.

Each process must compute on its own GPU before the 4-bit load (the guide's recipe quantizes every rank onto
cuda:0): the core loads onto ``PartialState().device``, which follows ``LOCAL_RANK``.

FSDP version 1 (``FullyShardedDataParallel``), not FSDP2's ``fully_shard``: FSDP2 turns bitsandbytes'
``Params4bit`` into plain DTensors and loses their quantization metadata, a known source of silent errors
(bitsandbytes issue 1945, accelerate issue 3983); FSDP1 with a float quant storage is the documented path.
Accelerate's own FSDP plugin is not used because accelerate applies FSDP only to several GPUs, never on CPUs
(gloo), where the tests run the same code.
"""

from __future__ import annotations

from typing import Any

from qlora_core import hookimpl
from qlora_core import Option
from qlora_core import UsageError

STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")


def wanted_quant_storage(config, device: str) -> str:
    """The packed 4-bit weights' storage dtype FSDP needs: the compute dtype, the dtype of the layers' other
    parameters."""
    from qlora_core import compute_dtype_for

    return str(compute_dtype_for(config, device)).replace("torch.", "")


def decoder_layer_class(model, name: str | None = None) -> type:
    """The class of the model's decoder layers: the members of its ModuleList of ``num_hidden_layers`` modules,
    or the module class called ``name``."""
    import torch

    if name:
        for module in model.modules():
            if type(module).__name__ == name:
                return type(module)
        found = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__})
        raise UsageError(f"fsdp.wrap_class: the model has no module of class {name!r} "
                         f"(layer classes in it: {', '.join(found) or 'none'})")
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and count and len(module) == count:
            return type(module[0])
    raise UsageError(f"fsdp: cannot find the model's decoder layers (a list of num_hidden_layers={count} "
                     f"modules); name their class with fsdp.wrap_class")


def adapter_modules(model) -> list:
    """The modules holding trainable parameters of their own (the LoRA A and B layers)."""
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def wrap_kwargs(model, config, device) -> dict[str, Any]:
    """The keyword arguments of ``FullyShardedDataParallel`` for a PEFT model: the wrapping plan."""
    import functools

    import torch
    from torch.distributed.fsdp import CPUOffload, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    layer = decoder_layer_class(model, config["fsdp.wrap_class"])
    return {
        "auto_wrap_policy": functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer}),
        "ignored_states": adapter_modules(model),
        "sharding_strategy": getattr(ShardingStrategy, config["fsdp.sharding_strategy"]),
        "cpu_offload": CPUOffload(offload_params=config["fsdp.cpu_offload"]),
        "device_id": torch.device(device),
        "use_orig_params": False,
        "limit_all_gathers": True,
    }


def adapter_grad_averager(world: int, params: list):
    """Average the adapters' gradients across processes after a step's backward passes: one all-reduce per
    dtype, of the gradients flattened together. One collective a step instead of one per adapter tensor (448
    for Llama-3-8B at r=16 on all linear layers), each of which the compute stream would wait for; and none in
    the micro-batches that accumulate."""
    import torch
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    def average_all() -> None:
        by_dtype: dict = {}
        for p in params:
            if p.grad is None:  # every process flattens the same tensors
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            whole = _one_buffer(grads)
            if whole is not None:  # train.flat_params: the gradients already fill one buffer, reduced in place
                dist.all_reduce(whole, op=dist.ReduceOp.SUM)
                whole.div_(world)
                continue
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world)
            for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(synced)

    return average_all


def _one_buffer(grads: list):
    """The buffer ``grads`` exactly tile (views of one tensor, together as large as it: what
    the ``flat-params`` plugin's ``FlatParams`` makes), else None."""
    base = grads[0]._base
    if base is None or not base.is_contiguous() or any(g._base is not base for g in grads):
        return None
    if sum(g.numel() for g in grads) != base.numel() or len({g.data_ptr() for g in grads}) != len(grads):
        return None
    return base


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FSDP:
    """The ``fsdp`` plugin. Its per-run state: the averaging of the adapters' gradients across the processes,
    made when the model is wrapped and run once each step's gradients are complete (the adapters are not
    sharded, so FSDP does not synchronise their gradients itself)."""

    def __init__(self) -> None:
        self.average_adapter_grads: Any = None

    @hookimpl
    def qlora_config_options(self):
        return [
            Option("fsdp.sharding_strategy", "str", "FULL_SHARD",
                   "fsdp: FULL_SHARD (weights sharded, gathered per layer), SHARD_GRAD_OP (kept whole between forward "
                   "and backward), HYBRID_SHARD (FULL_SHARD within a host, replicated across hosts), NO_SHARD",
                   choices=STRATEGIES),
            Option("fsdp.cpu_offload", "bool", False,
                   "fsdp: keep each process's shard of the base weights in CPU memory between uses"),
            Option("fsdp.wrap_class", "str", None,
                   "fsdp: class name of the decoder layer each FSDP unit wraps (default: found in the model)",
                   nullable=True),
        ]

    @hookimpl
    def qlora_configure(self, config, device) -> None:
        if "cpu-offload" in config.plugins:
            raise UsageError("--plugin fsdp and --plugin cpu-offload do not combine; for less GPU memory under FSDP "
                             "set fsdp.cpu_offload=true")
        if config["lora.bias"] != "none":
            raise UsageError(f"fsdp: lora.bias={config['lora.bias']} trains biases inside the sharded base layers; "
                             f"set lora.bias=none")
        if config["quant.load_in_4bit"]:
            storage = wanted_quant_storage(config, device)
            key = "quant.bnb_4bit_quant_storage"
            if config.is_explicit(key) and config[key] != storage:
                raise UsageError(f"fsdp: {key}={config[key]} contradicts FSDP, which needs the 4-bit weights stored "
                                 f"in the compute dtype ({storage}); drop the setting or set {key}={storage}")
            config.set(key, storage)
        if config.is_explicit("quant.fp32_upcast") and config["quant.fp32_upcast"]:
            raise UsageError("fsdp: quant.fp32_upcast=true upcasts the norms to float32, which FSDP cannot flatten "
                             "with the other weights; drop the setting")
        config.set("quant.fp32_upcast", False)
        # compiling layers inside FSDP units is not measured yet: off by default (the key's plugin may be off)
        if config.get("train.compile") == "auto":
            config.set("train.compile", False)

    @hookimpl
    def qlora_distribute_model(self, model, accelerator, config):
        import torch
        import torch.distributed as dist
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not dist.is_initialized():
            # One process started without a launcher: a group of one, so FSDP runs (and is measured) the same way.
            import os

            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            dist.init_process_group("nccl" if accelerator.device.type == "cuda" else "gloo", rank=0, world_size=1)
        device = accelerator.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.type == "cpu":
            device = torch.device("cpu")  # FSDP compares it with the parameters' device, which has no index
        kwargs = wrap_kwargs(model, config, device)
        adapters = [p for m in kwargs["ignored_states"] for p in m.parameters(recurse=False) if p.requires_grad]
        wrapped = FullyShardedDataParallel(model, **kwargs)
        world = dist.get_world_size()
        self.average_adapter_grads = None
        if world > 1:
            for param in adapters:  # the same start on every process (they are seeded alike; made certain)
                dist.broadcast(param.data, src=0)
            self.average_adapter_grads = adapter_grad_averager(world, adapters)
        return wrapped

    @hookimpl
    def qlora_plan_settings(self, settings, config) -> None:
        # What qlora_configure and qlora_distribute_model do to the run's memory: the base weights sharded and
        # stored in the compute dtype, no fp32 upcast, the adapters (with their gradients and optimizer states)
        # whole on every process.
        settings.shards_weights = True
        settings.upcast = False
        settings.shard_adapters = False

    @hookimpl(tryfirst=True)
    def qlora_on_after_backward(self, run, model, optimizer) -> None:
        # First, so that the other plugins (flat-params' collect, a callback changing gradients) see averaged ones.
        if self.average_adapter_grads is not None:
            self.average_adapter_grads()
