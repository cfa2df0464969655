"""The QLoRA guide's advice by model size: its LoRA rank and learning-rate tables, the effective batch it
recommends, and the warnings a run's settings earn against them (``qlora run`` prints them when training starts,
``qlora plan`` beside its estimate).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qlora_core.framework.config import Config


# --------------------------------------------------------------------------- the guide's tables


@dataclass(frozen=True)
class GuideRow:
    """One row of the guide's hyperparameter tables."""

    label: str
    n_params: float
    r_range: tuple[int, int]
    lr_range: tuple[float, float]
    #: what the guide's own workflows use for this size (inside the row's ranges)
    r: int
    lr: float


#: The QLoRA guide's "LoRA Rank" and "Learning Rate" tables, by model size.
GUIDE_ROWS: tuple[GuideRow, ...] = (
    GuideRow("7B", 7e9, (8, 16), (2e-4, 3e-4), 16, 2e-4),
    GuideRow("13B", 13e9, (16, 32), (2e-4, 3e-4), 16, 2e-4),
    GuideRow("70B", 70e9, (32, 64), (1e-4, 2e-4), 32, 2e-4),
    GuideRow("405B", 405e9, (64, 128), (5e-5, 1e-4), 64, 1e-4),
)
#: The guide's recommended effective batch sizes.
INSTRUCTION_BATCH = (64, 128)
PRETRAINING_BATCH = (256, 512)
#: Below this effective batch a warning is given (the guide: 64-128 for instruction tuning).
MIN_EFFECTIVE_BATCH = 8
#: How far (a factor) the learning rate may leave the guide's range before a warning.
LR_TOLERANCE = 3.0


@dataclass(frozen=True)
class Recommendation:
    """The guide's hyperparameters for a model of ``n_params`` parameters.

    :ivar row: the table row used (``"7B"``, ...); ``basis`` says why.
    :ivar r_range / r: the recommended LoRA rank range and the suggested rank.
    :ivar lora_alpha: ``2 x r``.
    :ivar lr_range / learning_rate: the recommended learning-rate range and the suggested rate.
    :ivar effective_batch: the guide's effective batch range for instruction tuning.
    """

    n_params: int
    row: str
    basis: str
    r_range: tuple[int, int]
    r: int
    lora_alpha: int
    lr_range: tuple[float, float]
    learning_rate: float
    effective_batch: tuple[int, int] = INSTRUCTION_BATCH
    pretraining_batch: tuple[int, int] = PRETRAINING_BATCH

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


def _row_for(n_params: float) -> GuideRow:
    """The nearest table row on a log scale (everything below 7B takes the 7B row)."""
    for lower, upper in itertools.pairwise(GUIDE_ROWS):
        if n_params < math.sqrt(lower.n_params * upper.n_params):
            return lower
    return GUIDE_ROWS[-1]


def recommend(n_params: float) -> Recommendation:
    """The guide's LoRA rank, ``lora_alpha = 2 x r``, learning rate and effective batch for a model size.

    Sizes between the table's rows take the row nearer on a log scale; sizes below the table (< 7B) take the
    7B row (r 8-16, learning rate 2e-4 .. 3e-4); sizes above 405B the 405B row. The suggested ``r`` and learning
    rate are those of the guide's own workflows, which lie inside the row's ranges.
    """
    if not n_params or n_params <= 0:
        raise ValueError(f"n_params must be positive (got {n_params!r})")
    row = _row_for(float(n_params))
    if n_params < GUIDE_ROWS[0].n_params:
        basis = "7B row (the tables start at 7B)"
    else:
        basis = f"{row.label} row (the nearest on a log scale)"
    return Recommendation(n_params=int(n_params), row=row.label, basis=basis, r_range=row.r_range, r=row.r,
                          lora_alpha=2 * row.r, lr_range=row.lr_range, learning_rate=row.lr)


def _lr_upper_tolerance(n_params: float) -> float:
    """The factor above the row's top learning rate that still passes without a warning.

    The guide has no row below 7B; smaller models train well at higher rates (the embedded default job uses
    1e-3 on 135M parameters), so below 7B the factor grows with sqrt(7B / size), up to 10x more.
    """
    if n_params >= GUIDE_ROWS[0].n_params:
        return LR_TOLERANCE
    return LR_TOLERANCE * min(10.0, math.sqrt(GUIDE_ROWS[0].n_params / n_params))


def effective_batch(config: Config, gpus: int = 1) -> int:
    return config["train.per_device_train_batch_size"] * config["train.gradient_accumulation_steps"] * gpus


