"""The data path in process: bytes fed to `ClientConnection.data_received`
through a fake client transport, in exactly the splits chosen, no sleeps.

The upstream side is real (a server on 127.0.0.1 in the same event loop), so
what it receives is what the proxy really sends. The exchange's state machine
is tested as data too.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy import errors
from proxy.dataplane import (
    ALLOWED,
    DONE,
    EXCHANGE_TRANSITIONS,
    QUEUED,
    STATE_NAMES,
    ClientConnection,
    DataPlane,
    Exchange,
)
from proxy.loader import parse_config
from proxy.metrics import Metrics
from proxy.plan import refusal
from proxy.state import LiveState

from recording import parse_responses

CONFIG = """
listen: "127.0.0.1:1"
limits: {max_body_bytes: %(max_body)d}
services:
  - name: web
    match: {host: "web.test"}
    versions: {stable: {endpoints: ["127.0.0.1:%(port)d"]}}
"""


class FakeTransport:
    """What a client connection writes, and whether it paused or closed."""

    def __init__(self, protocol: ClientConnection) -> None:
        self.protocol = protocol
        self.written = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.written += piece

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


class Recorder:
    """An upstream that keeps every byte and answers each request head with a
    fixed 200 once the body it announces (Content-Length, or chunked's last
    chunk) has arrived."""

    def __init__(self) -> None:
        self.received = bytearray()
        # What each request is answered with, written in these pieces, a pause
        # between them (so that the proxy reads them apart).
        self.answer = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.planes: list[DataPlane] = []  # whose upstream connections end with the test

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            await self._answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the proxy closed the connection
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            self.received += head
            if b"transfer-encoding: chunked" in head:
                self.received += await reader.readuntil(b"0\r\n\r\n")
            elif b"content-length: " in head:
                length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
                self.received += await reader.readexactly(length)
            for index, piece in enumerate(self.answer):
                if index:
                    await asyncio.sleep(0.002)
                writer.write(piece)
                await writer.drain()


def run(scenario: Callable[[Recorder], Awaitable[None]]) -> None:
    async def main() -> None:
        recorder = Recorder()
        server = await recorder.start()
        try:
            await scenario(recorder)
        finally:
            for plane in recorder.planes:
                plane.upstreams.close()
            for writer in recorder.writers:
                writer.close()
            server.close()
            await server.wait_closed()
            await asyncio.sleep(0.01)  # the closed transports let go of their sockets

    asyncio.run(main())


def plane_for(recorder: Recorder, max_body: int = 0) -> DataPlane:
    config = parse_config(CONFIG % {"port": recorder.port, "max_body": max_body})
    plane = DataPlane(LiveState(config, None), Metrics())
    recorder.planes.append(plane)
    return plane


def connect(plane: DataPlane) -> tuple[ClientConnection, FakeTransport]:
    conn = plane.protocol_factory()
    transport = FakeTransport(conn)
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


async def answered(transport: FakeTransport, responses: int = 1) -> list[Any]:
    """The responses the client got, once `responses` of them are complete."""
    for _ in range(500):
        parsed = parse_responses(bytes(transport.written))
        if len(parsed) >= responses and all(r.complete for r in parsed):
            return parsed
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {responses} responses: {bytes(transport.written)!r}")


MADE_ID = re.compile(rb"x-request-id: [0-9a-f]{32}\r\n")
HEAD = b"POST /a?b=1 HTTP/1.1\r\nHost: web.test\r\nX-Thing: 1\r\n"
FIXED = HEAD + b"Content-Length: 11\r\n\r\nhello world"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n"


def dechunked(body: bytes) -> bytes:
    """A chunked body's data; the chunks may be cut anywhere (they follow the reads)."""
    data = b""
    while True:
        size_line, body = body.split(b"\r\n", 1)
        size = int(size_line, 16)
        if not size:
            assert body == b"\r\n"
            return data
        data += body[:size]
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


def cuts(raw: bytes) -> list[list[bytes]]:
    """`raw` in two reads at every point, and one byte at a time."""
    return [[raw[:cut], raw[cut:]] for cut in range(1, len(raw))] + [
        [raw[i : i + 1] for i in range(len(raw))]
    ]


