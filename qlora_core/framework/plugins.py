"""Finding, loading and combining plugins.

Built-in plugins are entry points of the ``qlora`` group, loaded by the same code as third-party ones.
Only the defaults plus the plugins a run asks for take part in it: installing a package never changes a
run by itself.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pluggy

from qlora_core import hookspecs
from qlora_core.framework.errors import PluginError, UsageError

#: The installed qlora's version.
__version__ = "0.1.0"

#: Marks a function or method as the implementation of a hook of :mod:`qlora_core.hookspecs`
#: (``@hookimpl``, ``@hookimpl(tryfirst=True)``, ``@hookimpl(trylast=True)``).
hookimpl = pluggy.HookimplMarker("qlora")

ENTRY_POINT_GROUP = "qlora"

#: Plugins that take part in every run unless turned off with ``--plugin no:NAME``.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "embedded",
    "nf4",
    "all-linear",
    "paged-adamw-8bit",
    "gradient-checkpointing",
    "liger-kernels",
    "guanaco-format",
    "alpaca-format",
    "chat-format",
    "rich-progress",
    "loss-plot",
    "adapter-export",
    "fused-lora",
    "compile-layers",
    "fused-loss",
    "varlen-packing",
    "flat-params",
)


@dataclass
class PluginInfo:
    """A loaded plugin and where it came from."""

    name: str
    plugin: Any
    source: str  # "entry point", "module" or "file"
    distribution: str | None = None
    version: str | None = None
    default: bool = False
    requested: bool = False
    hooks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "distribution": self.distribution,
                "version": self.version, "default": self.default, "requested": self.requested,
                "hooks": list(self.hooks)}


def entry_points() -> dict[str, md.EntryPoint]:
    """Installed entry points of the ``qlora`` group, by name."""
    return {ep.name: ep for ep in md.entry_points(group=ENTRY_POINT_GROUP)}


def implemented_hooks(plugin: Any) -> list[str]:
    """Names of the ``qlora_`` hooks a plugin object marks as implementations."""
    names = []
    for attr in dir(plugin):
        if attr.startswith("qlora_") and hasattr(getattr(plugin, attr, None), "qlora_impl"):
            names.append(attr)
    return sorted(names)


def _module_distribution(module_name: str) -> tuple[str | None, str | None]:
    top = module_name.split(".")[0]
    dists = md.packages_distributions().get(top) or []
    if not dists:
        return None, None
    try:
        return dists[0], md.version(dists[0])
    except md.PackageNotFoundError:
        return dists[0], None


def _import_failure(name: str, exc: BaseException) -> PluginError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    fix = "install what it imports" if isinstance(exc, ImportError) else "fix the plugin"
    return PluginError(f'cannot import plugin "{name}": {type(exc).__name__}: {reason}; {fix}, or run without it')


def _instance(name: str, obj: Any) -> Any:
    """A plugin that is a class is instantiated: one instance per run (each run loads its plugins anew), the
    place where the plugin keeps that run's state."""
    if not isinstance(obj, type):
        return obj
    try:
        return obj()
    except Exception as e:
        raise PluginError(f'plugin "{name}": its class {obj.__name__} cannot be instantiated without arguments: '
                          f'{type(e).__name__}: {e}') from None


def load_plugin(name: str, eps: dict[str, md.EntryPoint] | None = None) -> PluginInfo:
    """Load one plugin by entry-point name, dotted module path (``pkg.mod`` or ``pkg.mod:obj``) or ``.py`` file.

    A plugin that is a class is instantiated (one instance per call, so per run)."""
    eps = entry_points() if eps is None else eps
    if name in eps:
        ep = eps[name]
        try:
            obj = ep.load()
        except Exception as e:
            raise _import_failure(name, e) from None
        dist = ep.dist
        return PluginInfo(name, _instance(name, obj), "entry point", dist.name if dist else None,
                          dist.version if dist else None)
    if name.endswith(".py") or "/" in name or "\\" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise PluginError(f"plugin file {name!r} not found; check the path (--plugin takes an installed "
                              f"plugin's name, a module path or a .py file)")
        mod_name = f"qlora_file_plugin_{path.stem}_{abs(hash(str(path.resolve()))):x}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise _import_failure(name, e) from None
        return PluginInfo(path.stem, module, "file")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name):
            known = ", ".join(sorted(eps)) or "none"
            raise PluginError(
                f"unknown plugin {name!r}: not an installed plugin (installed: {known}), "
                f"an importable module or a .py file") from None
        raise _import_failure(name, e) from None
    except Exception as e:
        raise _import_failure(name, e) from None
    obj: Any = module
    if attr:
        try:
            obj = getattr(module, attr)
        except AttributeError:
            raise PluginError(f"plugin {name!r}: module {module_name} has no attribute {attr!r}; check the name "
                              f"after the colon") from None
    dist, version = _module_distribution(module_name)
    return PluginInfo(name, _instance(name, obj), "module", dist, version)


