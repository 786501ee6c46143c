"""`workers: N`: processes sharing the port, kept in step and supervised."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from procs import ProxyProcess, http_get
from servers import LoopThread, Upstream

CONFIG = """
listen: "127.0.0.1:${data_port}"
workers: 2
control: {listen: "127.0.0.1:${control_port}"}
services:
  - name: web
    versions:
      stable: {endpoints: ["%(stable)s"]}
      canary: {endpoints: ["%(canary)s"]}
    split: {weights: {stable: 100, canary: 0}, hash_on: [{header: x-user-id}]}
"""


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Upstream]]:
    loops = LoopThread()
    servers = {name: Upstream(loops, name).start() for name in ("stable", "canary")}
    yield servers
    for server in servers.values():
        server.stop()
    loops.stop()


def render(upstreams: dict[str, Upstream], canary: int = 0) -> str:
    config = CONFIG % {name: u.address for name, u in upstreams.items()}
    return config.replace(
        "{stable: 100, canary: 0}", f"{{stable: {100 - canary}, canary: {canary}}}"
    )


@pytest.fixture
def proxy(upstreams: dict[str, Upstream]) -> Iterator[ProxyProcess]:
    with ProxyProcess(render(upstreams)) as proc:
        yield proc


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(child) for child in text)
    return found


def versions_seen(proxy: ProxyProcess, count: int) -> set[str]:
    """Each request on a new connection, so the kernel spreads them over the workers."""
    seen = set()
    for user in range(count):
        _, headers, _ = http_get(
            proxy.data_url + "/", {"x-user-id": str(user), "Connection": "close"}
        )
        seen.add(headers["x-grayproxy-version"])
    return seen


def put_weights(proxy: ProxyProcess, weights: dict[str, int]) -> None:
    request = urllib.request.Request(
        proxy.control_url + "/api/v1/services/web/weights",
        data=json.dumps(weights).encode(),
        method="PUT",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def test_two_workers_serve_and_follow_a_weight_change_within_a_second(proxy: ProxyProcess) -> None:
    assert proxy.process is not None
    assert len(children(proxy.process.pid)) == 2
    assert versions_seen(proxy, 20) == {"stable"}
    put_weights(proxy, {"stable": 0, "canary": 100})
    time.sleep(1.0)
    assert versions_seen(proxy, 40) == {"canary"}


def test_a_reload_reaches_every_worker_and_a_restarted_one(
    proxy: ProxyProcess, upstreams: dict[str, Upstream]
) -> None:
    assert proxy.process is not None
    proxy.write_config(render(upstreams, canary=100))
    request = urllib.request.Request(proxy.control_url + "/api/v1/reload", method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["generation"] == 2
    time.sleep(1.0)
    assert versions_seen(proxy, 40) == {"canary"}

    victim = min(children(proxy.process.pid))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while listeners(proxy.data_port) == 2:  # until the kernel has dropped the dead one's
        assert time.monotonic() < deadline, "the worker did not die"
        time.sleep(0.05)
    while listeners(proxy.data_port) < 2:  # a worker listens once it has its config
        assert time.monotonic() < deadline, "the worker was not restarted"
        time.sleep(0.05)
    assert versions_seen(proxy, 40) == {"canary"}


def reload(proxy: ProxyProcess) -> dict[str, Any]:
    request = urllib.request.Request(proxy.control_url + "/api/v1/reload", method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def test_workers_from_the_command_line_are_no_change_in_the_file(
    upstreams: dict[str, Upstream],
) -> None:
    """--workers 3 over the file's 2: a reload of the same file warns of
    nothing; a file that changes workers is warned of, and 3 keep serving."""
    text = render(upstreams)
    with ProxyProcess(text, extra_args=["--workers", "3"]) as proxy:
        assert reload(proxy)["warnings"] == []
        proxy.write_config(text.replace("workers: 2", "workers: 4"))
        assert reload(proxy)["warnings"] == ["workers: changed in the file; a restart applies it"]
        assert listeners(proxy.data_port) == 3


def listeners(port: int) -> int:
    """Sockets listening on ``port`` (/proc/net/tcp; with SO_REUSEPORT, one per worker)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    fields = (line.split() for line in lines)
    return sum(1 for f in fields if f[1].endswith(f":{port:04X}") and f[3] == "0A")


def test_metrics_and_stats_are_summed_over_workers(proxy: ProxyProcess) -> None:
    for _ in range(30):
        status, _, _ = http_get(proxy.data_url + "/", {"Connection": "close"})
        assert status == 200
    text = http_get(proxy.control_url + "/metrics")[2].decode()
    found = re.search(
        r'grayproxy_requests_total\{code="200",service="web",version="stable"\} (\S+)', text
    )
    assert found and float(found.group(1)) == 30
    service = json.loads(http_get(proxy.control_url + "/api/v1/services/web")[2])
    assert service["versions"]["stable"]["stats"]["requests"] == 30


def test_a_dead_worker_is_restarted_and_counters_survive(proxy: ProxyProcess) -> None:
    assert proxy.process is not None
    for _ in range(10):
        http_get(proxy.data_url + "/", {"Connection": "close"})
    http_get(proxy.control_url + "/metrics")  # the supervisor now holds every worker's counts
    before = children(proxy.process.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = children(proxy.process.pid)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.1)
    assert len(now) == 2 and victim not in now
    assert versions_seen(proxy, 10) == {"stable"}
    text = http_get(proxy.control_url + "/metrics")[2].decode()
    found = re.search(
        r'grayproxy_requests_total\{code="200",service="web",version="stable"\} (\S+)', text
    )
    assert found and float(found.group(1)) >= 10


def test_workers_log_from_the_level_given_by_log_level(upstreams: dict[str, Upstream]) -> None:
    with ProxyProcess(render(upstreams), extra_args=["--log-level", "debug"]) as proxy:
        assert proxy.process is not None
        workers = children(proxy.process.pid)
        assert len(workers) == 2
        for pid in workers:  # each logs this before it tells the supervisor it is ready
            assert f"DEBUG grayproxy: worker pid {pid}: serving generation 1" in proxy.stderr
        put_weights(proxy, {"stable": 0, "canary": 100})
        installed = [f"worker pid {pid}: generation 2 installed" for pid in workers]
        wait_for(lambda: all(line in proxy.stderr for line in installed))


def test_workers_log_nothing_below_info_by_default(proxy: ProxyProcess) -> None:
    put_weights(proxy, {"stable": 0, "canary": 100})
    time.sleep(1.0)
    assert "DEBUG" not in proxy.stderr


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigterm_stops_every_worker_and_exits_zero(proxy: ProxyProcess) -> None:
    assert proxy.process is not None
    workers = children(proxy.process.pid)
    assert proxy.stop(signal.SIGTERM) == 0
    for pid in workers:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
