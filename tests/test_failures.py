"""Failure and limits, with real processes: slow and idle clients, oversize
bodies, hanging and dying endpoints, SIGTERM with requests in flight,
WebSocket tunnels, 100-continue refused by the upstream, and flat memory
while 300 MB stream each way."""

from __future__ import annotations

import asyncio
import http.client
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from procs import ProxyProcess
from recording import RecordingUpstream, parse_responses
from servers import LoopThread, Upstream, WebSocketUpstream, decode_json, raw_server

MAX_BODY = 100_000

CONFIG = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
timeouts: {idle: 1s}
limits: {header_read_timeout: 1s, max_body_bytes: %(max_body)d}
services:
  - name: hang
    match: {path_prefix: /hang}
    timeouts: {response: 500ms}
    versions: {only: {endpoints: ["127.0.0.1:%(hang)d"]}}
  - name: stall
    match: {path_prefix: /stall}
    timeouts: {response: 500ms}
    versions: {only: {endpoints: ["127.0.0.1:%(stall)d"]}}
  - name: refuse413
    match: {path_prefix: /refuse413}
    versions: {only: {endpoints: ["127.0.0.1:%(refuse413)d"]}}
  - name: refuse401
    match: {path_prefix: /refuse401}
    versions: {only: {endpoints: ["127.0.0.1:%(refuse401)d"]}}
  - name: ws
    match: {path_prefix: /ws}
    versions:
      stable: {endpoints: ["127.0.0.1:%(ws_stable)d"]}
      canary: {endpoints: ["127.0.0.1:%(ws_canary)d"]}
    split: {weights: {stable: 100, canary: 0}}
    rules:
      - match: {header: {name: x-canary, value: always}}
        version: canary
  - name: rec
    match: {path_prefix: /rec}
    versions: {only: {endpoints: ["%(recorder)s"]}}
  - name: web
    versions: {stable: {endpoints: ["%(web)s"]}}
"""


# --------------------------------------------------------------------------- upstreams


@dataclass
class Servers:
    web: Upstream
    recorder: RecordingUpstream
    ws: dict[str, WebSocketUpstream]
    ports: dict[str, int]


@pytest.fixture(scope="module")
def servers(loops: LoopThread) -> Iterator[Servers]:
    stops = []
    ports = {}
    replies = {
        "hang": b"",
        "stall": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc",
        "refuse401": b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n"
        b"WWW-Authenticate: Basic\r\n\r\nauth",
    }
    for name, reply in replies.items():
        ports[name], stop = raw_server(loops, reply, hold=True)
        stops.append(stop)
    ports["refuse413"], stop = raw_server(
        loops,
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig",
    )
    stops.append(stop)
    started = Servers(
        Upstream(loops, "web").start(),
        RecordingUpstream(loops).start(),
        {name: WebSocketUpstream(loops, name).start() for name in ("stable", "canary")},
        ports,
    )
    yield started
    started.web.stop()
    started.recorder.stop()
    for ws in started.ws.values():
        ws.stop()
    for stop in stops:
        stop()


@pytest.fixture(scope="module")
def proxy(servers: Servers) -> Iterator[ProxyProcess]:
    config = CONFIG % {
        **servers.ports,
        "max_body": MAX_BODY,
        "ws_stable": servers.ws["stable"].port,
        "ws_canary": servers.ws["canary"].port,
        "recorder": servers.recorder.address,
        "web": servers.web.address,
    }
    with ProxyProcess(config) as proc:
        yield proc


# --------------------------------------------------------------------------- helpers


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def read_until_close(sock: socket.socket, timeout: float) -> tuple[bytes, bool, float]:
    """Everything until the peer closes: (bytes, closed, seconds waited)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    chunks = []
    closed = False
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        closed = True
    except ConnectionResetError:
        closed = True
    except TimeoutError:
        pass
    return b"".join(chunks), closed, time.monotonic() - started


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Steady:
    """Background clients doing small GETs in a loop, recording each outcome."""

    def __init__(self, port: int, clients: int = 2) -> None:
        self.port = port
        self.outcomes: list[tuple[float, int | str, float]] = []  # start, status, seconds
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def __enter__(self) -> Steady:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status: int | str = get(self.port, "/status/200", timeout=3)[0]
            except OSError as exc:
                status = repr(exc)
            self.outcomes.append((started, status, time.monotonic() - started))
            time.sleep(0.05)


