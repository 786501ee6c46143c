"""Mirroring (SPEC §10): real grayproxy processes, real upstreams that record
what they received, and one in-process test of the bound on shadows in flight.

The primary of every service is one recording upstream; each service mirrors
to a shadow of its own that records, answers 500, or never answers.
"""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import os
import pickle
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import ConfigError
from proxy.dataplane import DataPlane
from proxy.loader import parse_config
from proxy.metrics import MIRROR_OUTCOMES, Metrics, MirrorStats
from proxy.mirror import Shadow, mirror_seed, mirrored_key, percent_threshold
from proxy.state import LiveState

from procs import DIRECT, ProxyProcess, free_port, http_get, run_cli
from recording import parse_responses
from servers import AppServer, LoopThread, raw_server

SALT = "mirror-test"
HANG_TIMEOUT = 5.0  # the hang service's response timeout, which cuts its hanging shadows
HANG_IN_FLIGHT = 5
COPY_MAX_BODY = 65536

CONFIG = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
workers: %(workers)d
services:
  - name: keyed
    match: {path_prefix: /keyed}
    versions:
      stable: {endpoints: ["%(primary)s"]}
      canary: {endpoints: ["%(keyed)s"]}
    split:
      weights: {stable: 100, canary: 0}
      hash_on: [{header: x-user-id}]
      salt: %(salt)s
    rules:
      - match: {header: {name: x-canary, value: always}}
        version: canary
    mirror: {to: canary, percent: 30}
  - name: copy
    match: {path_prefix: /copy}
    versions:
      stable: {endpoints: ["%(primary)s"]}
      canary: {endpoints: ["%(copy)s"]}
    mirror: {to: canary, percent: 100, max_body_bytes: %(copy_max)d}
  - name: diff
    match: {path_prefix: /diff}
    versions:
      stable: {endpoints: ["%(primary)s"]}
      canary: {endpoints: ["%(failing)s"]}
    mirror: {to: canary}
  - name: hang
    match: {path_prefix: /hang}
    timeouts: {response: %(hang_timeout)gs}
    versions:
      stable: {endpoints: ["%(primary)s"]}
      canary: {endpoints: ["%(hanging)s"]}
    mirror: {to: canary, percent: 100, max_in_flight: %(in_flight)d}
  - name: stuck
    match: {path_prefix: /stuck}
    timeouts: {response: 60s}
    versions:
      stable: {endpoints: ["%(primary)s"]}
      canary: {endpoints: ["127.0.0.1:%(stuck)d"]}
    mirror: {to: canary, percent: 100, max_in_flight: %(in_flight)d, max_body_bytes: 1000000}
  - name: reset
    match: {path_prefix: /reset}
    versions:
      stable: {endpoints: ["%(primary)s"]}
      canary: {endpoints: ["127.0.0.1:%(cut)d"]}
    mirror: {to: canary}
  - name: refused
    match: {path_prefix: /refused}
    versions:
      stable: {endpoints: ["%(primary)s"]}
      canary: {endpoints: ["127.0.0.1:%(nobody)d"]}
    outlier_detection: {consecutive_connect_failures: 0}
    mirror: {to: canary}
  - name: plain
    versions:
      stable: {endpoints: ["%(primary)s"]}
      canary: {endpoints: ["%(keyed)s"]}
