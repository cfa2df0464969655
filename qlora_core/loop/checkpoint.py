"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder ``RUN_DIR/checkpoints/step-NNNNNNN`` holding the adapter (PEFT format), the
optimizer and scheduler states (``optimizer.pt``, ``scheduler.pt``), the random-number-generators' states
(``rng.json``), the training position (``state.json``), the resolved config and plugin versions, and last
``manifest.json``: the size and SHA-256 of every other file. It is written under a temporary name and renamed
when complete, so a crash while writing never leaves a folder that looks like a checkpoint; a write that fails
(a full disk, a file-size limit) removes the temporary folder and leaves the earlier checkpoints as they were.

Nothing in a checkpoint runs code when it is loaded: the adapter is safetensors, the RNG states and the
position are JSON, and the optimizer and scheduler states are read with ``torch.load(weights_only=True)``,
which builds only tensors, numbers, strings and containers of them and refuses a file naming any other
callable. Such a file is reported, and nothing in it runs. Checkpoints of earlier releases (``rng.pt`` holding
numpy arrays, no manifest) load the same way, with numpy's array-rebuilding functions allowed for ``rng.pt``.

On resume the checkpoints are tried newest first, and the first whose files match its manifest is used
(:func:`resumable_checkpoint`); one without a manifest is taken as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_core.framework.errors import PluginError, UsageError

if TYPE_CHECKING:
    from qlora_core.framework.config import Config
    from qlora_core.framework.plugins import PluginSet

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step-(\d+)$")
#: The files a resume reads; a checkpoint with a manifest must list each of them.
_LOADED = ("adapter/adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.json", "state.json")
_CHUNK = 1 << 20


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (its files are not checked: see :func:`resumable_checkpoint`)."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


# --------------------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> Path:
    """Write ``folder/manifest.json``: every other file's path (relative, ``/``-separated) -> size and SHA-256.
    Each file is flushed to the disk first, so the manifest never describes data still in a write cache."""
    folder = Path(folder)
    files = {}
    manifest = folder / MANIFEST
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p != manifest):
        _fsync(path)
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    _write_bytes(manifest, (json.dumps({"format": 1, "files": files}, indent=1) + "\n").encode())
    return manifest


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint at ``path`` must not be used (its files differ from its manifest), naming the file;
    ``None`` when it is intact or has no manifest (written by an earlier release)."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = {str(rel): (int(e["size"]), str(e["sha256"])) for rel, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for rel in entries:
        if rel.startswith("/") or ".." in rel.split("/"):
            return f"{MANIFEST} names a file outside the checkpoint ({rel!r})"
    for rel in _LOADED:
        if rel not in entries:
            return f"{rel} is not in its {MANIFEST}"
    for rel, (size, _) in entries.items():  # sizes first: a torn file is found without hashing the rest
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{rel} has {actual} bytes where its {MANIFEST} says {size}"
    for rel, (_, sha) in entries.items():
        if _sha256(path / rel) != sha:
            return f"{rel} differs from its {MANIFEST} (same size, another SHA-256)"
    return None


def set_aside(path: Path) -> Path:
    """Rename the checkpoint folder ``path`` out of the checkpoints' names, to ``.NAME.refused`` (then
    ``.NAME.refused-2`` and on, when a checkpoint of that step was set aside before), and return the new path.
    Nothing is deleted: the files stay for a person to look at."""
    target = path.with_name(f".{path.name}.refused")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f".{path.name}.refused-{n}")
    path.rename(target)
    return target