# --------------------------------------------------------------------------- slow and idle clients


def test_slowloris_gets_408_while_others_are_served(proxy: ProxyProcess) -> None:
    """20 clients send their headers a byte per 100 ms (header_read_timeout
    1s): each gets 408 and is closed, and other clients are served meanwhile."""
    head = b"GET /status/200 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    slow = [socket.create_connection(("127.0.0.1", proxy.data_port)) for _ in range(20)]
    replies = {sock: b"" for sock in slow}
    closed_at: dict[socket.socket, float] = {}
    started = time.monotonic()
    try:
        with Steady(proxy.data_port) as steady:
            for byte in head:
                for sock in slow:
                    if sock not in closed_at:
                        drip(sock, byte, replies, closed_at, time.monotonic() - started)
                if len(closed_at) == len(slow) or time.monotonic() - started > 4:
                    break
                time.sleep(0.1)
            time.sleep(0.3)  # serve a little longer after the slow ones are gone
    finally:
        for sock in slow:
            sock.close()
    for sock in slow:
        assert replies[sock].startswith(b"HTTP/1.1 408 "), replies[sock][:200]
        assert closed_at.get(sock, 99) < 2.0, closed_at.get(sock)
    assert steady.outcomes, "no request was served meanwhile"
    assert {status for _, status, _ in steady.outcomes} == {200}, steady.outcomes
    assert max(seconds for _, _, seconds in steady.outcomes) < 0.5


def drip(
    sock: socket.socket,
    byte: int,
    replies: dict[socket.socket, bytes],
    closed_at: dict[socket.socket, float],
    now: float,
) -> None:
    """Collect what the proxy answered so far; if it has not closed, send one more byte."""
    try:
        while chunk := sock.recv(65536, socket.MSG_DONTWAIT):
            replies[sock] += chunk
        closed_at[sock] = now
        return
    except BlockingIOError:
        pass
    except ConnectionResetError:
        closed_at[sock] = now
        return
    try:
        sock.sendall(bytes([byte]))
    except OSError:
        closed_at[sock] = now


def test_a_request_line_stalled_in_its_method_gets_408(proxy: ProxyProcess) -> None:
    """The header read timeout runs from a message's first byte, even before its URL."""
    with socket.create_connection(("127.0.0.1", proxy.data_port)) as sock:
        sock.sendall(b"GE")
        reply, closed, waited = read_until_close(sock, timeout=4)
    assert closed and waited < 2.5, (reply, waited)
    assert reply.startswith(b"HTTP/1.1 408 "), reply


