"""The run configuration: one YAML file plus ``--set key=value`` overrides, validated against options.

Options are declared by the core (below) and by plugins (:func:`qlora_core.hookspecs.qlora_config_options`).
Every problem in a config is collected and reported together, each naming its key.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from qlora_core.framework.errors import ConfigError, UsageError

_MISSING = object()

# Types an option can have; each maps to a coercion that also accepts the strings --set gives.
TYPES = ("int", "float", "bool", "str", "str_list", "str_or_list", "auto_bool")


@dataclass(frozen=True)
class Option:
    """A config key.

    :ivar key: dotted name, e.g. ``"lora.r"``.
    :ivar type: one of ``int``, ``float``, ``bool``, ``str``, ``str_list``, ``str_or_list``, ``auto_bool``
        (true, false or ``"auto"``: the code decides, e.g. on for CUDA only).
    :ivar default: the value when the config does not set it.
    :ivar help: one line for the docs.
    :ivar choices: allowed values, if limited.
    :ivar minimum / maximum: inclusive bounds for numbers.
    :ivar exclusive_minimum: bound that the value must exceed (``r > 0``).
    :ivar nullable: whether ``null`` is allowed.
    :ivar check: extra check returning an error text or ``None``.
    """

    key: str
    type: str
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"option {self.key}: unknown type {self.type!r}")

    def coerce(self, value: Any) -> Any:
        """Return ``value`` converted to this option's type, or raise ``ValueError`` with the reason."""
        if value is None:
            if self.nullable:
                return None
            raise ValueError("must not be null")
        t = self.type
        if t == "auto_bool" and isinstance(value, str) and value.lower() == "auto":
            return "auto"
        if t in ("bool", "auto_bool"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            raise ValueError(f"must be true or false{' or auto' if t == 'auto_bool' else ''} (got {value!r})")
        if t == "int":
            if isinstance(value, bool):
                raise ValueError(f"must be an integer (got {value!r})")
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
            raise ValueError(f"must be an integer (got {value!r})")
        if t == "float":
            if isinstance(value, bool):
                raise ValueError(f"must be a number (got {value!r})")
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ValueError(f"must be a number (got {value!r})")
        if t == "str":
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
            raise ValueError(f"must be a string (got {value!r})")
        if t in ("str_list", "str_or_list"):
            if isinstance(value, str):
                if t == "str_or_list" and "," not in value:
                    return value
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError(f"must be a list of strings (got {value!r})")
        raise AssertionError(t)

    def validate(self, value: Any) -> str | None:
        """Return what is wrong with an already coerced value, or ``None``."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))} (got {value!r})"
        if self.exclusive_minimum is not None and not value > self.exclusive_minimum:
            return f"must be > {self.exclusive_minimum:g} (got {value!r})"
        if self.minimum is not None and value < self.minimum:
            return f"must be >= {self.minimum:g} (got {value!r})"
        if self.maximum is not None and value > self.maximum:
            return f"must be <= {self.maximum:g} (got {value!r})"
        if self.check is not None:
            return self.check(value)
        return None


def auto_on(value: bool | str, default: bool) -> bool:
    """An ``auto_bool`` option's value as a decision: ``default`` for ``"auto"`` (e.g. "on CUDA")."""
    return default if value == "auto" else bool(value)


def _positive_or_minus_one(value: int) -> str | None:
    return None if value == -1 or value > 0 else f"must be a positive number of steps or -1 for none (got {value})"


CORE_OPTIONS: tuple[Option, ...] = (
    # model
    Option("model.name_or_path", "str", "embedded:smollm2-135m-instruct",
           "base model: a local folder, a hub id, or a name a plugin resolves (embedded:...)"),
    Option("model.revision", "str", None, "hub revision of the model", nullable=True),
    Option("model.trust_remote_code", "bool", False, "allow model code from the hub"),
    # quantization
    Option("quant.load_in_4bit", "bool", True, "load the base model's linear layers in 4 bits"),
    Option("quant.bnb_4bit_quant_type", "str", "nf4", "4-bit data type", choices=("nf4", "fp4")),
    Option("quant.bnb_4bit_use_double_quant", "bool", True, "quantize the quantization constants too"),
    Option("quant.bnb_4bit_compute_dtype", "str", "auto",
           "dtype of the matmuls: auto = bfloat16 on a GPU that supports it, else float32",
           choices=("auto", "bfloat16", "float16", "float32")),
    Option("quant.bnb_4bit_quant_storage", "str", "uint8",
           "storage dtype of packed 4-bit weights (the fsdp plugin sets it to the compute dtype)",
           choices=("uint8", "bfloat16", "float16", "float32")),
    Option("quant.fp32_upcast", "bool", False,
           "upcast every non-4-bit weight (embeddings, head, norms) to fp32 as PEFT's prepare_model_for_kbit_training "
           "does (the guide's recipe; more memory, slower, no better training measured)"),
    Option("quant.skip_modules", "str_list", [],
           "linear layers kept out of 4 bits, in the compute dtype: module names or dotted parts of them "
           "(model.layers.0.mlp.down_proj, down_proj, model.layers.0); the output head always is"),
    # LoRA
    Option("lora.r", "int", 16, "LoRA rank", exclusive_minimum=0),
    Option("lora.lora_alpha", "float", 32.0, "LoRA scaling numerator (the guide: 2 x r)", exclusive_minimum=0),
    Option("lora.lora_dropout", "float", 0.05, "dropout on the LoRA input", minimum=0.0,
           check=lambda v: None if v < 1 else f"must be < 1 (got {v})"),
    Option("lora.target_modules", "str_or_list", "all-linear",
           "modules that get adapters: all-linear or a list of module names"),
    Option("lora.bias", "str", "none", "which biases to train", choices=("none", "all", "lora_only")),
    # data
    Option("data.path", "str", "embedded:secret-rules",
           "training data: a json/jsonl/csv/parquet file or folder, or a hub dataset id"),
    Option("data.split", "str", "train", "split of data.path to train on"),
    Option("data.format", "str", None, "dataset format by name (guanaco, alpaca, chat, ...); default: detected",
           nullable=True),
    Option("data.train_on_prompt", "bool", False, "let the loss cover the prompt too, not only the answers"),
    Option("data.eval_path", "str", None, "held-out data (default: data.path's test/validation split if any)",
           nullable=True),
    Option("data.eval_split", "str", None, "split of the eval data (default: test, then validation)",
           nullable=True),
    Option("data.eval_fraction", "float", 0.0,
           "hold out this fraction of the training data for evaluation when there is no eval split",
           minimum=0.0, check=lambda v: None if v < 1 else f"must be < 1 (got {v})"),
    Option("data.max_eval_samples", "int", -1, "evaluate on at most this many examples (-1: all)",
           check=_positive_or_minus_one),
    Option("data.num_proc", "int", 0,
           "processes that format and tokenize the data (0: one per core; fewer for small datasets)", minimum=0),
    Option("data.cache", "bool", True,
           "keep the prepared data on disk ($QLORA_DATA_CACHE, else the qlora cache's prepared/) and reuse it "
           "while the data, format, tokenizer and length are unchanged"),
    Option("data.streaming", "bool", False,
           "read, format and tokenize the training rows as training goes instead of ahead (for datasets too big "
           "to download whole); needs train.max_steps"),
    Option("data.shuffle_buffer", "int", 10_000,
           "with data.streaming: rows shuffled at a time (0: in the data's order)", minimum=0),
    # training
    Option("train.per_device_train_batch_size", "int", 4, "micro-batch size per device", exclusive_minimum=0),
    Option("train.per_device_eval_batch_size", "int", 8, "evaluation batch size per device", exclusive_minimum=0),
    Option("train.gradient_accumulation_steps", "int", 4, "micro-batches per optimizer step", exclusive_minimum=0),
    Option("train.num_train_epochs", "float", 1.0, "passes over the data (when max_steps is -1)",
           exclusive_minimum=0),
    Option("train.max_steps", "int", -1, "optimizer steps to take; -1: from num_train_epochs",
           check=_positive_or_minus_one),
    Option("train.learning_rate", "float", 2e-4, "peak learning rate", minimum=0.0),
    Option("train.lr_scheduler_type", "str", "linear", "learning-rate schedule after warmup",
           choices=("linear", "cosine", "constant", "constant_with_warmup")),
    Option("train.warmup_steps", "int", 0, "steps of linear warmup", minimum=0),
    Option("train.weight_decay", "float", 0.0, "weight decay of the optimizer", minimum=0.0),
    Option("train.max_grad_norm", "float", 0.3, "gradient clipping norm (0: no clipping)", minimum=0.0),
    Option("train.max_nonfinite_steps", "int", 3,
           "steps in a row whose loss or gradients are not finite (each skipped: no weight changes) before the run "
           "stops", exclusive_minimum=0),
    Option("train.max_seq_length", "int", 512, "longer examples are truncated", exclusive_minimum=0),
    Option("train.logging_steps", "int", 10, "log metrics every this many steps", exclusive_minimum=0),
    Option("train.eval_steps", "int", 0, "evaluate every this many steps (0: only before and after training)",
           minimum=0),
    Option("train.save_strategy", "str", "steps",
           "when to write checkpoints besides the last step and a stop signal, which always write one",
           choices=("steps", "epoch", "no")),
    Option("train.save_steps", "int", 500, "with save_strategy steps: a checkpoint every this many steps",
           exclusive_minimum=0),
    Option("train.save_total_limit", "int", -1, "keep only this many newest checkpoints (-1: all)",
           check=_positive_or_minus_one),
    Option("train.packing", "bool", False,
           "padding-free batches: micro-batches of up to per_device_train_batch_size x max_seq_length tokens, "
           "packed into one row or into rows of up to max_seq_length tokens (train.packing_attention), "
           "attention kept within each example"),
    Option("train.auto_find_batch_size", "bool", False,
           "on running out of GPU memory, halve the micro-batch and double gradient accumulation, and go on"),
    Option("train.seed", "int", 42, "random seed for data order, adapters and dropout"),
    Option("train.deterministic", "bool", False,
           "repeat a run bit for bit on the same machine and versions: torch's deterministic algorithms (flash "
           "attention's deterministic backward, a fixed cuBLAS workspace); an operation without one stops the "
           "run with its name. Off: GPU runs differ slightly from one to the next"),
    Option("train.optim", "str", None,
           "optimizer plugin by name (paged_adamw_8bit, paged_adamw_32bit, adamw_8bit, adamw); default: "
           "paged_adamw_8bit",
           nullable=True),
    Option("train.sample_max_new_tokens", "int", 48,
           "tokens generated for the sample answer shown before and after training (0: no sample)", minimum=0),
    Option("train.num_threads", "int", 0, "CPU threads for torch (0: leave torch's default)", minimum=0),
)


class Config:
    """A validated, nested configuration with dotted access: ``config["lora.r"]``."""

    def __init__(self, data: dict[str, Any], options: Mapping[str, Option], plugins: list[str],
                 explicit: Iterable[str] = ()):
        self._data = data
        self.options = dict(options)
        self.plugins = list(plugins)
        self._explicit = frozenset(explicit)

    def is_explicit(self, key: str) -> bool:
        """Whether the config file or ``--set`` gave ``key`` (rather than its default, or a plugin's
        ``config.set``): a plugin adjusting a key can tell a user's choice, to respect or refuse, from a default."""
        return key in self._explicit

    def __getitem__(self, key: str) -> Any:
        node: Any = self._data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(key)
            node = node[part]
        return node

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: str) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def set(self, key: str, value: Any) -> None:
        """Set a known key, coercing and checking the value like the config file's."""
        if key not in self.options:
            raise ConfigError([f"{key}: unknown key"])
        option = self.options[key]
        try:
            value = option.coerce(value)
        except ValueError as e:
            raise ConfigError([f"{key}: {e}"]) from None
        problem = option.validate(value)
        if problem:
            raise ConfigError([f"{key}: {problem}"])
        _set_dotted(self._data, key, value)

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain data (``plugins`` first), as written to ``config.yaml``."""
        return {"plugins": list(self.plugins), **copy.deepcopy(self._data)}

    def dump(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([f"{key}: {'.'.join(parents[:i + 1])} is a value, not a section"])
    node[last] = value


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML config file into nested data (``{}`` for ``None``)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {str(p)!r} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"config file {str(p)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(p)!r} must hold a mapping of keys, not {type(data).__name__}")
    return data


def parse_overrides(pairs: Iterable[str]) -> list[tuple[str, Any]]:
    """Parse ``--set key=value`` strings; values are read as YAML (``[a, b]``, ``true``, ``null``)."""
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set lora.r=32")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def merge_overrides(data: dict[str, Any], overrides: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Return a copy of nested ``data`` with dotted ``overrides`` applied."""
    merged = copy.deepcopy(data)
    for key, value in overrides:
        if key == "plugins":
            merged["plugins"] = value
            continue
        _set_dotted(merged, key, value)
    return merged


