"""Setting a run up: the config (a file, a mapping or the embedded default job, with ``--set`` overrides) and the
plugins taking part, resolved together; the device and the compute dtype.

Nothing heavy is imported here: ``qlora run`` and ``qlora plan`` resolve a run before any model is loaded.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from qlora_core.framework.config import (CORE_OPTIONS, Config, ConfigError, build_config, merge_overrides,
                                         parse_overrides, requested_plugins)
from qlora_core.framework.errors import UsageError
from qlora_core.framework.plugins import (PluginSet, entry_points, implemented_hooks, load_plugin, parse_plugin_args,
                                          select_plugins)

if TYPE_CHECKING:
    import torch


def default_config_data() -> dict[str, Any]:
    """The embedded default job's config (``qlora run`` with no config file)."""
    import yaml

    return yaml.safe_load(resources.files("qlora_core").joinpath("default_run.yaml").read_text())


def read_config(path: str | Path) -> dict[str, Any]:
    """A YAML config file's data: a mapping of sections and keys.

    A file that cannot serve is a :class:`UsageError` naming the file, the line where that is known, and the
    fix: a folder or missing file, bytes that are not UTF-8, invalid YAML, a key given twice in one mapping
    (YAML would keep the last silently), or a document that is not a mapping (a list, a plain value). An empty
    file is an empty config.
    """
    import yaml

    p = Path(path)
    name = str(p)
    if p.is_dir():
        inside = " (it holds a config.yaml: pass that file)" if (p / "config.yaml").is_file() else ""
        raise UsageError(f"config file {name!r} is a folder, not a YAML file{inside}; pass the path of a .yaml file")
    if not p.is_file():
        raise UsageError(f"config file {name!r} not found; check the path (or give no CONFIG for the embedded "
                         f"default job)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {name!r} is not UTF-8 text: byte 0x{raw[e.start]:02x} at "
                         f"{_byte_position(raw, e.start)}; save the file as UTF-8") from None
    try:
        duplicate = _duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"config file {name!r} is not valid YAML{_yaml_position(e)}; fix that line") from None
    if duplicate:  # YAML itself would keep the last value silently
        raise UsageError(f"config file {name!r} {duplicate}; keep one of them")
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a plain string", int: "a number", float: "a number",
                bool: "a boolean"}.get(type(data), f"a {type(data).__name__}")
        raise UsageError(f"config file {name!r} holds {kind}, not a mapping of keys; write sections of "
                         f"`key: value` lines, e.g. `lora:` then `  r: 16` (see docs/configuration.md)")
    return data


def _byte_position(raw: bytes, offset: int) -> str:
    """Where byte ``offset`` of ``raw`` is, for a message: line (1-based) and byte offset."""
    line = raw.count(b"\n", 0, offset) + 1
    return f"line {line} (byte offset {offset})"


def _yaml_position(e: Exception) -> str:
    """`` at line L, column C: problem (context)`` for a YAML error, as much as it knows."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    if "'\\t'" in problem:
        problem += " (YAML indents with spaces, not tabs)"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None and (mark is None or cmark.line != mark.line):
        problem += f" ({context} that starts at line {cmark.line + 1}, column {cmark.column + 1})"
    return f"{where}: {problem}"


def _duplicate_key(node: Any, parents: tuple[str, ...] = ()) -> str | None:
    """The first key that a mapping of a composed YAML document gives twice, as a message part; else ``None``."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key is not None and key != "<<":
                if key in seen:
                    where = f" in section {'.'.join(parents)}" if parents else ""
                    return f"gives the key {key!r}{where} twice, at line {seen[key]} and line {line}"
                seen[key] = line
            found = _duplicate_key(value_node, parents + (str(key),))
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_key(item, parents)
            if found:
                return found
    return None


def _optimizer_plugin_names(eps) -> list[str]:
    names = []
    for name in sorted(eps):
        try:
            if "qlora_optimizer" in implemented_hooks(eps[name].load()):
                names.append(name.replace("-", "_"))
        except Exception:
            continue
    return names


def resolve(config: str | Path | Mapping[str, Any] | None = None, plugins: Sequence[str] = (),
            overrides: Sequence[str] | Sequence[tuple[str, Any]] = (), *,
            run_folder: bool = False) -> tuple[Config, PluginSet]:
    """Turn a config file (or dict, or the embedded default), ``--plugin`` names and ``--set`` overrides into a
    validated :class:`Config` and the :class:`PluginSet` taking part in the run.

    :param run_folder: the config is a run folder's ``config.yaml`` (resuming, evaluating, merging): a key that
        only a plugin the run left out declares is dropped, not refused. Such a folder may come from a release
        whose core declared keys a plugin declares now (``train.fused_lora`` in a run with ``no:fused-lora``).
    """
    if config is None:
        data = default_config_data()
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        data = read_config(config)
    # Overrides come as "key=value" strings (the CLI's --set) or (key, value) pairs (Python callers).
    pairs = [o if isinstance(o, tuple) else parse_overrides([o])[0] for o in overrides]
    data = merge_overrides(data, pairs)
    requested, blocked = parse_plugin_args(requested_plugins(data) + list(plugins))
    origins: dict[str, str] = {}
    train = data.get("train")
    optim = train.get("optim") if isinstance(train, dict) else None
    if optim is not None:
        eps = entry_points()
        name = next((n for n in (str(optim), str(optim).replace("_", "-")) if n in eps), None)
        if name is None or "qlora_optimizer" not in implemented_hooks(load_plugin(name, eps).plugin):
            raise ConfigError([f"train.optim: unknown optimizer {optim!r}; installed: "
                               f"{', '.join(_optimizer_plugin_names(eps))}"])
        if name not in requested:
            requested.append(name)
            origins[name] = "train.optim"
    plugin_set = select_plugins(requested, blocked, origins=origins)
    options = list(CORE_OPTIONS)
    for extra in plugin_set.hook.qlora_config_options():
        options.extend(extra or [])
    if run_folder:
        data = _without_keys(data, _inactive_plugin_keys({o.key for o in options}))
    cfg = build_config(data, options, requested + [f"no:{b}" for b in blocked])
    return cfg, plugin_set


def _inactive_plugin_keys(active: set[str]) -> set[str]:
    """Config keys that installed plugins declare and the run's options do not."""
    from qlora_core.framework.plugins import installed_plugin_manager

    declared = {o.key for offered in installed_plugin_manager().hook.qlora_config_options() for o in offered or []}
    return declared - active


def _without_keys(data: Mapping[str, Any], keys: set[str]) -> dict[str, Any]:
    """Nested ``data`` without the dotted ``keys``."""
    out = copy.deepcopy(dict(data))
    for key in keys:
        *parents, last = key.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype_for(config: Config, device: str) -> "torch.dtype":
    """``quant.bnb_4bit_compute_dtype``, with ``auto`` meaning bfloat16 on a GPU that supports it, else float32."""
    import torch

    name = config["quant.bnb_4bit_compute_dtype"]
    if name == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def run_config_file(run_dir: str | Path) -> Path:
    """The ``config.yaml`` of a run folder, or a :class:`UsageError` saying the folder is not a run."""
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        raise UsageError(f"{str(run_dir)!r} is not a qlora run folder (no config.yaml); pass the folder "
                         f"`qlora run --output` wrote")
    return config
