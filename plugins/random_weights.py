"""Random weights: the base model built from its folder's ``config.json`` alone, with random weights, its
linear layers quantized straight into 4 bits on the device (:func:`build_direct`).

For measuring speed and memory of any architecture without downloading or storing its weights: a Llama-3-70B
shape builds in seconds on the GPU, where its bf16 checkpoint (140 GB) would not fit the disk. The folder needs
only ``config.json`` and a tokenizer. Quantization follows the quant plugin's ``quantization_config`` (type,
double quantization, storage dtype: FSDP's bf16 storage too); without one, every weight is drawn in the compute
dtype. The weights are drawn on the device from ``random_weights.seed`` (0 by default), so every process of a
distributed run, and a later ``Job.from_run`` for evaluation or generation, builds the same model. Where the
model is to live in CPU memory (``fsdp``: process 0 of several, or ``fsdp.cpu_offload``), the loader's
``quantize_device`` is where the weights are drawn and quantized, so it builds the same model as on that GPU.

    qlora run config.yaml --plugin random-weights
"""

from __future__ import annotations

from pathlib import Path

from qlora_core import Option, UsageError, hookimpl


@hookimpl
def qlora_config_options():
    return [Option("random_weights.seed", "int", 0,
                   "random-weights: the seed the weights are drawn from (the same model on every process and "
                   "every rebuild)", minimum=0)]


@hookimpl
def qlora_load_base_model(name_or_path, kwargs, config):
    folder = Path(name_or_path)
    if not (folder / "config.json").is_file():
        raise UsageError(f"random-weights: {name_or_path!r} is not a folder with a config.json; point "
                         f"model.name_or_path at one (the weights are not needed)")
    device = (kwargs.get("device_map") or {}).get("", "cpu")
    quant = kwargs.get("quantization_config")
    load_in_4bit = bool(quant is not None and getattr(quant, "load_in_4bit", False))
    opts = {}
    if load_in_4bit:
        opts = {"quant_type": quant.bnb_4bit_quant_type, "double_quant": quant.bnb_4bit_use_double_quant,
                "quant_storage": quant.bnb_4bit_quant_storage}
    return build_direct(folder, str(device), kwargs["dtype"], seed=config["random_weights.seed"],
                        load_in_4bit=load_in_4bit, draw_device=kwargs.get("quantize_device"), **opts)


def build_direct(model_dir: Path | str, device: str, compute_dtype, quant_type: str = "nf4",
                 double_quant: bool = True, seed: int = 0, quant_storage=None, load_in_4bit: bool = True,
                 draw_device: str | None = None):
    """The model of ``model_dir``'s config with random weights, its linear layers (not the head) in 4 bits.

    The model is made on the meta device; every linear layer but the output head becomes a bitsandbytes
    ``Linear4bit`` quantized from random weights drawn on the device one layer at a time (one layer's weight in
    ``compute_dtype`` is all that is ever unquantized); embeddings, norms and the head are drawn in
    ``compute_dtype``. With ``draw_device`` (a GPU, for a model kept in CPU memory) every weight is drawn and
    quantized there and then moved to ``device``, the quantization states staying on ``draw_device``: the same
    values as a build on ``draw_device``, at its speed. Marked ``is_loaded_in_4bit`` as transformers' loader does, so PEFT treats it as the
    quantized model it is. With ``load_in_4bit=False`` every weight is drawn in ``compute_dtype`` (the
    unquantized reference).
    """
    import bitsandbytes as bnb
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    storage = quant_storage or torch.uint8
    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    keep = torch.device(device)
    device = str(draw_device or device)
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
        if q.weight.device != keep:
            q.weight.data = q.weight.data.to(keep)  # the packed bytes alone: the state stays where it was made
        if module.bias is not None:
            q.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=compute_dtype, device=keep),
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
                done[id(p)] = torch.nn.Parameter(data.to(keep), requires_grad=p.requires_grad)
            setattr(module, pname, done[id(p)])
    for module in model.modules():
        for bname, b in list(module.named_buffers(recurse=False)):
            if b is not None:
                module._buffers[bname] = b.to(keep)
    if getattr(config, "tie_word_embeddings", False) and head is not None:
        head.weight = model.get_input_embeddings().weight
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"parameters left on the meta device: {leftover[:5]}")
    if load_in_4bit:
        model.is_loaded_in_4bit = True  # what transformers' bitsandbytes quantizer sets after loading
    model.eval()
    return model