def resumable_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of ``run_dir`` whose files match its manifest, and one notice line for each newer
    one that was passed over (naming the file that differs).

    :returns: ``(None, [])`` when the run has no checkpoint at all.
    :raises UsageError: the run has checkpoints and none is intact (one line, each one's reason).
    """
    refused: list[tuple[Path, str]] = []
    for path in reversed(checkpoint_dirs(run_dir)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path, [f"checkpoint {bad} was not used: {why}; resuming from {path.name} instead"
                          for bad, why in refused]
        refused.append((path, reason))
    if not refused:
        return None, []
    reasons = "; ".join(f"{p.name}: {why}" for p, why in refused)
    raise UsageError(f"run folder {str(run_dir)!r} has no intact checkpoint to resume from ({reasons}); nothing was "
                     f"loaded — restore a checkpoint folder from a copy, or start the run again")


# --------------------------------------------------------------------------- random-number generators


def rng_state() -> dict[str, Any]:
    """The states of Python's, numpy's and torch's (CPU and CUDA) global generators."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """:func:`rng_state` as JSON values (Python's floats round-trip exactly through JSON)."""
    version, internal, gauss_next = state["python"]
    name, key, pos, has_gauss, cached = state["numpy"]
    data = {"format": 1,
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
            "numpy": {"bit_generator": name, "key": [int(k) for k in key], "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": state["torch"].tolist()}
    if "cuda" in state:
        data["cuda"] = [s.tolist() for s in state["cuda"]]
    return data


def rng_from_json(data: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`rng_to_json`."""
    import numpy as np
    import torch

    py, npy = data["python"], data["numpy"]
    state = {"python": (py["version"], tuple(py["state"]), py["gauss_next"]),
             "numpy": (npy["bit_generator"], np.asarray(npy["key"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                       npy["cached_gaussian"]),
             "torch": torch.tensor(data["torch"], dtype=torch.uint8)}
    if "cuda" in data:
        state["cuda"] = [torch.tensor(s, dtype=torch.uint8) for s in data["cuda"]]
    return state


def _numpy_rebuilders() -> list:
    """What unpickling numpy's generator state (a uint32 array) calls: allowed for ``rng.pt`` of earlier
    releases only. None of them can call anything else: an array of Python objects would still need those
    objects' own (refused) callables."""
    import numpy as np

    multiarray = (getattr(np, "_core", None) or np.core).multiarray
    allowed: list = [np.ndarray, np.dtype,
                     (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                     (multiarray._reconstruct, "numpy._core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed.append(dtypes.UInt32DType)
    return allowed


# --------------------------------------------------------------------------- writing


class _Writer:
    """A binary file that keeps the first OS error of a write (torch.save reports it as a RuntimeError)."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to the disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_plain(obj: Any, path: Path, what: str) -> None:
    """``torch.save`` ``obj`` to ``path``, refusing a state that could only be loaded by running code."""
    import torch

    with open(path, "wb") as f:
        writer = _Writer(f)
        try:
            torch.save(obj, writer)
        except Exception:
            if writer.error is not None:
                raise writer.error from None
            raise
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    if unsafe:
        raise PluginError(f"the {what} state holds {', '.join(sorted(unsafe))}, which a checkpoint cannot hold: "
                          f"loading it would run code; the {what} must keep its state as tensors, numbers, "
                          f"strings, and lists, tuples and dicts of them")


def _os_error(error: BaseException) -> OSError | None:
    """The OS error (full disk, file-size limit, permissions) behind a failed write, if that is what it was;
    safetensors reports one as ``SafetensorError('... (os error N)')``."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m:
            code = int(m.group(1))
            return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None


_WRAPPER_PREFIX = "_fsdp_wrapped_module."


def save_adapter(model: Any, folder: Path) -> None:
    """Write a PEFT model's adapter in PEFT's format (``PeftModel.from_pretrained`` loads it).

    Under FSDP (plugins/fsdp.py) the adapters are not sharded: every process holds them whole, so they are read
    from the parameters themselves. ``save_pretrained`` would call ``model.state_dict()``, a collective call under
    FSDP that every process must make and that gathers the sharded base model too; and PEFT's key selection does
    not expect the wrapper's module names.
    """
    names = [name for name, _ in model.named_parameters()]
    if not any(_WRAPPER_PREFIX in name for name in names):
        model.save_pretrained(folder, safe_serialization=True)
        return
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    weights = {name.replace(_WRAPPER_PREFIX, ""): t.contiguous().cpu()
               for name, t in get_peft_model_state_dict(model, state_dict=trainable).items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = model.peft_config["default"]
    inference_mode = config.inference_mode
    config.inference_mode = True  # as save_pretrained writes it
    try:
        config.save_pretrained(str(folder))
    finally:
        config.inference_mode = inference_mode


def save_checkpoint(run_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any, train_state: dict,
                    config: "Config", plugins: "PluginSet", keep: int = -1) -> Path:
    """Write the checkpoint of ``step`` atomically; keep only the newest ``keep`` (-1: all).

    :raises UsageError: the disk refused a write (full, a file-size limit, no permission): the partial folder is
        removed and the earlier checkpoints are intact.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.partial"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_adapter(model, tmp / "adapter")
        _save_plain(optimizer.state_dict(), tmp / "optimizer.pt", "optimizer")
        _save_plain(scheduler.state_dict(), tmp / "scheduler.pt", "learning-rate scheduler")
        (tmp / "rng.json").write_text(json.dumps(rng_to_json(rng_state())) + "\n")
        (tmp / "state.json").write_text(json.dumps(train_state, indent=2) + "\n")
        config.dump(tmp / "config.yaml")
        plugins.dump(tmp / "plugins.json")
        write_manifest(tmp)  # last: a folder with a manifest was written whole
        _fsync(tmp)
        stale = root / f".step-{step:07d}.replaced"
        if final.exists():  # a resumed run writes again a step it had saved before
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
        os.replace(tmp, final)
        _fsync(root)
        shutil.rmtree(stale, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = _os_error(e) if isinstance(e, Exception) else None
        if error is None:
            raise
        earlier = [d for d in checkpoint_dirs(run_dir) if int(_NAME.match(d.name).group(1)) < step]
        intact = next((d for d in reversed(earlier) if verify_checkpoint(d) is None), None)
        kept = (f"the previous checkpoint {intact.name} is intact — free space and resume with "
                f"qlora run --resume {run_dir}") if intact else "no earlier checkpoint is intact"
        raise UsageError(f"could not write checkpoint {final.name} in {root}: {error.strerror or error}; "
                         f"{kept}") from e
    if keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            # Renamed out of the checkpoints' names first: a process killed while deleting leaves a hidden
            # folder, never a half-deleted one that looks like a checkpoint.
            doomed = old.with_name(f".{old.name}.removed")
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- loading


def _refused(path: Path, name: str) -> UsageError:
    return UsageError(f"checkpoint {path}: {name} is not a plain tensor file (it would run code when loaded); "
                      f"it was not loaded — delete that checkpoint or resume from another")


def _unreadable(path: Path, name: str, error: BaseException) -> UsageError:
    detail = " ".join(str(error).split())[:200] or type(error).__name__
    return UsageError(f"checkpoint {path}: {name} could not be read ({detail}); delete that checkpoint or resume "
                      f"from another")


def _names_callables(file: Path) -> bool:
    """Whether a pickle file names a callable that ``torch.load(weights_only=True)`` refuses (found by reading
    its opcodes, without loading it): a torch zip file, or a plain pickle."""
    import pickletools
    import zipfile

    import torch

    if zipfile.is_zipfile(file):
        try:
            return bool(torch.serialization.get_unsafe_globals_in_checkpoint(str(file)))
        except Exception:
            return False
    try:
        with open(file, "rb") as f:
            for op, _, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "STACK_GLOBAL", "INST"):
                    return True
    except Exception:
        pass
    return False


def _load_plain(path: Path, name: str, allowed: list = ()) -> Any:
    """``torch.load`` a checkpoint's state file with ``weights_only=True`` (and the callables in ``allowed``)."""
    import torch

    file = path / name
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as e:
        if _names_callables(file) or "global" in str(e).lower():
            raise _refused(path, name) from None
        raise _unreadable(path, name, e) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise _unreadable(path, name, e) from None


def _load_rng(path: Path) -> dict[str, Any]:
    if (path / "rng.json").is_file():
        try:
            return rng_from_json(json.loads((path / "rng.json").read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _unreadable(path, "rng.json", e) from None
    return _load_plain(path, "rng.pt", _numpy_rebuilders())  # written by an earlier release


def load_adapter_weights(path: Path, model: Any) -> None:
    """Load a checkpoint's adapter weights into the (not yet distributed) PEFT model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    name = "adapter/adapter_model.safetensors"
    try:
        weights = load_file(str(path / name))
    except Exception as e:  # safetensors' own error type for a damaged file
        raise _unreadable(path, name, e) from None
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint {path} has adapter weights this model lacks: {unexpected[:3]}")


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> tuple[dict, dict]:
    """Load adapter weights, optimizer and scheduler states into the given objects (``model=None``: the
    adapter weights were loaded already, with :func:`load_adapter_weights`).

    :returns: ``(train_state, rng_state)``; the caller restores the RNGs right before the next step.
    :raises UsageError: a state file is not a plain tensor file, or cannot be read; nothing of it ran.
    """
    if model is not None:
        load_adapter_weights(path, model)
    optimizer_state = _load_plain(path, "optimizer.pt")
    scheduler_state = _load_plain(path, "scheduler.pt")
    rng = _load_rng(path)
    try:
        train_state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise _unreadable(path, "state.json", e) from None
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    return train_state, rng
