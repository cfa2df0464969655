"""``qlora new-plugin``: a new plugin package folder, from the templates in ``qlora_core/templates/plugin/``.

The package is complete the moment it is written: a ``pyproject.toml`` registering the plugin under the ``qlora``
entry-point group, a README, the plugin module (a config option through ``qlora_config_options`` and a
``qlora_on_log`` that prints the loss) and tests using qlora's pytest fixtures, which pass once it is installed.
Each ``--hook`` adds an implementation of that hook to the module, with the hook's arguments, that leaves a run
as it was (and, for the single-choice optimizer and dataset-format hooks, a working starting point).

The folder is written under a temporary name in the parent folder and renamed when complete: a mistake leaves
nothing behind.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import inspect
import os
import re
import shutil
import tempfile
import textwrap
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Iterable, Sequence

from qlora_core import hookspecs
from qlora_core.framework.errors import UsageError
from qlora_core.framework.plugins import __version__

#: A plugin name: lower-case words of letters and digits joined by single hyphens, starting with a letter.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")

#: What the example module implements whatever ``--hook`` asks for.
EXAMPLE_HOOKS = ("qlora_config_options", "qlora_on_log")

#: Template file -> its path in the package (``$module`` is the module's name).
FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "module.py.tmpl": "$module.py",
    "test_module.py.tmpl": "tests/test_$module.py",
}


@dataclass(frozen=True)
class Starter:
    """The body of an added hook implementation, the names it imports from ``qlora_core`` and code it needs
    at module level (after the hooks)."""

    body: str
    imports: tuple[str, ...] = ()
    module_code: str = ""


# A requested plugin implementing a single-choice hook replaces the defaults that implement it, so these two
# must do the job themselves for the run to train; the other single-choice hooks fall back to the core when
# they return None (no quantization, lora.target_modules, accelerate).
STARTERS: dict[str, Starter] = {
    "qlora_optimizer": Starter(
        '    import torch\n\n'
        '    return torch.optim.AdamW(params, lr=config["train.learning_rate"],\n'
        '                             weight_decay=config["train.weight_decay"])\n'),
    "qlora_dataset_formats": Starter(
        "    return [TextTurns()]\n",
        imports=("ChatTemplateFormat",),
        module_code='''

class TextTurns(ChatTemplateFormat):
    """Rows of ``text`` holding ``### Human: QUESTION### Assistant: ANSWER``, rendered with the tokenizer's
    chat template; the loss covers the answer."""

    name = "$plugin-text"
    fields = ("text",)

    def messages(self, example):
        question, answer = example["text"].removeprefix("### Human:").split("### Assistant:", 1)
        return [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": answer.strip()}]
'''),
    "qlora_bench_variants": Starter("    return {}\n"),
}


def hook_names() -> list[str]:
    """Every hook of :mod:`qlora_core.hookspecs`, in the order the file declares them."""
    return [name for name, obj in vars(hookspecs).items()
            if name.startswith("qlora_") and callable(obj) and hasattr(obj, "qlora_spec")]


def _plugin_names() -> dict[str, str]:
    """The installed plugins' names and the distribution of each."""
    found = {}
    for ep in md.entry_points(group="qlora"):
        found.setdefault(ep.name, ep.dist.name if ep.dist is not None else "?")
    return found


def check_name(name: str) -> None:
    """Raise :class:`UsageError` unless ``name`` can name a new plugin."""
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"plugin name {name!r} is not valid: use lower-case letters, digits and single hyphens, "
                         f"starting with a letter (e.g. loss-printer)")
    if name.startswith("qlora-") or name == "qlora":
        raise UsageError(f"plugin name {name!r}: leave out the qlora- prefix, the package is named qlora-NAME "
                         f"already (e.g. {name.removeprefix('qlora-') or 'loss-printer'})")
    taken = _plugin_names().get(name)
    if taken:
        raise UsageError(f"a plugin named {name!r} is installed already (from {taken}); choose another name")


