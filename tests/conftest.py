"""Fixtures shared by the black-box tests: real upstream servers on 127.0.0.1,
served from one background event loop per test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from recording import RecordingUpstream
from servers import LoopThread, Upstream

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"


def pytest_configure(config: pytest.Config) -> None:
    """Python imports a compiled module before its source: refuse to test a stale build."""
    compiled = list(PACKAGE.glob("*.so"))
    newest_source = max(path.stat().st_mtime for path in PACKAGE.glob("*.py"))
    if any(path.stat().st_mtime < newest_source for path in compiled):
        pytest.exit(
            "proxy/*.so is older than the source: `make test` recompiles it, "
            "`rm proxy/*.so` runs the source interpreted",
            returncode=2,
        )


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
