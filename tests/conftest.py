"""Fixtures shared by the black-box tests: real upstream servers on 127.0.0.1,
served from one background event loop per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from recording import RecordingUpstream
from servers import LoopThread, Upstream


@pytest.fixture(scope="module")
def loops() -> Iterator[LoopThread]:
    loops = LoopThread()
    yield loops
    loops.stop()


@pytest.fixture(scope="module")
def upstreams(loops: LoopThread) -> Iterator[dict[str, Upstream]]:
    """Two aiohttp upstreams, "stable" and "canary", that record what they receive."""
    servers = {name: Upstream(loops, name).start() for name in ("stable", "canary")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def upstream(loops: LoopThread) -> Iterator[RecordingUpstream]:
    """A raw upstream that keeps every byte it receives."""
    server = RecordingUpstream(loops).start()
    yield server
    server.stop()