"""


# --------------------------------------------------------------------------- upstreams


@dataclass
class Received:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name]
        return values[0] if values else None


class Recorder(AppServer):
    """Records every complete request; answers `status` (its name as the body),
    or never answers while `hang` is set."""

    def __init__(self, loops: LoopThread, name: str, status: int = 200, hang: bool = False):
        super().__init__(loops, name)
        self.status = status
        self.hang = hang
        self.received: list[Received] = []
        self._released: asyncio.Event | None = None  # ends the hanging, at stop

    def stop(self) -> None:
        async def release() -> None:
            if self._released is not None:
                self._released.set()

        self.loops.call(release())
        super().stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        self.received.append(Received(request.method, request.raw_path, headers, body))
        if self.hang:
            if self._released is None:
                self._released = asyncio.Event()
            await self._released.wait()
        return web.Response(status=self.status, text=self.name)

    def paths(self, prefix: str) -> list[Received]:
        return [r for r in self.received if r.raw_path.startswith(prefix)]


def stuck_server(loops: LoopThread) -> tuple[int, Callable[[], None]]:
    """A TCP server that accepts connections and never reads from them."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    async def start() -> asyncio.Server:
        return await asyncio.start_server(hold, "127.0.0.1", 0)

    server: asyncio.Server = loops.call(start())

    def stop() -> None:
        async def close() -> None:
            for writer in held:
                writer.transport.abort()
            server.close()

        loops.call(close())

    return server.sockets[0].getsockname()[1], stop


@dataclass
class Servers:
    primary: Recorder
    keyed: Recorder
    copy: Recorder
    failing: Recorder
    hanging: Recorder
    stuck: int  # the port of a stuck_server
    cut: int  # the port of a server that cuts its response short

    def addresses(self) -> dict[str, str]:
        return {
            name: getattr(self, name).address
            for name in ("primary", "keyed", "copy", "failing", "hanging")
        }


@pytest.fixture(scope="module")
def servers(loops: LoopThread) -> Iterator[Servers]:
    stuck, stop_stuck = stuck_server(loops)
    cut, stop_cut = raw_server(loops, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
    started = Servers(
        Recorder(loops, "primary").start(),
        Recorder(loops, "keyed").start(),
        Recorder(loops, "copy").start(),
        Recorder(loops, "failing", status=500).start(),
        Recorder(loops, "hanging", hang=True).start(),
        stuck,
        cut,
    )
    yield started
    for server in (started.primary, started.keyed, started.copy, started.failing, started.hanging):
        server.stop()
    stop_stuck()
    stop_cut()


def config_for(servers: Servers, workers: int = 1) -> str:
    return CONFIG % {
        **servers.addresses(),
        "stuck": servers.stuck,
        "cut": servers.cut,
        "nobody": free_port(),
        "workers": workers,
        "salt": SALT,
        "copy_max": COPY_MAX_BODY,
        "hang_timeout": HANG_TIMEOUT,
        "in_flight": HANG_IN_FLIGHT,
    }


@pytest.fixture(scope="module")
def proxy(servers: Servers) -> Iterator[ProxyProcess]:
    with ProxyProcess(config_for(servers)) as proc:
        yield proc


# --------------------------------------------------------------------------- helpers


def wait_for(check: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def arrived(server: Recorder, path: str) -> Callable[[], bool]:
    """Whether `server` received a request for `path`, when called."""
    return lambda: bool(server.paths(path))


def mirror_json(proxy: ProxyProcess, service: str) -> Any:
    status, _, body = http_get(f"{proxy.control_url}/api/v1/services/{service}")
    assert status == 200, body
    return json.loads(body)["mirror"]


def mirror_stats(proxy: ProxyProcess, service: str) -> dict[str, float]:
    stats: dict[str, float] = mirror_json(proxy, service)["stats"]
    return stats


def settled_stats(proxy: ProxyProcess, service: str) -> dict[str, float]:
    """The stats once every shadow sent so far has an outcome: the counts stay
    the same over a few reads in a row."""
    last = mirror_stats(proxy, service)
    same = 0
    deadline = time.monotonic() + 20
    while same < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
        now = mirror_stats(proxy, service)
        same = same + 1 if now == last else 0
        last = now
    return last


def mirror_samples(proxy: ProxyProcess) -> dict[tuple[str, ...], float]:
    """grayproxy_mirror_* samples by (name, service, version[, outcome or le])."""
    _, _, body = http_get(f"{proxy.control_url}/metrics")
    samples: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.startswith("grayproxy_mirror"):
                labels = sample.labels
                extra = labels.get("outcome") or labels.get("le") or ""
                key = (sample.name, labels["service"], labels["version"], extra)
                samples[key] = sample.value
    return samples


def request(
    proxy: ProxyProcess,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    chunked: bool = False,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, dict[str, str], bytes]:
    own = conn is None
    if conn is None:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.data_port, timeout=30)
    try:
        if chunked:
            assert body is not None
            pieces = [body[i : i + 16384] for i in range(0, len(body), 16384)]
            conn.request(
                method, path, body=iter(pieces), headers=headers or {}, encode_chunked=True
            )
        else:
            conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        if own:
            conn.close()


# --------------------------------------------------------------------------- the choice


def test_keyed_requests_mirror_the_percent_and_the_same_keys_every_time(
    proxy: ProxyProcess, servers: Servers
) -> None:
    keys = [f"user-{index}" for index in range(1000)]

    def one_pass(tag: str) -> set[str]:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.data_port, timeout=30)
        try:
            for key in keys:
                status, headers, _ = request(
                    proxy, "GET", f"/keyed/{tag}", {"x-user-id": key}, conn=conn
                )
                assert status == 200 and headers["x-grayproxy-version"] == "stable"
        finally:
            conn.close()
        settled_stats(proxy, "keyed")
        mirrored = servers.keyed.paths(f"/keyed/{tag}")
        assert all(r.header("x-grayproxy-mirror") == "stable" for r in mirrored)
        return {r.header("x-user-id") or "" for r in mirrored}

    first = one_pass("first")
    # The keys are fixed, so is the share: 30 % of 1000 draws of a fair hash
    # has a standard deviation of 1.45 points; 3 of them either side.
    assert 0.30 - 0.045 <= len(first) / len(keys) <= 0.30 + 0.045, len(first)
    assert len(servers.keyed.paths("/keyed/first")) == len(first)  # each key once
    second = one_pass("second")
    assert second == first
    # the choice is the documented one: mmh3 of the key, seeded by the salt
    threshold = percent_threshold(30)
    assert first == {k for k in keys if mirrored_key(k, mirror_seed(SALT), threshold)}
    stats = mirror_stats(proxy, "keyed")
    assert stats["mirrored"] == stats["match"] == 2 * len(first)


