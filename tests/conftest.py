"""Fixtures shared by the black-box tests: real upstream servers on 127.0.0.1,
served from one background event loop per test module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from recording import RecordingUpstream
from servers import LoopThread, Upstream


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--invariant-examples",
        type=int,
        help="examples for test_invariant.py (default 200; or INVARIANT_EXAMPLES)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Hand --invariant-examples on; under `make test-compiled`, check the build is compiled."""
    examples = config.getoption("--invariant-examples")
    if examples is not None:  # read when test_invariant.py is imported, after this
        os.environ["INVARIANT_EXAMPLES"] = str(examples)
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