@pytest.mark.parametrize("raw", [FIXED, CHUNKED], ids=["content-length", "chunked"])
def test_every_split_of_a_request_reaches_the_upstream_the_same(raw: bytes) -> None:
    async def scenario(recorder: Recorder) -> None:
        plane = plane_for(recorder)
        forwarded: set[bytes] = set()
        for reads in cuts(raw):
            recorder.received.clear()
            conn, transport = connect(plane)
            for read in reads:
                conn.data_received(read)
            [response] = await answered(transport)
            assert response.status == 200 and response.body == b"ok"
            # Each request gets a new id: the rest of the head is what must not vary.
            forwarded.add(MADE_ID.sub(b"", bytes(recorder.received)))
            transport.close()
        heads = {sent.split(b"\r\n\r\n", 1)[0] for sent in forwarded}
        assert len(heads) <= 2, heads  # as received, or rebuilt when split
        for sent in forwarded:
            head, body = sent.split(b"\r\n\r\n", 1)
            assert head.startswith(b"POST /a?b=1 HTTP/1.1\r\nHost: web.test\r\nX-Thing: 1\r\n")
            assert b"x-forwarded-for: 127.0.0.1\r\n" in head
            assert (body if raw is FIXED else dechunked(body)) == b"hello world"

    run(scenario)


def test_pipelined_requests_in_one_read_are_answered_in_order() -> None:
    async def scenario(recorder: Recorder) -> None:
        conn, transport = connect(plane_for(recorder))
        get = b"GET /%d HTTP/1.1\r\nHost: web.test\r\n\r\n"
        conn.data_received(get % 1 + get % 2 + get % 3)
        responses = await answered(transport, 3)
        assert [r.status for r in responses] == [200, 200, 200]
        paths = [line.split(b" ")[1] for line in recorder.received.split(b"\r\n") if b"GET" in line]
        assert paths == [b"/1", b"/2", b"/3"]

    run(scenario)