def check_hooks(hooks: Iterable[str]) -> list[str]:
    """The hooks asked for, as full names without repeats (``on_save`` is ``qlora_on_save``); an unknown one
    is a :class:`UsageError` naming the closest hooks."""
    known = hook_names()
    chosen: list[str] = []
    for hook in hooks:
        full = hook if hook.startswith("qlora_") else f"qlora_{hook}"
        if full not in known:
            close = difflib.get_close_matches(full, known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "see qlora_core/hookspecs.py for the hooks"
            raise UsageError(f"--hook {hook}: no such hook; {hint}")
        if full not in chosen and full not in EXAMPLE_HOOKS:
            chosen.append(full)
    return chosen


def _hook_code(hook: str, section: str) -> tuple[str, Starter]:
    spec = getattr(hookspecs, hook)
    sig = inspect.signature(spec)
    summary = " ".join((inspect.getdoc(spec) or "").split("\n\n", 1)[0].split()).replace(chr(34) * 3, "")
    firstresult = bool(spec.qlora_spec.get("firstresult"))
    starter = STARTERS.get(hook)
    if starter is None:
        returns = sig.return_annotation not in (None, "None")
        if firstresult:
            body = "    return None  # None: the next plugin, or the core, decides\n"
        elif returns:
            body = "    return None\n"
        else:
            body = ""
        starter = Starter(body)
    doc = textwrap.fill(f'"""{summary}"""', width=116, initial_indent="    ", subsequent_indent="    ") + "\n" \
        if summary else ""
    code = f"\n\n@hookimpl\ndef {hook}({', '.join(sig.parameters)}):\n{doc}{starter.body}"
    if not doc and not starter.body:
        code += "    pass\n"
    return code, starter


def render(name: str, hooks: Sequence[str] = ()) -> dict[str, str]:
    """The package's files, path -> text, for plugin ``name`` (checked) with implementations of ``hooks``."""
    check_name(name)
    added = check_hooks(hooks)
    module = "qlora_" + name.replace("-", "_")
    section = name.replace("-", "_")
    imports = {"Option", "hookimpl"}
    hook_code, module_code = "", ""
    for hook in added:
        code, starter = _hook_code(hook, section)
        hook_code += code
        imports.update(starter.imports)
        module_code += starter.module_code
    values = {
        "plugin": name,
        "dist": f"qlora-{name}",
        "module": module,
        "section": section,
        "description": f"Prints the training loss of a qlora run's logging steps (plugin {name}).",
        "qlora_version": __version__,
        "imports": ", ".join(sorted(imports, key=lambda n: (n.islower(), n))),
        # Module-level code the hooks need is itself a template (the dataset format's name uses $section).
        "hooks": hook_code + Template(module_code).substitute(plugin=name),
    }
    templates = resources.files("qlora_core").joinpath("templates", "plugin")
    files = {}
    for template, target in FILES.items():
        text = Template(templates.joinpath(template).read_text(encoding="utf-8")).substitute(values)
        files[Template(target).substitute(module=module)] = text.rstrip("\n") + "\n"
    return files


def new_plugin(name: str, parent: str | os.PathLike = ".", hooks: Sequence[str] = ()) -> Path:
    """Write the plugin package ``qlora-NAME/`` into ``parent`` and return its path.

    :raises UsageError: on a bad name or hook, a missing parent folder or an existing package folder; nothing is
        written then.
    """
    parent = Path(parent)
    files = render(name, hooks)
    if not parent.is_dir():
        raise UsageError(f"--dir {parent}: no such folder; create it first or pick another")
    target = parent / f"qlora-{name}"
    if target.exists() or target.is_symlink():
        raise UsageError(f"{target} exists already; remove it or pick another name or --dir")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".qlora-{name}-", dir=parent))
    except OSError as e:
        raise UsageError(f"--dir {parent}: cannot write there ({e.strerror}); pick another folder") from None
    try:
        for path, text in files.items():
            (staging / path).parent.mkdir(parents=True, exist_ok=True)
            (staging / path).write_text(text, encoding="utf-8")
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's folder is private; a package folder is not
        if target.exists():  # created meanwhile: never replace it
            raise UsageError(f"{target} exists already; remove it or pick another name or --dir")
        os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