def test_requests_served_by_the_shadow_version_itself_are_not_mirrored(
    proxy: ProxyProcess, servers: Servers
) -> None:
    before = settled_stats(proxy, "keyed")
    for index in range(40):
        headers = {"x-user-id": f"pinned-{index}", "x-canary": "always"}
        status, response_headers, body = request(proxy, "GET", "/keyed/pinned", headers)
        assert (status, response_headers["x-grayproxy-version"], body) == (200, "canary", b"keyed")
    received = servers.keyed.paths("/keyed/pinned")
    assert len(received) == 40  # each once, as the primary
    assert all(r.header("x-grayproxy-mirror") is None for r in received)
    assert settled_stats(proxy, "keyed") == before


def test_mirror_choice_is_keyed_deterministic_and_near_the_percent() -> None:
    seed = mirror_seed("salt")
    keys = [f"k{index}" for index in range(20000)]
    for percent in (0, 1, 10, 50, 99.5, 100):
        chosen = sum(mirrored_key(k, seed, percent_threshold(percent)) for k in keys)
        assert abs(chosen / len(keys) * 100 - percent) < 1.5, (percent, chosen)
    # another salt mirrors other users
    other = mirror_seed("other")
    threshold = percent_threshold(50)
    differ = sum(
        mirrored_key(k, seed, threshold) != mirrored_key(k, other, threshold) for k in keys
    )
    assert 0.4 < differ / len(keys) < 0.6