def parse_plugin_args(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split ``--plugin`` values into (requested, blocked); duplicates are dropped, order kept."""
    requested: list[str] = []
    blocked: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        target = blocked if name.startswith("no:") else requested
        value = name[3:] if name.startswith("no:") else name
        if value not in target:
            target.append(value)
    both = set(requested) & set(blocked)
    if both:
        n = sorted(both)[0]
        raise PluginError(f"plugin {n!r} is both requested and turned off (no:{n}); keep one")
    return requested, blocked


class PluginSet:
    """The plugins that take part in one run, registered with a pluggy manager (``.hook``)."""

    def __init__(self, infos: Sequence[PluginInfo]):
        self.pm = pluggy.PluginManager("qlora")
        self.pm.add_hookspecs(hookspecs)
        self.infos = list(infos)
        # Later registrations are called first: defaults go in first so that requested plugins win.
        for info in sorted(self.infos, key=lambda i: not i.default):
            try:
                self.pm.register(info.plugin, name=info.name)
            except pluggy.PluginValidationError as e:
                reason = " ".join(str(e).split())  # pluggy's message spans lines
                raise PluginError(f"plugin {info.name!r} cannot be registered: {reason}") from None
            except ValueError as e:
                raise PluginError(f"plugin {info.name!r} is loaded twice ({e}); request it once") from None
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            bad = getattr(e, "plugin", None)
            pname = self.pm.get_name(bad) if bad is not None else "?"
            unknown = [h for h in implemented_hooks(bad) if not hasattr(hookspecs, h)] if bad is not None else []
            what = f" {', '.join(unknown)}" if unknown else ""
            raise PluginError(
                f"plugin {pname!r} implements unknown hook{what}; check the name against qlora_core.hookspecs"
            ) from None
        for info in self.infos:
            info.hooks = [h.name for h in self.pm.get_hookcallers(info.plugin) or []]
        defaults = {i.name for i in self.infos if i.default}
        guard_hook_calls(self.pm, lambda name: f"--plugin no:{name}" if name in defaults else None)
        if tracing():
            trace_hook_calls(self.pm)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def names(self) -> list[str]:
        return [i.name for i in self.infos]

    def implementers(self, hook_name: str) -> list[str]:
        return [i.name for i in self.infos if hook_name in i.hooks]

    def to_json(self) -> list[dict[str, Any]]:
        return [i.to_dict() for i in self.infos]

    def dump(self, path: Path) -> None:
        """Write the plugins with their versions, as ``plugins.json`` in runs and checkpoints."""
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


#: The attribute :func:`guard_hook_calls` sets on an exception a hook implementation raised.
_FAILURE_ATTR = "_qlora_plugin_failure"


@dataclass(frozen=True)
class HookFailure:
    """Where an exception came from: the plugin, its hook, and the line of the plugin's file that raised it.

    :ivar turn_off: the option that leaves the plugin out of a run (``--plugin no:NAME`` for a default), if any.
    """

    plugin: str
    hook: str
    where: str | None = None
    turn_off: str | None = None

    def message(self, error: BaseException) -> str:
        """One line: ``plugin 'NAME' failed in HOOK (file.py line N): Type: reason; how to go on``."""
        text = str(error).strip()
        reason = f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
        where = f" ({self.where})" if self.where else ""
        leave = f"turn it off with {self.turn_off}" if self.turn_off else "run without it"
        return (f"plugin {self.plugin!r} failed in {self.hook}{where}: {reason}; a bug in the plugin: fix or "
                f"report it, or {leave}")


def hook_failure(error: BaseException) -> HookFailure | None:
    """The plugin hook an exception was raised in (:func:`guard_hook_calls`), or ``None``."""
    return getattr(error, _FAILURE_ATTR, None)


def _raising_line(error: BaseException, function: Any) -> str | None:
    """``file.py line N``: the innermost line of ``function``'s file in the exception's traceback."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    if code is None:
        return None
    line = None
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == code.co_filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"{Path(code.co_filename).name} line {line}" if line is not None else None


def guard_hook_calls(pm: pluggy.PluginManager, turn_off: Any = None) -> None:
    """Mark each exception a hook implementation raises with the plugin and the hook (:func:`hook_failure`),
    and let it go on unchanged, so that the core still handles what it expects (running out of GPU memory in a
    step); the command line reports the rest as the plugin's failure, in one line. :class:`UsageError` (a
    plugin reporting the user's mistake), memory errors and what is not an ``Exception`` (Ctrl-C) are left
    unmarked; an exception already marked by a hook called further in keeps that mark.

    :param turn_off: ``turn_off(plugin_name)``: the option that leaves the plugin out, or ``None``.
    """
    def guarded(hook_name: str, plugin_name: str, function: Any) -> Any:
        def call(*args: Any) -> Any:
            try:
                return function(*args)
            except UsageError:
                raise
            except Exception as e:
                if hook_failure(e) is None and not _out_of_memory(e):
                    failure = HookFailure(plugin_name, hook_name, _raising_line(e, function),
                                          turn_off(plugin_name) if turn_off else None)
                    try:
                        setattr(e, _FAILURE_ATTR, failure)
                    except (AttributeError, TypeError):  # an exception type that takes no attributes
                        pass
                raise

        call._qlora_guarded = True  # type: ignore[attr-defined]
        return call

    for hook_name in dir(pm.hook):
        if not hook_name.startswith("qlora_"):
            continue
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.hookwrapper or impl.wrapper or getattr(impl.function, "_qlora_guarded", False):
                continue
            impl.function = guarded(hook_name, impl.plugin_name, impl.function)


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"


#: Set to 1 (``qlora --trace-plugins`` does) to log every hook call with its plugin and duration.
TRACE_ENV = "QLORA_TRACE_PLUGINS"


def tracing() -> bool:
    return os.environ.get(TRACE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def trace_hook_calls(pm: pluggy.PluginManager, stream: Any = None) -> None:
    """Log each call of every registered hook implementation, one line to stderr: the hook, the plugin, how long
    it took and what it returned (``-`` for None), or what it raised.

    Each implementation's function is timed on its own (pluggy's call monitoring sees only a whole hook call).
    """
    import time

    def timed(hook_name: str, plugin_name: str, function: Any) -> Any:
        def call(*args: Any) -> Any:
            out = stream or sys.stderr
            t0 = time.perf_counter()
            try:
                result = function(*args)
            except BaseException as e:
                ms = (time.perf_counter() - t0) * 1e3
                print(f"qlora trace: {hook_name} {plugin_name} {ms:.2f} ms raised {type(e).__name__}", file=out,
                      flush=True)
                raise
            ms = (time.perf_counter() - t0) * 1e3
            shown = "-" if result is None else type(result).__name__
            print(f"qlora trace: {hook_name} {plugin_name} {ms:.2f} ms -> {shown}", file=out, flush=True)
            return result

        call.__wrapped__ = function  # type: ignore[attr-defined]
        return call

    for hook_name in dir(pm.hook):
        if not hook_name.startswith("qlora_"):
            continue
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.hookwrapper or impl.wrapper or getattr(impl.function, "__wrapped__", None) is not None:
                continue
            impl.function = timed(hook_name, impl.plugin_name, impl.function)


def select_plugins(requested: Sequence[str], blocked: Sequence[str] = (),
                   defaults: Sequence[str] = DEFAULT_PLUGINS,
                   origins: dict[str, str] | None = None) -> PluginSet:
    """Load the defaults (minus ``blocked``) and the requested plugins, and settle single-choice concerns.

    :param origins: where each requested name came from, for messages (``"train.optim"``).
    """
    eps = entry_points()
    origins = origins or {}
    for name in blocked:
        if name not in eps and name not in defaults and name not in requested:
            raise PluginError(f"--plugin no:{name}: no plugin named {name!r} is installed (see qlora plugins)")
    infos: list[PluginInfo] = []
    for name in defaults:
        if name in blocked or name in requested:
            continue
        info = load_plugin(name, eps)
        info.default = True
        infos.append(info)
    wanted = []
    for name in requested:
        info = load_plugin(name, eps)
        info.default = name in defaults
        info.requested = True
        wanted.append(info)

    def label(info: PluginInfo) -> str:
        origin = origins.get(info.name)
        return f"{info.name!r}" + (f" (from {origin})" if origin else "")

    dropped: set[str] = set()
    for hook_name, concern in hookspecs.SINGLE_CHOICE_HOOKS.items():
        claimants = [i for i in wanted if hook_name in implemented_hooks(i.plugin)]
        if len(claimants) > 1:
            a, b = claimants[0], claimants[1]
            raise PluginError(
                f"plugins {label(a)} and {label(b)} both provide the {concern}; request only one of them")
        if claimants:
            dropped |= {i.name for i in infos if hook_name in implemented_hooks(i.plugin)}
    infos = [i for i in infos if i.name not in dropped] + wanted
    return PluginSet(infos)


def _decorated_hooks(body: Sequence[ast.stmt]) -> list[str]:
    """The ``qlora_`` functions among ``body`` that carry a ``hookimpl`` decorator (``@hookimpl``,
    ``@hookimpl(...)``, ``@qlora_core.hookimpl``)."""
    def is_hookimpl(dec: ast.expr) -> bool:
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        return name == "hookimpl"

    return sorted(node.name for node in body
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("qlora_")
                  and any(is_hookimpl(d) for d in node.decorator_list))


def static_hooks(value: str) -> tuple[list[str], str] | None:
    """The hooks an entry point's object implements and the file it lives in, read from the source without
    running it; ``None`` where the source does not say (no source file, an object built by a call to a class
    from elsewhere, hooks added at run time): then the plugin must be imported.

    :param value: the entry point's value, ``module`` or ``module:attribute``.
    """
    module_name, _, attr = value.partition(":")
    try:
        spec = importlib.util.find_spec(module_name)  # imports the parent packages only
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    if not attr:
        return _decorated_hooks(tree.body), spec.origin
    if attr in classes:
        cls = classes[attr]
        if any(not (isinstance(b, ast.Name) and b.id == "object") for b in cls.bases):
            return None  # hooks may be inherited from a class defined elsewhere
        return _decorated_hooks(cls.body), spec.origin
    for node in tree.body:  # NAME = SomeClass(...) with SomeClass defined in the module
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attr for t in node.targets):
            call = node.value
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in classes:
                cls = classes[call.func.id]
                if not cls.bases:
                    return _decorated_hooks(cls.body), spec.origin
    return None


def installed_plugins(load: bool = False) -> list[dict[str, Any]]:
    """Every installed ``qlora`` entry point with its distribution, version, file, hooks and default flag.

    The hooks are read from the plugin's source where it says them (:func:`static_hooks`), so listing imports
    no plugin's dependencies; otherwise, or with ``load``, the plugin is imported. A plugin that fails to
    import is listed with its error instead of hooks.
    """
    out = []
    for name, ep in sorted(entry_points().items()):
        dist = ep.dist
        row: dict[str, Any] = {"name": name, "distribution": dist.name if dist else None,
                               "version": dist.version if dist else None, "default": name in DEFAULT_PLUGINS,
                               "entry_point": ep.value}
        found = None if load else static_hooks(ep.value)
        if found is not None:
            row["hooks"], row["file"] = found
            row["imported"] = False
        else:
            row["imported"] = True
            try:
                obj = ep.load()
                row["hooks"] = implemented_hooks(obj)
                module = sys.modules.get(ep.module)
                row["file"] = getattr(module, "__file__", None)
            except Exception as e:
                row["hooks"] = []
                row["error"] = f"{type(e).__name__}: {e}"
        out.append(row)
    return out


def installed_plugin_objects() -> list[tuple[str, Any]]:
    """Every installed ``qlora`` entry point that imports, loaded (classes instantiated), by name: for the hooks
    that ask every installed plugin rather than a run's (commands, bench variants). One that fails to import is
    left out; ``qlora plugins`` shows its error."""
    out = []
    for name, ep in sorted(entry_points().items()):
        try:
            out.append((name, _instance(name, ep.load())))
        except Exception:  # noqa: BLE001 - listed with its error by `qlora plugins`
            continue
    return out


def installed_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager holding every installed plugin that imports (:func:`installed_plugin_objects`)."""
    pm = pluggy.PluginManager("qlora")
    pm.add_hookspecs(hookspecs)
    for name, obj in installed_plugin_objects():
        try:
            pm.register(obj, name=name)
        except (ValueError, pluggy.PluginValidationError):
            continue
    guard_hook_calls(pm)
    return pm
