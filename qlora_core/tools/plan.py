"""Plan a QLoRA run before spending GPU time on it: the guide's hyperparameters for the model's size, the
trainable LoRA parameters, and an estimate of the peak GPU memory per device.

Everything is computed from the model's ``config.json`` alone: the model is built on the meta device
(``accelerate.init_empty_weights`` + ``AutoModelForCausalLM.from_config``), so no weights are read or
downloaded beyond the config, and an 8B model plans in about a second.

The recommendations
-------------------
:func:`recommend` applies the QLoRA guide's tables (``lora_alpha = 2 x r``):

======  ===============  ==================  =========================================
row     LoRA rank r      learning rate       used for models of
======  ===============  ==================  =========================================
7B      8-16             2e-4 .. 3e-4        below 9.5B (also below the table: < 7B)
13B     16-32            2e-4 .. 3e-4        9.5B .. 30B
70B     32-64            1e-4 .. 2e-4        30B .. 168B
405B    64-128           5e-5 .. 1e-4        168B and more
======  ===============  ==================  =========================================

A size between two rows takes the row nearer on a log scale (the boundaries are the geometric means of
neighbouring rows: sqrt(7 x 13) = 9.5B, sqrt(13 x 70) = 30B, sqrt(70 x 405) = 168B). The effective batch
(``per_device_train_batch_size x gradient_accumulation_steps x GPUs``) the guide recommends is 64-128 for
instruction tuning (256-512 for continued pretraining).

The memory model
----------------
Notation: ``T = per_device_train_batch_size x max_seq_length`` tokens per micro-batch, ``L`` layers, hidden
size ``h``, MLP size ``i``, ``nh`` query heads, ``qd = nh x head_dim``, ``kv = kv_heads x head_dim``,
vocabulary ``V``, ``a`` bytes of the compute dtype (2 for bf16), ``s`` bytes of the residual stream, LoRA rank
``r``, ``m = 1`` byte (a bool dropout mask) when ``lora_dropout > 0``, else 0, ``N`` GPUs.

Static, sharded by FSDP (divided by ``N``; with ``fsdp.cpu_offload`` the weights are in CPU memory instead, and
the GPU holds what FSDP gathers, below):

* **4-bit linear weights**: every ``nn.Linear`` but the output head and the layers ``quant.skip_modules`` names,
  at 0.5 byte/param.
* **quantization constants**: blockwise absmax, block size 64. Plain: one fp32 per block = 32/64 = 0.5
  bits/param. Double quantization (``bnb_4bit_use_double_quant``) stores them as 8 bits with one fp32 per 256
  blocks: 8/64 + 32/(64 x 256) = 0.127 bits/param (the QLoRA paper's figure). They are not parameters, so
  FSDP neither shards nor offloads them: whole on every GPU.
* **non-quantized weights** (embeddings, output head, norms, biases): fp32, because PEFT's
  ``prepare_model_for_kbit_training`` (which the ``nf4`` plugin runs) upcasts every non-4-bit parameter to
  fp32; in the compute dtype when the model is not loaded in 4 bits. Tied embeddings count once. The linear
  layers of ``quant.skip_modules`` count here too: ``a`` bytes/param (fp32 with the upcast), no quantization
  constants, and not dequantized for their matmul; frozen, they keep no activation for backward (a frozen
  ``nn.Linear`` saves only its weight), so the activation terms do not change (with the fp32 upcast, autocast's
  bf16 copy of such a weight, kept for backward while its layer's activations are, is not counted).
* **LoRA weights** (fp32, ``r x (in + out)`` per adapted linear), their **gradients** (fp32) and the
  **optimizer states**: paged AdamW 8-bit keeps two 1-byte states per parameter (2 bytes/param), 32-bit AdamW
  two fp32 states (8 bytes/param). Paged states live in CUDA managed memory: they can be evicted to the CPU
  under pressure and ``torch.cuda.max_memory_allocated`` does not count them (they are small next to the rest).
  The guide's FSDP recipe shards these three as well; the ``fsdp`` plugin keeps them whole on every GPU (they
  are a fraction of a percent of the model), and turns the fp32 upcast off.

Activations (per GPU, not sharded). With the fp32 upcast the residual stream is fp32 (``s = 4``): the
embeddings are fp32 and bitsandbytes returns its matmul outputs in the input's dtype. The tensors kept for the
backward pass of one decoder layer, in bytes per token (derived from the code of transformers' Llama layer,
PEFT's LoRA layer and bitsandbytes' ``MatMul4Bit``, which keeps no activation for the frozen 4-bit weight;
checked on the CPU with a tensor-allocation tracker to within 2%)::

    P_layer = 2 x 4h                      two RMSNorms keep their fp32 input
            + a(qd + 2kv) + a.qd + 4nh    SDPA keeps q, k, v, its output and the log-sum-exp
            + 3 s i   (2 s i ungated)     gate, up and act(gate) outputs of a gated MLP
            + per adapted linear: a d_in  (LoRA's input, cast to bf16 by autocast) + m d_in (dropout mask) + a r
            [+ 6 nh seq                   only for eager attention: the softmax output, fp32 and bf16]

* **with gradient checkpointing** the layers keep only their inputs: ``L x T x h x s``; the peak working set
  is the larger of the loss (below) and one recomputed layer during backward:
  ``T x (P_layer + 2 s (h + i))`` (the layer's activations plus the gradients flowing through it).
* **without** every layer keeps ``T x P_layer``, plus the KV cache transformers builds when ``use_cache`` stays
  on (``2 s kv`` per token and layer; the ``gradient-checkpointing`` plugin turns it off).
* **logits and loss**: qlora's trainer gets fp32 logits (accelerate's autocast wrapper converts the bf16
  output), indexes the answer tokens (a copy) and takes ``log_softmax``: three fp32 tensors of ``T x V``
  in the forward pass, and again three in the backward pass (the saved log-probabilities, their gradient
  and the input gradient): **12 bytes per logit**. A loop that calls the model with ``labels`` and keeps
  its output alive through ``backward()`` (transformers' loss, the guide's recipe) also holds the bf16
  logits: 14 bytes (``loss="transformers"``). For a large vocabulary this term dominates: Llama-3's 128,256
  tokens at T = 8,192 make 11.7 GiB. Add the output head's weight cast to bf16 by autocast and kept for its
  backward (``a x V x h`` when the head is fp32), the final norm's input and the head's bf16 input
  (``T x h x (4 + a)``).

qlora's own loop on one GPU changes two terms (its defaults; both modelled from the config):

* **fused head + loss** (``train.fused_cross_entropy``): one chunk of 1,024 positions at a time, 6 bytes per
  logit (the fp32 logits turned into their gradient in place, and its bf16 copy), plus the gradient of the
  head's input (``T x h x a``), instead of 12-14 bytes per logit for every position;
* **offloaded checkpoints** (``train.activation_offload``): two layers' inputs on the GPU at a time instead of
  ``L``.

It also counts the adapters' bf16 copy that the fused LoRA op reads (``train.adapter_compute_copy``: 2 bytes
per trainable parameter beside the 4 of the float32 weights).

Measured with these defaults (``qlora bench``): 7.59 GiB at the Llama-3-8B shape (estimate 8.24, +9%) and
40.11 GiB at the Llama-3-70B shape, batch 1 (estimate 40.76, +1.6%). The per-layer term was derived for PEFT's
LoRA layers; the fused LoRA op keeps less, so the estimate errs high.

Transient buffers: the largest 4-bit layer dequantized for its matmul (``a x in x out``) plus 64 MiB of
workspaces; with ``N > 1`` also what FSDP gathers: the root unit (embeddings, head, final norm: not
resharded during the step) and two decoder layers (the current one and the prefetched one), less the GPU's own
shard of them (all of them with ``fsdp.cpu_offload``).

Loading (:func:`estimate_loading`), before training: onto each GPU (one GPU, or FSDP with
``fsdp.low_memory_loading=false``) the whole 4-bit model plus one weight in the compute dtype beside its 4-bit
copy while it is quantized; into CPU memory (FSDP's low-memory loading on several GPUs, or
``fsdp.cpu_offload``) one process holds the one 4-bit copy per machine in CPU memory, and a GPU the quantization
constants, the adapters and the largest of: one weight being quantized; the decoder layers' shards plus one unit
whole while it is sharded (no shards with offload). With offload the CPU also holds one unit flattened beside its
original. Measured on two H200s with the whole model loaded by each process (Llama-3-70B shape): 38.26 GiB per
GPU while loading (estimate 37.35), 26.53 while training (25.21).

Which of these terms apply is settled by :class:`PlanSettings`: the core fills it from the config as if no plugin
took part, and each plugin of the run adjusts it through the ``qlora_plan_settings`` hook (the optimizer
plugins give their state bytes, ``gradient-checkpointing`` and ``fsdp`` what they change).

Peak allocated = static + stored activations + peak working set + transient buffers. It estimates
``torch.cuda.max_memory_allocated``. What ``nvidia-smi`` shows is more: the **budget** adds the CUDA context
(about 0.6 GiB) and the caching allocator's reserve (5% of the peak).

Calibration (Llama-3-8B shape, seq 2048, batch 4, r = 16 all-linear, NF4 double quant, paged AdamW 8-bit,
gradient checkpointing, bf16). Measured on an H200, the seed's recipe peaked at 27.3 GiB allocated. The model
gives 26.7 GiB for a loop like the seed's (transformers' loss, ``loss="transformers"``): 2.2% under the
measurement, and 24.7 GiB for qlora's own loop (12 bytes per logit instead of 14). Two more measurements of
the same shape agree as closely: without the fp32 upcast 21.4 GiB measured, 21.8 estimated (+1.7%); FSDP over
2 GPUs without the upcast, AdamW 32-bit: 19.9 GiB per GPU measured, 20.1 estimated (+1.1%). Without
checkpointing the estimate is 106 GiB with SDPA attention and 202 GiB with eager attention (the seed's recipe
ran out of memory on the 139 GiB GPU). On the CPU, a tracker of every tensor allocation (PyTorch dispatch)
running this pipeline on scaled-down Llama layers agreed with the activation terms to within 2.5%.
``benchmarks/plan_check.py`` measures qlora's own pipeline on a GPU against this estimate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_core.framework.errors import ConfigError, UsageError
from qlora_core.framework.hub import offline_unless_reachable, unreachable_note
from qlora_core.loop.guidance import Recommendation, guidance_notes, guidance_warnings, recommend

if TYPE_CHECKING:
    from qlora_core.framework.config import Config
    from qlora_core.framework.plugins import PluginSet

GIB = 2 ** 30

# --------------------------------------------------------------------------- the model's shape


@dataclass
class ModelShape:
    """What the estimate needs to know about a model, read from its meta-device instance."""

    model_type: str
    n_params: int
    n_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    gated_mlp: bool
    attn_implementation: str
    use_cache: bool
    supports_checkpointing: bool
    #: linear layers but the output head: (qualified name, in, out, has bias)
    linears: list[tuple[str, int, int, bool]]
    #: the output head: (in, out) or None
    head: tuple[int, int] | None
    #: the first decoder layer's linear layers: (name relative to the layer, in, out)
    layer_linears: list[tuple[str, int, int]]
    n_bias: int
    n_quantizable: int
    #: parameters of one decoder layer
    layer_params: int
    #: qualified name of the decoder layers' ModuleList (``model.layers``), ``""`` when not found
    layers_name: str = ""

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _first(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def load_meta_model(path: str, revision: str | None = None, trust_remote_code: bool = False):
    """``(config, model)``: the model of ``path``'s config, built on the meta device (no weights)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    local = Path(path).expanduser()
    if path.startswith(("/", "./", "../", "~")) or local.exists():
        if not local.is_dir():
            raise UsageError(f"model folder {path!r} does not exist (check --model / model.name_or_path)")
        if not (local / "config.json").is_file():
            raise UsageError(f"model folder {path!r} has no config.json (check --model / model.name_or_path)")
    else:
        offline_unless_reachable()  # a hub id: fail at once, not after half a minute of retries, when offline
    try:
        hf_config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"could not read the config of model {path!r}: {unreachable_note(first)} (check "
                         f"--model / model.name_or_path)") from None
    try:
        with init_empty_weights(include_buffers=True), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"model {path!r} is not a causal language model transformers can build: {first}") from None
    return hf_config, model


