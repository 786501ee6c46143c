"""The request-smuggling invariant, as a generated test.

Hypothesis writes request streams the way smuggling scanners do (defparam's
smuggler, PortSwigger's HTTP Request Smuggler): Content-Length and
Transfer-Encoding in every spelling and together, obfuscated `chunked`, odd
chunk sizes, bare CR and LF, NUL, obs-fold, 8-bit bytes, header names with
underscores, `Connection` naming end-to-end headers, Upgrade (websocket, h2c,
with and without a body), `Expect: 100-continue`, HTTP/1.0, absolute-form
targets, the HTTP/2 preface; one to three pipelined requests, sent raw in
several writes with a pause between them (a body split across reads). About
half of the requests are well formed, so that much of it is forwarded.

Every request carries a marker (`X-Inv: <example>-r<index>`); a request hidden
in a body carries `<example>-hidden`. The upstream reads each of its
connections with h11 (strict, third party) and tags its answers with
`x-upstream-seq`; the client's bytes are read with h11 too. For every example:

- the upstream's bytes parse as complete requests: no h11 error, nothing left
  over, no request left partial unless its client left (or was refused)
  in the middle of a body that came in several writes;
- every request the upstream got is one the client sent as a request and got
  the upstream's answer to, in its place: nothing hidden in a body, nothing
  after a refusal or after `Connection: close`, no answer out of order;
- the client gets well-framed responses, one per request it sent at most; a
  request that must be refused gets its status (400, 501, 505...) and the
  connection is closed; a well-formed request is served;
- what is forwarded is what was sent: method, target (origin-form), body;
  Host, X-Request-Id kept even when Connection names them; no header name with
  `_`; no Upgrade except `websocket` on a GET without a body; no
  HTTP2-Settings; the proxy's own X-Forwarded-* lines.

The shapes once found to get through (KNOWN, at the end) are tried first on
every run. Then 200 generated examples, derandomized so that CI always tries
the same ones: about 15 s. Run more examples, and new ones, with:

    INVARIANT_RANDOM=1 .venv/bin/pytest tests/test_invariant.py --invariant-examples 3000

(`INVARIANT_EXAMPLES=3000` works too; 3000 take about 4 minutes.)
`--hypothesis-show-statistics` shows how many were forwarded, refused or cut.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from procs import ProxyProcess
from servers import LoopThread

EXAMPLES = int(os.environ.get("INVARIANT_EXAMPLES", "200"))
DERANDOMIZE = not os.environ.get("INVARIANT_RANDOM")

CONFIG = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
limits: {header_read_timeout: 2s}
services:
  - name: web
    # a failing example may leave 502s behind: they must not eject the upstream
    outlier_detection: {consecutive_5xx: 0, consecutive_connect_failures: 0}
    versions: {stable: {endpoints: ["%s"]}}
"""
CRLF = b"\r\n"
HOST = b"inv.test"
MARK = b"######"  # replaced by the example's number, as wide, when sent
HIDDEN = b"GET /hidden HTTP/1.1\r\nHost: inv.test\r\nX-Inv: " + MARK + b"-hidden\r\n\r\n"
PAUSE = 0.01  # between two writes of one example
QUIET = 0.5  # the client gives up when the proxy says nothing for this long
REFUSALS = frozenset({400, 408, 413, 417, 431, 501, 505})
CLOSING = frozenset({400, 501, 505})


# --------------------------------------------------------------------------- the upstream


@dataclass
class Arrival:
    """One request as the upstream's h11 read it: from its head on, complete or not."""

    seq: int
    conn: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # names as received
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False
    cut: bool = False  # its connection ended before it was complete
    tunnel: bytearray = field(default_factory=bytearray)  # bytes after a 101

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name]


@dataclass
class Fault:
    conn: int
    problem: str


