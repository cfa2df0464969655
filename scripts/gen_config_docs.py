"""Render the config keys into docs/configuration.md: the core's (``qlora_core.framework.config.CORE_OPTIONS``)
and those every built-in plugin declares (``qlora_config_options`` of the ``qlora`` distribution's entry points),
each of these marked with its plugin.

The tables go between the markers ``<!-- options:start -->`` and ``<!-- options:end -->``, and the embedded
default job's config (``qlora_core/default_run.yaml``) between ``<!-- default-run:start -->`` and
``<!-- default-run:end -->``; the rest of the page is written by hand. Run it after changing either::

    python scripts/gen_config_docs.py           # rewrite the tables
    python scripts/gen_config_docs.py --check   # exit 1 when the page is stale (tests/test_docs.py runs this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterable

from qlora_core.framework.config import CORE_OPTIONS, Option
from qlora_core.framework.plugins import entry_points, implemented_hooks, load_plugin

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
START = "<!-- options:start -->"
END = "<!-- options:end -->"
DEFAULT_RUN_START = "<!-- default-run:start -->"
DEFAULT_RUN_END = "<!-- default-run:end -->"
DEFAULT_RUN = ROOT / "qlora_core" / "default_run.yaml"

SECTIONS: dict[str, str] = {
    "model": "The base model.",
    "quant": "How the base model is quantized when loaded (read by the default `nf4` plugin).",
    "lora": "The LoRA adapters (targets are chosen by the default `all-linear` plugin).",
    "data": "Training and held-out data.",
    "train": "The training loop, the optimizer and what is shown while training.",
}

TYPE_NAMES: dict[str, str] = {
    "int": "int",
    "float": "float",
    "bool": "bool",
    "str": "str",
    "str_list": "list of str",
    "str_or_list": "str or list of str",
    "auto_bool": "bool or `auto`",
}

# An Option's ``check`` is code, so what it allows cannot be read off it: each one is described here.
# A key with a check missing from this table makes the script fail, so a new rule cannot go undocumented.
CHECK_TEXT: dict[str, str] = {
    "lora.lora_dropout": "< 1",
    "data.eval_fraction": "< 1",
    "data.max_eval_samples": "> 0, or -1",
    "train.max_steps": "> 0, or -1",
    "train.save_total_limit": "> 0, or -1",
    "offload.gpu_memory": "a size (`40GiB`, `500MB`), or `auto`",
    "offload.cpu_memory": "a size (`40GiB`, `500MB`), or `auto`",
}


def _value(value: Any) -> str:
    """A value as it is written in YAML, in backticks."""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{'true' if value else 'false'}`"
    if isinstance(value, float):
        return f"`{value!r}`"
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(map(str, value)) + "]`"
    return f"`{value}`"


def _number(value: float, type_: str) -> str:
    return str(int(value)) if type_ == "int" and float(value).is_integer() else f"{value:g}"


def allowed(option: Option) -> str:
    """What values the option accepts beyond its type, in words."""
    parts = []
    if option.choices is not None:
        parts.append(", ".join(_value(c) for c in option.choices))
    if option.exclusive_minimum is not None:
        parts.append(f"> {_number(option.exclusive_minimum, option.type)}")
    if option.minimum is not None:
        parts.append(f">= {_number(option.minimum, option.type)}")
    if option.maximum is not None:
        parts.append(f"<= {_number(option.maximum, option.type)}")
    if option.check is not None:
        if option.key not in CHECK_TEXT:
            raise SystemExit(f"error: option {option.key} has a custom check; describe it in CHECK_TEXT "
                             f"in {Path(__file__).name}")
        parts.append(CHECK_TEXT[option.key])
    text = "; ".join(parts) or "any"
    return text + ", or `null`" if option.nullable else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


#: The distribution whose entry points are the built-in plugins.
DISTRIBUTION = "qlora"


def plugin_options() -> list[tuple[str, Option]]:
    """The keys the built-in plugins declare, as ``(plugin name, option)``, the plugins in name order."""
    eps = {name: ep for name, ep in entry_points().items() if ep.dist is not None and ep.dist.name == DISTRIBUTION}
    out = []
    for name in sorted(eps):
        plugin = load_plugin(name, eps).plugin
        if "qlora_config_options" in implemented_hooks(plugin):
            out.extend((name, option) for option in plugin.qlora_config_options() or [])
    return out


def render(options: Iterable[Option] = CORE_OPTIONS,
           declared_by_plugins: Iterable[tuple[str, Option]] = ()) -> str:
    """The markdown tables, one per section, in the order the options are declared (the core's first). A section
    only a plugin declares says so; a plugin's key in another section names its plugin."""
    by_section: dict[str, list[tuple[str | None, Option]]] = {}
    for owner, option in [*((None, o) for o in options), *declared_by_plugins]:
        by_section.setdefault(option.key.split(".", 1)[0], []).append((owner, option))
    out = []
    for section, opts in by_section.items():
        owners = {owner for owner, _ in opts}
        said = None  # the plugin the section's introduction names
        out.append(f"### `{section}`")
        out.append("")
        if section in SECTIONS:
            out.append(SECTIONS[section])
            out.append("")
        elif len(owners) == 1 and None not in owners:
            said = next(iter(owners))
            out.append(f"Declared by the `{said}` plugin: these keys exist only in runs that include it.")
            out.append("")
        out.append("| key | type | default | allowed | meaning |")
        out.append("|---|---|---|---|---|")
        for owner, o in opts:
            by = f"declared by the `{owner}` plugin: " if owner not in (None, said) else ""
            out.append(f"| `{o.key}` | {TYPE_NAMES[o.type]} | {_value(o.default)} | {_cell(allowed(o))} "
                       f"| {_cell(by + o.help)} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def render_default_run() -> str:
    """The embedded default job's YAML, as a code block."""
    return "```yaml\n" + DEFAULT_RUN.read_text().rstrip("\n") + "\n```\n"


def replace_between_markers(page: str, body: str, start_marker: str = START, end_marker: str = END) -> str:
    start, end = page.find(start_marker), page.find(end_marker)
    if start < 0 or end < start:
        raise SystemExit(f"error: {DOC} lacks the markers {start_marker} ... {end_marker}")
    return page[: start + len(start_marker)] + "\n\n" + body + "\n" + page[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when docs/configuration.md is stale")
    args = parser.parse_args(argv)
    page = DOC.read_text()
    updated = replace_between_markers(page, render(CORE_OPTIONS, plugin_options()))
    updated = replace_between_markers(updated, render_default_run(), DEFAULT_RUN_START, DEFAULT_RUN_END)
    if args.check:
        if updated != page:
            print(f"error: {DOC.relative_to(ROOT)} is stale; run python scripts/gen_config_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    if updated != page:
        DOC.write_text(updated)
        print(f"updated {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