def guidance_warnings(config: Config, n_params: float, gpus: int = 1,
                      settings: Any = None, storage: bool = True) -> list[str]:
    """Settings that go against the guide, each naming its recommendation (warnings, not errors).

    * ``lora_alpha`` outside ``[r, 4r]`` (the guide: ``2 x r``);
    * the learning rate outside the size's range by more than a factor of 3 (below 7B parameters the upper
      limit grows with ``sqrt(7B / size)``, up to 30x: the guide has no row for small models);
    * ``r`` below half or above twice the size's range;
    * an effective batch (per device x accumulation x GPUs) below 8 (the guide: 64-128 for instruction
      tuning);
    * fp16 compute (the guide: "risky") or FP4 instead of NF4;
    * more than one GPU without ``quant.bnb_4bit_quant_storage: bfloat16`` (the guide: critical for FSDP), or the
      compute dtype; with the plan's ``settings``, none when a plugin shards the weights (``shards_weights``: the
      ``fsdp`` plugin sets the storage); none with ``storage=False`` (a run that has started: FSDP's plugin set the
      storage, and without FSDP, as under plain data parallelism, it does not matter).

    The embedded default job (135M parameters, r 16, alpha 32, learning rate 1e-3, effective batch 8) gets
    none: its rate is 3.3x the 7B row's top, within the 22x a 135M model is allowed; :func:`guidance_notes` says
    so.
    """
    rec = recommend(n_params)
    out: list[str] = []
    r = config["lora.r"]
    alpha = config["lora.lora_alpha"]
    if not r <= alpha <= 4 * r:
        out.append(f"lora.lora_alpha={alpha:g} with lora.r={r} scales the adapters by alpha/r = {alpha / r:.3g}; "
                   f"the guide recommends lora_alpha = 2 x r = {2 * r}")
    lo, hi = rec.lr_range
    lr = config["train.learning_rate"]
    top = hi * _lr_upper_tolerance(n_params)
    if lr < lo / LR_TOLERANCE or lr > top:
        which = "above" if lr > hi else "below"
        out.append(f"train.learning_rate={short_float(lr)} is far {which} the guide's {short_float(lo)} .. "
                   f"{short_float(hi)} for {human_count(n_params)} parameters ({rec.row} row); try "
                   f"{short_float(rec.learning_rate)}")
    r_lo, r_hi = rec.r_range
    if r < r_lo / 2 or r > r_hi * 2:
        out.append(f"lora.r={r} is far outside the guide's {r_lo}-{r_hi} for {human_count(n_params)} parameters "
                   f"({rec.row} row); try r={rec.r} with lora_alpha={rec.lora_alpha}")
    eff = effective_batch(config, gpus)
    if eff < MIN_EFFECTIVE_BATCH:
        out.append(f"effective batch {eff} (per_device_train_batch_size {config['train.per_device_train_batch_size']}"
                   f" x gradient_accumulation_steps {config['train.gradient_accumulation_steps']} x {gpus} GPU"
                   f"{'s' if gpus != 1 else ''}) is below {MIN_EFFECTIVE_BATCH}; the guide recommends "
                   f"{INSTRUCTION_BATCH[0]}-{INSTRUCTION_BATCH[1]} for instruction tuning: raise "
                   f"train.gradient_accumulation_steps")
    if config["quant.bnb_4bit_compute_dtype"] == "float16":
        out.append("quant.bnb_4bit_compute_dtype=float16: the guide calls fp16 compute risky (precision "
                   "issues); it recommends bfloat16 (auto picks it where the GPU supports it)")
    if config["quant.load_in_4bit"] and config["quant.bnb_4bit_quant_type"] != "nf4":
        out.append(f"quant.bnb_4bit_quant_type={config['quant.bnb_4bit_quant_type']}: the guide recommends nf4")
    # FSDP flattens the packed 4-bit weights with the layers' other parameters: the storage must be their dtype,
    # the compute dtype (auto: bfloat16 on a GPU, float32 on the CPU). A plugin that shards the weights sets it
    # in the run (the plan's settings say so; the plan does not run the plugins' qlora_configure).
    compute = config["quant.bnb_4bit_compute_dtype"]
    fits = {"bfloat16", "float32"} if compute == "auto" else {"bfloat16", compute}
    sharded = settings is not None and settings.shards_weights
    if storage and gpus > 1 and config["quant.load_in_4bit"] and config["quant.bnb_4bit_quant_storage"] not in fits \
            and not sharded:
        out.append(f"{gpus} GPUs with quant.bnb_4bit_quant_storage={config['quant.bnb_4bit_quant_storage']}: the "
                   f"guide calls bnb_4bit_quant_storage=bfloat16 critical for FSDP (4-bit layers must be wrapped "
                   f"like the others)")
    return out


def guidance_notes(config: Config, n_params: float, gpus: int = 1) -> list[str]:
    """Informative notes: a learning rate or rank outside the guide's range but inside the warning thresholds.

    An effective batch between 8 and the guide's 64 gets no note: ``qlora plan`` shows it next to the
    recommendation anyway, and small datasets (the embedded job's 400 examples) are better served by it.
    """
    rec = recommend(n_params)
    out: list[str] = []
    lo, hi = rec.lr_range
    lr = config["train.learning_rate"]
    if (hi < lr <= hi * _lr_upper_tolerance(n_params)) or (lo / LR_TOLERANCE <= lr < lo):
        which = "above" if lr > hi else "below"
        why = ("; usual for a model this small: the guide has no row below 7B, and small models take higher rates"
               if lr > hi and n_params < GUIDE_ROWS[0].n_params else "")
        out.append(f"train.learning_rate={short_float(lr)} is {which} the guide's {short_float(lo)} .. "
                   f"{short_float(hi)} ({rec.row} row){why}")
    r = config["lora.r"]
    r_lo, r_hi = rec.r_range
    if (r_lo / 2 <= r < r_lo) or (r_hi < r <= 2 * r_hi):
        out.append(f"lora.r={r} is outside the guide's {r_lo}-{r_hi} ({rec.row} row)")
    return out


def human_count(n: float, digits: int = 1) -> str:
    """``8030261248`` -> ``"8.0B"``, ``41943040`` -> ``"41.9M"``."""
    n = float(n)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return f"{n:.0f}"


def short_float(x: float) -> str:
    """``0.0002`` -> ``"2e-4"``, ``2.5e-05`` -> ``"2.5e-5"``, ``0.5`` -> ``"0.5"``."""
    if x == 0 or 1e-2 <= abs(x) < 1e4:
        return f"{x:g}"
    mantissa, exponent = f"{x:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"