class H11Upstream:
    """An upstream that reads every connection with h11 as a server.

    It answers each complete request with 200 and `x-upstream-seq: N` (its
    Arrival's number), sends 100 Continue when asked, and switches protocols
    (101, then keeps the raw bytes, closing 150 ms later) when a request has
    an Upgrade header and `X-Inv-Switch`. Bytes h11 refuses end the connection
    and become a Fault."""

    def __init__(self, loops: LoopThread) -> None:
        self.loops = loops
        self.arrivals: list[Arrival] = []
        self.faults: list[Fault] = []
        self.log: list[tuple[int, bytes]] = []  # (connection, bytes) in arrival order
        self.last_activity = 0.0
        self.port = 0
        self.ids = itertools.count(1)
        self.connections: set[_H11Connection] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> H11Upstream:
        async def serve() -> asyncio.Server:
            loop = asyncio.get_running_loop()
            return await loop.create_server(lambda: _H11Connection(self), "127.0.0.1", 0)

        self._server = self.loops.call(serve())
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.abort()

        self.loops.call(close())

    def settle(self, since: int, limit: float = 1.5) -> None:
        """Wait until no request that began after arrival `since` is in progress
        and nothing has arrived for 50 ms (the proxy cuts an upstream request
        whose client left a moment after the client's close)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            busy = any(not a.complete and not a.cut for a in self.arrivals[since:])
            if not busy and time.monotonic() - self.last_activity > 0.05:
                break
            time.sleep(0.01)

    def cut_open_requests(self) -> None:
        """End the connections in the middle of a request (the proxy left them
        open after its client left: already a failure), so that nothing of
        them reaches the next example."""

        async def cut() -> None:
            for conn in list(self.connections):
                if conn.current is not None and conn.transport is not None:
                    conn.transport.abort()

        self.loops.call(cut())

    def pending_heads(self) -> list[Fault]:
        """Connections holding the first bytes of a request head that never ended."""

        async def look() -> list[Fault]:
            return [
                Fault(conn.id, "an incomplete request head is waiting")
                for conn in self.connections
                if conn.tunnel is None
                and conn.h11.their_state is h11.IDLE
                and conn.h11.trailing_data[0]
            ]

        faults: list[Fault] = self.loops.call(look())
        return faults


class _H11Connection(asyncio.Protocol):
    def __init__(self, owner: H11Upstream) -> None:
        self.owner = owner
        self.id = next(owner.ids)
        self.h11 = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.current: Arrival | None = None
        self.tunnel: Arrival | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.owner.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.owner.last_activity = time.monotonic()
        self.owner.log.append((self.id, data))
        if self.tunnel is not None:
            self.tunnel.tunnel += data
            return
        self.h11.receive_data(data)
        try:
            self._serve()
        except h11.ProtocolError as exc:
            problem = f"h11: {type(exc).__name__}: {exc}"
            self.owner.faults.append(Fault(self.id, problem))
            self._close()

    def _serve(self) -> None:
        while self.transport is not None and self.tunnel is None:
            event = self.h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.current = Arrival(
                    len(self.owner.arrivals),
                    self.id,
                    event.method,
                    event.target,
                    list(event.headers.raw_items()),
                )
                self.owner.arrivals.append(self.current)
                if self.h11.they_are_waiting_for_100_continue:
                    self._send(h11.InformationalResponse(status_code=100, headers=[]))
            elif isinstance(event, h11.Data):
                assert self.current is not None
                self.current.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._answer()
            else:  # ConnectionClosed
                return

    def _answer(self) -> None:
        arrival, self.current = self.current, None
        assert arrival is not None and self.transport is not None
        arrival.complete = True
        seq = b"%d" % arrival.seq
        upgrade = arrival.values(b"upgrade")
        switching = self.h11.their_state is h11.MIGHT_SWITCH_PROTOCOL  # type: ignore[attr-defined]
        if switching and arrival.values(b"x-inv-switch"):
            switch = [
                (b"upgrade", upgrade[0]),
                (b"connection", b"upgrade"),
                (b"x-upstream-seq", seq),
            ]
            self._send(h11.InformationalResponse(status_code=101, headers=switch))
            self.tunnel = arrival
            arrival.tunnel += self.h11.trailing_data[0]
            asyncio.get_running_loop().call_later(0.15, self._close)
            return
        headers = [(b"content-length", b"2"), (b"x-upstream-seq", seq)]
        self._send(h11.Response(status_code=200, headers=headers))
        self._send(h11.Data(data=b"ok"))
        self._send(h11.EndOfMessage())
        if self.h11.our_state is h11.MUST_CLOSE:
            self._close()
        else:
            self.h11.start_next_cycle()

    def _send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data and self.transport is not None:
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.current is not None:
            self.current.cut = True
        elif self.tunnel is None and self.h11.trailing_data[0]:
            problem = "the connection ended inside a request head"
            self.owner.faults.append(Fault(self.id, problem))
        self.transport = None
        self.owner.connections.discard(self)


@pytest.fixture(scope="module")
def h11_upstream(loops: LoopThread) -> Iterator[H11Upstream]:
    server = H11Upstream(loops).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(h11_upstream: H11Upstream) -> Iterator[ProxyProcess]:
    with ProxyProcess(CONFIG % h11_upstream.address) as proc:
        yield proc


# --------------------------------------------------------------------------- what is expected


@dataclass(frozen=True)
class Rule:
    """What the proxy must do with a request: serve it (no statuses), refuse
    it with one of `statuses` (`must`), or either."""

    statuses: frozenset[int] = frozenset()
    must: bool = False

    def __and__(self, other: Rule) -> Rule:
        return Rule(self.statuses | other.statuses, self.must or other.must)

    def __str__(self) -> str:
        codes = "/".join(map(str, sorted(self.statuses)))
        if self.must:
            return f"must be refused ({codes})"
        return f"may be served or refused ({codes})" if codes else "must be served"


SERVE = Rule()


def refuse(*statuses: int) -> Rule:
    return Rule(frozenset(statuses), True)


def either(*statuses: int) -> Rule:
    return Rule(frozenset(statuses), False)


@dataclass
class Req:
    """One request as sent, and what the proxy must make of it."""

    index: int
    method: bytes = b"GET"
    target: bytes = b"/"
    version: bytes = b"HTTP/1.1"
    fields: list[bytes] = field(default_factory=list)  # header lines, each with its end
    body: bytes = b""  # as sent after the head
    payload: bytes = b""  # the body the upstream must get when it is served
    rule: Rule = SERVE
    head_rule: Rule = SERVE  # the rule its head alone implies (nothing of it may go upstream)
    shapes: list[str] = field(default_factory=list)
    path: bytes = b"/"  # the origin-form target it must be forwarded with
    host: bool = False  # it says Host: inv.test, which must reach the upstream
    request_id: bool = False  # it says X-Request-Id: inv-rid, which must too
    hop_by_hop: bytes = b""  # a header its Connection names: it must not be forwarded
    closes: bool = False  # Connection: close, or HTTP/1.0: nothing after it is answered
    may_stop: bool = False  # an upgrade: the proxy may stop reading after it
    upgrade: bytes = b""  # the Upgrade it asks for (a 101 may answer it)
    truncated: bool = False  # its body never ends: the client leaves in the middle
    raw: bytes = b""  # the whole request, when it is not built from the parts

    @property
    def marker(self) -> bytes:
        return MARK + b"-r%d" % self.index

    def shape(self, name: str, rule: Rule = SERVE, body: bool = False) -> None:
        """Say what was done to it; `body`: in its body, after a head that may be forwarded."""
        self.shapes.append(name)
        self.rule = self.rule & rule
        if not body:
            self.head_rule = self.head_rule & rule

    def add(self, *lines: bytes) -> None:
        self.fields.extend(lines)

    def head(self) -> bytes:
        if self.raw:
            return self.raw
        line = b"%s %s %s\r\n" % (self.method, self.target, self.version)
        return line + b"".join(self.fields) + CRLF

    def render(self) -> bytes:
        return self.head() + (b"" if self.raw else self.body)

    def describe(self) -> str:
        shapes = ", ".join(self.shapes) or "well formed"
        return f"request {self.index} [{shapes}] {self.rule}"


@dataclass
class Example:
    """Pipelined requests, sent in writes split after the bytes in `cuts`."""

    requests: list[Req]
    cuts: list[int] = field(default_factory=list)

    def data(self, number: int) -> bytes:
        return b"".join(r.render() for r in self.requests).replace(MARK, b"%06d" % number)

    def writes(self, number: int) -> list[bytes]:
        data = self.data(number)
        bounds = [0, *self.cuts, len(data)]
        return [data[a:b] for a, b in itertools.pairwise(bounds)]

    def spans(self) -> list[tuple[int, int, int]]:
        """Where each request starts, its head ends and it ends, in the data."""
        spans, start = [], 0
        for req in self.requests:
            head_end = start + len(req.head())
            end = start + len(req.render())
            spans.append((start, head_end, end))
            start = end
        return spans

    def may_arrive_in_part(self, index: int) -> bool:
        """Request `index`'s head may be forwarded before the end of its body is
        known: nothing in its head is refused, and its body never ends or a
        write boundary falls in it."""
        _, head_end, end = self.spans()[index]
        req = self.requests[index]
        split = req.truncated or any(head_end <= cut < end for cut in self.cuts)
        return split and not req.head_rule.must

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints it
        printer.text(repr(self))

    def __repr__(self) -> str:
        lines = [f"Example(cuts={self.cuts}, requests=["]
        for req in self.requests:
            lines.append(f"    # {req.describe()}")
            lines.append(f"    {req.render()!r},")
        return "\n".join([*lines, "])"])


# --------------------------------------------------------------------------- strategies
#
# A request is built from parts (request line, framing, upgrade, Host, a few
# more header lines); each part is drawn clean most of the time and otherwise
# in one of the forms scanners try, each form with the rule it implies. The
# clean form is listed first in each table, so that shrinking goes to it.

Form = tuple[bytes, Rule, str]  # bytes (or a format), its rule, its name ("" when clean)


def pick(draw: st.DrawFn, forms: list[Form], clean: int = 4) -> Form:
    """The first (clean) form `clean` times in `clean + 1`, else any form."""
    if draw(st.integers(0, clean)) < clean:
        return forms[0]
    return draw(st.sampled_from(forms))


def use(req: Req, form: Form, body: bool = False) -> bytes:
    value, rule, name = form
    if name:
        req.shape(name, rule, body)
    return value


TARGETS: list[Form] = [
    (b"", SERVE, ""),
    (b"http://inv.test", SERVE, "absolute-form"),
    (b"http://INV.TEST", SERVE, "absolute-form in upper case"),
    (b"http://evil.test", refuse(400), "absolute-form naming another host"),
    (b"https://inv.test", either(400), "absolute-form https"),
]
VERSIONS: list[Form] = [
    (b"HTTP/1.1", SERVE, ""),
    (b"HTTP/1.0", SERVE, "HTTP/1.0"),
    (b"HTTP/1.0", SERVE, "HTTP/1.0"),
    (b"HTTP/2.0", refuse(505), "HTTP/2.0"),
    (b"HTTP/0.9", refuse(505), "HTTP/0.9"),
    (b"http/1.1", refuse(400), "lower-case version"),
]
METHODS = [b"GET", b"POST", b"PUT", b"OPTIONS", b"DELETE", b"PATCH"]


def request_line(draw: st.DrawFn, req: Req) -> None:
    req.method = draw(st.sampled_from(METHODS))
    req.path = b"/inv/%d" % req.index + draw(st.sampled_from([b"", b"?q=1", b"/a;b?c=d&e=%20"]))
    req.target = use(req, pick(draw, TARGETS, clean=6)) + req.path
    req.version = use(req, pick(draw, VERSIONS, clean=6))


def payloads() -> st.SearchStrategy[bytes]:
    """A body: a request hidden in it (forwarded as a request: smuggled) or bytes."""
    return st.one_of(st.just(HIDDEN), st.binary(min_size=1, max_size=12))


CL_NAMES: list[Form] = [
    (b"Content-Length: ", SERVE, ""),
    (b"content-length: ", SERVE, ""),
    (b"CONTENT-LENGTH:", SERVE, ""),
    (b"Content-Length:\t", SERVE, ""),
    (b"Content-Length : ", refuse(400), "space before the colon"),
    (b" Content-Length: ", refuse(400), "whitespace before the name"),
]
CL_VALUES: list[Form] = [
    (b"%d", SERVE, ""),
    (b"0%d", either(400), "Content-Length with a leading zero"),
    (b"00000000000000000000%d", either(400), "Content-Length with 20 leading zeros"),
    (b" %d", either(400), "Content-Length after more whitespace"),
    (b"%d\t", either(400), "Content-Length, tab after"),
    (b"+%d", refuse(400), "signed Content-Length"),
    (b"-%d", refuse(400), "negative Content-Length"),
    (b"0x%x", refuse(400), "hex Content-Length"),
    (b"%d, %d", refuse(400), "Content-Length list"),
    (b"%d,%d", refuse(400), "Content-Length list"),
    (b"%d %d", refuse(400), "two Content-Lengths in one value"),
    (b"99999999999999999999999", refuse(400, 413), "huge Content-Length"),
]
TE_NAMES: list[Form] = [
    (b"Transfer-Encoding: ", SERVE, ""),
    (b"transfer-encoding: ", SERVE, ""),
    (b"TRANSFER-ENCODING:", SERVE, ""),
    (b"Transfer-Encoding:\t", SERVE, ""),
    (b"Transfer-Encoding : ", refuse(400), "space before the colon"),
    (b" Transfer-Encoding: ", refuse(400), "whitespace before the name"),
    (b"Transfer-Encoding:\r\n ", refuse(400), "obs-fold before chunked"),
]
TE_VALUES: list[Form] = [
    (b"chunked", SERVE, ""),
    (b"Chunked", SERVE, ""),
    (b"CHUNKED", SERVE, ""),
    (b" chunked", either(400), "whitespace before chunked"),
    (b"chunked\t", either(400), "tab after chunked"),
    (b"chunked ", either(400), "space after chunked"),
    (b"xchunked", refuse(400), "xchunked"),
    (b"chunked, identity", refuse(400), "chunked, identity"),
    (b"chunk", refuse(400), "chunk"),
    (b"identity", refuse(400), "identity"),
    (b"identity, chunked", refuse(400, 501), "identity, chunked"),
    (b"gzip, chunked", refuse(400, 501), "gzip, chunked"),
    (b"chunked, chunked", refuse(400, 501), "chunked, chunked"),
    (b",chunked", refuse(400, 501), "leading comma before chunked"),
    (b"chunked,", refuse(400, 501), "trailing comma after chunked"),
    (b'"chunked"', refuse(400, 501), "quoted chunked"),
    (b"chunked\x0b", refuse(400, 501), "vertical tab after chunked"),
]
# A chunk: size (format of its length), then the line end, the data and the data's end.
CHUNKS: list[Form] = [
    (b"%x\r\n%s\r\n", SERVE, ""),
    (b"%X\r\n%s\r\n", SERVE, ""),
    (b"0%x\r\n%s\r\n", SERVE, "chunk size with a leading zero"),
    (b"%08x\r\n%s\r\n", SERVE, "chunk size of 8 hex digits"),
    (b"%x;ext\r\n%s\r\n", SERVE, "chunk extension"),
    (b'%x;name="v;1"\r\n%s\r\n', SERVE, "quoted chunk extension"),
    (b"%x ;ext\r\n%s\r\n", either(400), "space before a chunk extension"),
    # A size is bounded by its value (as nginx and HAProxy bound it), not by its digits.
    (b"%016x\r\n%s\r\n", SERVE, "chunk size of 16 hex digits, leading zeros"),
    (b"%020x\r\n%s\r\n", SERVE, "chunk size of 20 hex digits, leading zeros"),
    (b"8%015x\r\n%s\r\n", refuse(400), "chunk size over 2^63-1"),
    (b"f%015x\r\n%s\r\n", refuse(400), "chunk size of 16 hex digits over 2^63-1"),
    (b"%x \r\n%s\r\n", refuse(400), "space after the chunk size"),
    (b"%x\t\r\n%s\r\n", refuse(400), "tab after the chunk size"),
    (b"0x%x\r\n%s\r\n", refuse(400), "chunk size 0x"),
    (b"%x\n%s\r\n", refuse(400), "chunk size ends in bare LF"),
    (b"%x\r\n%s", refuse(400), "no CRLF after the chunk data"),
    (b"%x\r\n%s\n", refuse(400), "bare LF after the chunk data"),
    (b"%x\r\n%sXX\r\n", refuse(400), "chunk data longer than its size"),
]
LAST_CHUNKS: list[Form] = [
    (b"0\r\n\r\n", SERVE, ""),
    (b"000\r\n\r\n", SERVE, "last chunk with leading zeros"),
    (b"0;ext=1\r\n\r\n", SERVE, "last chunk with an extension"),
    (b"0\r\nX-Trailer: t\r\n\r\n", SERVE, "a trailer"),
    (b"0000000000000000\r\n\r\n", SERVE, "last chunk of 16 hex digits"),
    (b"0\r\n\n", refuse(400), "last chunk ends in bare LF"),
]


def content_length(draw: st.DrawFn, req: Req, truncated: bool) -> None:
    req.payload = req.body = draw(payloads())
    size = len(req.payload) + (5 if truncated else 0)
    name = use(req, pick(draw, CL_NAMES, clean=6))
    value = use(req, pick(draw, CL_VALUES, clean=6))
    line = name + value.replace(b"%d", b"%d" % size).replace(b"%x", b"%x" % size) + CRLF
    req.add(line)
    if draw(st.integers(0, 9)) == 0:
        other = line if draw(st.booleans()) else b"Content-Length: %d\r\n" % (size + 1)
        req.add(other)
        req.shape("two Content-Length lines", refuse(400))


def chunked(draw: st.DrawFn, req: Req, truncated: bool) -> None:
    req.payload = draw(payloads())
    name = use(req, pick(draw, TE_NAMES, clean=6))
    value = use(req, pick(draw, TE_VALUES, clean=6))
    req.add(name + value + CRLF)
    if draw(st.integers(0, 9)) == 0:
        req.add(b"Transfer-Encoding: chunked\r\n")
        req.shape("two Transfer-Encoding lines", refuse(400, 501))
    cuts = draw(st.lists(st.integers(1, len(req.payload)), max_size=2, unique=True))
    marks = [i for i in range(len(req.payload)) if req.payload.startswith(MARK, i)]
    cuts = sorted(c for c in cuts if not any(m < c < m + len(MARK) for m in marks))
    pieces = [req.payload[a:b] for a, b in itertools.pairwise([0, *cuts, len(req.payload)])]
    body = b""
    for piece in filter(None, pieces):
        body += use(req, pick(draw, CHUNKS, clean=8), body=True) % (len(piece), piece)
    last_chunk = b"" if truncated else use(req, pick(draw, LAST_CHUNKS, clean=8), body=True)
    req.body = body + last_chunk


def framing(draw: st.DrawFn, req: Req, last: bool) -> None:
    kind = draw(st.sampled_from(["none", "length", "chunked", "none", "length", "chunked", "both"]))
    truncated = last and kind != "none" and draw(st.integers(0, 11)) == 0
    if truncated:
        req.truncated = True
        req.shape("body cut short: the client leaves", either(400, 408), body=True)
    if kind == "length":
        content_length(draw, req, truncated)
    elif kind == "chunked":
        chunked(draw, req, truncated)
    elif kind == "both":
        chunked(draw, req, truncated)
        size = len(req.body) if draw(st.booleans()) else len(req.payload)
        req.add(b"Content-Length: %d\r\n" % size)
        req.shape("Content-Length and Transfer-Encoding", refuse(400))


HTTP2_SETTINGS = b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
UPGRADES: list[tuple[bytes, list[bytes], str]] = [
    (b"websocket", [b"Connection: Upgrade\r\n"], "Upgrade: websocket"),
    (b"WebSocket", [b"Connection: keep-alive, upgrade\r\n"], "Upgrade: WebSocket"),
    (b"websocket", [], "Upgrade: websocket without Connection: upgrade"),
    (
        b"h2c",
        [b"Connection: Upgrade, HTTP2-Settings\r\n", HTTP2_SETTINGS],
        "Upgrade: h2c",
    ),
    (b"h2c", [b"Connection: upgrade\r\n"], "Upgrade: h2c without HTTP2-Settings"),
    (b"h2c", [HTTP2_SETTINGS], "Upgrade: h2c, no Connection"),
]


def upgrade(draw: st.DrawFn, req: Req) -> None:
    """An Upgrade request: only websocket on a GET without a body may be
    tunnelled; any other is served as plain HTTP/1.1 (its Upgrade and
    HTTP2-Settings removed); with a body it is refused."""
    token, lines, name = draw(st.sampled_from(UPGRADES))
    if draw(st.integers(0, 3)):
        req.method = b"GET"
    req.upgrade = token
    req.may_stop = True
    req.add(b"Upgrade: " + token + CRLF, *lines)
    if b"HTTP2-Settings\r\n" in b"".join(lines):
        req.hop_by_hop = b"http2-settings"
    if draw(st.booleans()):
        req.add(b"X-Inv-Switch: yes\r\n")  # the upstream answers 101 if it gets the Upgrade
    if token == b"websocket":
        req.add(
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"Sec-WebSocket-Version: 13\r\n"
        )
    with_body = req.body != b"" or any(b"chunked" in line.lower() for line in req.fields)
    connection = any(line.lower().startswith(b"connection:") for line in lines)
    if not with_body:
        req.shape(name)
    elif token.lower() == b"websocket" and connection:
        req.shape(name + " with a body", refuse(400))
    else:
        req.shape(name + " with a body", either(400))


HOSTS: list[Form] = [
    (b"Host: inv.test\r\n", SERVE, ""),
    (b"host: inv.test\r\n", SERVE, ""),
    (b"HOST:inv.test\r\n", SERVE, ""),
    (b"Host:\tinv.test\r\n", SERVE, ""),
    (b"Host: inv.test \t\r\n", either(400), "whitespace after the Host value"),
    (b"", SERVE, "no Host"),
    (b"Host: inv.test\r\nHost: inv.test\r\n", refuse(400), "two Host lines"),
    (b"Host: inv.test, inv.test\r\n", refuse(400), "Host list"),
    (b"Host : inv.test\r\n", refuse(400), "space before the colon"),
    (b"Host: inv.test\x00\r\n", refuse(400), "NUL in Host"),
]


def host(draw: st.DrawFn, req: Req) -> None:
    line = use(req, pick(draw, HOSTS, clean=8))
    if line:
        req.add(line)
        req.host = True
    elif req.version == b"HTTP/1.1":
        req.shape("HTTP/1.1 without Host", refuse(400))  # RFC 9112 §3.2


def _line(text: bytes, rule: Rule = SERVE, name: str = "") -> Callable[[st.DrawFn, Req], None]:
    def add(draw: st.DrawFn, req: Req) -> None:
        req.add(text)
        if name:
            req.shape(name, rule)

    return add


def _request_id(draw: st.DrawFn, req: Req) -> None:
    req.add(b"X-Request-Id: inv-rid\r\n")
    req.request_id = True


def _connection_option(draw: st.DrawFn, req: Req) -> None:
    """Connection naming a header the proxy needs or sets: ignored, not obeyed."""
    option = draw(
        st.sampled_from(
            [
                b"host",
                b"Host",
                b"content-length",
                b"transfer-encoding",
                b"keep-alive, host",
                b"x-forwarded-for",
                b"X-Forwarded-Host",
                b"x-request-id",
            ]
        )
    )
    req.add(b"Connection: " + option + CRLF)
    req.shape(f"Connection: {option.decode()}")
    if option == b"x-request-id":
        _request_id(draw, req)


def _underscore(draw: st.DrawFn, req: Req) -> None:
    """A name with `_`: some servers read it as the `-` name; dropped, not forwarded."""
    line = draw(
        st.sampled_from(
            [
                b"Transfer_Encoding: chunked\r\n",
                b"Content_Length: 5\r\n",
                b"X_Forwarded_Host: evil.test\r\n",
                b"X_Forwarded_For: 10.0.0.1\r\n",
            ]
        )
    )
    req.add(line)
    req.shape(line.split(b":")[0].decode())


WELL_FORMED: list[Callable[[st.DrawFn, Req], None]] = [
    _line(b"X-A: v\r\n"),
    _line(b"x-a:v\r\n"),
    _line(b"X-A:\t v \t\r\n"),
    _request_id,
    _connection_option,
    _connection_option,
    _underscore,
    _underscore,
    _line(b"X-Forwarded-Host: evil.test\r\n"),
    _line(b"X-Forwarded-For: 10.0.0.1\r\n"),
    _line(b"Expect: 100-continue\r\n", SERVE, "Expect: 100-continue"),
    _line(b"Expect: 100-Continue\r\n", SERVE, "Expect: 100-Continue"),
    _line(b"Expect: x-inv\r\n", either(417), "unknown expectation"),
    _line(b"X-High: caf\xe9\r\n", either(400), "8-bit value"),
]
MALFORMED: list[Callable[[st.DrawFn, Req], None]] = [
    _line(b"X-Caf\xe9: v\r\n", refuse(400), "8-bit name"),
    _line(b"X-Nul: a\x00b\r\n", refuse(400), "NUL in a value"),
    _line(b"X-N\x00ul: v\r\n", refuse(400), "NUL in a name"),
    _line(b"X-Cr: a\rb\r\n", refuse(400), "bare CR in a value"),
    _line(b"X-Cr: a\rX-B: b\r\n", refuse(400), "bare CR ends a line"),
    _line(b"X-Lf: a\nX-B: b\r\n", refuse(400), "bare LF ends a line"),
    _line(b"X-Fold: a\r\n b\r\n", refuse(400), "obs-fold"),
    _line(b"X-Fold: a\r\n\tb\r\n", refuse(400), "obs-fold with a tab"),
    _line(b"X-A : v\r\n", refuse(400), "space before the colon"),
    _line(b"X-A\r\n", refuse(400), "no colon"),
    _line(b": v\r\n", refuse(400), "empty name"),
]


@st.composite
def requests(draw: st.DrawFn, index: int, last: bool) -> Req:
    req = Req(index)
    if draw(st.integers(0, 24)) == 0:
        req.raw = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        req.shape("HTTP/2 preface", refuse(505))
        return req
    request_line(draw, req)
    req.add(b"X-Inv: " + req.marker + CRLF)
    framing(draw, req, last)
    if draw(st.integers(0, 4)) == 0:
        upgrade(draw, req)
    host(draw, req)
    for _ in range(draw(st.integers(0, 2))):
        extras = MALFORMED if draw(st.integers(0, 3)) == 3 else WELL_FORMED
        draw(st.sampled_from(extras))(draw, req)
    if req.version == b"HTTP/1.0" and not last and draw(st.booleans()):
        req.add(b"Connection: keep-alive\r\n")
    elif req.version == b"HTTP/1.1" and last and draw(st.integers(0, 9)):
        req.add(b"Connection: close\r\n")
    req.closes = closes(req.version, b"".join(req.fields))
    req.fields = list(draw(st.permutations(req.fields)))
    return req


def closes(version: bytes, lines: bytes) -> bool:
    """Whether a request with these header lines ends its connection (RFC 9112 §9.3)."""
    found = re.findall(rb"(?:^|\n)connection:([^\r\n]*)", lines.lower())
    options = {option.strip() for value in found for option in value.split(b",")}
    return b"close" in options or (version == b"HTTP/1.0" and b"keep-alive" not in options)


@st.composite
def examples(draw: st.DrawFn) -> Example:
    count = draw(st.integers(1, 3))
    reqs = [draw(requests(index, index == count - 1)) for index in range(count)]
    size = sum(len(r.render()) for r in reqs)
    cuts = draw(st.lists(st.integers(1, size - 1), max_size=3, unique=True))
    return Example(reqs, sorted(cuts))


# --------------------------------------------------------------------------- one example


@dataclass
class Answer:
    """One response the client got, as h11 read it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    informational: list[int] = field(default_factory=list)  # 1xx before it

    @property
    def seq(self) -> int | None:
        """The upstream's arrival it answers, or None if the proxy answered itself."""
        values = [v for k, v in self.headers if k == b"x-upstream-seq"]
        return int(values[0]) if values else None


