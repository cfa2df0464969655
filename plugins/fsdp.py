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

Low-memory loading (``fsdp.low_memory_loading``, on by default): with several processes, no process holds more
than its own shard of the 4-bit weights on its device, and a machine's CPU memory holds one copy of the 4-bit
model, not one per process. Process 0 alone loads the model (a checkpoint or ``random-weights``) into CPU
memory, each weight quantized on its GPU first (the loader's ``quantize_device``: the nf4 plugin streams a
safetensors checkpoint a tensor at a time, random-weights draws on the GPU, so its model is the one-GPU build's);
every other process builds the model on the meta device from its ``config.json`` and receives
process 0's 4-bit structure: each ``Linear4bit``'s packed shape and storage dtype and its bitsandbytes
quantization state (absmax, code, the nested statistics of double quantization), broadcast tensor by tensor,
bit for bit (:func:`share_4bit_structure`). Then the FSDP units are made one at a time, each decoder layer and
then the root (:func:`wrap_filled`): the unit's meta tensors are made empty on the device, process 0's are moved
there, every tensor is broadcast from process 0, and the unit is sharded, so a process holds one unit whole at
most, for a moment. That is what FSDP's ``sync_module_states=True`` with a ``param_init_fn`` does, done here
because FSDP refuses ``sync_module_states`` on the CPU (the tests' gloo runs take the same path as GPUs). The
quantization state is not a parameter, so no FSDP broadcast would carry it: that is why it travels first, on its
own. The path Answer.AI's fsdp_qlora, accelerate's ``cpu_ram_efficient_loading`` and transformers' FSDP loading
take.

Parameter offload (``fsdp.cpu_offload``, GPUs only): FSDP keeps each process's shard of the base weights in
(pinned) CPU memory and copies each unit to the GPU for its forward and backward. The model loads into CPU
memory as above, on any number of processes, so a GPU never holds more than the unit being sharded: one GPU
trains what its memory cannot hold (the Llama-3-70B shape within 24 GB, docs/performance.md). The quantization
states stay on the GPU (they are not parameters, so FSDP does not move them), as do the adapters.

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


#: Attributes transformers' 4-bit loading sets on the model, copied from process 0 onto the meta-built models.
_MODEL_ATTRS = ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized", "quantization_method")


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes: the process group's, else torchrun's environment."""
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _comm_device():
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def share_4bit_structure(model, device) -> None:
    """Make every process's model 4-bit where process 0's is: process 0 describes each bitsandbytes
    ``Linear4bit`` (its name, packed weight shape and storage dtype, quantization type, block size, compute
    dtype, bias) and broadcasts it with the layer's quantization state, packed as bitsandbytes serializes it
    (``QuantState.as_dict(packed=True)``: absmax, code, nested absmax and code, the rest as bytes); the other
    processes put a ``Linear4bit`` whose weight is a meta ``Params4bit`` of that shape in place of their meta
    ``Linear``, its quantization state rebuilt on ``device`` from exactly the bytes process 0 holds. The weights
    themselves come later, through FSDP's ``sync_module_states``."""
    import bitsandbytes as bnb
    import torch
    import torch.distributed as dist
    from bitsandbytes.functional import QuantState

    rank = dist.get_rank()
    comm = _comm_device()
    packed: dict[str, dict] = {}
    spec = None
    if rank == 0:
        layers = []
        for name, module in model.named_modules():
            if not isinstance(module, bnb.nn.Linear4bit):
                continue
            weight = module.weight
            state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
            if state is None:
                raise RuntimeError(f"fsdp: {name} is a Linear4bit without a quantization state")
            packed[name] = {k: v for k, v in state.as_dict(packed=True).items()}
            layers.append({"name": name, "in": module.in_features, "out": module.out_features,
                           "bias": None if module.bias is None else module.bias.dtype,
                           "shape": tuple(weight.shape), "storage": weight.dtype, "quant_type": weight.quant_type,
                           "blocksize": weight.blocksize, "compress_statistics": weight.compress_statistics,
                           "compute_dtype": module.compute_dtype, "training": module.training,
                           "state": [(k, tuple(v.shape), v.dtype) for k, v in packed[name].items()]})
        config_quant = getattr(getattr(model, "config", None), "quantization_config", None)
        spec = {"layers": layers, "attrs": {k: getattr(model, k) for k in _MODEL_ATTRS if hasattr(model, k)},
                "quantization_config": config_quant}
    box = [spec]
    dist.broadcast_object_list(box, src=0, device=comm if comm.type == "cuda" else None)
    spec = box[0]
    for layer in spec["layers"]:
        tensors = {}
        for key, shape, dtype in layer["state"]:
            t = packed[layer["name"]][key].to(comm) if rank == 0 else torch.empty(shape, dtype=dtype, device=comm)
            dist.broadcast(t, src=0)
            tensors[key] = t
        if rank == 0:
            continue
        parent_name, _, child = layer["name"].rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        storage = layer["storage"]
        q = bnb.nn.Linear4bit(layer["in"], layer["out"], bias=layer["bias"] is not None,
                              compute_dtype=layer["compute_dtype"], compress_statistics=layer["compress_statistics"],
                              quant_type=layer["quant_type"], quant_storage=storage, device="meta")
        state = QuantState.from_dict(tensors, device=device)
        q.weight = bnb.nn.Params4bit(torch.empty(layer["shape"], dtype=storage, device="meta"), requires_grad=False,
                                     quant_state=state, blocksize=layer["blocksize"],
                                     compress_statistics=layer["compress_statistics"], quant_type=layer["quant_type"],
                                     quant_storage=storage, module=q, bnb_quantized=True)
        q.quant_state = state
        if layer["bias"] is not None:
            q.bias = torch.nn.Parameter(torch.empty(layer["out"], dtype=layer["bias"], device="meta"),
                                        requires_grad=False)
        q.train(layer["training"])
        setattr(parent, child, q)
    if rank != 0:
        for key, value in spec["attrs"].items():
            setattr(model, key, value)
        if spec["quantization_config"] is not None and getattr(model, "config", None) is not None:
            model.config.quantization_config = spec["quantization_config"]


def check_same_structure(model) -> None:
    """Every process's model has process 0's parameters and buffers, by name, shape and dtype, tied where
    process 0's are (the same tensor under two names), else a RuntimeError naming the first difference: they
    are filled from process 0 in that order."""
    import torch.distributed as dist

    first: dict[int, str] = {}
    mine = []
    for name, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        mine.append((name, tuple(t.shape), str(t.dtype), first.setdefault(id(t), name)))
    box = [mine if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=_comm_device() if _comm_device().type == "cuda" else None)
    if box[0] != mine:
        diff = next((a, b) for a, b in zip(box[0] + [None], mine + [None]) if a != b)
        raise RuntimeError(f"fsdp: process {dist.get_rank()}'s model differs from process 0's "
                           f"(process 0: {diff[0]}, here: {diff[1]})")


def materialize_meta(module, device, made: dict | None = None) -> None:
    """The module's own meta parameters and buffers replaced by empty ones on ``device``, of the same kind: a
    bitsandbytes ``Params4bit`` stays one, with its quantization state; ``made`` (old tensor's id: new tensor)
    keeps tied weights tied across modules. (``Module.to_empty`` would make each a plain new ``Parameter``: a
    meta tensor cannot take another device's data in place.)"""
    import torch

    made = {} if made is None else made
    for name, p in list(module._parameters.items()):
        if p is None or not p.is_meta:
            continue
        if id(p) not in made:
            data = torch.empty(p.shape, dtype=p.dtype, device=device)
            if type(p).__name__ == "Params4bit":
                made[id(p)] = type(p)(data, requires_grad=False, quant_state=p.quant_state, blocksize=p.blocksize,
                                      compress_statistics=p.compress_statistics, quant_type=p.quant_type,
                                      quant_storage=p.quant_storage, module=p.module, bnb_quantized=True)
            else:
                made[id(p)] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
        module._parameters[name] = made[id(p)]
    for name, b in list(module._buffers.items()):
        if b is not None and b.is_meta:
            module._buffers[name] = made.setdefault(id(b), torch.empty(b.shape, dtype=b.dtype, device=device))


def _unit_modules(module, skip: set) -> list:
    """``module`` and its descendants, less those inside an FSDP unit already made or in ``skip``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    found, todo = [], [module]
    while todo:
        m = todo.pop(0)
        found.append(m)
        todo += [c for c in m.children() if not isinstance(c, FullyShardedDataParallel) and id(c) not in skip]
    return found


def fill_from_process_0(module, device, skip: set) -> None:
    """Make the tensors of ``module`` (less FSDP units already made and the modules in ``skip``) process 0's,
    on ``device``: the meta ones made empty there, process 0's moved there (its 4-bit layers' quantization
    states with them), then each broadcast from process 0, in the same order on every process. What FSDP's
    ``sync_module_states`` does for a unit, which FSDP refuses on the CPU ("requires them to be on GPU")."""
    import torch.distributed as dist

    seen: set = set()
    made: dict = {}
    for m in _unit_modules(module, skip):
        materialize_meta(m, device, made)
        state = getattr(m, "quant_state", None)
        if state is not None and state.absmax.device != device:
            state.to(device)  # process 0 quantized in CPU memory
        for t in list(m.parameters(recurse=False)) + [b for b in m.buffers(recurse=False) if b is not None]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            if t.device != device:
                t.data = t.data.to(device)  # .data: a Params4bit's .to() would quantize again
            dist.broadcast(t.data, src=0)


def wrap_filled(model, kwargs: dict[str, Any], layer_cls: type, device):
    """FSDP units made one at a time, each filled from process 0 just before it is sharded: every decoder layer
    (the ``transformer_auto_wrap_policy`` plan), then the root. A process holds one unit whole at most, and
    between units only its shards."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    unit = {k: v for k, v in kwargs.items() if k != "auto_wrap_policy"}
    skip = {id(m) for m in kwargs["ignored_states"]}
    names = [name for name, m in model.named_modules() if type(m) is layer_cls]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        fill_from_process_0(layer, device, skip)
        setattr(parent, child, FullyShardedDataParallel(layer, **unit))
    fill_from_process_0(model, device, skip)
    return FullyShardedDataParallel(model, **unit)


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
        self.device = "cpu"
        self.low_memory = False  # this load is the low-memory one (several processes, fsdp.low_memory_loading)

    @hookimpl
    def qlora_config_options(self):
        return [
            Option("fsdp.sharding_strategy", "str", "FULL_SHARD",
                   "fsdp: FULL_SHARD (weights sharded, gathered per layer), SHARD_GRAD_OP (kept whole between forward "
                   "and backward), HYBRID_SHARD (FULL_SHARD within a host, replicated across hosts), NO_SHARD",
                   choices=STRATEGIES),
            Option("fsdp.cpu_offload", "bool", False,
                   "fsdp: keep each process's shard of the base weights in CPU memory between uses on the GPU "
                   "(GPUs only); the model loads into CPU memory, each weight quantized on the GPU first"),
            Option("fsdp.wrap_class", "str", None,
                   "fsdp: class name of the decoder layer each FSDP unit wraps (default: found in the model)",
                   nullable=True),
            Option("fsdp.low_memory_loading", "bool", True,
                   "fsdp: with several processes, process 0 alone loads and quantizes the model, in CPU memory; the "
                   "others build it on the meta device and FSDP fills their shards from process 0 (false: every "
                   "process loads the whole model onto its device)"),
        ]

    @hookimpl
    def qlora_configure(self, config, device) -> None:
        self.device = device
        if "cpu-offload" in config.plugins:
            raise UsageError("--plugin fsdp and --plugin cpu-offload do not combine; for less GPU memory under FSDP "
                             "set fsdp.cpu_offload=true")
        if config["fsdp.cpu_offload"] and device != "cuda":
            raise UsageError("fsdp: fsdp.cpu_offload=true needs a GPU: it keeps the weights in CPU memory between "
                             "their uses on the GPU, and on the CPU they are there already; drop the setting")
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
    def qlora_model_load_kwargs(self, kwargs, config) -> None:
        _, world = rank_and_world()
        self.low_memory = world > 1 and bool(config["fsdp.low_memory_loading"])
        if self.low_memory or config["fsdp.cpu_offload"]:
            # The model loads into CPU memory (process 0's alone, under low-memory loading), each weight quantized
            # on this process's device first; FSDP places each unit on the device as it shards it, and with
            # cpu_offload keeps the shards in CPU memory.
            kwargs["quantize_device"] = str((kwargs.get("device_map") or {}).get("", "cpu"))
            kwargs["device_map"] = {"": "cpu"}

    @hookimpl(tryfirst=True)
    def qlora_load_base_model(self, name_or_path, kwargs, config):
        # First, before any loading plugin (random-weights): the processes other than 0 load nothing.
        if self.low_memory and rank_and_world()[0] != 0:
            from qlora_plugins.quant_load import meta_model

            return meta_model(name_or_path, kwargs)
        return None

    @hookimpl(tryfirst=True)
    def qlora_model_loaded(self, model, config, for_training) -> None:
        # First, so that the other plugins see every process's model 4-bit where process 0's is.
        if not self.low_memory:
            return
        import torch
        import torch.distributed as dist

        if not for_training:
            raise UsageError("fsdp: a model loaded for inference under several processes; run it in one process")
        if not dist.is_initialized():
            from accelerate import PartialState

            PartialState(cpu=self.device == "cpu")  # the run's process group, as its Accelerator makes it
        device = torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else torch.device("cpu")
        share_4bit_structure(model, device)

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
        low_memory = self.low_memory and dist.get_world_size() > 1
        if low_memory:
            check_same_structure(model)
        # The adapters, whole on every process, were made where the base weights are (the meta device, CPU
        # memory): onto the device (under low-memory loading filled from process 0 below).
        for module in kwargs["ignored_states"]:
            materialize_meta(module, device)
            module.to(device)
        adapters = [p for m in kwargs["ignored_states"] for p in m.parameters(recurse=False) if p.requires_grad]
        if low_memory:
            wrapped = wrap_filled(model, kwargs, decoder_layer_class(model, config["fsdp.wrap_class"]), device)
        else:
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
        settings.cpu_offload = bool(config["fsdp.cpu_offload"])
        settings.low_memory_loading = bool(config["fsdp.low_memory_loading"])

    @hookimpl(tryfirst=True)
    def qlora_on_after_backward(self, run, model, optimizer) -> None:
        # First, so that the other plugins (flat-params' collect, a callback changing gradients) see averaged ones.
        if self.average_adapter_grads is not None:
            self.average_adapter_grads()