def test_silent_connection_is_closed_in_time(proxy: ProxyProcess) -> None:
    """A connection that never sends a byte is not held longer than the idle
    timeout (1 s here)."""
    with socket.create_connection(("127.0.0.1", proxy.data_port)) as sock:
        reply, closed, waited = read_until_close(sock, timeout=4)
    assert closed and waited < 2.5, (reply, waited)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408 ")


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    proxy: ProxyProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.data_port)) as sock:
        sock.sendall(b"GET /status/200 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(3)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first
        rest, closed, waited = read_until_close(sock, timeout=4)
    assert closed, "idle keep-alive connection still open after 4 s (idle: 1s)"
    assert 0.5 < waited < 2.5, waited
    assert rest == b""


def test_keep_alive_connection_in_use_is_not_cut_by_the_idle_timeout(
    proxy: ProxyProcess,
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.data_port, timeout=5)
    try:
        for _ in range(6):  # 6 x 0.4 s: longer than idle, never idle that long
            conn.request("GET", "/status/200")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            time.sleep(0.4)
    finally:
        conn.close()


# --------------------------------------------------------------------------- body limit


def test_content_length_over_the_limit_is_413_before_anything_goes_upstream(
    proxy: ProxyProcess, servers: Servers
) -> None:
    recorder = servers.recorder
    before = len(recorder.raw)
    head = b"POST /rec/up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    with socket.create_connection(("127.0.0.1", proxy.data_port)) as sock:
        sock.sendall(head)  # and no body: the answer must not wait for it
        reply, closed, waited = read_until_close(sock, timeout=3)
    [response] = parse_responses(reply)
    assert response.status == 413, reply
    assert closed and waited < 1.0
    time.sleep(0.05)
    assert bytes(recorder.raw[before:]) == b""


def test_content_length_at_the_limit_is_served(proxy: ProxyProcess, servers: Servers) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.data_port, timeout=5)
    try:
        conn.request("POST", "/echo", body=b"b" * MAX_BODY)
        response = conn.getresponse()
        assert response.status == 200
        assert decode_json(response.read())["body_length"] == MAX_BODY
    finally:
        conn.close()


def send_until_answered(port: int, pieces: list[bytes], pause: float) -> tuple[bytes, bool]:
    """Send `pieces` with pauses, stopping early once the proxy answers;
    then read until it closes."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for piece in pieces:
            sock.settimeout(pause)
            try:
                early = sock.recv(65536, socket.MSG_PEEK)
            except TimeoutError:
                early = b""
            except ConnectionResetError:
                break
            if early:
                break
            try:
                sock.sendall(piece)
            except OSError:
                break
        reply, closed, _ = read_until_close(sock, timeout=3)
    return reply, closed


def chunked_pieces(total: int, size: int) -> list[bytes]:
    pieces = []
    for _ in range(total // size):
        pieces.append(b"%x\r\n%b\r\n" % (size, b"c" * size))
    return [*pieces, b"0\r\n\r\n"]


@pytest.mark.parametrize("pause", [0.0, 0.02], ids=["one-burst", "streamed"])
def test_chunked_body_over_the_limit_is_413_and_never_completes_upstream(
    proxy: ProxyProcess, servers: Servers, pause: float
) -> None:
    """Chunked: the size is known only while reading. The client must get
    413 and the upstream must never get a complete request (a proxy that
    streams may have sent the head; it must then abort that request)."""
    recorder = servers.recorder
    before_requests, before_aborted = len(recorder.requests), recorder.aborted
    head = b"POST /rec/up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = chunked_pieces(MAX_BODY + 20_000, 10_000)
    if pause:
        reply, closed = send_until_answered(proxy.data_port, [head, *body], pause)
    else:
        reply, closed = send_until_answered(proxy.data_port, [head + b"".join(body)], 0.01)
    [response] = parse_responses(reply)
    assert response.status == 413, reply
    assert closed
    time.sleep(0.1)
    assert len(recorder.requests) == before_requests, "an over-limit body reached the upstream"
    assert recorder.open_partials == 0
    if pause == 0.0:  # everything arrived at once: nothing needed to go upstream at all
        assert recorder.aborted == before_aborted


# ------------------------------------------------------------------ hanging and dying endpoints


def test_hanging_endpoint_is_504_after_the_response_timeout(proxy: ProxyProcess) -> None:
    started = time.monotonic()
    status, _, body = get(proxy.data_port, "/hang/x")
    elapsed = time.monotonic() - started
    assert status == 504, body
    assert 0.4 < elapsed < 1.5, elapsed
    assert b"Traceback" not in body


def test_endpoint_stalling_mid_body_is_cut_after_the_response_timeout(
    proxy: ProxyProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.data_port)) as sock:
        sock.sendall(b"GET /stall/x HTTP/1.1\r\nHost: x\r\n\r\n")
        reply, closed, waited = read_until_close(sock, timeout=4)
    [response] = parse_responses(reply)
    assert response.status == 200 and response.body == b"abc"
    assert closed and not response.complete
    assert waited < 2.0


def test_killed_endpoint_under_load_is_ejected_and_the_other_takes_the_traffic(
    loops: LoopThread,
) -> None:
    doomed, survivor = Upstream(loops, "doomed").start(), Upstream(loops, "survivor").start()
    config = f"""
