"""The data path, from the outside: a real grayproxy process between real
clients and real upstreams, checking what the upstream actually received."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from procs import ProxyProcess, free_port, http_get
from servers import LoopThread, Upstream, decode_json, raw_server

CONFIG = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
services:
  - name: untagged
    match: {path_prefix: /untagged}
    version_header: false
    versions: {only: {endpoints: ["%(stable)s"]}}
  - name: deadfb
    match: {path_prefix: /deadfb}
    fallback: ok
    versions:
      broken: {endpoints: ["127.0.0.1:%(dead2)d"]}
      ok: {endpoints: ["%(stable)s"]}
    split: {weights: {broken: 100, ok: 0}}
  - name: dead
    match: {path_prefix: /dead}
    versions: {broken: {endpoints: ["127.0.0.1:%(dead)d"]}}
  - name: slow
    match: {path_prefix: /slow}
    timeouts: {response: 300ms}
    versions: {only: {endpoints: ["%(stable)s"]}}
  - name: sticky
    match: {host: sticky.test}
    versions:
      stable: {endpoints: ["%(stable)s"]}
      canary: {endpoints: ["%(canary)s"]}
    split:
      weights: {stable: 50, canary: 50}
      hash_on: [{header: x-user-id}]
      sticky_cookie: {name: gp_sticky, max_age: 600}
  - name: web
    match: {host: "*", path_prefix: /}
    versions:
      stable: {endpoints: ["%(stable)s"]}
      canary: {endpoints: ["%(canary)s"]}
    split:
      weights: {stable: 90, canary: 10}
      hash_on: [{header: x-user-id}, {cookie: session}]
      salt: test-salt
    rules:
      - match: {header: {name: x-canary, value: always}}
        version: canary
      - match: {header: {name: x-canary, value: never}}
        version: stable
"""


def render(upstreams: dict[str, Upstream]) -> str:
    return CONFIG % {
        "stable": upstreams["stable"].address,
        "canary": upstreams["canary"].address,
        "dead": free_port(),
        "dead2": free_port(),
    }


@pytest.fixture(scope="module")
def proxy(upstreams: dict[str, Upstream]) -> Iterator[ProxyProcess]:
    with ProxyProcess(render(upstreams)) as proc:
        yield proc


