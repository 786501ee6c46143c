"""Request ids and the JSON access log, with real processes, upstreams and files.

Each response names its request id (x-request-id); the tests find the log line
of a request by it. Lines are written by a thread within about 100 ms of the
response, so a test polls the file for them (generous deadlines, no sleeps as
assertions). The pure parts (the line, the ids, the writer's bound) are tested
as plain data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from proxy.accesslog import (
    NO_NAMES,
    LogWriter,
    format_line,
    names_json,
    pipe_pieces,
    quoted,
    quoted_method,
    timestamp,
    write_all,
)
from proxy.config import ConfigError
from proxy.loader import parse_config
from proxy.requestid import MAX_CLIENT_ID, RequestIds, client_id_line, id_of

from procs import DIRECT, ProxyProcess, free_port, http_get, run_cli
from servers import LoopThread, Upstream, raw_server

FIELDS = [
    "time",
    "request_id",
    "client",
    "method",
    "path",
    "status",
    "bytes_sent",
    "duration_ms",
    "upstream_ms",
    "service",
    "version",
    "endpoint",
    "decision",
]
MADE_ID = re.compile(r"[0-9a-f]{32}")
RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
WAIT = 15.0  # seconds a line may take to appear: generous, only a lost line reaches it


# --------------------------------------------------------------------------- helpers


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the log, each parsed (a torn or partial line fails the test)."""
    if not path.exists():
        return []
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "the log ends in the middle of a line"
    return [json.loads(line) for line in text.splitlines()]