@settings(max_examples=200)
@given(st.text(min_size=1), st.floats(0, 100), st.floats(0, 100))
def test_a_key_mirrored_at_a_percent_stays_mirrored_at_a_higher_one(
    key: str, low: float, high: float
) -> None:
    low, high = sorted((low, high))
    seed = mirror_seed(SALT)
    if mirrored_key(key, seed, percent_threshold(low)):
        assert mirrored_key(key, seed, percent_threshold(high))


# --------------------------------------------------------------------------- the copy


def test_the_shadow_gets_the_same_method_path_headers_and_body_plus_the_mirror_header(
    proxy: ProxyProcess, servers: Servers
) -> None:
    body = bytes(range(256)) * 40  # 10 KiB
    cases = [
        ("POST", "/copy/form?a=1&b=%20x&c", body, False),
        ("PUT", "/copy/chunked", body, True),
        ("DELETE", "/copy/item/7", None, False),
        ("GET", "/copy/plain?q", None, False),
        ("HEAD", "/copy/head", None, False),
    ]
    headers = {"x-custom": "Value", "Cookie": "a=1; b=2", "Content-Type": "application/x-thing"}
    for method, path, payload, chunked in cases:
        status, response_headers, _ = request(proxy, method, path, headers, payload, chunked)
        assert status == 200 and response_headers["x-grayproxy-version"] == "stable"
        wait_for(arrived(servers.copy, path), what=f"{path} mirrored")
        [primary] = servers.primary.paths(path)
        [shadow] = servers.copy.paths(path)
        assert (shadow.method, shadow.raw_path, shadow.body) == (method, path, primary.body)
        assert shadow.headers == [*primary.headers, ("x-grayproxy-mirror", "stable")]
        assert primary.header("x-grayproxy-mirror") is None
        if chunked:
            assert shadow.header("transfer-encoding") == "chunked"
    assert settled_stats(proxy, "copy")["match"] >= len(cases)


def test_a_shadow_answering_500_to_a_200_counts_a_mismatch(
    proxy: ProxyProcess, servers: Servers
) -> None:
    for index in range(10):
        status, headers, body = request(proxy, "GET", f"/diff/{index}")
        # the client gets the primary's answer, untouched
        assert (status, headers["x-grayproxy-version"], body) == (200, "stable", b"primary")
    stats = settled_stats(proxy, "diff")
    assert (stats["mismatch"], stats["match"], stats["mirrored"]) == (10, 0, 10)
    assert stats["shadow_p50_ms"] > 0 and stats["primary_p50_ms"] > 0
    samples = mirror_samples(proxy)
    assert samples[("grayproxy_mirror_total", "diff", "canary", "mismatch")] == 10
    assert samples[("grayproxy_mirror_total", "diff", "canary", "match")] == 0
    assert samples[("grayproxy_mirror_duration_seconds_count", "diff", "canary", "")] == 10
    copied = samples[("grayproxy_mirror_total", "copy", "canary", "match")]
    assert copied == mirror_stats(proxy, "copy")["match"]


def test_the_service_json_shape(proxy: ProxyProcess) -> None:
    mirror = mirror_json(proxy, "keyed")
    assert set(mirror) == {"to", "percent", "stats"}
    assert (mirror["to"], mirror["percent"]) == ("canary", 30)
    assert set(mirror["stats"]) == {
        "mirrored",
        *MIRROR_OUTCOMES,
        "primary_p50_ms",
        "shadow_p50_ms",
        "shadow_p99_ms",
    }
    assert mirror_json(proxy, "plain") is None
    assert ("grayproxy_mirror_total", "plain", "canary", "match") not in mirror_samples(proxy)


@pytest.mark.parametrize("service", ["reset", "refused"])
def test_a_shadow_that_resets_or_refuses_counts_an_error(proxy: ProxyProcess, service: str) -> None:
    for index in range(5):
        status, _, body = request(proxy, "GET", f"/{service}/{index}")
        assert (status, body) == (200, b"primary")
    wait_for(lambda: mirror_stats(proxy, service)["error"] == 5, what="5 errors")
    stats = mirror_stats(proxy, service)
    assert (stats["mirrored"], stats["match"], stats["mismatch"]) == (5, 0, 0)


