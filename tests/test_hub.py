"""qlora_core.framework.hub: an unreachable hub takes the process offline after one connection, not five retries."""

from __future__ import annotations

import socket

import pytest
from huggingface_hub import constants

from qlora_core.framework import hub


@pytest.fixture
def fresh(monkeypatch):
    hub.offline_unless_reachable.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_went_offline", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    tried = []
    monkeypatch.setattr(hub, "_reachable", lambda url: tried.append(url) or False)
    yield tried
    hub.offline_unless_reachable.cache_clear()


def test_an_unreachable_hub_takes_the_process_offline_once(fresh, monkeypatch):
    import os

    assert hub.offline_unless_reachable() is True
    assert hub.offline_unless_reachable() is True
    assert fresh == [constants.ENDPOINT]  # one try per process
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    assert hub.unreachable_note("no such file.") == (
        f"no such file; {constants.ENDPOINT} cannot be reached from here, so only models and datasets in the "
        f"local cache load")


def test_nothing_is_tried_when_offline_already_or_behind_a_proxy(fresh, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.offline_unless_reachable() is True
    hub.offline_unless_reachable.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub.offline_unless_reachable() is False
    assert fresh == [] and constants.HF_HUB_OFFLINE is False
    assert hub.unreachable_note("no such file.") == "no such file."  # not taken offline here: no note


def test_reachable_tries_a_real_connection():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert hub._reachable(f"http://127.0.0.1:{port}") is True
    assert hub._reachable(f"http://127.0.0.1:{port}") is False  # closed now