listen: "127.0.0.1:${{data_port}}"
control: {{listen: "127.0.0.1:${{control_port}}"}}
services:
  - name: pool
    versions: {{only: {{endpoints: ["{doomed.address}", "{survivor.address}"]}}}}
"""
    outcomes: list[tuple[float, int | str, str]] = []
    stop = threading.Event()

    def client(port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while not stop.is_set():
            started = time.monotonic()
            try:
                conn.request("GET", "/who")
                response = conn.getresponse()
                body = response.read()
                name = decode_json(body)["upstream"] if response.status == 200 else ""
                outcomes.append((started, response.status, name))
            except (OSError, http.client.HTTPException) as exc:
                outcomes.append((started, repr(exc), ""))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.close()

    try:
        with ProxyProcess(config) as proc:
            threads = [threading.Thread(target=client, args=(proc.data_port,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            killed_at = time.monotonic()
            doomed.stop()
            time.sleep(3.0)
            stop.set()
            for thread in threads:
                thread.join(10)
    finally:
        stop.set()
        survivor.stop()
    before = [o for o in outcomes if o[0] < killed_at]
    after = [o for o in outcomes if o[0] >= killed_at + 1.0]
    failures = [o for o in outcomes if o[1] != 200]
    assert {o[2] for o in before} == {"doomed", "survivor"}
    assert all(o[1] == 200 for o in before), before
    assert after and all(o[1] == 200 and o[2] == "survivor" for o in after), failures
    assert len(failures) <= 8, failures  # only requests caught in flight at the kill


# --------------------------------------------------------------------------- 100-continue


@pytest.mark.parametrize("status", [413, 401])
def test_expect_continue_refused_by_the_upstream_reaches_the_client(
    proxy: ProxyProcess, status: int
) -> None:
    head = (
        b"POST /refuse%d/upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 50000\r\n\r\n" % status
    )
    with socket.create_connection(("127.0.0.1", proxy.data_port)) as sock:
        sock.sendall(head)  # the body is never sent: the client waits for 100 or a final answer
        reply, closed, waited = read_until_close(sock, timeout=3)
    final = [r for r in parse_responses(reply) if r.status >= 200]
    assert [r.status for r in final] == [status], reply
    assert final[0].complete
    assert closed and waited < 2.0, "the proxy waited for a body the client never sent"


# --------------------------------------------------------------------------- WebSocket


def test_websocket_is_tunnelled_both_ways_to_the_routed_version(
    proxy: ProxyProcess, servers: Servers
) -> None:
    async def talk(headers: dict[str, str]) -> tuple[list[str], bytes, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{proxy.data_url}/ws/chat", headers=headers) as ws,
        ):
            version = ws._response.headers.get("x-grayproxy-version", "")
            texts = [await ws.receive_str(timeout=5)]
            await ws.send_str("ping")
            texts.append(await ws.receive_str(timeout=5))
            big = bytes(range(256)) * 4096  # 1 MiB each way
            await ws.send_bytes(big)
            echoed = await ws.receive_bytes(timeout=10)
            assert echoed == big[::-1]
            await ws.send_str("close")  # the upstream closes: the client must see it
            closing = await ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            return texts, echoed[:4], version

    texts, _, version = asyncio.run(talk({"x-canary": "always"}))
    assert texts == ["hello from canary", "canary:ping"]
    assert version == "canary"
    texts, _, version = asyncio.run(talk({}))
    assert texts == ["hello from stable", "stable:ping"]
    assert version == "stable"
    handshake = servers.ws["canary"].handshakes[-1]
    assert handshake.get("Upgrade", "").lower() == "websocket"
    assert "x-forwarded-for" in {k.lower() for k in handshake}


def test_websocket_client_close_ends_the_tunnel(proxy: ProxyProcess) -> None:
    async def open_and_close() -> int | None:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"{proxy.data_url}/ws/x")
            assert await ws.receive_str(timeout=5) == "hello from stable"
            await ws.close()
            return ws.close_code

    assert asyncio.run(open_and_close()) == 1000
    # the proxy is fine afterwards
    assert get(proxy.data_port, "/status/200")[0] == 200


# --------------------------------------------------------------------------- SIGTERM


def drain_config(upstream: Upstream, drain_timeout: str, workers: int = 1) -> str:
    return f"""