def request(
    proxy: ProxyProcess,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.data_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def received_headers(record: dict[str, Any]) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in record["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    return headers


@pytest.mark.parametrize(
    "target",
    ["/a/b?x=1&y=%2F&z", "/a?", "/%7Euser//double/./dots/../x?q=a+b&q=%20", "/p;param?=&&"],
)
def test_method_path_and_query_reach_upstream_byte_for_byte(
    proxy: ProxyProcess, upstreams: dict[str, Upstream], target: str
) -> None:
    head = f"PATCH {target} HTTP/1.1\r\nHost: x\r\nX-Canary: never\r\nConnection: close\r\n\r\n"
    reply = raw_exchange(proxy.data_port, head.encode())
    assert reply.startswith(b"HTTP/1.1 200")
    record = upstreams["stable"].received[-1]
    assert record["method"] == "PATCH"
    assert record["raw_path"] == target


def test_forwarded_headers_and_hop_by_hop(proxy: ProxyProcess) -> None:
    status, headers, body = request(
        proxy,
        "GET",
        "/echo",
        {
            "Host": "shop.example:8443",
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": "https",
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "drop me",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "X-Kept": "kept",
        },
    )
    assert status == 200
    seen = received_headers(decode_json(body))
    assert seen["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["shop.example:8443"]
    assert seen["host"] == ["shop.example:8443"]
    assert seen["x-kept"] == ["kept"]
    for hop in ("x-secret", "keep-alive", "te"):
        assert hop not in seen
    assert headers["x-grayproxy-version"] in ("stable", "canary")


def test_version_header_can_be_turned_off(proxy: ProxyProcess) -> None:
    status, headers, _ = request(proxy, "GET", "/untagged/echo")
    assert status == 200
    assert "x-grayproxy-version" not in headers


def test_rules_pin_the_version(proxy: ProxyProcess, upstreams: dict[str, Upstream]) -> None:
    for user in range(30):
        _, headers, body = request(
            proxy, "GET", "/echo", {"x-canary": "always", "x-user-id": str(user)}
        )
        assert headers["x-grayproxy-version"] == "canary"
        assert decode_json(body)["upstream"] == "canary"
        _, headers, _ = request(
            proxy, "GET", "/echo", {"x-canary": "never", "x-user-id": str(user)}
        )
        assert headers["x-grayproxy-version"] == "stable"


def versions_for_users(proxy: ProxyProcess, users: range, host: str = "x") -> dict[str, str]:
    """Which version each user id lands on, over one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.data_port, timeout=10)
    seen = {}
    try:
        for user in users:
            conn.request("GET", "/status/204", headers={"x-user-id": str(user), "Host": host})
            response = conn.getresponse()
            response.read()
            seen[str(user)] = response.getheader("x-grayproxy-version") or ""
    finally:
        conn.close()
    return seen


def set_weights(proxy: ProxyProcess, service: str, weights: dict[str, float]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.control_port, timeout=10)
    try:
        conn.request("PUT", f"/api/v1/services/{service}/weights", body=json.dumps(weights))
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
    finally:
        conn.close()


def test_split_share_stickiness_and_monotone_growth(proxy: ProxyProcess) -> None:
    users = range(3000)
    at_10 = versions_for_users(proxy, users)
    share = Counter(at_10.values())["canary"] / len(users)
    assert 0.08 < share < 0.12  # 10 % ± > 5 sigma at n = 3000
    assert versions_for_users(proxy, users) == at_10  # same key, same version
    try:
        set_weights(proxy, "web", {"stable": 50, "canary": 50})
        at_50 = versions_for_users(proxy, users)
        assert 0.46 < Counter(at_50.values())["canary"] / len(users) < 0.54
        assert all(at_50[u] == "canary" for u, v in at_10.items() if v == "canary")
        set_weights(proxy, "web", {"stable": 0, "canary": 100})
        assert set(versions_for_users(proxy, users).values()) == {"canary"}
    finally:
        set_weights(proxy, "web", {"stable": 90, "canary": 10})
    assert versions_for_users(proxy, users) == at_10


def test_two_processes_route_every_key_alike(
    proxy: ProxyProcess, upstreams: dict[str, Upstream]
) -> None:
    users = range(500)
    with ProxyProcess(render(upstreams)) as other:
        assert versions_for_users(other, users) == versions_for_users(proxy, users)


def test_sticky_cookie_for_keyless_clients(proxy: ProxyProcess) -> None:
    status, headers, _ = request(proxy, "GET", "/echo", {"Host": "sticky.test"})
    assert status == 200
    cookie = headers["set-cookie"]
    assert re.fullmatch(
        r"gp_sticky=[0-9a-f]+; Path=/; Max-Age=600; HttpOnly; SameSite=Lax", cookie
    ), cookie
    first = headers["x-grayproxy-version"]
    pair = cookie.split(";")[0]
    for _ in range(20):
        _, again, _ = request(proxy, "GET", "/echo", {"Host": "sticky.test", "Cookie": pair})
        assert again["x-grayproxy-version"] == first
        assert "set-cookie" not in again
    _, keyed, _ = request(proxy, "GET", "/echo", {"Host": "sticky.test", "x-user-id": "u1"})
    assert "set-cookie" not in keyed


def test_no_service_is_404_with_a_clear_body(upstreams: dict[str, Upstream]) -> None:
    config = render(upstreams).replace(
        'match: {host: "*", path_prefix: /}', "match: {host: only.test}"
    )
    with ProxyProcess(config) as proc:
        status, _, body = request(proc, "GET", "/nothing/here", {"Host": "other.test"})
    assert status == 404
    assert b"no service" in body and b"Traceback" not in body


def test_refused_upstream_is_502_then_503_without_fallback(proxy: ProxyProcess) -> None:
    status, _, body = request(proxy, "GET", "/dead/x")
    assert status == 502
    assert b"connect" in body and b"Traceback" not in body
    status, _, body = request(proxy, "GET", "/dead/x")  # the endpoint is now ejected
    assert status == 503
    assert b"no healthy endpoint" in body


def test_fallback_version_takes_traffic_of_a_dead_one(
    proxy: ProxyProcess, upstreams: dict[str, Upstream]
) -> None:
    for _ in range(3):
        status, headers, body = request(proxy, "GET", "/deadfb/echo")
        assert status == 200
        assert headers["x-grayproxy-version"] == "ok"
        assert decode_json(body)["raw_path"] == "/deadfb/echo"
    metrics = http_get(proxy.control_url + "/metrics")[2].decode()
    assert re.search(
        r'grayproxy_fallback_total\{service="deadfb",version="broken"\} [1-9]', metrics
    )
    errors = r'grayproxy_upstream_errors_total\{kind="connect",service="deadfb",version="broken"\}'
    assert re.search(errors + " [1-9]", metrics)


def test_upstream_timeout_is_504(proxy: ProxyProcess) -> None:
    started = time.monotonic()
    status, _, body = request(proxy, "GET", "/slow/sleep/3")
    assert status == 504
    assert time.monotonic() - started < 2.5
    assert b"Traceback" not in body
    status, _, _ = request(proxy, "GET", "/slow/sleep/0")
    assert status == 200


def test_invalid_upstream_response_is_502(
    loops: LoopThread, upstreams: dict[str, Upstream]
) -> None:
    port, stop = raw_server(
        loops, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
    )
    config = f"""
listen: "127.0.0.1:${{data_port}}"
control: {{listen: "127.0.0.1:${{control_port}}"}}
services:
  - name: bad
    versions: {{v1: {{endpoints: ["127.0.0.1:{port}"]}}}}
"""
    try:
        with ProxyProcess(config) as proc:
            status, _, body = request(proc, "GET", "/")
    finally:
        stop()
    assert status == 502
    assert b"invalid response" in body


def test_upstream_dying_mid_body_truncates_the_client(proxy: ProxyProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.data_port, timeout=10)
    conn.request("GET", "/reset", headers={"x-canary": "never"})
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    conn.close()


def test_request_and_response_bodies_stream_both_framings(proxy: ProxyProcess) -> None:
    payload = b"z" * 300_000
    status, _, body = request(proxy, "POST", "/echo", {"x-canary": "never"}, payload)
    assert status == 200 and decode_json(body)["body_length"] == len(payload)

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"q" * 1000

    conn = http.client.HTTPConnection("127.0.0.1", proxy.data_port, timeout=10)
    conn.request("POST", "/echo", body=chunks(), headers={"x-canary": "never"}, encode_chunked=True)
    record = decode_json(conn.getresponse().read())
    conn.close()
    assert record["body_length"] == 10_000 and record["chunked"]

    status, headers, body = request(proxy, "GET", "/chunked", {"x-canary": "never"})
    assert status == 200 and body == b"one,two,three"
    assert headers["transfer-encoding"] == "chunked"


def test_keep_alive_and_pipelining_on_one_client_connection(proxy: ProxyProcess) -> None:
    pipelined = b"".join(
        f"GET /status/20{i} HTTP/1.1\r\nHost: x\r\nX-Canary: never\r\n\r\n".encode()
        for i in range(3)
    )
    reply = raw_exchange(
        proxy.data_port,
        pipelined + b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    statuses = re.findall(rb"HTTP/1.1 (\d+) ", reply)
    assert statuses == [b"200", b"201", b"202", b"200"]


def test_head_request_and_expect_continue(proxy: ProxyProcess) -> None:
    status, headers, body = request(proxy, "HEAD", "/bytes/5000", {"x-canary": "never"})
    assert status == 200 and body == b"" and headers["content-length"] == "5000"
    # the connection is reusable after a HEAD
    reply = raw_exchange(
        proxy.data_port,
        b"HEAD /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\nGET /bytes/10 HTTP/1.1\r\nHost: x\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert reply.count(b"HTTP/1.1 200") == 2 and reply.endswith(b"x" * 10)

    with socket.create_connection(("127.0.0.1", proxy.data_port), timeout=5) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Canary: never\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\n"
        )
        interim = sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    assert b'"body_length": 5' in rest


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET http://evil.test/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n", 400),
    ],
)
def test_malformed_requests_are_refused_and_never_forwarded(
    proxy: ProxyProcess, upstreams: dict[str, Upstream], raw: bytes, status: int
) -> None:
    before = sum(len(u.received) for u in upstreams.values())
    reply = raw_exchange(proxy.data_port, raw)
    assert reply.startswith(b"HTTP/1.1 %d" % status), reply
    assert b"Traceback" not in reply
    time.sleep(0.05)
    assert sum(len(u.received) for u in upstreams.values()) == before


def test_large_body_streams_with_flat_memory(proxy: ProxyProcess) -> None:
    size = 200 * 1024 * 1024
    rss_before = proxy_rss_kib(proxy)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.data_port, timeout=60)
    conn.request("GET", f"/bytes/{size}", headers={"x-canary": "never"})
    response = conn.getresponse()
    received = 0
    while block := response.read(1 << 20):
        received += len(block)
    conn.close()
    assert received == size
    assert proxy_rss_kib(proxy) - rss_before < 40 * 1024  # far less than the 200 MiB that passed


def proxy_rss_kib(proxy: ProxyProcess) -> int:
    assert proxy.process is not None
    with open(f"/proc/{proxy.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_metrics_count_requests_per_version_and_code(proxy: ProxyProcess) -> None:
    def count(code: str) -> float:
        text = http_get(proxy.control_url + "/metrics")[2].decode()
        labels = f'code="{code}",service="web",version="canary"'
        pattern = r"grayproxy_requests_total\{" + labels + r"\} ([0-9.e+]+)"
        found = re.search(pattern, text)
        return float(found.group(1)) if found else 0.0

    before = count("418")
    for _ in range(7):
        request(proxy, "GET", "/status/418", {"x-canary": "always"})
    assert count("418") == before + 7


def test_sighup_reloads_and_a_broken_file_keeps_the_running_config(
    upstreams: dict[str, Upstream],
) -> None:
    config = render(upstreams)
    with ProxyProcess(config) as proc:
        assert proc.process is not None
        proc.write_config(
            config.replace("weights: {stable: 90, canary: 10}", "weights: {stable: 0, canary: 100}")
        )
        proc.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if set(versions_for_users(proc, range(20)).values()) == {"canary"}:
                break
            time.sleep(0.05)
        assert set(versions_for_users(proc, range(20)).values()) == {"canary"}
        proc.write_config("services: [oops")
        proc.process.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert set(versions_for_users(proc, range(20)).values()) == {"canary"}
        assert proc.stop(signal.SIGTERM) == 0
        assert "reload refused" in proc.output


def test_sigterm_exits_zero(upstreams: dict[str, Upstream]) -> None:
    with ProxyProcess(render(upstreams)) as proc:
        status, _, _ = request(proc, "GET", "/echo")
        assert status == 200
        assert proc.stop(signal.SIGTERM) == 0


def test_request_on_a_kept_alive_connection_the_upstream_dropped_is_sent_again(
    loops: LoopThread,
) -> None:
    """The upstream closes each connection at its second request, unanswered
    (a keep-alive timeout racing the request): idempotent requests are
    replayed on a new connection, a POST is not."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.close()

    async def start() -> asyncio.Server:
        return await asyncio.start_server(handle, "127.0.0.1", 0)

    server = loops.call(start())
    port = server.sockets[0].getsockname()[1]
    config = f"""
listen: "127.0.0.1:${{data_port}}"
control: {{listen: "127.0.0.1:${{control_port}}"}}
services:
  - name: flaky
    versions: {{v1: {{endpoints: ["127.0.0.1:{port}"]}}}}
"""
    try:
        with ProxyProcess(config) as proc:
            for _ in range(5):
                assert request(proc, "GET", "/")[0] == 200
            assert request(proc, "POST", "/", body=b"x")[0] == 502  # its bytes were sent
            assert request(proc, "POST", "/", body=b"x")[0] == 200  # on a new connection
    finally:
        loops.call(_close(server))


async def _close(server: asyncio.Server) -> None:
    server.close()


def test_a_reload_applies_new_limits(upstreams: dict[str, Upstream]) -> None:
    config = render(upstreams)
    with ProxyProcess(config) as proc:
        assert request(proc, "POST", "/echo", {"x-canary": "never"}, b"x" * 100)[0] == 200
        proc.write_config(config.replace("services:", "limits: {max_body_bytes: 10}\nservices:", 1))
        assert http_post(proc.control_url + "/api/v1/reload") == 200
        assert request(proc, "POST", "/echo", {"x-canary": "never"}, b"x" * 100)[0] == 413


def http_post(url: str) -> int:
    conn = http.client.HTTPConnection(url.split("/")[2], timeout=10)
    try:
        conn.request("POST", "/" + url.split("/", 3)[3])
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()