@dataclass
class Outcome:
    number: int
    writes: list[bytes]
    reply: bytes
    closed: bool  # the proxy closed the connection (else the client gave up)
    arrivals: list[Arrival]
    faults: list[Fault]
    log: list[tuple[int, bytes]]
    still_open: set[int]  # the arrivals in progress once the client had left


NUMBERS = itertools.count(1)


def converse(port: int, writes: list[bytes]) -> tuple[bytes, bool]:
    """Send the writes PAUSE apart; read until the proxy closes, is quiet for
    QUIET, or 4 s have passed."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=QUIET) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for index, piece in enumerate(writes):
                if index:
                    time.sleep(PAUSE)
                sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before everything was sent: read what it answered
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return b"".join(chunks), False
            except ConnectionResetError:
                return b"".join(chunks), True
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
    return b"".join(chunks), False


def run(proxy: ProxyProcess, upstream: H11Upstream, ex: Example) -> Outcome:
    number = next(NUMBERS)
    writes = ex.writes(number)
    arrivals, faults, log = len(upstream.arrivals), len(upstream.faults), len(upstream.log)
    reply, closed = converse(proxy.data_port, writes)
    upstream.settle(arrivals)
    pending = upstream.pending_heads()
    outcome = Outcome(
        number,
        writes,
        reply,
        closed,
        upstream.arrivals[arrivals:],
        upstream.faults[faults:] + pending,
        upstream.log[log:],
        {a.seq for a in upstream.arrivals[arrivals:] if not a.complete and not a.cut},
    )
    if outcome.still_open:  # already a failure: keep what follows from the next example
        upstream.cut_open_requests()  # (the proxy may send the request again: absorb that)
        upstream.settle(len(upstream.arrivals), limit=0.3)
        upstream.cut_open_requests()
    return outcome


# --------------------------------------------------------------------------- the check


class Broken(AssertionError):
    pass


def explain(ex: Example, out: Outcome, problem: str) -> str:
    lines = [problem, "", f"sent (example {out.number:06d}, {len(out.writes)} writes):"]
    for req in ex.requests:
        lines.append(f"  {req.describe()}")
    lines += [f"    {piece!r}" for piece in out.writes]
    ending = "then closed" if out.closed else f"then nothing for {QUIET}s"
    lines += ["", f"the proxy answered ({ending}):", f"    {out.reply[:1500]!r}"]
    by_conn: dict[int, bytes] = {}
    for conn, data in out.log:
        by_conn[conn] = by_conn.get(conn, b"") + data
    lines.append("the upstream got:" if by_conn else "the upstream got nothing")
    for conn, data in by_conn.items():
        lines.append(f"  on its connection {conn}: {data[:1500]!r}")
    return "\n".join(lines)


def read_answers(ex: Example, out: Outcome) -> list[Answer]:
    """The client's bytes, read by h11 as the client of the requests sent."""
    __tracebackhide__ = True
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(out.reply)
    if out.closed:
        conn.receive_data(b"")
    answers: list[Answer] = []
    for req in ex.requests:
        if conn.their_state is not h11.IDLE or not conn.trailing_data[0]:
            break  # closed, or no more bytes
        headers = [(b"host", HOST)]
        if req.upgrade:
            headers += [(b"upgrade", req.upgrade), (b"connection", b"upgrade")]
        conn.send(h11.Request(method=b"GET", target=b"/", headers=headers))
        conn.send(h11.EndOfMessage())
        answer: Answer | None = None
        informational: list[int] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if answer is not None:
                    raise Broken(f"the response to request {req.index} is cut short")
                return answers  # the client gave up waiting, or the proxy closed
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
                if event.status_code == 101:
                    answers.append(Answer(101, list(event.headers)))
                    return answers  # the rest is another protocol
            elif isinstance(event, h11.Response):
                answer = Answer(event.status_code, list(event.headers))
                answer.informational = informational
            elif isinstance(event, h11.EndOfMessage):
                assert answer is not None
                answers.append(answer)
                break
            elif isinstance(event, h11.ConnectionClosed):
                return answers
        if h11.MUST_CLOSE in (conn.our_state, conn.their_state):
            conn.next_event()  # raises if bytes follow a response that said close
            return answers
        conn.start_next_cycle()
    if conn.trailing_data[0]:
        raise Broken(f"bytes after the last response: {bytes(conn.trailing_data[0][:300])!r}")
    return answers