listen: "127.0.0.1:${{data_port}}"
control: {{listen: "127.0.0.1:${{control_port}}"}}
workers: {workers}
drain_timeout: {drain_timeout}
services:
  - name: web
    versions: {{only: {{endpoints: ["{upstream.address}"]}}}}
"""


def slow_get(port: int, path: str, results: list[tuple[int, dict[str, str], bytes] | str]) -> None:
    try:
        results.append(get(port, path, timeout=10))
    except (OSError, http.client.HTTPException) as exc:
        results.append(repr(exc))


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_zero(
    loops: LoopThread, workers: int
) -> None:
    upstream = Upstream(loops, "slow").start()
    try:
        with ProxyProcess(drain_config(upstream, "5s", workers)) as proc:
            port = proc.data_port
            idle = socket.create_connection(("127.0.0.1", port))
            idle.sendall(b"GET /status/200 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.recv(65536).startswith(b"HTTP/1.1 200 ")
            late = socket.create_connection(("127.0.0.1", port))
            late.sendall(b"GET /sleep/0.3 HTTP/1.1\r\nHost: x\r\n")  # head not finished yet
            results: list[tuple[int, dict[str, str], bytes] | str] = []
            threads = [
                threading.Thread(target=slow_get, args=(port, "/sleep/1.5", results))
                for _ in range(4)
            ]
            for thread in threads:
                thread.start()
            time.sleep(0.4)  # all four in flight upstream
            sigterm_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            late.sendall(b"\r\n")  # a request completed during the drain
            late_reply, _, _ = read_until_close(late, timeout=3)
            idle_rest, idle_closed, _ = read_until_close(idle, timeout=1)
            code = proc.wait(10)
            exited_after = time.monotonic() - sigterm_at
            for thread in threads:
                thread.join(10)
            late.close()
            idle.close()
    finally:
        upstream.stop()
    assert code == 0
    assert exited_after < 3.0, "waited for the drain timeout although nothing was in flight"
    assert len(results) == 4
    for result in results:
        assert not isinstance(result, str), results
        status, headers, _ = result
        assert status == 200
        assert headers.get("connection", "").lower() == "close", headers
    assert idle_closed and idle_rest == b"", "an idle keep-alive connection was kept open"
    [late_response] = parse_responses(late_reply)
    assert late_response.status in (200, 503), late_reply
    assert late_response.headers.get(b"connection", b"").lower() == b"close"


def test_drain_is_bounded_by_the_drain_timeout(loops: LoopThread) -> None:
    upstream = Upstream(loops, "slower").start()
    try:
        with ProxyProcess(drain_config(upstream, "1s")) as proc:
            results: list[tuple[int, dict[str, str], bytes] | str] = []
            thread = threading.Thread(target=slow_get, args=(proc.data_port, "/sleep/8", results))
            thread.start()
            time.sleep(0.3)
            sigterm_at = time.monotonic()
            code = proc.stop(signal.SIGTERM, timeout=10)
            exited_after = time.monotonic() - sigterm_at
            thread.join(10)
    finally:
        upstream.stop()
    assert code == 0
    assert 0.8 < exited_after < 2.5, exited_after
    assert len(results) == 1 and isinstance(results[0], str), results  # cut, not answered


# --------------------------------------------------------------------------- memory


MEMORY_CONFIG = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
services:
  - name: web
    versions: {only: {endpoints: ["%s"]}}
"""
STREAM_BYTES = 300 * 1024 * 1024