def build_config(data: Mapping[str, Any], options: Iterable[Option], plugins: list[str]) -> Config:
    """Validate nested ``data`` against ``options``; raise one :class:`ConfigError` listing every problem."""
    by_key: dict[str, Option] = {}
    for option in options:
        if option.key in by_key:
            raise UsageError(f"config key {option.key} is declared twice (by the core or two plugins)")
        by_key[option.key] = option
    problems: list[str] = []
    explicit: list[str] = []
    resolved: dict[str, Any] = {}
    for option in by_key.values():
        _set_dotted(resolved, option.key, copy.deepcopy(option.default))
    sections = {k.split(".")[0] for k in by_key}
    for key, value in _flatten({k: v for k, v in data.items() if k != "plugins"}):
        option = by_key.get(key)
        if option is None:
            if key in sections:
                problems.append(f"{key}: must be a section of keys, not a value")
                continue
            close = difflib.get_close_matches(key, by_key, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{key}: unknown key{hint}")
            continue
        try:
            value = option.coerce(value)
        except ValueError as e:
            problems.append(f"{key}: {e}")
            continue
        problem = option.validate(value)
        if problem:
            problems.append(f"{key}: {problem}")
            continue
        _set_dotted(resolved, key, value)
        explicit.append(key)
    if problems:
        raise ConfigError(problems)
    return Config(resolved, by_key, plugins, explicit)


def requested_plugins(data: Mapping[str, Any]) -> list[str]:
    """The ``plugins:`` list of a config file's data, checked."""
    value = data.get("plugins", []) or []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError([f"plugins: must be a list of plugin names (got {value!r})"])
    return value
