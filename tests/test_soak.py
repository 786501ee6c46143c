"""Soak: concurrent clients (keep-alive and one connection per request) hit a
real grayproxy for GRAYPROXY_SOAK_SECONDS (default 60) while the weights
change 20 times through the control API and the config file is rewritten and
reloaded 3 times (SIGHUP and POST /api/v1/reload). Every request must succeed
(200 from an upstream, the right body on the right connection), and the
proxy's memory must not grow after warm-up."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from procs import ProxyProcess
from servers import Upstream, decode_json

SOAK_SECONDS = float(os.environ.get("GRAYPROXY_SOAK_SECONDS", "60"))
WEIGHT_CHANGES = 20
RELOADS = 3
MAX_RSS_GROWTH_MIB = 20

CONFIG = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
workers: %(workers)d
services:
  - name: web
    versions:
      stable: {endpoints: ["%(stable)s"]}
      canary: {endpoints: ["%(canary)s"]}
    split:
      weights: {stable: %(stable_weight)d, canary: %(canary_weight)d}
      hash_on: [{header: x-user-id}]
      salt: "%(salt)s"
"""


def render(upstreams: dict[str, Upstream], workers: int, canary: int, salt: str) -> str:
    return CONFIG % {
        "workers": workers,
        "stable": upstreams["stable"].address,
        "canary": upstreams["canary"].address,
        "stable_weight": 100 - canary,
        "canary_weight": canary,
        "salt": salt,
    }


@dataclass
class Tally:
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self) -> None:
        with self.lock:
            self.requests += 1

    def fail(self, what: str) -> None:
        with self.lock:
            self.requests += 1
            self.failures.append(what)


def one_request(conn: http.client.HTTPConnection, number: int, rng: random.Random) -> str | None:
    """A GET or a POST with a unique path; None if it came back right, else why not."""
    path = f"/soak/{number}?user={rng.randrange(10_000)}"
    headers = {"x-user-id": str(rng.randrange(10_000))}
    body = rng.randbytes(rng.choice((0, 100, 5000))) if rng.random() < 0.3 else None
    conn.request("POST" if body is not None else "GET", path, body=body, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    if response.status != 200:
        return f"{path}: status {response.status}: {payload[:200]!r}"
    record = decode_json(payload)
    version = response.getheader("x-grayproxy-version")
    if record["raw_path"] != path or record["upstream"] != version:
        return f"{path}: got {record['raw_path']} from {record['upstream']} tagged {version}"
    if record["body_length"] != len(body or b""):
        return f"{path}: upstream got {record['body_length']} body bytes"
    return None


def client(port: int, keep_alive: bool, seed: int, stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(seed)
    number = seed * 10_000_000
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    while not stop.is_set():
        number += 1
        try:
            problem = one_request(conn, number, rng)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            problem = f"request {number}: {exc!r}"
            conn.close()
        if problem is None:
            tally.ok()
        else:
            tally.fail(problem)
        if not keep_alive or problem is not None:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.close()


def control(proxy: ProxyProcess, method: str, path: str, body: object = None) -> dict[str, object]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.control_port, timeout=10)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body))
        response = conn.getresponse()
        payload = response.read()
        assert response.status == 200, (method, path, response.status, payload)
        result: dict[str, object] = json.loads(payload)
        return result
    finally:
        conn.close()


def generation(proxy: ProxyProcess) -> int:
    return int(str(control(proxy, "GET", "/api/v1/services/web")["generation"]))


def reload_config(proxy: ProxyProcess, config: str, by_signal: bool) -> None:
    before = generation(proxy)
    proxy.write_config(config)
    if by_signal:
        proxy.send_signal(signal.SIGHUP)
    else:
        control(proxy, "POST", "/api/v1/reload")
    deadline = time.monotonic() + 5
    while generation(proxy) == before:
        assert time.monotonic() < deadline, "the reload did not take"
        time.sleep(0.05)


def process_tree_rss_kib(pid: int) -> int:
    """RSS of the process and its children (the workers, with workers > 1)."""
    total = 0
    for member in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(child) for child in text)
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_soak_under_weight_changes_and_reloads(
    upstreams: dict[str, Upstream], workers: int
) -> None:
    rng = random.Random(workers)
    tally = Tally()
    stop = threading.Event()
    with ProxyProcess(render(upstreams, workers, 10, "soak-0")) as proxy:
        assert proxy.process is not None
        pid = proxy.process.pid
        threads = [
            threading.Thread(
                target=client, args=(proxy.data_port, index % 2 == 0, index, stop, tally)
            )
            for index in range(8)
        ]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        warm_up = max(3.0, SOAK_SECONDS * 0.15)
        changes = WEIGHT_CHANGES + RELOADS
        rss_after_warm_up = 0
        served_at_changes = []  # requests served when each change begins, and at the end
        try:
            for step in range(changes):
                at = warm_up + (SOAK_SECONDS - warm_up) * step / changes
                time.sleep(max(0.0, started + at - time.monotonic()))
                served_at_changes.append(tally.requests)
                if not rss_after_warm_up:
                    rss_after_warm_up = process_tree_rss_kib(pid)
                if step % 6 == 5:  # steps 5, 11 and 17 reload, the 20 others change weights
                    canary = rng.randrange(0, 101)
                    config = render(upstreams, workers, canary, f"soak-{step}")
                    reload_config(proxy, config, by_signal=step != 11)
                else:
                    canary = rng.randrange(0, 101)
                    weights = {"stable": 100 - canary, "canary": canary}
                    control(proxy, "PUT", "/api/v1/services/web/weights", weights)
            time.sleep(max(0.0, started + SOAK_SECONDS - time.monotonic()))
            served_at_changes.append(tally.requests)
        finally:
            stop.set()
            for thread in threads:
                thread.join(15)
        rss_at_end = process_tree_rss_kib(pid)
        alive = proxy.returncode is None
    assert alive
    # Traffic flowed before the first change, between every two, and after the last.
    assert served_at_changes[0] > 0, served_at_changes
    assert served_at_changes == sorted(set(served_at_changes)), served_at_changes
    assert tally.failures == [], f"{len(tally.failures)} of {tally.requests}: {tally.failures[:10]}"
    growth_mib = (rss_at_end - rss_after_warm_up) / 1024
    assert growth_mib < MAX_RSS_GROWTH_MIB, (
        f"RSS {rss_after_warm_up} KiB after warm-up, {rss_at_end} KiB at the end "
        f"({tally.requests} requests)"
    )