def check(ex: Example, out: Outcome) -> None:
    """Raise Broken, from where it is found, if the invariant does not hold."""
    __tracebackhide__ = True  # pytest shows the message (with the example), not this code
    try:
        answers = read_answers(ex, out)
    except h11.ProtocolError as exc:
        raise Broken(f"the client got malformed HTTP: h11: {exc}") from None
    by_seq = {a.seq: a for a in out.arrivals}
    prefix = b"%06d-r" % out.number

    # The upstream's bytes: complete requests, in order, each one sent as one.
    for fault in out.faults:
        raise Broken(
            f"the upstream's h11 refused what the proxy sent on its connection "
            f"{fault.conn}: {fault.problem}"
        )
    forwarded: dict[int, Arrival] = {}
    for arrival in out.arrivals:
        markers = arrival.values(b"x-inv")
        what = f"{arrival.method.decode()} {arrival.target.decode('latin-1')} (X-Inv: {markers})"
        if markers == [b"%06d-hidden" % out.number]:
            raise Broken(f"the request hidden in a body reached the upstream: {what}")
        if len(markers) == 1 and markers[0][:6] < b"%06d" % out.number:
            raise Broken(
                f"a request of an earlier example reached the upstream only now, after its "
                f"client had left: {what}"
            )
        if len(markers) != 1 or not markers[0].startswith(prefix):
            raise Broken(f"the upstream got a request that was not sent as one: {what}")
        index = int(markers[0][len(prefix) :])
        if index in forwarded:
            raise Broken(f"request {index} reached the upstream twice")
        forwarded[index] = arrival
        if not arrival.complete and not ex.may_arrive_in_part(index):
            raise Broken(
                f"request {index} reached the upstream in part only "
                f"({'still open' if arrival.seq in out.still_open else 'cut'}); "
                f"it {ex.requests[index].rule}, and "
                f"none of a request refused for its head, or whose body came with it, may be sent"
            )
        if arrival.seq in out.still_open:
            raise Broken(f"request {index} stays open upstream after its client left")

    # The client's answers: in order, each one the answer to its own request.
    stopped = ""  # why nothing more may be answered
    optional = False  # the proxy may have stopped after an upgrade
    for req in ex.requests:
        i = req.index
        answer = answers[i] if i < len(answers) else None
        upstream_got = forwarded.get(i)
        if stopped:
            if answer is not None or upstream_got is not None:
                raise Broken(f"request {i} was answered or forwarded after {stopped}")
            continue
        if answer is None:
            if upstream_got is not None and upstream_got.complete:
                raise Broken(f"request {i} was forwarded but the client got no answer to it")
            if not (optional or req.truncated):
                raise Broken(f"request {i} got no answer; it {req.rule}")
            stopped = "no answer"
            continue
        seq = answer.seq
        if seq is not None:
            got = by_seq.get(seq)
            if got is None or got is not upstream_got:
                raise Broken(
                    f"the answer to request {i} is the upstream's answer to another request "
                    f"(x-upstream-seq {seq}): responses are out of step"
                )
            if req.rule.must:
                raise Broken(f"request {i} was forwarded; it {req.rule}")
            if upstream_got is not None and upstream_got.complete:
                check_forwarded(req, upstream_got, out.number)
            if answer.status == 101 and upstream_got is not None:
                check_switch(req, upstream_got)
                stopped = "a 101"
            if 100 in answer.informational and req.version == b"HTTP/1.0":
                raise Broken(f"request {i} is HTTP/1.0 and got a 100 Continue")
        else:
            if upstream_got is not None and upstream_got.complete:
                raise Broken(f"request {i} was forwarded, yet the proxy answered {answer.status}")
            if answer.status not in req.rule.statuses or answer.status not in REFUSALS:
                raise Broken(f"request {i} got {answer.status} from the proxy; it {req.rule}")
            if answer.status in CLOSING and not out.closed:
                raise Broken(f"the connection stayed open after a {answer.status}")
            stopped = f"the proxy's {answer.status} to request {i}"
        if req.closes and not stopped:
            stopped = f"request {i}'s Connection: close"
        optional = optional or req.may_stop