# --------------------------------------------------------------------------- not mirrored


def test_a_hanging_shadow_never_delays_the_client_and_past_max_in_flight_is_skipped(
    proxy: ProxyProcess, servers: Servers
) -> None:
    before = mirror_stats(proxy, "hang")
    started = time.monotonic()
    for index in range(4 * HANG_IN_FLIGHT):
        sent = time.monotonic()
        status, _, body = request(proxy, "POST", f"/hang/{index}", body=b"payload")
        # Waiting for the shadow in any way would take its response timeout.
        assert time.monotonic() - sent < HANG_TIMEOUT, "the client waited for its shadow"
        assert (status, body) == (200, b"primary")
    assert time.monotonic() - started < HANG_TIMEOUT  # so none of the shadows was cut yet
    stats = mirror_stats(proxy, "hang")
    assert stats["skipped"] - before["skipped"] == 3 * HANG_IN_FLIGHT
    # The shadows in flight are cut by the response timeout: errors, and room again.
    wait_for(
        lambda: mirror_stats(proxy, "hang")["error"] - before["error"] == HANG_IN_FLIGHT,
        timeout=HANG_TIMEOUT + 10,
        what="hanging shadows cut",
    )
    assert request(proxy, "GET", "/hang/after")[0] == 200
    wait_for(arrived(servers.hanging, "/hang/after"), what="mirrored again")


def test_a_body_over_max_body_bytes_is_served_and_not_mirrored(
    proxy: ProxyProcess, servers: Servers
) -> None:
    big = b"x" * 1_000_000
    for path, chunked in (("/copy/big-fixed", False), ("/copy/big-chunked", True)):
        before = settled_stats(proxy, "copy")
        status, _, _ = request(proxy, "POST", path, body=big, chunked=chunked)
        assert status == 200
        [primary] = servers.primary.paths(path)
        assert primary.body == big
        stats = settled_stats(proxy, "copy")
        assert stats["skipped"] == before["skipped"] + 1
        assert stats["mirrored"] == before["mirrored"]
        assert not servers.copy.paths(path)
    # a chunked body within the limit is mirrored whole
    small = b"y" * (COPY_MAX_BODY - 10)
    assert request(proxy, "POST", "/copy/small-chunked", body=small, chunked=True)[0] == 200
    wait_for(arrived(servers.copy, "/copy/small-chunked"), what="small body mirrored")
    assert servers.copy.paths("/copy/small-chunked")[0].body == small


def test_an_upgrade_is_not_mirrored(proxy: ProxyProcess, servers: Servers) -> None:
    before = settled_stats(proxy, "copy")
    head = (
        b"GET /copy/socket HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", proxy.data_port), timeout=10) as sock:
        sock.sendall(head)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    [response] = parse_responses(reply)
    assert response.status == 200  # the primary did not switch protocols
    assert servers.primary.paths("/copy/socket")
    stats = settled_stats(proxy, "copy")
    assert stats["skipped"] == before["skipped"] + 1
    assert not servers.copy.paths("/copy/socket")


# --------------------------------------------------------------------------- workers


def test_outcomes_are_summed_over_workers(servers: Servers) -> None:
    with ProxyProcess(config_for(servers, workers=2)) as proxy:
        for index in range(30):  # a connection each: both workers serve some
            assert request(proxy, "GET", f"/diff/workers/{index}")[0] == 200
        wait_for(
            lambda: mirror_stats(proxy, "diff")["mismatch"] == 30, what="30 mismatches counted"
        )
        samples = mirror_samples(proxy)
        assert samples[("grayproxy_mirror_total", "diff", "canary", "mismatch")] == 30


# --------------------------------------------------------------------------- bad input