def wait_lines(path: Path, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT
    while True:
        lines = read_lines(path)
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def line_of(path: Path, request_id: str) -> dict[str, Any]:
    """The log line of one request, once it is written."""
    deadline = time.monotonic() + WAIT
    while True:
        found = [line for line in read_lines(path) if line["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"{len(found)} lines for request {request_id}"
            return found[0]
        time.sleep(0.05)


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    """Send `request` (which asks to close) and read until the proxy closes: the
    status, the headers (lower-case names, every value) and every byte received."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head = received.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(head[0].split()[1]), headers, received


def get(port: int, path: str, *headers: str) -> tuple[int, dict[str, list[str]], bytes]:
    lines = "".join(f"{header}\r\n" for header in headers)
    request = f"GET {path} HTTP/1.1\r\nHost: test\r\n{lines}Connection: close\r\n\r\n"
    return raw_exchange(port, request.encode("latin-1"))


def the_id(headers: dict[str, list[str]]) -> str:
    [request_id] = headers["x-request-id"]
    return request_id


def ids_received(upstream: Upstream) -> list[str]:
    """The x-request-id values of the last request the upstream received."""
    return [
        value for name, value in upstream.received[-1]["headers"] if name.lower() == "x-request-id"
    ]


# --------------------------------------------------------------------------- the proxy


class EchoWebSocket:
    """A WebSocket upstream that echoes text messages."""

    def __init__(self, loops: LoopThread) -> None:
        self.loops = loops
        self.port = 0
        self._runner: web.AppRunner | None = None

    def start(self) -> EchoWebSocket:
        async def start() -> None:
            app = web.Application()
            app.router.add_get("/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", 0).start()
            self.port = self._runner.addresses[0][1]

        self.loops.call(start())
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self.loops.call(self._runner.cleanup())

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo:{message.data}")
        return ws


CONFIG = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
access_log: {path: "%(log)s"}
services:
  - name: slow
    match: {path_prefix: /slow}
    timeouts: {response: 300ms}
    versions: {only: {endpoints: ["%(stable)s"]}}
  - name: gone
    match: {path_prefix: /gone}
    outlier_detection: {consecutive_connect_failures: 0}
    versions: {only: {endpoints: ["127.0.0.1:%(dead)d"]}}
  - name: ws
    match: {path_prefix: /ws}
    versions: {only: {endpoints: ["127.0.0.1:%(ws)d"]}}
  - name: theirs
    match: {path_prefix: /theirs}
    versions: {only: {endpoints: ["127.0.0.1:%(theirs)d"]}}
  - name: web
    match: {path_prefix: /app}
    decision_header: true
    versions:
      stable: {endpoints: ["%(stable)s"]}
      canary: {endpoints: ["%(canary)s"]}
    split: {weights: {stable: 50, canary: 50}, hash_on: [{header: x-user-id}]}
    rules:
      - name: testers
        match: {header: {name: x-canary, value: always}}
        version: canary
"""
THEIRS = (
    b"HTTP/1.1 200 OK\r\nX-Request-Id: theirs\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("access-log")


@pytest.fixture(scope="module")
def dead_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def proxy(
    loops: LoopThread, upstreams: dict[str, Upstream], log_dir: Path, dead_port: int
) -> Iterator[ProxyProcess]:
    ws = EchoWebSocket(loops).start()
    theirs_port, stop_theirs = raw_server(loops, THEIRS)
    config = CONFIG % {
        "log": log_dir / "access.log",
        "stable": upstreams["stable"].address,
        "canary": upstreams["canary"].address,
        "dead": dead_port,
        "ws": ws.port,
        "theirs": theirs_port,
    }
    with ProxyProcess(config) as running:
        yield running
    ws.stop()
    stop_theirs()


@pytest.fixture(scope="module")
def log(log_dir: Path) -> Path:
    return log_dir / "access.log"


# --------------------------------------------------------------------------- one line per request


def test_a_200_is_one_line_with_every_field(
    proxy: ProxyProcess, log: Path, upstreams: dict[str, Upstream]
) -> None:
    before = time.time()
    status, headers, received = get(proxy.data_port, "/app/x?y=1&z=%20", "x-user-id: alice")
    assert status == 200
    line = line_of(log, the_id(headers))
    assert list(line) == FIELDS
    assert MADE_ID.fullmatch(line["request_id"])
    assert line["client"] == "127.0.0.1"
    assert (line["method"], line["path"], line["status"]) == ("GET", "/app/x?y=1&z=%20", 200)
    assert line["bytes_sent"] == len(received)
    assert 0 <= line["upstream_ms"] <= line["duration_ms"] < WAIT * 1000
    [version] = headers["x-grayproxy-version"]
    assert (line["service"], line["version"]) == ("web", version)
    assert line["endpoint"] == upstreams[version].address
    assert line["decision"] == "split;key=header:x-user-id" == headers["x-grayproxy-decision"][0]
    assert RFC3339_MS.fullmatch(line["time"])
    logged = datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - 1 <= logged.timestamp() <= time.time() + 1


def test_a_404_names_no_service_version_or_endpoint(proxy: ProxyProcess, log: Path) -> None:
    status, headers, received = get(proxy.data_port, "/nowhere")
    assert status == 404
    line = line_of(log, the_id(headers))
    assert list(line) == FIELDS
    assert (line["method"], line["path"], line["status"]) == ("GET", "/nowhere", 404)
    assert line["service"] is line["version"] is line["endpoint"] is line["decision"] is None
    assert line["upstream_ms"] is None
    assert line["bytes_sent"] == len(received)


def test_a_502_names_the_endpoint_that_refused(
    proxy: ProxyProcess, log: Path, dead_port: int
) -> None:
    status, headers, received = get(proxy.data_port, "/gone/x")
    assert status == 502
    line = line_of(log, the_id(headers))
    assert (line["status"], line["service"], line["version"]) == (502, "gone", "only")
    assert line["endpoint"] == f"127.0.0.1:{dead_port}"
    assert line["decision"] == "split;random"
    assert line["upstream_ms"] >= 0
    assert line["bytes_sent"] == len(received)


def test_a_504_after_the_response_timeout(
    proxy: ProxyProcess, log: Path, upstreams: dict[str, Upstream]
) -> None:
    status, headers, received = get(proxy.data_port, "/slow/sleep/5")
    assert status == 504
    line = line_of(log, the_id(headers))
    assert (line["status"], line["service"], line["version"]) == (504, "slow", "only")
    assert line["endpoint"] == upstreams["stable"].address
    # The response timeout (300 ms) runs on the ticker's clock, up to a tick (100 ms) off.
    assert 200 <= line["upstream_ms"] <= line["duration_ms"]
    assert line["bytes_sent"] == len(received)


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /app/te HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: xchunked\r\n\r\n",
        b"GET /app/te HTTP/1.1\r\nHost: test\r\nBad Header: x\r\n\r\n",  # the parser's refusal
    ],
    ids=["checked", "unparsable"],
)
def test_a_400_refusal_names_its_request_line(
    proxy: ProxyProcess, log: Path, request_head: bytes
) -> None:
    status, headers, received = raw_exchange(proxy.data_port, request_head)
    assert status == 400
    line = line_of(log, the_id(headers))
    assert (line["method"], line["path"], line["status"]) == ("GET", "/app/te", 400)
    assert line["service"] is line["version"] is line["upstream_ms"] is None
    assert line["bytes_sent"] == len(received)


def test_a_websocket_is_logged_once_its_tunnel_closes(proxy: ProxyProcess, log: Path) -> None:
    async def talk() -> tuple[str, float]:
        opened = time.monotonic()
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{proxy.data_url}/ws/chat?room=1") as ws,
        ):
            request_id = ws._response.headers["x-request-id"]
            for n in range(3):
                await ws.send_str(f"m{n}")
                assert await ws.receive_str(timeout=5) == f"echo:m{n}"
            assert not any(line["request_id"] == request_id for line in read_lines(log))
        return request_id, time.monotonic() - opened

    request_id, held = asyncio.run(talk())
    line = line_of(log, request_id)
    assert (line["method"], line["path"], line["status"]) == ("GET", "/ws/chat?room=1", 101)
    assert (line["service"], line["version"], line["decision"]) == ("ws", "only", "split;random")
    assert line["bytes_sent"] > 3 * len("echo:m0")  # the handshake and the echoes
    assert line["upstream_ms"] <= line["duration_ms"] <= held * 1000 + 1000


# --------------------------------------------------------------------------- request ids


@pytest.mark.parametrize(
    "client_id",
    [
        "client-id-1",
        "a" * MAX_CLIENT_ID,
        'with"quote\\and-backslash',
        "!#$%&'()*+,-./:;<=>?@[]^_`{|}~",
    ],
)
def test_a_fit_client_id_is_kept_upstream_back_and_in_the_log(
    proxy: ProxyProcess, log: Path, upstreams: dict[str, Upstream], client_id: str
) -> None:
    status, headers, _ = get(
        proxy.data_port, "/app/id", "x-canary: always", f"X-Request-Id: {client_id}"
    )
    assert status == 200
    assert the_id(headers) == client_id
    assert ids_received(upstreams["canary"]) == [client_id]
    assert line_of(log, client_id)["status"] == 200


def test_a_request_without_an_id_gets_a_new_one_everywhere(
    proxy: ProxyProcess, log: Path, upstreams: dict[str, Upstream]
) -> None:
    made = set()
    for _ in range(5):
        _, headers, _ = get(proxy.data_port, "/app/id", "x-canary: always")
        request_id = the_id(headers)
        assert MADE_ID.fullmatch(request_id)
        assert ids_received(upstreams["canary"]) == [request_id]
        assert line_of(log, request_id)["path"] == "/app/id"
        made.add(request_id)
    assert len(made) == 5


@pytest.mark.parametrize(
    "sent",
    [
        ["X-Request-Id: " + "a" * (MAX_CLIENT_ID + 1)],
        ["X-Request-Id: has space"],
        ["X-Request-Id: tab\there"],
        ["X-Request-Id: caf\xe9"],
        ["X-Request-Id: one", "x-request-id: two"],
    ],
    ids=["too-long", "space", "tab", "not-ascii", "repeated"],
)
def test_an_unfit_client_id_is_replaced_by_a_new_one(
    proxy: ProxyProcess, log: Path, upstreams: dict[str, Upstream], sent: list[str]
) -> None:
    status, headers, _ = get(proxy.data_port, "/app/replaced", "x-canary: always", *sent)
    assert status == 200
    request_id = the_id(headers)
    assert MADE_ID.fullmatch(request_id)
    assert ids_received(upstreams["canary"]) == [request_id]
    assert line_of(log, request_id)["path"] == "/app/replaced"


def test_error_responses_of_the_proxy_carry_the_id(proxy: ProxyProcess) -> None:
    for path in ("/nowhere", "/gone/x", "/slow/sleep/5"):
        status, headers, _ = get(proxy.data_port, path, "X-Request-Id: mine-" + path[1:4])
        assert status in (404, 502, 504)
        assert the_id(headers) == "mine-" + path[1:4]


def test_an_upstreams_own_response_id_is_replaced_by_the_requests(
    proxy: ProxyProcess, log: Path
) -> None:
    status, headers, received = get(proxy.data_port, "/theirs", "X-Request-Id: ours")
    assert status == 200 and received.endswith(b"ok")
    assert headers["x-request-id"] == ["ours"]
    status, headers, _ = get(proxy.data_port, "/theirs")
    assert MADE_ID.fullmatch(the_id(headers))


# --------------------------------------------------------------------------- workers, rotation


def workers_config(upstream: Upstream, log: str, workers: int) -> str:
    return f"""
listen: "127.0.0.1:${{data_port}}"
control: {{listen: "127.0.0.1:${{control_port}}"}}
workers: {workers}
access_log: {{path: "{log}"}}
services:
  - name: web
    versions: {{only: {{endpoints: ["{upstream.address}"]}}}}
"""


def load(port: int, requests: int, threads: int, per_connection: int) -> list[str]:
    """`requests` GETs from `threads` threads, `per_connection` on each keep-alive
    connection: the request id of each response."""
    ids: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(count: int) -> None:
        import http.client

        try:
            done = 0
            while done < count:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                for _ in range(min(per_connection, count - done)):
                    conn.request("GET", f"/load/{done}")
                    response = conn.getresponse()
                    response.read()
                    assert response.status == 200
                    with lock:
                        ids.append(response.headers["x-request-id"])
                    done += 1
                conn.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(requests // threads,)) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert not errors, errors[:3]
    return ids


def test_two_workers_under_load_write_whole_lines_one_per_request(
    upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    with ProxyProcess(workers_config(upstreams["stable"], str(log), 2)) as proxy:
        ids = load(proxy.data_port, requests=480, threads=12, per_connection=8)
        assert len(ids) == 480 == len(set(ids))
        lines = wait_lines(log, len(ids))
    assert len(lines) == len(ids)  # read_lines parsed each: none torn or interleaved
    assert {line["request_id"] for line in lines} == set(ids)
    assert all(list(line) == FIELDS and line["status"] == 200 for line in lines)
    # A made id starts with its process's random prefix: both workers wrote.
    assert len({line["request_id"][:16] for line in lines}) == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_after_a_move_starts_a_new_file(
    upstreams: dict[str, Upstream], tmp_path: Path, workers: int
) -> None:
    log = tmp_path / "access.log"
    moved = tmp_path / "access.log.1"
    with ProxyProcess(workers_config(upstreams["stable"], str(log), workers)) as proxy:
        before = load(proxy.data_port, requests=40, threads=4, per_connection=2)
        assert len(wait_lines(log, 40)) == 40
        log.rename(moved)
        proxy.send_signal(signal.SIGUSR1)
        # Each worker reopens on its own: once lines of each stand in the new
        # file, every later request of each is logged there.
        sent = 40
        deadline = time.monotonic() + WAIT
        while len({line["request_id"][:16] for line in read_lines(log)}) < workers:
            assert time.monotonic() < deadline, "no new file from every worker"
            sent += len(load(proxy.data_port, requests=8, threads=4, per_connection=1))
            time.sleep(0.1)
        after = load(proxy.data_port, requests=40, threads=4, per_connection=2)
        sent += 40
        deadline = time.monotonic() + WAIT
        while len(read_lines(moved)) + len(read_lines(log)) < sent:
            assert time.monotonic() < deadline, "lines missing"
            time.sleep(0.05)
        assert proxy.returncode is None
    old_lines, new_lines = read_lines(moved), read_lines(log)  # whole lines, or they fail
    assert len(old_lines) + len(new_lines) == sent
    assert {line["request_id"] for line in old_lines} >= set(before)
    assert {line["request_id"] for line in new_lines} >= set(after)


def test_the_log_can_go_to_stdout_from_every_worker(upstreams: dict[str, Upstream]) -> None:
    with ProxyProcess(workers_config(upstreams["stable"], "-", 2)) as proxy:
        ids = load(proxy.data_port, requests=40, threads=4, per_connection=1)
        deadline = time.monotonic() + WAIT
        while sum('"request_id"' in line for line in proxy.stdout.splitlines()) < 40:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    lines = [json.loads(line) for line in proxy.stdout.splitlines() if '"request_id"' in line]
    assert {line["request_id"] for line in lines} == set(ids)


def test_a_reload_moves_the_log_stops_it_and_starts_it(
    upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    first, second, third = (tmp_path / f"{n}.log" for n in ("first", "second", "third"))
    config = workers_config(upstreams["stable"], str(first), 1)
    with ProxyProcess(config) as proxy:
        for path, log in (("/a", first), ("/b", second), ("/c", None), ("/d", third)):
            if log is None:
                proxy.write_config(config.replace(f'access_log: {{path: "{first}"}}', ""))
            else:
                proxy.write_config(config.replace(str(first), str(log)))
            assert reload(proxy)[0] == 200
            _, headers, _ = get(proxy.data_port, path)
            if log is not None:
                assert line_of(log, the_id(headers))["path"] == path
    # One writer per process, in order: had /c been logged, its line would
    # stand in the second file before /d's reached the third.
    assert [[line["path"] for line in read_lines(log)] for log in (first, second, third)] == [
        ["/a"],
        ["/b"],
        ["/d"],
    ]


def reload(proxy: ProxyProcess) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(proxy.control_url + "/api/v1/reload", method="POST", data=b"")
    try:
        with DIRECT.open(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


# --------------------------------------------------------------------------- refused configs


def test_a_log_in_a_missing_directory_is_refused_with_its_line(tmp_path: Path) -> None:
    config = tmp_path / "grayproxy.yaml"
    config.write_text(
        "services:\n"
        "  - name: web\n"
        '    versions: {only: {endpoints: ["127.0.0.1:9"]}}\n'
        f'access_log: {{path: "{tmp_path}/missing/access.log", format: xml}}\n'
    )
    result = run_cli("run", "-c", str(config))
    assert result.returncode == 2
    assert sorted(result.stderr.splitlines()) == [
        f"{config}: access_log.format: line 4: 'xml': expected one of: json",
        f"{config}: access_log.path: line 4: directory {tmp_path}/missing does not exist",
    ]
    assert run_cli("check", "-c", str(config)).returncode == 2


def test_a_relative_log_path_is_taken_from_the_config_files_directory(tmp_path: Path) -> None:
    config = tmp_path / "grayproxy.yaml"
    config.write_text(
        "services:\n"
        "  - name: web\n"
        '    versions: {only: {endpoints: ["127.0.0.1:9"]}}\n'
        "access_log: {path: logs/access.log}\n"
    )
    (tmp_path / "logs").mkdir()
    from proxy.loader import load_config

    loaded = load_config(str(config))
    assert loaded.access_log is not None
    assert loaded.access_log.path == str(tmp_path / "logs" / "access.log")
    assert parse_config(config.read_text().replace("logs/access.log", '"-"')).access_log == (
        type(loaded.access_log)("-", "json")
    )
    config.write_text(config.read_text().replace("logs/access.log", "logs"))
    with pytest.raises(ConfigError, match=r"access_log.path: line 4: .* is a directory"):
        load_config(str(config))


def test_a_reload_with_a_bad_log_path_keeps_the_running_config(
    upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    config = workers_config(upstreams["stable"], str(log), 1)
    with ProxyProcess(config) as proxy:
        generation = json.loads(http_get(proxy.control_url + "/api/v1/services")[2])["generation"]
        proxy.write_config(config.replace(str(log), str(tmp_path / "nope" / "access.log")))
        status, answer = reload(proxy)
        assert status == 400
        assert any(
            "access_log.path: line" in detail and "does not exist" in detail
            for detail in answer["details"]
        )
        assert (
            json.loads(http_get(proxy.control_url + "/api/v1/services")[2])["generation"]
            == generation
        )
        _, headers, _ = get(proxy.data_port, "/still")
        assert line_of(log, the_id(headers))["path"] == "/still"


# --------------------------------------------------------------------------- plain data


def test_made_ids_are_32_hex_digits_unique_across_blocks_and_prefixes() -> None:
    ids = RequestIds(prefix=0xAB, start=4090)  # crosses a block of 4,096 after six
    made = [id_of(ids.next_line()) for _ in range(20)]
    assert all(MADE_ID.fullmatch(request_id) for request_id in made)
    assert [int(request_id, 16) for request_id in made] == [
        (0xAB << 64) + 4090 + n for n in range(20)
    ]
    other = RequestIds(prefix=0xAC, start=4090)
    assert not {id_of(other.next_line()) for _ in range(20)} & set(made)
    fresh = [RequestIds() for _ in range(50)]  # random prefixes and starts
    assert len({generator.prefix for generator in fresh}) == 50
    line = fresh[0].next_line()
    assert line.startswith(b"x-request-id: ") and line.endswith(b"\r\n") and len(line) == 48


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("abc", True),
        ("a" * MAX_CLIENT_ID, True),
        ("!~", True),
        (None, False),
        ("", False),
        ("a" * (MAX_CLIENT_ID + 1), False),
        ("a b", False),
        ("a\tb", False),
        ("caf\xe9", False),
        ("a\x7f", False),
        ("one, two", False),  # a repeated header, as the head joins it
    ],
)
def test_which_client_ids_are_kept(value: str | None, kept: bool) -> None:
    line = client_id_line(value)
    assert line == (f"x-request-id: {value}\r\n".encode() if kept else b"")


@given(
    request_id=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E)),  # as kept or made
    client=st.text(),
    path=st.none() | st.text(),
    decision=st.none() | st.text(),
    method=st.binary(max_size=10),
    status=st.integers(0, 2000),
    sent=st.integers(0, 2**40),
    duration=st.floats(0, 1e6),
    upstream=st.floats(-1, 1e6),
    started=st.floats(0, 4e9),
)
def test_a_line_is_one_json_object_of_exactly_what_it_was_given(
    request_id: str,
    client: str,
    path: str | None,
    decision: str | None,
    method: bytes,
    status: int,
    sent: int,
    duration: float,
    upstream: float,
    started: float,
) -> None:
    line = format_line(
        started,
        request_id,
        quoted(client),
        quoted_method(method),
        path,
        status,
        sent,
        duration,
        upstream,
        names_json("web", "canary"),
        quoted("127.0.0.1:80"),
        quoted(decision),
    )
    assert line.endswith("\n") and "\n" not in line[:-1] and line.isascii()
    parsed = json.loads(line)
    assert list(parsed) == FIELDS
    assert parsed["request_id"] == request_id and parsed["client"] == client
    assert parsed["method"] == (method.decode("latin-1") if method else None)
    assert (parsed["path"], parsed["decision"], parsed["status"]) == (path, decision, status)
    assert parsed["bytes_sent"] == sent
    assert abs(parsed["duration_ms"] - duration * 1000) <= 0.0011 + duration * 1e-9
    if upstream < 0:
        assert parsed["upstream_ms"] is None
    else:
        assert abs(parsed["upstream_ms"] - upstream * 1000) <= 0.0011 + upstream * 1e-9
    assert (parsed["service"], parsed["version"]) == ("web", "canary")
    assert parsed["time"] == timestamp(started)
    stamp = datetime.strptime(parsed["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert started - 0.0011 <= stamp.timestamp() <= started + 1e-6
    assert json.loads("{" + NO_NAMES + "}") == {"service": None, "version": None}


def test_write_all_writes_each_byte_once() -> None:
    read_end, write_end = os.pipe()
    try:
        write_all(write_end, b"one line\n")
        os.close(write_end)
        assert os.read(read_end, 100) == b"one line\n"
    finally:
        os.close(read_end)


@given(st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=40))
def test_pipe_pieces_are_whole_lines_within_the_limit(lines: list[bytes]) -> None:
    data = b"".join(lines)
    pieces = pipe_pieces(data, 256)
    assert b"".join(pieces) == data
    for piece in pieces:
        assert piece.endswith(b"\n")
        assert len(piece) <= 256 or piece.count(b"\n") == 1  # a single line over the limit


def test_the_writer_drops_and_counts_past_its_bound_and_keeps_lines_whole(tmp_path: Path) -> None:
    """A reader that does not read: the pipe fills, the writer thread blocks in
    write(), lines pile up to the bound; further ones are dropped, not kept."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer = LogWriter(str(fifo), max_pending=100_000)
    line = '{"n":%d,"pad":"' + "x" * 80 + '"}\n'
    try:
        writer.write(line % 0)
        writer.flush()
        received = b""
        deadline = time.monotonic() + WAIT
        while not received:  # the writer thread has the FIFO open once its first line is in
            assert time.monotonic() < deadline
            with contextlib.suppress(BlockingIOError):
                received = os.read(reader, 65536)
        for n in range(1, 5000):  # 500 KB: a pipe holds 64 KiB, the bound 100,000 characters
            writer.write(line % n)
            if n % 100 == 0:
                writer.flush()
        writer.flush()
        assert 0 < writer.dropped < 5000
        writer.close()
        os.set_blocking(reader, True)
        while chunk := os.read(reader, 65536):  # until the writer closes its end
            received += chunk
    finally:
        os.close(reader)
    writer.join(10)
    numbers = [json.loads(text)["n"] for text in received.decode().splitlines()]
    assert len(numbers) == 5000 - writer.dropped
    assert numbers == sorted(numbers)  # in order, none torn
