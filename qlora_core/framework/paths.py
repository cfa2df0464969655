"""Where qlora keeps what it makes once and reuses: the cache."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The qlora cache: ``$QLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/qlora``, else ``~/.cache/qlora``.

    Converted models (``models/``) and prepared datasets (``prepared/``, see :func:`data_cache_dir`) live here;
    anything in it can be deleted, and is made again when needed.
    """
    explicit = os.environ.get("QLORA_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "qlora"


def data_cache_dir() -> Path:
    """Where prepared datasets are kept: ``$QLORA_DATA_CACHE``, else ``prepared/`` in :func:`cache_dir` (a
    million rows of a few hundred tokens take about 3 GB: point it at a large disk)."""
    explicit = os.environ.get("QLORA_DATA_CACHE")
    return Path(explicit).expanduser() if explicit else cache_dir() / "prepared"