def model_shape(hf_config: Any, model: Any) -> ModelShape:
    """Read a :class:`ModelShape` from a (meta-device) model and its config."""
    import torch

    cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    seen: set[int] = set()
    n_params = 0
    for p in model.parameters():  # tied parameters count once
        if id(p) not in seen:
            seen.add(id(p))
            n_params += p.numel()
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head_module:
            linears.append((name, module.in_features, module.out_features, module.bias is not None))
    head = None
    if isinstance(head_module, torch.nn.Linear):
        head = (head_module.in_features, head_module.out_features)
    n_layers = int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers", default=0))
    layer = None
    layers_name = ""
    for list_name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            layer, layers_name = module[0], list_name
            break
    layer_linears = []
    layer_params = 0
    if layer is not None:
        layer_linears = [(n, m.in_features, m.out_features) for n, m in layer.named_modules()
                         if isinstance(m, torch.nn.Linear)]
        layer_params = sum(p.numel() for p in layer.parameters())
    hidden = int(_first(cfg, "hidden_size", "n_embd", "d_model"))
    heads = int(_first(cfg, "num_attention_heads", "n_head", "num_heads"))
    kv_heads = int(_first(cfg, "num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(_first(cfg, "head_dim", default=hidden // heads))
    intermediate = _first(cfg, "intermediate_size", "n_inner", "ffn_dim")
    if intermediate is None:
        outs = [o for _, i, o in layer_linears if i == hidden and o != hidden]
        intermediate = max(outs) if outs else 4 * hidden
    intermediate = int(intermediate)
    up_like = [(i, o) for _, i, o in layer_linears if i == hidden and o in (intermediate, 2 * intermediate)]
    gated = len(up_like) >= 2 or any(o == 2 * intermediate for _, o in up_like)
    vocab = int(_first(cfg, "vocab_size", default=head[1] if head else 0))
    attn = getattr(hf_config, "_attn_implementation", None) or "sdpa"
    n_bias = sum(1 for *_, b in linears if b)
    return ModelShape(
        model_type=str(getattr(hf_config, "model_type", "?")), n_params=n_params, n_layers=n_layers,
        hidden_size=hidden, intermediate_size=intermediate, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, vocab_size=vocab, tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        gated_mlp=gated, attn_implementation=str(attn), use_cache=bool(getattr(cfg, "use_cache", False)),
        supports_checkpointing=bool(getattr(model, "supports_gradient_checkpointing", False)),
        linears=linears, head=head, layer_linears=layer_linears, n_bias=n_bias,
        n_quantizable=sum(i * o for _, i, o, _ in linears), layer_params=layer_params, layers_name=layers_name,
    )


def _matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for a list of ``target_modules``: the module's name equals a target or ends in ``.target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def skip_matches(name: str, pattern: str) -> bool:
    """The ``nf4`` plugin's rule for ``quant.skip_modules``: ``pattern``'s dotted parts appear, whole and in order,
    among ``name``'s (``layers.0`` matches ``model.layers.0.mlp.down_proj``, not ``model.layers.10.mlp.down_proj``;
    ``proj`` matches neither)."""
    pattern = pattern.strip().strip(".")
    return bool(pattern) and f".{pattern}." in f".{name}."


def skipped_linears(shape: ModelShape, patterns: Sequence[str]) -> list[tuple[str, int, int, bool]]:
    """The linear layers (output head excluded: it is never in 4 bits) that ``quant.skip_modules`` keeps out of
    4 bits."""
    return [lin for lin in shape.linears if any(skip_matches(lin[0], p) for p in patterns)]


def lora_modules(shape: ModelShape, targets: str | Sequence[str]) -> list[tuple[str, int, int, bool]]:
    """The linear layers that get adapters: ``all-linear`` = every linear but the output head."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return list(shape.linears)
        targets = [targets]
    return [lin for lin in shape.linears if _matches(lin[0], targets)]


# --------------------------------------------------------------------------- the estimate

#: Bytes of workspaces and small buffers (cuBLAS, bitsandbytes) assumed on top of the modelled tensors.
WORKSPACE_BYTES = 64 * 2 ** 20
#: CUDA context (not in torch's allocated figures, but in nvidia-smi's) and the caching allocator's reserve.
CONTEXT_BYTES = int(0.6 * GIB)
RESERVE_FRACTION = 0.05
#: Bytes per logit of the loss's working set (see the module docstring).
LOSS_BYTES_PER_LOGIT = {"qlora": 12, "transformers": 14}
#: The fused head + loss (``train.fused_cross_entropy``): positions per chunk and bytes per logit of a chunk.
FUSED_LOSS_CHUNK = 1024
FUSED_LOSS_CHUNK_BYTES_PER_LOGIT = 6
#: Names of attention output projections (their input is the attention output, already in compute dtype).
ATTN_OUT_NAMES = ("o_proj", "out_proj", "wo", "dense", "c_proj")

ROW_LABELS = {
    "quantized_weights": "4-bit linear weights",
    "quant_constants": "quantization constants",
    "other_weights": "non-quantized weights",
    "lora_weights": "LoRA weights (fp32)",
    "lora_gradients": "LoRA gradients (fp32)",
    "optimizer_states": "optimizer states",
    "stored_activations": "activations kept for backward",
    "working_set": "peak working set",
    "transients": "transient buffers",
}


@dataclass
class MemoryEstimate:
    """Peak GPU memory per device for one setting of gradient checkpointing, in bytes."""

    checkpointing: bool
    quantized_weights: float
    quant_constants: float
    other_weights: float
    lora_weights: float
    lora_gradients: float
    optimizer_states: float
    stored_activations: float
    working_set: float
    transients: float
    #: what the peak working set is: "logits and loss", "one recomputed layer" or "backward gradients"
    working_set_kind: str
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def static(self) -> float:
        return (self.quantized_weights + self.quant_constants + self.other_weights + self.lora_weights
                + self.lora_gradients + self.optimizer_states)

    @property
    def total(self) -> float:
        """Estimated peak allocated bytes (compare with ``torch.cuda.max_memory_allocated``)."""
        return self.static + self.stored_activations + self.working_set + self.transients

    @property
    def budget(self) -> float:
        """What to budget on the GPU: the peak plus the CUDA context and the allocator's reserve."""
        return self.total * (1 + RESERVE_FRACTION) + CONTEXT_BYTES

    def rows(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ROW_LABELS}

    def to_dict(self) -> dict[str, Any]:
        d = {f"{k}_gib": v / GIB for k, v in self.rows().items()}
        d.update(checkpointing=self.checkpointing, working_set_kind=self.working_set_kind,
                 total_gib=self.total / GIB, budget_gib=self.budget / GIB,
                 detail={k: v for k, v in self.detail.items()})
        return d


@dataclass
class PlanSettings:
    """The run settings the estimate uses.

    :func:`plan` fills them from the config with the core's own defaults, as if no plugin took part: an fp32
    AdamW (8 bytes of optimizer state per trainable parameter), every activation kept, the logits
    materialized. Then each plugin of the run adjusts them in place in its
    :func:`~qlora_core.hookspecs.qlora_plan_settings` hook (the optimizer plugins set their state bytes, the
    ``gradient-checkpointing`` plugin turns ``checkpointing`` on, ``fsdp`` keeps the adapters whole).
    """

    r: int
    lora_alpha: float
    learning_rate: float
    lora_dropout: float
    target_modules: Any
    lora_bias: str
    #: micro-batch (sequences) and sequence length (tokens): the activations scale with both
    batch: int
    seq: int
    gradient_accumulation_steps: int
    #: GPUs the run is spread over: the weights, adapters, gradients and optimizer states are divided by it
    gpus: int
    #: the base model's linear layers in 4 bits (``quant.load_in_4bit`` and a quant plugin in the run)
    load_in_4bit: bool
    double_quant: bool
    quant_type: str
    #: ``bfloat16`` (what ``auto`` picks on the GPUs this plans for), ``float16`` or ``float32``
    compute_dtype: str
    #: the non-quantized weights upcast to fp32, and so the residual stream in fp32 (``quant.fp32_upcast``)
    upcast: bool = False
    #: names of linear layers kept out of 4 bits, in the compute dtype (``quant.skip_modules``; matched by
    #: :func:`skip_matches`); empty when the model is not loaded in 4 bits
    skip_modules: list[str] = field(default_factory=list)
    #: the optimizer plugin's name, and the bytes of optimizer state it keeps per trainable parameter
    optimizer: str = "unknown"
    optimizer_bytes: int = 8
    #: the decoder layers recomputed in backward (a checkpointing plugin sets it; only where the model supports
    #: it)
    checkpointing: bool = False
    #: ``"qlora"`` (the trainer's loss, 12 bytes per logit) or ``"transformers"`` (the model's own, 14)
    loss: str = "qlora"
    #: the output head and the loss computed a chunk of positions at a time, the logits never whole
    fused_loss: bool = False
    #: the checkpointed layers' inputs kept in CPU memory (two layers' on the GPU at a time)
    offload: bool = False
    #: the LoRA weights, gradients and optimizer states divided by ``gpus`` too, as the guide's FSDP recipe
    #: does (the ``fsdp`` plugin keeps them whole on every GPU)
    shard_adapters: bool = True
    #: a compute-dtype copy of the adapters kept beside their fp32 weights (2 bytes per trainable parameter)
    adapter_copy: bool = False
    #: a plugin in the run shards the base weights across the GPUs, and stores the 4-bit weights as that needs
    #: (``fsdp``); without one, ``gpus > 1`` is still estimated as FSDP, and a note says how to run it so
    shards_weights: bool = False
    #: the sharded base weights kept in CPU memory between their uses on the GPU (``fsdp.cpu_offload``)
    cpu_offload: bool = False
    #: with several GPUs, one process loads and quantizes the model into CPU memory and the others receive their
    #: shards (``fsdp.low_memory_loading``); without it, every process loads the whole model onto its GPU
    low_memory_loading: bool = False


def layer_bytes_per_token(shape: ModelShape, settings: PlanSettings, targets: str | Sequence[str]) -> float:
    """``P_layer``: bytes one decoder layer keeps for backward, per token (see the module docstring)."""
    h, i = shape.hidden_size, shape.intermediate_size
    a = 4 if settings.compute_dtype == "float32" else 2
    s = 4 if settings.upcast else a
    m = 1 if settings.lora_dropout > 0 else 0
    r = settings.r
    total = 2 * 4 * h  # two norms keep their input in fp32 (or an fp32 copy of it)
    total += a * (shape.q_dim + 2 * shape.kv_dim) + a * shape.q_dim + 4 * shape.num_heads  # SDPA
    if shape.attn_implementation == "eager":
        total += (4 + 2) * shape.num_heads * settings.seq
    total += (3 if shape.gated_mlp else 2) * s * i
    # Each adapted linear: its input for lora_A (cast to the compute dtype when the stream is wider), the
    # dropout mask, lora_A's output. Inputs already in the compute dtype with no dropout are shared by the
    # layers reading them (q/k/v; gate/up) and kept once. Frozen linears that are not 4-bit keep their input.
    adapted = {n for n, *_ in lora_modules(_layer_as_shape(shape), targets)}
    shared: set[tuple[str, int]] = set()
    for name, d_in, _out in shape.layer_linears:
        short = name.rsplit(".", 1)[-1]
        in_compute_dtype = short in ATTN_OUT_NAMES or s == a
        group = (name.rsplit(".", 1)[0] if "." in name else "", d_in)
        if name in adapted:
            total += a * r + m * d_in
            if m or not in_compute_dtype:
                total += a * d_in  # the dropout output or the cast: one per adapted layer
            elif short not in ATTN_OUT_NAMES:  # the attention output is already kept by SDPA
                shared.add(group)
        if not settings.load_in_4bit and short not in ATTN_OUT_NAMES:
            shared.add(group)
    total += sum(a * d_in for _, d_in in shared)
    return float(total)


def _layer_as_shape(shape: ModelShape) -> ModelShape:
    """A view of ``shape`` whose linears are the first decoder layer's (for :func:`lora_modules`)."""
    from copy import copy

    view = copy(shape)
    view.linears = [(n, i, o, False) for n, i, o in shape.layer_linears]
    return view


def estimate_memory(shape: ModelShape, settings: PlanSettings, targets: str | Sequence[str], checkpointing: bool,
                    trainable: int) -> MemoryEstimate:
    """The memory model of the module docstring for one setting of gradient checkpointing."""
    n = max(1, settings.gpus)
    m = n if settings.shard_adapters else 1
    a = 4 if settings.compute_dtype == "float32" else 2
    s = 4 if settings.upcast else a
    h, i, L, V = shape.hidden_size, shape.intermediate_size, shape.n_layers, shape.vocab_size
    T = settings.batch * settings.seq

    skipped = skipped_linears(shape, settings.skip_modules) if settings.load_in_4bit else []
    skipped_names = {name for name, *_ in skipped}
    n_skipped = sum(li * lo for _, li, lo, _ in skipped)
    n_quant = shape.n_quantizable - n_skipped if settings.load_in_4bit else 0
    n_other = shape.n_params - n_quant
    quantized = n_quant * 0.5
    const_bits = (8 / 64 + 32 / (64 * 256)) if settings.double_quant else 32 / 64
    # plus each layer's 16-entry fp32 4-bit code (and, with double quant, the 256-entry absmax code + offset)
    n_quant_layers = len(shape.linears) - len(skipped) if settings.load_in_4bit else 0
    constants = n_quant * const_bits / 8 + n_quant_layers * (64 + (1028 if settings.double_quant else 0))
    other_bytes = 4 if settings.upcast else a
    other = n_other * other_bytes
    lora = trainable * (4.0 + (a if settings.adapter_copy else 0))  # fp32, and the fused op's bf16 copy
    grads = trainable * 4.0
    optim = trainable * float(settings.optimizer_bytes)

    per_layer = layer_bytes_per_token(shape, settings, targets)
    final = T * h * (4 + a)  # the final norm's input and the head's input in compute dtype
    head_cast = 0.0
    if shape.head is not None and other_bytes != a:
        head_cast = a * shape.head[0] * shape.head[1]  # autocast's copy of the fp32 head, kept for backward
    if settings.fused_loss:
        # one chunk of positions at a time: fp32 logits turned into their gradient in place, its bf16 copy,
        # and the gradient of the head's input
        loss = FUSED_LOSS_CHUNK_BYTES_PER_LOGIT * min(T, FUSED_LOSS_CHUNK) * V + T * h * a
    else:
        loss = LOSS_BYTES_PER_LOGIT[settings.loss] * T * V
    backward_grads = T * 2 * s * (h + i)
    detail = {"tokens_per_micro_batch": T, "layer_bytes_per_token": per_layer, "logits_loss_bytes": loss,
              "head_cast_bytes": head_cast, "final_bytes": final, "skipped_layers": len(skipped),
              "skipped_params": n_skipped, "skipped_weight_bytes": n_skipped * other_bytes / n}
    if checkpointing:
        # offloaded: two layers' inputs on the GPU at a time (one being copied out, or prefetched back)
        stored = (min(L, 2) if settings.offload else L) * T * h * s + final
        recompute = T * per_layer + backward_grads
        loss_side = loss + head_cast
        working = max(loss_side, recompute)
        kind = "logits and loss" if loss_side >= recompute else "one recomputed layer"
        detail.update(checkpoint_bytes=L * T * h * s, recompute_bytes=recompute)
    else:
        cache = L * T * 2 * s * shape.kv_dim if shape.use_cache else 0.0
        stored = L * T * per_layer + cache + final
        loss_side = loss + head_cast
        working = max(loss_side, backward_grads)
        kind = "logits and loss" if loss_side >= backward_grads else "backward gradients"
        detail.update(layers_bytes=L * T * per_layer, kv_cache_bytes=cache)
    largest = max((li * lo for name, li, lo, _ in shape.linears if name not in skipped_names),
                  default=0) if settings.load_in_4bit else 0
    transients = a * largest + WORKSPACE_BYTES
    # FSDP's units: the root (embeddings, head, final norm), gathered for the whole step, and the decoder layers,
    # one (plus the prefetched next one) at a time.
    layer_quant = _layer_quantizable(shape, settings)
    # the skipped parameters of each decoder layer: the largest layer is the one gathered
    per_layer_skip = _skipped_per_layer(shape, skipped)
    layer_skip = max(per_layer_skip.values(), default=0)
    layer_weights = ((layer_quant - layer_skip) * 0.5 + (shape.layer_params - layer_quant + layer_skip) * other_bytes)
    root = max(0.0, other - (L * (shape.layer_params - layer_quant) + sum(per_layer_skip.values())) * other_bytes)
    detail.update(whole_weight_bytes=quantized + other, quant_constant_bytes=constants, root_unit_bytes=root,
                  layer_unit_bytes=layer_weights, largest_linear_params=largest)
    offload = settings.cpu_offload and settings.shards_weights
    on_gpu = 0.0 if offload else 1.0 / n  # the share of the base weights each GPU keeps
    if n > 1 or offload:
        # gathered: what the GPU does not keep of the units (with offload, all of them: the shards are in CPU
        # memory)
        gathered = (root + 2 * layer_weights) * (1 - on_gpu)
        transients += gathered
        detail.update(fsdp_gathered_bytes=gathered)
    return MemoryEstimate(
        # the quantization constants are not parameters: FSDP neither shards nor offloads them
        checkpointing=checkpointing, quantized_weights=quantized * on_gpu, quant_constants=constants,
        other_weights=other * on_gpu, lora_weights=lora / m, lora_gradients=grads / m, optimizer_states=optim / m,
        stored_activations=stored, working_set=working, transients=transients, working_set_kind=kind,
        detail=detail,
    )


@dataclass
class LoadingEstimate:
    """Peak memory while the base model is loaded (and, under FSDP, sharded), before training starts: per GPU,
    and the model's bytes in CPU memory per machine (beyond each process's own libraries)."""

    gpu: float
    cpu: float
    #: how the model loads: "onto each GPU", "low-memory" (one process into CPU memory, the others their
    #: shards) or "into CPU memory" (fsdp.cpu_offload)
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return {"gpu_gib": self.gpu / GIB, "cpu_gib": self.cpu / GIB, "kind": self.kind}


def estimate_loading(memory: MemoryEstimate, settings: PlanSettings) -> LoadingEstimate:
    """The loading peaks for ``memory``'s weights.

    Onto each GPU (one GPU, or FSDP without low-memory loading): every process quantizes the whole model onto its
    GPU, one weight at a time in the compute dtype beside it; the checkpoint's pages are only mapped in CPU
    memory. Into CPU memory (``fsdp.low_memory_loading`` with several GPUs, or ``fsdp.cpu_offload``): one process
    quantizes each weight on its GPU and keeps the 4-bit copy in CPU memory, the quantization constants on the
    GPU; each FSDP unit then comes onto the GPU whole while it is sharded, the GPU keeping its shard (none with
    offload), and with offload the CPU copy of a unit is flattened beside the original.
    """
    d = memory.detail
    a = 4 if settings.compute_dtype == "float32" else 2
    n = max(1, settings.gpus)
    whole, constants = d["whole_weight_bytes"], d["quant_constant_bytes"]
    quantizing = d["largest_linear_params"] * (a + 0.5)  # one weight unquantized beside its 4-bit copy
    adapters = memory.lora_weights
    offload = settings.cpu_offload and settings.shards_weights
    into_cpu = settings.shards_weights and (offload or (n > 1 and settings.low_memory_loading))
    if not into_cpu:
        return LoadingEstimate(gpu=whole + constants + quantizing, cpu=0.0, kind="onto each GPU")
    root, layer = d["root_unit_bytes"], d["layer_unit_bytes"]
    unit = max(root, layer)
    # the decoder layers are sharded first, the root last: at most the layers' shards and one unit whole
    kept = 0.0 if offload else (whole - root) / n
    gpu = constants + adapters + max(quantizing, kept + unit)
    cpu = whole + (unit if offload else 0.0)
    return LoadingEstimate(gpu=gpu, cpu=cpu, kind="into CPU memory" if offload else "low-memory")


def _skipped_per_layer(shape: ModelShape, skipped: Sequence[tuple[str, int, int, bool]]) -> dict[str, int]:
    """The skipped linear parameters of each decoder layer (by its index), those outside the layers left out."""
    out: dict[str, int] = {}
    prefix = shape.layers_name + "." if shape.layers_name else None
    for name, li, lo, _ in skipped:
        if prefix is not None and name.startswith(prefix):
            index = name[len(prefix):].split(".", 1)[0]
            out[index] = out.get(index, 0) + li * lo
    return out


def _layer_quantizable(shape: ModelShape, settings: PlanSettings) -> int:
    if not settings.load_in_4bit:
        return 0
    return sum(i * o for _, i, o in shape.layer_linears)


def _size(n_bytes: float) -> str:
    """``n_bytes`` in GiB, or in MiB below a tenth of a GiB."""
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB / 10 else f"{n_bytes / 2 ** 20:.2f} MiB"


def _check_skip_modules(model: Any, patterns: Sequence[str], model_name: str) -> None:
    """A ``quant.skip_modules`` name that matches no linear layer of the (meta-device) model is the config
    error ``qlora run`` would stop with."""
    import torch

    if not patterns:
        return
    if any(not p.strip().strip(".") for p in patterns):
        raise ConfigError(["quant.skip_modules: an empty name; give module names such as down_proj or "
                           "model.layers.0.mlp.down_proj"])
    modules = [(n, m) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    linears = [n for n, _ in modules]
    missing = [p for p in patterns if not any(skip_matches(n, p) for n in linears)]
    if missing:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        example = next((n for n, m in modules if m is not head), None)
        hint = f"; e.g. {example} or {example.rsplit('.', 1)[-1]}" if example else ""
        raise ConfigError([f"quant.skip_modules: {', '.join(map(repr, missing))} "
                           f"match{'es' if len(missing) == 1 else ''} no linear layer of {model_name}{hint}"])


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """What :func:`plan` found: the model's size, the guide's recommendation, the LoRA setup and the memory
    estimate with and without gradient checkpointing (``memory`` is the one the config's plugins use)."""

    model: str
    path: str
    shape: ModelShape
    settings: PlanSettings
    lora_targets: list[str]
    lora_modules: int
    trainable_params: int
    recommendation: Recommendation
    with_checkpointing: MemoryEstimate
    without_checkpointing: MemoryEstimate
    warnings: list[str]
    notes: list[str]
    #: the peaks while the model loads, before training (``memory``'s weights)
    loading: LoadingEstimate | None = None

    @property
    def n_params(self) -> int:
        return self.shape.n_params

    @property
    def memory(self) -> MemoryEstimate:
        return self.with_checkpointing if self.settings.checkpointing else self.without_checkpointing

    def to_dict(self) -> dict[str, Any]:
        shape = asdict(self.shape)
        shape.pop("linears")
        shape.pop("layer_linears")
        return {
            "model": self.model, "path": self.path, "n_params": self.n_params,
            "shape": shape, "settings": asdict(self.settings),
            "lora_targets": self.lora_targets, "lora_modules": self.lora_modules,
            "trainable_params": self.trainable_params,
            "trainable_percent": 100.0 * self.trainable_params / max(1, self.n_params),
            "recommendation": self.recommendation.to_dict(),
            "memory": {"with_checkpointing": self.with_checkpointing.to_dict(),
                       "without_checkpointing": self.without_checkpointing.to_dict()},
            "peak_with_checkpointing_gib": self.with_checkpointing.total / GIB,
            "peak_without_checkpointing_gib": self.without_checkpointing.total / GIB,
            "peak_gib": self.memory.total / GIB, "budget_gib": self.memory.budget / GIB,
            "loading": self.loading.to_dict() if self.loading is not None else None,
            "warnings": self.warnings, "notes": self.notes,
        }


def _settings(config: Config, plugins: PluginSet, gpus: int, loss: str, upcast: bool | None,
              supports_checkpointing: bool) -> tuple[PlanSettings, list[str]]:
    """The core's settings for ``config``, then every plugin's adjustments (``qlora_plan_settings``)."""
    notes: list[str] = []
    quantized = bool(config["quant.load_in_4bit"]) and bool(plugins.implementers("qlora_quantization_config"))
    compute = config["quant.bnb_4bit_compute_dtype"]
    if compute == "auto":
        compute = "bfloat16"  # what auto picks on a GPU with bf16 (every GPU this plans for: Ampere and later)
    settings = PlanSettings(
        r=config["lora.r"], lora_alpha=config["lora.lora_alpha"], learning_rate=config["train.learning_rate"],
        lora_dropout=config["lora.lora_dropout"], target_modules=config["lora.target_modules"],
        lora_bias=config["lora.bias"], batch=config["train.per_device_train_batch_size"],
        seq=config["train.max_seq_length"], gradient_accumulation_steps=config["train.gradient_accumulation_steps"],
        gpus=gpus, load_in_4bit=quantized, double_quant=bool(config["quant.bnb_4bit_use_double_quant"]),
        quant_type=config["quant.bnb_4bit_quant_type"], compute_dtype=compute,
        upcast=bool(config["quant.fp32_upcast"]) and quantized, loss=loss,
        skip_modules=list(config.get("quant.skip_modules") or []) if quantized else [],
    )
    plugins.hook.qlora_plan_settings(settings=settings, config=config)
    if upcast is not None:  # the caller's word overrides the config's and the plugins'
        settings.upcast = bool(upcast and quantized)
    settings.checkpointing = settings.checkpointing and supports_checkpointing
    if settings.optimizer == "unknown":  # no plugin described the optimizer: the core's assumption stands
        optimizers = plugins.implementers("qlora_optimizer")
        assumed = f"assumed AdamW with two fp32 states ({settings.optimizer_bytes} bytes per trainable parameter)"
        if optimizers:
            settings.optimizer = optimizers[-1]
            notes.append(f"optimizer plugin {settings.optimizer!r} does not describe its states to qlora plan "
                         f"(qlora_plan_settings): {assumed}")
        else:
            settings.optimizer = "none"
            notes.append(f"no optimizer plugin takes part (qlora run needs one, e.g. --plugin adamw): {assumed}")
    return settings, notes


def plan(model_name_or_path: str | Path | None = None, config: Config | Mapping[str, Any] | str | Path | None = None,
         gpus: int = 1, *, plugins: PluginSet | Sequence[str] | None = None, loss: str = "qlora",
         upcast: bool | None = None) -> Plan:
    """Plan a run of ``model_name_or_path`` (default: the config's ``model.name_or_path``) with ``config``.

    :param config: a resolved :class:`~qlora_core.framework.config.Config`, or what :func:`qlora_core.resolve`
        takes (a YAML path, a mapping, ``None`` for the embedded default job).
    :param gpus: GPUs the run is spread over with FSDP: the weights, LoRA weights, gradients and optimizer
        states are divided by it; the activations per GPU are not.
    :param plugins: the run's :class:`~qlora_core.framework.plugins.PluginSet` (or ``--plugin`` names when ``config``
        is not resolved yet); found with ``resolve()`` when not given.
    :param loss: ``"qlora"`` (the trainer's loss, 12 bytes per logit) or ``"transformers"`` (the model's own
        loss with its output kept through backward, 14 bytes per logit).
    :param upcast: whether the non-quantized weights are upcast to fp32 (default: ``quant.fp32_upcast``, with
        which the ``nf4`` plugin runs PEFT's ``prepare_model_for_kbit_training``; never under the ``fsdp``
        plugin).
    :raises UsageError: the model's config cannot be read (unknown path or hub id offline, not a causal LM).
    """
    from qlora_core.framework.config import Config
    from qlora_core.framework.plugins import PluginSet
    from qlora_core.loop.setup import resolve

    if gpus < 1:
        raise UsageError(f"--gpus must be at least 1 (got {gpus})")
    if loss not in LOSS_BYTES_PER_LOGIT:
        raise ValueError(f"loss must be one of {', '.join(LOSS_BYTES_PER_LOGIT)} (got {loss!r})")
    overrides = [("model.name_or_path", str(model_name_or_path))] if model_name_or_path is not None else []
    names = [] if plugins is None or isinstance(plugins, PluginSet) else list(plugins)
    if isinstance(config, Config) and not overrides and isinstance(plugins, PluginSet):
        cfg, plugin_set = config, plugins
    else:
        data = config.to_dict() if isinstance(config, Config) else config
        cfg, plugin_set = resolve(data, names, overrides)
        if isinstance(plugins, PluginSet):
            plugin_set = plugins
    name = cfg["model.name_or_path"]
    path = plugin_set.hook.qlora_resolve_model(name_or_path=name, config=cfg) or name
    hf_config, meta = load_meta_model(str(path), cfg["model.revision"], cfg["model.trust_remote_code"])
    shape = model_shape(hf_config, meta)
    settings, notes = _settings(cfg, plugin_set, gpus, loss, upcast, shape.supports_checkpointing)
    _check_skip_modules(meta, settings.skip_modules, str(name))
    targets = plugin_set.hook.qlora_adapter_targets(model=meta, config=cfg) or cfg["lora.target_modules"]
    adapted = lora_modules(shape, targets)
    trainable = sum(settings.r * (i + o) for _, i, o, _ in adapted)
    if settings.lora_bias == "all":
        trainable += sum(o for *_, o, b in shape.linears if b)
    elif settings.lora_bias == "lora_only":
        trainable += sum(o for *_, o, b in adapted if b)
    del meta
    with_ckpt = estimate_memory(shape, settings, targets, True, trainable)
    without = estimate_memory(shape, settings, targets, False, trainable)
    if not shape.supports_checkpointing:
        notes.append(f"{shape.model_type} models do not support gradient checkpointing in transformers: "
                     f"the run trains without it")
    elif not settings.checkpointing:
        notes.append("gradient checkpointing is off in this config (no:gradient-checkpointing)")
    if shape.attn_implementation == "eager":
        notes.append("eager attention keeps the attention probabilities (seq x heads per token and layer)")
    if gpus > 1 and not settings.shards_weights:
        notes.append(f"{gpus} GPUs: the estimate is FSDP's (the guide's recipe, adapters sharded too); qlora run "
                     f"shards the model with --plugin fsdp --nproc-per-node {gpus} (without it, DDP keeps a whole "
                     f"model on each GPU)")
    skipped = skipped_linears(shape, settings.skip_modules)
    if skipped:
        from dataclasses import replace

        in_4bit = estimate_memory(shape, replace(settings, skip_modules=[]), targets, True, trainable)
        dtype = "float32 (fp32 upcast)" if settings.upcast else settings.compute_dtype
        notes.append(f"quant.skip_modules: {len(skipped)} linear layers ({with_ckpt.detail['skipped_params']:,.0f} "
                     f"parameters) kept in {dtype}, not 4 bits: {_size(with_ckpt.detail['skipped_weight_bytes'])} "
                     f"of weights{' per GPU' if gpus > 1 else ''}, "
                     f"{_size(with_ckpt.static - in_4bit.static)} more than in 4 bits")
    if gpus > 1 and settings.upcast:
        notes.append("under FSDP, PEFT's fp32 upcast of the non-quantized weights has been measured to break FSDP's "
                     "flattening (mixed bf16/fp32); the estimate assumes it is applied as on one GPU "
                     "(--plugin fsdp turns it off)")
    short = sorted({n.rsplit(".", 1)[-1] for n, *_ in adapted})
    return Plan(
        model=str(name), path=str(path), shape=shape, settings=settings, lora_targets=short,
        lora_modules=len(adapted), trainable_params=trainable, recommendation=recommend(shape.n_params),
        with_checkpointing=with_ckpt, without_checkpointing=without,
        warnings=guidance_warnings(cfg, shape.n_params, gpus, settings),
        notes=guidance_notes(cfg, shape.n_params, gpus) + notes,
        loading=estimate_loading(with_ckpt if settings.checkpointing else without, settings),
    )


# --------------------------------------------------------------------------- formatting