def check_switch(req: Req, arrival: Arrival) -> None:
    __tracebackhide__ = True
    if not (req.method == b"GET" and req.upgrade.lower() == b"websocket" and not req.payload):
        raise Broken(
            f"request {req.index} was switched to {req.upgrade!r} (101) and tunnelled; these "
            f"bytes reached the upstream raw through the tunnel: {bytes(arrival.tunnel)!r}"
        )


def check_forwarded(req: Req, got: Arrival, number: int) -> None:
    """What the upstream got is the request as sent, with the proxy's own lines."""
    __tracebackhide__ = True
    i = req.index
    payload = req.payload.replace(MARK, b"%06d" % number)
    names = [name.lower() for name, _ in got.headers]
    if got.method != req.method or got.target != req.path:
        raise Broken(f"request {i} reached the upstream as {got.method!r} {got.target!r}")
    if got.body != payload:
        raise Broken(f"request {i}'s body {payload!r} reached the upstream as {bytes(got.body)!r}")
    if any(b"_" in name for name in names):
        raise Broken(f"request {i}: a header name with _ was forwarded: {got.headers}")
    if req.hop_by_hop and req.hop_by_hop in names:
        raise Broken(f"request {i}: Connection names {req.hop_by_hop!r}, yet it was forwarded")
    for value in got.values(b"upgrade"):
        if got.method != b"GET" or value.lower() != b"websocket" or got.body:
            raise Broken(
                f"request {i}: Upgrade: {value.decode('latin-1')} was forwarded on a "
                f"{got.method.decode()} with {len(got.body)} body bytes; only websocket "
                f"on a GET without a body may be"
            )
    if req.host and got.values(b"host") != [HOST]:
        raise Broken(f"request {i} reached the upstream with Host {got.values(b'host')}")
    if req.host and got.values(b"x-forwarded-host") != [HOST]:
        raise Broken(f"request {i}: X-Forwarded-Host {got.values(b'x-forwarded-host')}")
    if req.request_id and set(got.values(b"x-request-id")) != {b"inv-rid"}:
        raise Broken(f"request {i}: X-Request-Id {got.values(b'x-request-id')}")
    if not got.values(b"x-forwarded-for") or got.values(b"x-forwarded-proto") != [b"http"]:
        raise Broken(f"request {i}: no X-Forwarded-For or -Proto upstream")