@pytest.mark.parametrize(
    ("raw", "status", "closes"),
    [
        (b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n", 404, False),
        (
            b"GET / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
            True,
        ),
        (b"GET / HTTP/2.0\r\nHost: web.test\r\n\r\n", 505, True),
        (HEAD + b"Content-Length: 101\r\n\r\n", 413, True),
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\n65\r\n", 400, True),
    ],
)
def test_refusals_never_reach_the_upstream(raw: bytes, status: int, closes: bool) -> None:
    async def scenario(recorder: Recorder) -> None:
        for reads in ([raw], [raw[:-1], raw[-1:]]):
            conn, transport = connect(plane_for(recorder, max_body=100))
            for read in reads:
                conn.data_received(read)
            [response] = await answered(transport)
            assert response.status == status, bytes(transport.written)
            assert transport.closed == closes
            assert recorder.received == b""

    run(scenario)


def test_a_chunked_body_under_a_limit_is_held_whole_then_sent() -> None:
    async def scenario(recorder: Recorder) -> None:
        conn, transport = connect(plane_for(recorder, max_body=100))
        head, body = CHUNKED.split(b"\r\n\r\n", 1)
        conn.data_received(head + b"\r\n\r\n" + body[:10])
        exchange = conn.current
        assert exchange is not None and STATE_NAMES[exchange.state] == "HOLDING"
        await asyncio.sleep(0.05)
        assert recorder.received == b""  # nothing upstream before the body is whole
        conn.data_received(body[10:])
        [response] = await answered(transport)
        assert response.status == 200
        assert bytes(recorder.received).endswith(b"hello\r\n6\r\n world\r\n0\r\n\r\n")

    run(scenario)


# --------------------------------------------------------------------------- the state machine


@pytest.mark.parametrize(
    "read",
    [
        b"GET /1 HTTP/1.1\r\nHost: web.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: web.test\r\n\r\n",
        b"POST /1 HTTP/1.1\r\nHost: web.test\r\nContent-Length: 6\r\n\r\nab\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: web.test\r\n\r\n",
    ],
    ids=["two heads", "a body that ends as a head does"],
)
def test_a_read_that_ends_as_a_head_does_but_holds_more_is_read_whole(read: bytes) -> None:
    async def scenario(recorder: Recorder) -> None:
        conn, transport = connect(plane_for(recorder))
        for _ in range(3):  # the first time and once the lines are known
            recorder.received.clear()
            transport.written.clear()
            conn.data_received(read)
            assert [r.status for r in await answered(transport, 2)] == [200, 200]
            sent = MADE_ID.sub(b"", bytes(recorder.received))
            assert sent.count(b"HTTP/1.1\r\nHost: web.test\r\n") == 2
            assert (b"ab\r\n\r\n" in sent) == (b"POST" in read)
            assert sent.index(b" /1 ") < sent.index(b" /2 ")

    run(scenario)


def test_heads_that_differ_in_a_line_or_two_go_upstream_as_received() -> None:
    """The runs (http1.run_lines): the lines that change are read afresh, at
    any length, and routing sees them."""

    async def scenario(recorder: Recorder) -> None:
        conn, transport = connect(plane_for(recorder))
        users = [b"u1", b"u1", b"user-22", b"u", b"u333", b"u333", b"u4\tx", b"u5"]
        for number, user in enumerate(users):
            head = (
                b"GET /p?q=%d HTTP/1.1\r\nHost: web.test\r\nx-user-id: %s\r\n"
                b"Accept: */*\r\nX-Request-Id: id-%d\r\n\r\n" % (number, user, number * 37)
            )
            if number == 7:  # a line more, then the runs do not fit
                head = head[:-2] + b"X-More: 1\r\n\r\n"
            recorder.received.clear()
            transport.written.clear()
            conn.data_received(head)
            [response] = await answered(transport)
            assert response.status == 200
            assert bytes(recorder.received).startswith(head[:-2])
            assert b"x-request-id: id-%d\r\n" % (number * 37) in bytes(transport.written)

    run(scenario)


def test_heads_like_those_learnt_are_served_as_llhttp_would_have_them() -> None:
    """Once a client's heads are learnt, a GET that differs in a user's id is
    read without llhttp (ClientConnection._read_plain); one that differs in
    what llhttp refuses or reads is read by llhttp, and served or refused as
    it was before there was a way around it."""
    template = b"GET /p HTTP/1.1\r\nHost: web.test\r\nx-user-id: %s\r\nAccept: */*\r\n\r\n"
    cases = [  # (the changing line, what follows in a read of its own, status, closed)
        (b"x-user-id: u3", b"", 200, False),
        (b"x-user-id: u\x01", b"", 400, True),
        (b"x-user-id: u\x7f", b"", 400, True),
        (b"x-user-id: \xe9t\xe9", b"", 200, False),
        (b"Connection: close", b"", 200, True),
        (b"Content-Length: 5", b"hello", 200, False),
        (b"Content-Length: x", b"", 400, True),
        (b"Transfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n", 200, False),
    ]

    async def scenario(recorder: Recorder) -> None:
        plane = plane_for(recorder)
        for user in (b"u1", b"u22"):  # learnt
            conn, transport = connect(plane)
            conn.data_received(template % user)
            assert [r.status for r in await answered(transport)] == [200]
        for line, after, status, closed in cases:
            head = template.replace(b"x-user-id: %s", line)
            recorder.received.clear()
            conn, transport = connect(plane)
            conn.data_received(head)
            if after:
                await asyncio.sleep(0.01)
                conn.data_received(after)
            [response] = await answered(transport)
            assert (response.status, transport.closed) == (status, closed), line
            sent = MADE_ID.sub(b"", bytes(recorder.received))
            if status != 200:
                assert sent == b""
                continue
            assert sent.startswith(b"GET /p HTTP/1.1\r\nHost: web.test\r\n")
            assert (line + b"\r\n" in sent) == line.startswith(b"x-user-id")
            assert sent.endswith(after or b"\r\n\r\n"), sent

    run(scenario)


# A response as an upstream may send it: an informational response first,
# an empty line before its status line (llhttp skips it), lines the proxy
# drops or replaces, and a separator without a space.
RESPONSE = (
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    b"\r\nHTTP/1.1 200 OK\r\nServer: up\r\nConnection: keep-alive\r\nX-Request-Id: theirs\r\n"
    b'ETag:\t"1" \r\nContent-Length: 5\r\n\r\nhello'
)


def test_every_split_of_a_response_reaches_the_client_the_same() -> None:
    async def scenario(recorder: Recorder) -> None:
        plane = plane_for(recorder)
        conn, transport = connect(plane)
        for reads in cuts(RESPONSE):
            recorder.answer = reads
            transport.written.clear()
            conn.data_received(b"GET / HTTP/1.1\r\nHost: web.test\r\nX-Request-Id: mine\r\n\r\n")
            [response] = await answered(transport)
            assert response.status == 200 and response.body == b"hello", reads
            head = bytes(transport.written).split(b"\r\n\r\n")[0]
            assert head.split(b"\r\n")[1:4] == [b"Server: up", b'ETag: "1" ', b"x-request-id: mine"]
            assert b"keep-alive" not in head and b"theirs" not in head

    run(scenario)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nServer: up\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
    ],
    ids=["keep-alive", "close", "HTTP/1.0", "no body", "204", "304"],
)
def test_a_response_like_the_last_is_served_as_llhttp_would_have_it(answer: bytes) -> None:
    """A read that is a whole response whose head is the last one llhttp read
    is read without it (UpstreamConnection._read_whole): the client gets the
    same response every time, and the upstream connection is kept or closed
    as llhttp said the first time."""

    async def scenario(recorder: Recorder) -> None:
        recorder.answer = [answer]
        conn, transport = connect(plane_for(recorder))
        answers = []
        for _ in range(4):
            transport.written.clear()
            conn.data_received(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
            [response] = await answered(transport)
            assert response.status == int(answer[9:12])
            assert response.body == (b"hello" if answer.endswith(b"hello") else b"")
            answers.append(MADE_ID.sub(b"", bytes(transport.written)))
            if transport.closed:
                conn, transport = connect(conn.plane)
        assert answers[0] == answers[1] == answers[2] == answers[3]
        reused = not any(word in answer for word in (b"close", b"1.0"))
        assert len(recorder.writers) == (1 if reused else 4)

    run(scenario)


def test_bytes_after_a_response_in_its_read_are_never_a_response_to_another_request() -> None:
    """An upstream that sends more than the response (a second one, unasked)
    in the same read: the client gets the response, and the connection is
    not used again (nginx and HAProxy close it too), so that the bytes after
    it never answer the next request, pipelined or not."""

    async def scenario(recorder: Recorder) -> None:
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        # The unasked response is cut short: what comes next would be its body.
        recorder.answer = [ok + b"HTTP/1.1 200 OK\r\nContent-Length: 90\r\n\r\nevil"]
        conn, transport = connect(plane_for(recorder))
        request = b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n"
        for reads in ([request * 2], [request, request]):
            transport.written.clear()
            for read in reads:
                conn.data_received(read)
                await asyncio.sleep(0.02)
            responses = await answered(transport, 2)
            assert [r.body for r in responses] == [b"hello", b"hello"]
        assert len(recorder.writers) == 4

    run(scenario)


def test_a_response_head_past_the_bound_is_a_502() -> None:
    async def scenario(recorder: Recorder) -> None:
        plane = plane_for(recorder)
        line = b"X-Big: " + b"a" * 1000 + b"\r\n"
        recorder.answer = [b"HTTP/1.1 200 OK\r\n"] + [line * 8] * 9 + [b"\r\n"]
        conn, transport = connect(plane)
        conn.data_received(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
        [response] = await answered(transport)
        assert response.status == 502 and b"too large" in response.body
        # Just under it, the same head in one read passes.
        recorder.answer = [b"HTTP/1.1 200 OK\r\n" + line * 60 + b"Content-Length: 0\r\n\r\n"]
        conn, transport = connect(plane)
        conn.data_received(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
        [response] = await answered(transport)
        assert response.status == 200 and bytes(transport.written).count(line) == 60

    run(scenario)


def test_every_state_is_reachable_and_every_path_ends_done() -> None:
    reachable = {QUEUED}
    frontier = [QUEUED]
    while frontier:
        for after in EXCHANGE_TRANSITIONS[frontier.pop()]:
            if after not in reachable:
                reachable.add(after)
                frontier.append(after)
    assert reachable == set(range(len(STATE_NAMES)))
    assert EXCHANGE_TRANSITIONS[DONE] == ()
    for state, afters in EXCHANGE_TRANSITIONS.items():
        assert state == DONE or DONE in afters, STATE_NAMES[state]
        assert state not in afters
        assert ALLOWED[state] == sum(1 << after for after in afters)


def test_a_transition_the_table_does_not_have_is_refused() -> None:
    async def scenario(recorder: Recorder) -> None:
        conn, _ = connect(plane_for(recorder))
        exchange = Exchange(conn, refusal(errors.BadRequest("test")))
        for state in range(len(STATE_NAMES)):
            allowed = state in EXCHANGE_TRANSITIONS[QUEUED]
            exchange.state = QUEUED
            if allowed:
                exchange._to(state)
                assert exchange.state == state
            else:
                with pytest.raises(RuntimeError, match="QUEUED"):
                    exchange._to(state)

    run(scenario)
