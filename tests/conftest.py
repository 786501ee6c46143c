"""Fixtures shared by the black-box tests: real upstream servers on 127.0.0.1,
served from one background event loop per test module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from recording import RecordingUpstream
from servers import LoopThread, Upstream


def pytest_configure(config: pytest.Config) -> None:
    """`make test-compiled` runs the suite against the compiled build: check it is that."""
    if os.environ.get("GRAYPROXY_EXPECT_COMPILED"):
        import proxy.dataplane

        if not proxy.dataplane.__file__.endswith(".so"):
            pytest.exit(f"not the compiled build: {proxy.dataplane.__file__}", returncode=2)


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