# --------------------------------------------------------------------------- the test


def literal(
    shape: str, raw: bytes, rule: Rule = SERVE, payload: bytes = b"", index: int = 0
) -> Req:
    """A request written out by hand, `@` where its marker goes; what is
    checked of it is read off its head."""
    line, _, rest = raw.partition(CRLF)
    method, target, version = line.split(b" ")
    head = CRLF + rest.split(b"\r\n\r\n")[0].lower() + CRLF
    upgrade = re.search(rb"\r\nupgrade: *([^\r]*)", head)
    req = Req(
        index,
        method=method,
        path=target,
        version=version,
        raw=raw.replace(b"@", MARK + b"-r%d" % index),
        payload=payload,
        rule=rule,
        head_rule=rule,
        shapes=[shape],
        host=b"\r\nhost: inv.test\r\n" in head,
        hop_by_hop=b"http2-settings" if b"http2-settings\r\n" in head else b"",
        closes=closes(version, head),
        upgrade=upgrade.group(1) if upgrade else b"",
        may_stop=upgrade is not None,
    )
    return req


# The shapes known to have got through once, written out: tried on every run.
# (A body here is a request hidden in it, so that losing the body smuggles it.)
GET = b"GET /inv/0 HTTP/1.1\r\nHost: inv.test\r\nX-Inv: @\r\n"
POST = b"POST /inv/0 HTTP/1.1\r\nHost: inv.test\r\nX-Inv: @\r\n"
CLOSE = b"Connection: close\r\n\r\n"
KNOWN = [
    Example(
        [
            literal(
                "Upgrade: websocket on a POST with a body",
                POST
                + b"Upgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 62\r\n"
                + CLOSE
                + HIDDEN,
                refuse(400),
                payload=HIDDEN,
            )
        ]
    ),
    Example(
        [
            literal(
                "Upgrade: h2c, answered 101 by the upstream if it gets it",
                GET
                + b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                + HTTP2_SETTINGS
                + b"X-Inv-Switch: yes\r\n\r\n",
            ),
            literal("pipelined after it", GET.replace(b"/0", b"/1") + CLOSE, index=1),
        ]
    ),
    Example([literal("Transfer_Encoding", GET + b"Transfer_Encoding: chunked\r\n" + CLOSE)]),
    Example([literal("Connection: host", GET + b"Connection: host\r\n" + CLOSE)]),
    Example(
        [
            literal(
                "chunk size of 16 hex digits",
                POST
                + b"Transfer-Encoding: chunked\r\n"
                + CLOSE
                + b"ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
                refuse(400),
                payload=b"hello",
            )
        ]
    ),
    Example(
        [
            literal(
                "xchunked",
                POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
                refuse(400),
            )
        ]
    ),
    Example([literal("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", refuse(505))]),
    Example([literal("HTTP/1.0 without Host", b"GET /inv/0 HTTP/1.0\r\nX-Inv: @\r\n\r\n")]),
    Example(
        [
            literal(
                "Content-Length with 20 leading zeros",
                POST + b"Content-Length: 000000000000000000005\r\n" + CLOSE + b"hello",
                either(400),
                payload=b"hello",
            )
        ]
    ),
]


def with_known_shapes(test: Callable[..., None]) -> Callable[..., None]:
    for known in KNOWN:
        test = example(ex=known)(test)
    return test


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ex=examples())
@with_known_shapes
def test_no_request_is_smuggled_past_the_proxy(
    proxy: ProxyProcess, h11_upstream: H11Upstream, ex: Example
) -> None:
    out = run(proxy, h11_upstream, ex)
    assert proxy.returncode is None, f"the proxy died:\n{proxy.output[-3000:]}"
    served = sum(a.complete for a in out.arrivals)
    event(f"{len(ex.requests)} requests, {served} forwarded")
    event("closed by the proxy" if out.closed else "the client gave up")
    try:
        check(ex, out)
    except Broken as exc:
        exc.args = (explain(ex, out, str(exc)),)
        raise  # from where it was found: hypothesis tells each kind of failure apart by that


def test_proxy_still_serves_afterwards(proxy: ProxyProcess) -> None:
    raw = b"GET /after HTTP/1.1\r\nHost: inv.test\r\nConnection: close\r\n\r\n"
    reply, _ = converse(proxy.data_port, [raw])
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    assert "Traceback" not in proxy.output