BAD_MIRRORS = """\
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
services:
  - name: web
    versions:
      stable: {endpoints: ["127.0.0.1:9"]}
      canary: {endpoints: ["127.0.0.1:9"]}
    mirror: {to: beta, percent: 101}
  - name: api
    match: {path_prefix: /api}
    versions:
      stable: {endpoints: ["127.0.0.1:9"]}
    mirror:
      to: stable
      percent: -5
      max_body_bytes: -1
      max_in_flight: 0
"""
BAD_ERRORS = [
    ("services[0].mirror.to", 8, "unknown version 'beta' (versions: stable, canary)"),
    ("services[0].mirror.percent", 8, "must be between 0 and 100"),
    ("services[1].mirror.to", 14, "the only version cannot mirror to itself"),
    ("services[1].mirror.percent", 15, "must be between 0 and 100"),
    ("services[1].mirror.max_body_bytes", 16, "must be at least 0"),
    ("services[1].mirror.max_in_flight", 17, "must be at least 1"),
]


def test_bad_mirrors_are_refused_at_start_with_every_error_and_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_MIRRORS)
    for command in ("check", "run"):
        result = run_cli(command, "-c", str(path))
        assert result.returncode == 2, result
        for yaml_path, line, message in BAD_ERRORS:
            assert f"{yaml_path}: line {line}: {message}" in result.stderr, result.stderr


def test_a_bad_mirror_at_reload_is_refused_and_the_old_config_stays(servers: Servers) -> None:
    with ProxyProcess(config_for(servers)) as proxy:
        assert proxy.config_path is not None
        proxy.write_config(BAD_MIRRORS)
        status, body = post(f"{proxy.control_url}/api/v1/reload")
        assert status == 400
        details = json.loads(body)["details"]
        for yaml_path, line, message in BAD_ERRORS:
            assert any(d.startswith(f"{yaml_path}: line {line}: {message}") for d in details)
        assert mirror_json(proxy, "keyed")["percent"] == 30  # the old config serves on
        assert request(proxy, "GET", "/copy/after-refused")[0] == 200
        wait_for(arrived(servers.copy, "/copy/after-refused"), what="still mirrored")


# --------------------------------------------------------------------------- memory


IN_PROCESS = """
listen: "127.0.0.1:1"
services:
  - name: web
    timeouts: {response: 60s}
    versions:
      stable: {endpoints: ["127.0.0.1:%(primary)d"]}
      canary: {endpoints: ["127.0.0.1:%(hanging)d"]}
    mirror: {to: canary, max_in_flight: %(in_flight)d, max_body_bytes: 100000}
"""


