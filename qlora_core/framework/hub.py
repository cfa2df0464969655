"""Whether the Hugging Face hub can be reached, found out once and fast.

Without a network, huggingface_hub retries each request five times with a growing wait (1 + 2 + 4 + 8 + 8 s)
before it looks in its cache, so a hub id on an offline machine costs about half a minute before its error.
:func:`offline_unless_reachable`, called where a hub id is about to be resolved, tries one TCP connection to the
hub (two seconds at most); when it fails, the process goes offline (``HF_HUB_OFFLINE``): cached models and
datasets still load, and anything else fails at once. Nothing is tried when offline mode is set already, or when a
proxy is configured (the hub may be reachable through it and not directly).
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
TIMEOUT_S = 2.0

_went_offline = False


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _reachable(url: str, timeout: float = TIMEOUT_S) -> bool:
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:  # no DNS, refused, unreachable, timed out
        return False


@functools.lru_cache(maxsize=1)
def offline_unless_reachable() -> bool:
    """Go offline when the hub cannot be reached; return whether the process is offline now.

    Checked once per process."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return False
    if _reachable(_endpoint()):
        return False
    global _went_offline
    _went_offline = True
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"  # for processes started from this one, and libraries that read it late
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    return True


def unreachable_note(reason: str) -> str:
    """``reason`` (a library's words about a hub id that failed), with a note when :func:`offline_unless_reachable`
    took the process offline."""
    if not _went_offline:
        return reason
    return (f"{reason.rstrip('.')}; {_endpoint()} cannot be reached from here, so only models and datasets in "
            f"the local cache load")