def upload(port: int, total: int, results: dict[str, object]) -> None:
    block = b"u" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
            % total
        )
        for _ in range(total // len(block)):
            sock.sendall(block)
        reply, _, _ = read_until_close(sock, timeout=60)
    [response] = parse_responses(reply)
    results["upload"] = decode_json(response.body)["body_length"]


def download(port: int, total: int, results: dict[str, object]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", f"/bytes/{total}")
        response = conn.getresponse()
        received = 0
        while block := response.read(1 << 20):
            received += len(block)
        results["download"] = received
    finally:
        conn.close()


def test_memory_stays_flat_while_300_mb_stream_each_way(loops: LoopThread) -> None:
    upstream = Upstream(loops, "bulk").start()
    try:
        with ProxyProcess(MEMORY_CONFIG % upstream.address) as proc:
            assert proc.process is not None
            pid = proc.process.pid
            warm: dict[str, object] = {}
            upload(proc.data_port, 8 << 20, warm)
            download(proc.data_port, 8 << 20, warm)
            baseline = rss_kib(pid)
            samples: list[int] = []
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    samples.append(rss_kib(pid))
                    time.sleep(0.1)

            results: dict[str, object] = {}
            workers = [
                threading.Thread(target=sample),
                threading.Thread(target=upload, args=(proc.data_port, STREAM_BYTES, results)),
                threading.Thread(target=download, args=(proc.data_port, STREAM_BYTES, results)),
            ]
            for worker in workers:
                worker.start()
            for worker in workers[1:]:
                worker.join(120)
            done.set()
            workers[0].join(5)
    finally:
        upstream.stop()
    assert results == {"upload": STREAM_BYTES, "download": STREAM_BYTES}
    growth_mib = (max(samples) - baseline) / 1024
    assert growth_mib < 50, f"RSS grew by {growth_mib:.1f} MiB (baseline {baseline} KiB)"


def test_memory_stays_flat_for_a_client_that_stops_reading(loops: LoopThread) -> None:
    """A slow client must slow the upstream down (back-pressure), not make
    the proxy buffer the response."""
    upstream = Upstream(loops, "bulk").start()
    try:
        with ProxyProcess(MEMORY_CONFIG % upstream.address) as proc:
            assert proc.process is not None
            pid = proc.process.pid
            download(proc.data_port, 8 << 20, {})
            baseline = rss_kib(pid)
            with socket.create_connection(("127.0.0.1", proc.data_port)) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\n\r\n" % STREAM_BYTES)
                samples = []
                for _ in range(20):  # two seconds without reading a byte
                    samples.append(rss_kib(pid))
                    time.sleep(0.1)
                received = len(read_until_close_or(sock, STREAM_BYTES))
    finally:
        upstream.stop()
    growth_mib = (max(samples) - baseline) / 1024
    assert growth_mib < 50, f"RSS grew by {growth_mib:.1f} MiB while the client did not read"
    assert received >= STREAM_BYTES


def read_until_close_or(sock: socket.socket, body_bytes: int) -> bytes:
    """Read a response head and at least `body_bytes` more (or until close)."""
    sock.settimeout(30)
    data = bytearray()
    while chunk := sock.recv(1 << 20):
        data += chunk
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0 and len(data) - head_end - 4 >= body_bytes:
            return bytes(data[head_end + 4 :])
    return bytes(data)