class FakeTransport:
    """A client socket that keeps what the proxy writes to it."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.written += piece

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


def test_shadows_in_memory_stay_within_max_in_flight_while_the_shadow_hangs() -> None:
    in_flight = 8
    requests = 200
    body = b"z" * 50_000

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    hung: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)  # reads nothing, answers nothing

    async def main() -> None:
        primary = await asyncio.start_server(answer, "127.0.0.1", 0)
        hanging = await asyncio.start_server(hang, "127.0.0.1", 0)
        ports = {
            "primary": primary.sockets[0].getsockname()[1],
            "hanging": hanging.sockets[0].getsockname()[1],
            "in_flight": in_flight,
        }
        metrics = Metrics()
        plane = DataPlane(LiveState(parse_config(IN_PROCESS % ports), None), metrics)
        transports = []
        most = 0
        for index in range(requests):
            conn = plane.protocol_factory()
            transport = FakeTransport()
            conn.connection_made(transport)  # type: ignore[arg-type]
            conn.data_received(
                b"POST /%d HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b"
                % (index, len(body), body)
            )
            transports.append(transport)
            assert plane.mirrors._pools[("web", "canary")].in_flight <= in_flight
            if index % 20 == 0:
                await asyncio.sleep(0.01)  # let connections open and bytes flow
                gc.collect()
                most = max(most, sum(isinstance(o, Shadow) for o in gc.get_objects()))
        for _ in range(1000):
            if all(b"\r\n\r\nok" in t.written for t in transports):
                break
            await asyncio.sleep(0.01)
        assert all(t.written.startswith(b"HTTP/1.1 200 ") for t in transports)
        stats: MirrorStats = metrics.mirror("web", "canary")
        assert most <= in_flight
        assert stats.outcomes["skipped"] == requests - in_flight
        assert plane.mirrors._pools[("web", "canary")].in_flight == in_flight
        plane.upstreams.close()
        plane.mirrors.close()
        for writer in hung:
            writer.close()
        primary.close()
        hanging.close()
        await asyncio.sleep(0.05)

    asyncio.run(main())


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_sockets_and_memory_stay_flat_under_many_requests_to_a_shadow_that_never_reads(
    proxy: ProxyProcess,
) -> None:
    """Shadows of /stuck connect to a server that never reads or answers: each
    would hold a socket, and its body in the socket buffers or the proxy."""
    assert proxy.process is not None
    body = b"m" * 500_000  # under its max_body_bytes: every shadow takes it whole
    conn = http.client.HTTPConnection("127.0.0.1", proxy.data_port, timeout=30)

    def burst(count: int) -> None:
        for index in range(count):
            assert request(proxy, "POST", f"/stuck/{index}", body=body, conn=conn)[0] == 200

    burst(50)  # warm up: pools, buffers, the allocator's arenas
    before = rss_kib(proxy.process.pid), open_files(proxy.process.pid)
    burst(400)  # 200 MB of bodies
    grown = rss_kib(proxy.process.pid) - before[0]
    opened = open_files(proxy.process.pid) - before[1]
    conn.close()
    assert grown < 40_000, f"RSS grew by {grown} KiB"
    assert opened < 10, f"{opened} more files open"
    assert mirror_stats(proxy, "stuck")["skipped"] >= 450 - HANG_IN_FLIGHT


def post(url: str) -> tuple[int, bytes]:
    try:
        with DIRECT.open(urllib.request.Request(url, method="POST", data=b""), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def test_mirror_defaults_and_type_errors() -> None:
    service = "services:\n  - name: web\n"
    service += "    versions: {a: {endpoints: [h:1]}, b: {endpoints: [h:2]}}\n"
    (parsed,) = parse_config(service + "    mirror: {to: b}\n").services
    mirror = parsed.mirror
    assert mirror is not None
    assert (mirror.percent, mirror.max_body_bytes, mirror.max_in_flight) == (100.0, 65536, 100)
    (parsed,) = parse_config(service).services
    assert parsed.mirror is None
    with pytest.raises(ConfigError) as refused:
        parse_config(service + "    mirror: {to: b, percent: '10%', max_in_flight: 1.5, x: 1}\n")
    assert sorted(refused.value.errors) == [
        "services[0].mirror.max_in_flight: line 4: expected an integer, got a number",
        "services[0].mirror.percent: line 4: expected a number, got a string",
        "services[0].mirror.x: line 4: unknown key 'x' (expected: to, percent, "
        "max_body_bytes, max_in_flight)",
    ]


def test_mirror_stats_survive_pickling_and_sum_over_workers() -> None:
    mine, theirs = Metrics(), Metrics()
    theirs.mirror("web", "canary").count("mismatch")
    theirs.mirror("web", "canary").observe(500, 0.004, time.monotonic())
    theirs.mirror("web", "canary").observe_primary(200, 0.002, time.monotonic())
    mine.mirror("web", "canary").count("match")
    mine.absorb(pickle.loads(pickle.dumps(theirs.dump())))
    summary = mine.mirror("web", "canary").summary()
    assert (summary["mirrored"], summary["match"], summary["mismatch"]) == (2, 1, 1)
    assert summary["shadow_p50_ms"] > 0 and summary["primary_p50_ms"] > 0
    assert Metrics().version("web", "stable").dump().mirror is None
