"""The data path: accept HTTP/1.1 clients, plan each request, forward, stream back.

One `ClientConnection` per client socket parses requests with httptools (the
llhttp C parser, strict). When a request head is complete, plan.py decides
what to do with it, without I/O; an `Exchange` then carries the plan out. It
moves through explicit states (EXCHANGE_TRANSITIONS) and relays bytes in
callbacks: request body chunks straight into the upstream socket, response
chunks straight into the client socket, with flow control in both
directions. Nothing is buffered whole. Framing is rebuilt, never copied:
Content-Length or chunked on each side as that side needs.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from time import monotonic
from typing import Final, cast

import httptools

from . import errors
from .accesslog import NO_NAMES, LogWriter, format_line, quoted, quoted_method
from .config import AccessLog, Address
from .endpoints import Endpoint, Upstreams
from .errors import ProxyError, UpstreamOverflow
from .http1 import (
    CHUNKED_END,
    IDEMPOTENT_METHODS,
    MAX_CHUNK_LINE,
    MAX_CHUNK_SIZE,
    ResponseHead,
    SeenRequestLine,
    error_response,
    forwarded_for_lines,
    learn_runs,
    open_chunk_size,
    plain_request_line_end,
    request_line_end,
    run_lines,
    seen_headers,
    seen_lines,
    verbatim_head,
)
from .metrics import Metrics
from .mirror import Mirrors, Shadow
from .plan import PathLimits, Plan, RoutingTable, UpgradeFlag, plan_request, refusal
from .requestid import id_of
from .routing import with_fallback
from .state import LiveState, Snapshot
from .tunnels import Tunnels
from .upstream import UpstreamConnection

PAUSE_BUFFER_BYTES: Final = 256 * 1024
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# Timeouts are checked by one ticker per process rather than a timer per
# request: arming one is then a float assignment. They fire up to a tick late.
TICK: Final = 0.1
SWEEP_EVERY: Final = 10  # ticks between two sweeps of idle upstream connections
# Refusals after which nothing more is read from the connection.
CLOSING_STATUSES: Final = frozenset({400, 408, 413, 431, 501, 505})
LOG_CLOSE_TIMEOUT: Final = 5.0  # seconds the access log's last lines may take at exit


class DataPlane:
    """Shared by every client connection of one process."""

    def __init__(self, state: LiveState, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics
        self.limits = PathLimits(state.snapshot.config)
        self.upstreams = Upstreams()
        self.mirrors = Mirrors()  # shadow connections, kept across snapshots
        self.tunnels = Tunnels(state.snapshot)  # tunnels that follow the split
        self.table = RoutingTable(state.snapshot, self.upstreams, metrics, self.mirrors)
        self.connections: set[ClientConnection] = set()
        # X-Forwarded-Proto: whether the listener speaks TLS is fixed at start (see state.py)
        self.scheme = b"https" if state.snapshot.config.tls is not None else b"http"
        self.draining = False
        self.now = time.monotonic()  # the ticker's clock, for timeouts
        self._ticker: asyncio.TimerHandle | None = None
        self._ticks = 0
        self.access_log: LogWriter | None = None  # None: off
        self._follow_access_log(state.snapshot.config.access_log)
        state.subscribe(self._on_snapshot)

    def start(self) -> None:
        """Start checking timeouts; call once the event loop runs."""
        self._tick()

    def _tick(self) -> None:
        self.now = now = time.monotonic()
        for conn in list(self.connections):
            conn.check_timeouts(now)
        self._ticks += 1
        if self._ticks % SWEEP_EVERY == 0:
            self.upstreams.close_expired(now)
        if self.access_log is not None:
            self.access_log.flush()  # the lines of the last tick, to the writer thread
        self._ticker = asyncio.get_running_loop().call_later(TICK, self._tick)

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        self.table = RoutingTable(snapshot, self.upstreams, self.metrics, self.mirrors)
        self.limits = PathLimits(snapshot.config)  # a reload may change them
        self.tunnels.follow(snapshot)
        self._follow_access_log(snapshot.config.access_log)

    def _follow_access_log(self, settings: AccessLog | None) -> None:
        """Start, move or stop the access log as the config says (at start and reloads)."""
        writer = self.access_log
        if settings is None:
            if writer is not None:
                writer.close()
                self.access_log = None
        elif writer is None:
            self.access_log = LogWriter(settings.path)
        elif writer.path != settings.path:
            writer.move_to(settings.path)

    def reopen_access_log(self) -> None:
        """SIGUSR1: open the access log's file again (log rotation)."""
        if self.access_log is not None:
            self.access_log.reopen()

    def endpoint_healthy(self, service: str, version: str, address: Address) -> bool:
        return self.upstreams.endpoint_healthy(service, version, address)

    def protocol_factory(self) -> ClientConnection:
        return ClientConnection(self)

    def tls_protocol_factory(self) -> ClientConnection:
        """For a TLS listener (see TlsClientConnection)."""
        return TlsClientConnection(self)

    def start_draining(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            conn.close_if_idle()

    async def wait_drained(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        if self._ticker is not None:
            self._ticker.cancel()
        self.upstreams.close()
        self.mirrors.close()
        self.tunnels.close()
        writer = self.access_log
        if writer is not None:
            writer.close()  # what is left is written before the thread ends
            await asyncio.to_thread(writer.join, LOG_CLOSE_TIMEOUT)


class ClientConnection(asyncio.Protocol):
    """One client socket: parses requests, runs their exchanges in order."""

    __slots__ = (
        "_alone_parser",
        "_alone_read",
        "_between",
        "_chunk_bytes",
        "_chunk_unchecked",
        "_chunked_body",
        "_earlier",
        "_full_parser",
        "_head_bytes",
        "_headers",
        "_in_head",
        "_line_end",
        "_message_read",
        "_not_alone",
        "_pending_error",
        "_read_hint",
        "_replaying",
        "_url",
        "client_ip",
        "current",
        "expires",
        "forwarded_for",
        "outgoing",
        "parser",
        "plane",
        "queue",
        "reading_paused",
        "refused",
        "transport",
        "tunnel",
    )

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.transport: asyncio.Transport | None = None
        # Two parsers, llhttp both. A head that arrives alone in a read, at a
        # message's start (nearly every GET), goes to one without a callback per
        # header line, and its lines are read from the bytes (http1.seen_lines);
        # anything else to the other. `parser` is the one reading the current head.
        self._full_parser = self.parser = httptools.HttpRequestParser(self)
        self._alone_parser: httptools.HttpRequestParser | None = None  # made on first use
        self._alone_read = b""  # the read _alone_parser is given
        self._not_alone = False  # _alone_parser was given more than one head
        self._between = True  # _full_parser is between two messages
        self._replaying = False  # _full_parser is given a head already read
        self.client_ip = ""
        self.forwarded_for = b""  # X-Forwarded-For and -Proto lines, see http1.forwarded_for_lines
        self.current: Exchange | None = None
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self.tunnel: UpstreamConnection | None = None  # after a 101: bytes pass both ways
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_head = False
        self._head_bytes = 0
        self.expires = 0.0  # when the idle or header-read wait times out; 0: not waiting
        self.refused = False  # a request was refused: nothing more is read or parsed
        self.reading_paused = False
        self._pending_error: ProxyError | None = None  # raised from a parser callback
        # A read that starts with a new message, that read once the message
        # began, and where its request line ends in it: see _request_line_end.
        self._read_hint = b""
        self._message_read = b""
        self._line_end = 0
        # Chunk sizes are checked against the body limit (see _check_chunk_size):
        # in a chunked body, a chunk whose size line has not been checked, the
        # bytes of its data since, and the bytes before the current read.
        self._chunked_body = False
        self._chunk_unchecked = False
        self._chunk_bytes = 0
        self._earlier = b""
        # Response bytes for the client, written once per upstream read: the
        # exchanges answer one at a time, so they share it.
        self.outgoing: list[bytes] = []

    def __repr__(self) -> str:
        return f"<ClientConnection {self.client_ip} busy={self.current is not None}>"

    # -- asyncio.Protocol ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        cap = self.plane.limits.max_connections
        if cap and len(self.plane.connections) >= cap:
            self.transport.abort()  # over the cap: refuse at once rather than queue
            return
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.forwarded_for = forwarded_for_lines(self.client_ip, self.plane.scheme)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.plane.connections.add(self)
        self.expires = self.plane.now + self.plane.limits.idle_timeout

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.refused:
            return
        if self.current is None and not self._in_head:  # a new message starts at data[0]
            if not self._head_bytes:  # its first bytes: the header read timeout runs from here
                self.expires = self.plane.now + self.plane.limits.header_read_timeout
            self._read_hint = data
        if self._in_head or self.current is None:
            self._head_bytes += len(data)
        self._parse(data)
        # Exchanges start once the whole read is parsed: a malformed body that
        # arrived with its head is refused before anything goes upstream.
        current = self.current
        if current is not None and current.state == QUEUED:
            current.start()

    def _parse(self, data: bytes) -> None:
        if self._between and data.endswith(b"\r\n\r\n") and self._parse_alone(data):
            return
        self.parser = self._full_parser
        while True:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                # The parser stops after a request that asks for an upgrade
                # (and reads no body after it: tunnelled_upgrade refuses one).
                data = data[exc.args[0] :]
                exchange = self._parsing()
                if exchange is not None and exchange.plan.upgrade:
                    # What follows belongs to the tunnel, if the upstream agrees to one.
                    self._pause()
                    exchange.early_data = data
                    return
                if data and not self.refused:
                    continue  # served as plain HTTP/1.1: the parser goes on with what follows
            except httptools.HttpParserError as exc:
                self.refuse(self._parse_error(exc))
            else:
                if self._in_head and self._head_bytes > self.plane.limits.max_header_bytes:
                    self.refuse(errors.HeadersTooLarge("request header block too large"))
                elif self._chunked_body:
                    self._check_chunk_size(data)
            return

    def _parse_alone(self, data: bytes) -> bool:
        """Parse a read that may hold one request head and nothing else (it
        ends with an empty line); False, with nothing done, if it holds more."""
        line_end = plain_request_line_end(data)
        if line_end:
            lines = run_lines(data, line_end, unchecked=True)
            if lines is not None:
                self._read_plain(data, line_end, lines)
                return True
        parser = self._alone_parser
        if parser is None:
            parser = self._alone_parser = httptools.HttpRequestParser(HeadAlone(self))
        self.parser = parser
        self._alone_read = data
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The head was all of the read: nothing follows it, for a tunnel or not.
            exchange = self._parsing()
            if exchange is not None and exchange.plan.upgrade:
                self._pause()
            self._alone_parser = None  # not to be trusted after an upgrade
        except httptools.HttpParserError as exc:
            if self._not_alone:  # undo what its request line did: the other parser reads it all
                self._not_alone = self._in_head = False
                self._between = True
                self._read_hint, self._message_read = self._message_read, b""
                self._alone_parser = None
                return False
            self.refuse(self._parse_error(exc))
        else:
            if not self._between and not self.refused:
                self._read_body_after(data)
        finally:
            self._alone_read = b""
        return True

    def _read_plain(self, head: bytes, line_end: int, lines: list[SeenRequestLine]) -> None:
        """Serve a read that holds one head of a GET or a HEAD and nothing
        else, whose lines llhttp would read as those of heads it read before
        (see http1.run_lines' unchecked): what llhttp's callbacks would do
        for it, without llhttp. It would find it keeps the connection alive,
        asks for no upgrade and has no body."""
        method = b"GET" if head[0] == 71 else b"HEAD"  # 71: "G"
        self._url = head[len(method) + 1 : line_end - 9]
        self._line_end = line_end
        self._read_hint = b""
        try:
            self._head_read(method, lines, head[:-2], True, NO_UPGRADE)
        except ProxyError as exc:
            self.refuse(exc)
            return
        self.on_message_complete()

    def _read_body_after(self, head: bytes) -> None:
        """The head _alone_parser read announces a body: the other parser reads
        it, once it has read the head too (its callbacks ignore it: _replaying)."""
        self._alone_parser = None
        self.parser = self._full_parser
        self._replaying = True
        try:
            self._full_parser.feed_data(head)
        except httptools.HttpParserError as exc:  # never: llhttp accepted it once
            self.refuse(self._parse_error(exc))
        finally:
            self._replaying = False

    def _check_chunk_size(self, data: bytes) -> None:
        """A chunk whose data runs past this read declared its size here: no
        more than a body may hold. (Chunks that ended here were counted whole.)"""
        if self._chunk_unchecked:
            self._chunk_unchecked = False
            try:
                size = open_chunk_size(self._earlier, data, self._chunk_bytes)
                limit = self.plane.limits.max_body_bytes or MAX_CHUNK_SIZE
                if size is not None and size > limit:
                    raise errors.BadRequest(f"chunk size {size} over {limit} bytes")
            except ProxyError as exc:
                self.refuse(exc)
                return
        self._earlier = (self._earlier + data[-MAX_CHUNK_LINE:])[-MAX_CHUNK_LINE:]

    def _parse_error(self, exc: Exception) -> ProxyError:
        if self._pending_error is not None:
            return self._pending_error
        if "HTTP version" in str(exc) or "PRI/Upgrade" in str(exc):  # the latter: HTTP/2's preface
            return errors.VersionNotSupported("only HTTP/1.0 and HTTP/1.1 are supported")
        return errors.BadRequest(f"malformed request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.plane.connections.discard(self)
        self.transport = None
        if self.current is not None:
            self.current.client_gone()
        for queued in self.queue:
            queued.client_gone()
        self.queue.clear()

    def pause_writing(self) -> None:
        if self.current is not None:
            self.current.client_write_paused(True)

    def resume_writing(self) -> None:
        if self.current is not None:
            self.current.client_write_paused(False)

    # -- httptools callbacks ---------------------------------------------
    def on_message_begin(self) -> None:
        self._between = False  # (only _full_parser calls it: see HeadAlone)

    def on_url(self, url: bytes) -> None:
        self._between = False
        if self._replaying:
            return
        if self._in_head:
            self._url += url  # the rest of a URL split across reads
            return
        if self.refused:
            return
        self._url = url
        self._headers = []
        self._in_head = True
        self._message_read, self._read_hint = self._read_hint, b""

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._replaying:
            return
        if self._in_head:
            self._headers.append((name, value))
            return
        # A trailer: not forwarded (bodies are re-framed), but bounded.
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.plane.limits.max_header_bytes:
            self._pending_error = errors.HeadersTooLarge("request trailers too large")
            raise self._pending_error

    def on_headers_complete(self) -> None:
        if self.refused or self._replaying:
            return
        parser = self.parser
        method = parser.get_method()
        read = self._alone_read
        lines: list[SeenRequestLine] | None = None
        verbatim = b""
        if read:
            self._line_end = request_line_end(read, method, self._url)
            lines = run_lines(read, self._line_end)
            if lines is None:
                if read.find(b"\r\n\r\n") != len(read) - 4:  # more than this head
                    self._not_alone = True
                    raise NotAlone
                lines = seen_lines(read, self._line_end)
                learn_runs(lines)
            if self._line_end:
                verbatim = read[:-2]  # all of it but the empty line
        self._head_read(method, lines, verbatim, parser.should_keep_alive(), parser)

    def _head_read(
        self,
        method: bytes,
        lines: list[SeenRequestLine] | None,
        verbatim: bytes,
        keep_alive: bool,
        upgrade: UpgradeFlag,
    ) -> None:
        """A request head is read: plan its exchange. When it was read from the
        bytes of a read it came alone in, `lines` are its header lines and
        `verbatim` its request and header lines as received (b"" if they
        cannot go on so); else `lines` is None: they are _headers, and
        _message_read holds the head."""
        self._in_head = False
        limit = self.plane.limits.max_header_bytes
        if self._head_bytes > limit and self._head_size(lines) > limit:
            self._pending_error = errors.HeadersTooLarge("request header block too large")
            raise self._pending_error
        self._head_bytes = 0
        self.expires = 0.0
        if lines is None:
            read = self._message_read
            self._line_end = request_line_end(read, method, self._url)
            verbatim = verbatim_head(read, self._line_end)
            lines = seen_headers(self._headers)
        plan = plan_request(
            method,
            self._url,
            lines,
            self.request_version(),
            keep_alive,
            upgrade,
            self.plane.table,
            self.plane.limits,
            self.forwarded_for,
            self.client_ip,
            verbatim,
        )
        self._message_read = b""  # not kept longer
        self._chunked_body = plan.chunked
        exchange = Exchange(self, plan)
        if plan.error is not None and plan.error.status in CLOSING_STATUSES:
            self.refused = True  # nothing after a refused request is read
            exchange.close_after = exchange.request_done = True
            self._pause()
        self._enqueue(exchange)

    def request_version(self) -> str:
        """The HTTP version of the message whose head just completed.

        httptools formats it into a new str on every call (about 0.5 us), so the
        common case reads it off the request line instead (see http1.request_line_end)."""
        if self._line_end:
            return "1.1"
        return str(self.parser.get_http_version())

    def _head_size(self, lines: list[SeenRequestLine] | None) -> int:
        headers = self._headers if lines is None else [line.header for line in lines]
        return len(self._url) + sum(len(n) + len(v) + 4 for n, v in headers)

    def on_chunk_header(self) -> None:
        self._chunk_unchecked = True
        self._chunk_bytes = 0

    def on_chunk_complete(self) -> None:
        self._chunk_unchecked = False

    def on_body(self, body: bytes) -> None:
        self._chunk_bytes += len(body)
        exchange = self._parsing()
        if exchange is not None and not self.refused:
            exchange.request_body(body)

    def on_message_complete(self) -> None:
        self._between = True
        self._head_bytes = 0  # what trailers counted
        self._chunked_body = False
        self._earlier = b""
        exchange = self._parsing()
        if exchange is not None and not self.refused:
            exchange.request_complete()

    # -- exchanges ---------------------------------------------------------
    def _parsing(self) -> Exchange | None:
        """The exchange of the request being parsed: the last one to arrive."""
        return self.queue[-1] if self.queue else self.current

    def _enqueue(self, exchange: Exchange) -> None:
        if self.current is None:
            self.current = exchange  # started by data_received once the read is parsed
        else:
            self.queue.append(exchange)
            self._pause()

    def exchange_done(self, exchange: Exchange, keep_alive: bool) -> None:
        """Called by the current exchange once its response is fully written."""
        self.current = None
        if not keep_alive or self.plane.draining or self.transport is None:
            self.close()
            return
        if self.queue:
            self.current = self.queue.popleft()
            self.current.start()
            return
        self._resume()
        self.expires = self.plane.now + self.plane.limits.idle_timeout

    def refuse(self, error: ProxyError) -> None:
        """The stream cannot be parsed or accepted: answer in turn, then close;
        nothing more is read."""
        self.refused = True
        request_line_read = self._in_head  # for the access log
        self._in_head = False
        self._pause()
        exchange = self._parsing()
        if exchange is not None and not exchange.request_done:
            exchange.refuse(error)  # its own body is malformed
            return
        plan = refusal(error)
        if request_line_read:
            plan.method = self.parser.get_method()
            plan.url = self._url
        failed = Exchange(self, plan)
        failed.request_done = True
        if self.current is None:
            self.current = failed
            failed.start()
        else:
            self.queue.append(failed)

    # -- helpers -----------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        if self.transport is not None:
            self.transport.writelines(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def start_tunnel(self, upstream: UpstreamConnection) -> None:
        self.expires = 0.0
        self.tunnel = upstream
        self._resume()

    def close_if_idle(self) -> None:
        if self.current is None and not self._head_started():
            self.close()

    def _head_started(self) -> bool:
        """Bytes of a request head arrived (its URL may not have yet) and it is not complete."""
        return self._in_head or self._head_bytes > 0

    def pause_reading(self, paused: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if paused:
            self._pause()
        elif self.current is not None and not self.queue:
            self._resume()

    # Reading is rarely paused: tracking it saves a resume call per request.
    def _pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True

    def _resume(self) -> None:
        if self.transport is not None and self.reading_paused:
            self.transport.resume_reading()
            self.reading_paused = False

    def check_timeouts(self, now: float) -> None:
        """Called by the ticker: act on what has waited too long."""
        if self.expires and now >= self.expires:
            self.expires = 0.0
            if self._head_started():  # a head not complete in time: slow client
                self.refuse(errors.RequestTimeout("request headers not received in time"))
            elif self.current is None:  # idle keep-alive connection
                self.close()
        if self.current is not None:
            self.current.check_timeout(now)


class NoUpgrade:
    """The parser's word for a head that asks for no upgrade (see _read_plain)."""

    def should_upgrade(self) -> bool:
        return False


NO_UPGRADE: Final = NoUpgrade()


class NotAlone(Exception):
    """Raised to stop the parser of heads alone in a read: this one is not."""


class HeadAlone:
    """What the parser of heads that arrive alone in a read calls back: no
    per-header callback, which httptools then does not make (the lines are read
    from the bytes), and no body callbacks (a head that announces a body is
    read again by the connection's other parser, which reads the body)."""

    __slots__ = ("client",)

    def __init__(self, client: ClientConnection) -> None:
        self.client = client

    def on_url(self, url: bytes) -> None:
        self.client.on_url(url)

    def on_headers_complete(self) -> None:
        self.client.on_headers_complete()

    def on_message_complete(self) -> None:
        self.client.on_message_complete()


# An exchange's states. It passes through them in this order, skipping some;
# EXCHANGE_TRANSITIONS says which may follow which, and _to keeps to it.
QUEUED: Final = 0  # parsed, waiting its turn behind the connection's earlier requests
HOLDING: Final = 1  # its turn: a chunked body under a size limit is read whole first
CONNECTING: Final = 2  # getting a connection to an endpoint
SENT: Final = 3  # the head is upstream (and the body goes on); awaiting the response head
RESPONDING: Final = 4  # the client has a status line: the rest of the response follows
TUNNEL: Final = 5  # the upstream switched protocols: bytes pass both ways unchanged
DONE: Final = 6  # over, and counted once
STATE_NAMES: Final = ("QUEUED", "HOLDING", "CONNECTING", "SENT", "RESPONDING", "TUNNEL", "DONE")
EXCHANGE_TRANSITIONS: Final = {
    QUEUED: (HOLDING, CONNECTING, RESPONDING, DONE),  # RESPONDING: refused at once
    HOLDING: (CONNECTING, RESPONDING, DONE),
    CONNECTING: (SENT, RESPONDING, DONE),  # RESPONDING: no endpoint could be reached
    SENT: (CONNECTING, RESPONDING, TUNNEL, DONE),  # CONNECTING: replayed on a new connection
    RESPONDING: (DONE,),
    TUNNEL: (DONE,),
    DONE: (),
}
# The same as bit masks, checked on every transition: bit n of ALLOWED[s] is set
# when state n may follow s.
ALLOWED: Final = tuple(
    sum(1 << after for after in EXCHANGE_TRANSITIONS[state]) for state in range(len(STATE_NAMES))
)


class TlsClientConnection(ClientConnection):
    """A client connection over TLS. What one upstream read produced goes out
    in one write: the SSL transport makes a TLS record (an encryption, a MAC,
    a header) of each piece it is given, where a socket takes a list at once."""

    __slots__ = ()

    def writelines(self, data: list[bytes]) -> None:
        if self.transport is not None:
            self.transport.write(b"".join(data))


class Exchange:
    """One request and its response, from head-complete to the last byte: it
    carries out the request's plan (see plan.py)."""

    __slots__ = (
        "_body_buffer",
        "_body_bytes",
        "_buffered",
        "_chunked_response",
        "_last_read",
        "_pending",
        "_tried",
        "_upstream_ms",
        "_upstream_start",
        "client",
        "close_after",
        "early_data",
        "limits",
        "plan",
        "plane",
        "pool",
        "request_done",
        "sent",
        "service",
        "shadow",
        "started_at",
        "state",
        "status",
        "target",
        "upstream",
        "upstream_closes",
    )

    def __init__(self, client: ClientConnection, plan: Plan) -> None:
        self.client = client
        self.plane = client.plane
        self.limits = client.plane.limits
        self.plan = plan
        self.state = QUEUED
        self.started_at = monotonic()
        self.service = plan.service
        self.target = plan.target  # the fallback's when the fallback serves
        self.close_after = plan.close
        self.request_done = False  # the request's last byte was parsed
        self.upstream: UpstreamConnection | None = None
        self.pool: Endpoint | None = None  # the endpoint serving this request
        self._pending: asyncio.Task[None] | None = None  # connecting in a task
        self._tried: tuple[Endpoint, ...] = ()
        self.status = 0
        self.upstream_closes = False
        self._body_buffer: list[bytes] | None = None  # created by _hold: most requests have no body
        self._buffered = 0
        self._body_bytes = 0
        self._last_read = 0.0  # 0: not waiting for the upstream
        self._chunked_response = False
        self.early_data = b""  # bytes the client sent after its upgrade request
        self.shadow: Shadow | None = None  # the request's copy to a mirror (see mirror.py)
        if plan.view is not None and plan.service is not None and plan.service.mirror is not None:
            self.shadow = plan.service.mirror.shadow(plan)
        self.sent = 0  # bytes written to the client for this exchange
        # For the access log only (0 and -1 while it is off): when the first
        # upstream connection was asked for, and how long until the upstream
        # answered (its response head) or failed.
        self._upstream_start = 0.0
        self._upstream_ms = -1.0

    def __repr__(self) -> str:
        return f"<Exchange {STATE_NAMES[self.state]} {self.plan!r}>"

    def _to(self, state: int) -> None:
        if not (ALLOWED[self.state] >> state) & 1:
            raise RuntimeError(f"exchange: {STATE_NAMES[self.state]} -> {STATE_NAMES[state]}")
        self.state = state

    # -- running -----------------------------------------------------------
    def start(self) -> None:
        """Its turn on the connection has come: answer a refusal, or go upstream."""
        plan = self.plan
        if plan.error is not None:
            self._respond_error(plan.error)
            return
        if self.plane.draining:
            self.close_after = True
        max_body = self.limits.max_body_bytes
        if plan.chunked and max_body:
            if self._body_bytes > max_body:
                self._respond_error(self._too_large())
                return
            if not self.request_done:
                self._to(HOLDING)  # read whole first; see request_complete
                return
        self._connect_soon()

    def _connect_soon(self, fresh: bool = False) -> None:
        """Get an upstream connection: at once if the chosen endpoint has an
        idle one (the common case, no task), else in a task that connects."""
        self._to(CONNECTING)
        if self.plane.access_log is not None and not self._upstream_start:
            self._upstream_start = monotonic()
        pool = None
        if not fresh:
            try:
                pool = self._choose_endpoint()
            except ProxyError as exc:
                self._respond_error(exc)
                return
            conn = pool.take_idle() if pool is not None else None
            if pool is not None and conn is not None:
                self._use(pool, conn)
                return
        self._pending = asyncio.get_running_loop().create_task(self._connect(fresh, pool))

    async def _connect(self, fresh: bool, chosen: Endpoint | None) -> None:
        try:
            await self._attach_upstream(fresh, chosen)
        except ProxyError as exc:  # already counted where it arose
            self._respond_error(exc)
        finally:
            self._pending = None

    async def _attach_upstream(self, fresh: bool, chosen: Endpoint | None) -> None:
        """Get a connection to `chosen` (or the balancer's choice), a new one
        if `fresh`; connect failures move on to the next healthy endpoint,
        then to the fallback version: nothing of the request has been sent
        yet, so trying again is always safe."""
        assert self.target is not None and self.service is not None
        last_error: ProxyError | None = None
        while True:
            pool: Endpoint | None
            if chosen is not None:
                pool, chosen = chosen, None
            elif len(self._tried) < self.target.balancer.max_attempts:
                pool = self._choose_endpoint()
            else:  # retries used up
                pool = None
            if pool is None:
                raise last_error or errors.NoHealthyEndpoint(
                    f"version {self.target.name!r} has no healthy endpoint"
                )
            conn = None if fresh else pool.take_idle()
            if conn is None:
                try:
                    conn = await pool.connect(self.service.timeouts.connect)
                except ProxyError as exc:
                    self._tried += (pool,)
                    self.target.stats.upstream_error(exc.kind or "connect")
                    last_error = exc
                    continue
            if self.client.transport is None:  # client left while we connected
                conn.finish(reusable=True)
                return
            self._use(pool, conn)
            return

    def _use(self, pool: Endpoint, conn: UpstreamConnection) -> None:
        self._tried += (pool,)
        self.pool = pool
        pool.begin()
        self._send_head(conn)

    def _choose_endpoint(self) -> Endpoint | None:
        assert self.target is not None and self.service is not None
        try:
            pool = self.target.balancer.choose(self._tried)
            fallback = self.service.fallback
            if pool is None and fallback is not None and fallback is not self.target:
                self.target.stats.fallback()
                self.target = fallback
                pool = fallback.balancer.choose(self._tried)
        except UpstreamOverflow:
            self.target.stats.upstream_error("overflow")
            raise
        return pool

    def _send_head(self, conn: UpstreamConnection) -> None:
        self._to(SENT)
        self.upstream = conn
        data = self.plan.head
        if self._body_buffer:  # what arrived of the body before the connection
            data += b"".join(self._body_buffer)
            self._body_buffer = None
            self._buffered = 0
        conn.start(self, data, self.plan.head_request)
        if self.request_done:
            self._request_sent()
        else:
            self.client.pause_reading(False)

    def refuse(self, error: ProxyError) -> None:
        """The request's own body turned out malformed: the upstream, if it
        has the head already, is cut off before the request is complete."""
        self.request_done = self.close_after = True
        if self.state == QUEUED:
            self.plan.error = error
            return
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._upstream_error(error)

    def request_body(self, chunk: bytes) -> None:
        if self.plan.error is not None or self.state >= RESPONDING:
            return
        self._body_bytes += len(chunk)
        if self.plan.chunked:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        if self.shadow is not None:
            self.shadow.body(chunk, self._body_bytes)
        if self.upstream is not None:
            self.upstream.write(chunk)
            return
        self._hold(chunk)
        max_body = self.limits.max_body_bytes
        if max_body and self._body_bytes > max_body:  # only chunked bodies get here
            self.plan.error = self._too_large()
            if self.client.current is self:
                self._respond_error(self.plan.error)
        elif self._buffered > PAUSE_BUFFER_BYTES and not max_body:
            self.client.pause_reading(True)

    def _hold(self, chunk: bytes) -> None:
        """Keep a piece of the body until an upstream connection takes it."""
        if self._body_buffer is None:
            self._body_buffer = []
        self._body_buffer.append(chunk)
        self._buffered += len(chunk)

    def _too_large(self) -> ProxyError:
        self._body_buffer = None
        return errors.PayloadTooLarge(f"request body over {self.limits.max_body_bytes} bytes")

    def request_complete(self) -> None:
        self.request_done = True
        if self.plan.error is not None or self.state >= RESPONDING:
            return
        if self.shadow is not None:
            self.shadow.request_complete()
        if self.plan.chunked:
            if self.upstream is not None:
                self.upstream.write(CHUNKED_END)
            else:
                self._hold(CHUNKED_END)
        if self.upstream is not None:
            self._request_sent()
        elif self.state == HOLDING:
            self._connect_soon()  # the held chunked body is complete and within the limit

    def _request_sent(self) -> None:
        self._last_read = self.plane.now  # the response timeout runs from here

    def _cancel_deadline(self) -> None:
        self._last_read = 0.0

    def check_timeout(self, now: float) -> None:
        """Called by the ticker: has the upstream been silent for too long?"""
        if not self._last_read or self.service is None:
            return
        timeout = self.service.timeouts.response
        if now - self._last_read >= timeout:
            self._last_read = 0.0
            if self.upstream is not None:
                self.upstream.abort()
            self._upstream_error(errors.UpstreamTimeout(f"upstream sent nothing for {timeout:g}s"))

    # -- ResponseSink: called by the upstream connection -------------------
    def response_informational(self, status: int) -> None:
        if status == 100 and self.plan.want_continue and not self.plan.http10:
            self.client.write(CONTINUE)
            self.sent += len(CONTINUE)

    def response_head(self, status: int, head: ResponseHead, close: bool) -> None:
        assert self.target is not None
        self._last_read = self.plane.now
        if self._upstream_start:
            self._upstream_over()
        self.status = status
        self.upstream_closes = close
        plan = self.plan
        own = plan.request_id
        if self.target.decision_header:
            own += self._decision_line()
        if status == 101 and plan.upgrade:
            self._switch_protocols([head.start, own], head.upgrade)
            return
        self._to(RESPONDING)
        bodyless = plan.head_request or status in (204, 304)
        extra = self.target.response_header
        if plan.set_cookie:
            extra += b"set-cookie: " + plan.set_cookie.encode("latin-1") + b"\r\n"
        close_after = self.close_after or not self.request_done or self.plane.draining
        framed, self._chunked_response, self.close_after = head.framed(
            own, bodyless, plan.http10, close_after, extra
        )
        self.sent += len(framed)
        self.client.outgoing.append(framed)

    def _switch_protocols(self, lines: list[bytes], upgrade: bytes) -> None:
        """101: from here on, bytes pass unchanged both ways until either side closes."""
        assert self.target is not None and self.upstream is not None
        self._to(TUNNEL)
        self._cancel_deadline()
        lines.append(b"connection: upgrade\r\nupgrade: " + upgrade + b"\r\n")
        lines.append(self.target.response_header)
        lines.append(b"\r\n")
        head = b"".join(lines)
        self.sent += len(head)
        self.client.write(head)
        if self.early_data:
            self.upstream.write(self.early_data)
        self.client.start_tunnel(self.upstream)
        if self.plan.view is not None:
            self.plane.tunnels.opened(self)

    def tunnel_data(self, data: bytes) -> None:
        self.sent += len(data)
        self.client.write(data)

    def tunnel_closed(self) -> None:
        self.plane.tunnels.closed(self)
        self.upstream = None
        self._observe(101)
        self.client.close()

    def response_body(self, chunk: bytes) -> None:
        if self._last_read:
            self._last_read = self.plane.now
        out = self.client.outgoing
        if self._chunked_response:
            size_line = b"%x\r\n" % len(chunk)
            out.append(size_line)
            out.append(chunk)
            out.append(b"\r\n")
            self.sent += len(size_line) + len(chunk) + 2
        else:
            out.append(chunk)
            self.sent += len(chunk)

    def flush(self) -> None:
        """Write what the last upstream read produced, in one call."""
        out = self.client.outgoing
        if out:
            self.client.writelines(out)  # the transport keeps the bytes, not the list
            out.clear()

    def response_complete(self) -> None:
        self._cancel_deadline()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.finish(reusable=self.request_done and not self.upstream_closes)
        if self._chunked_response:
            self.client.outgoing.append(CHUNKED_END)
            self.sent += len(CHUNKED_END)
        self.flush()
        self._finish(self.status)

    def upstream_failed(self, error: ProxyError) -> None:
        conn = self.upstream
        if conn is not None and conn.reused and not conn.received and self._replayable():
            # A kept-alive connection the upstream had already closed: the
            # request never reached it, so send it again on a new connection.
            self.upstream = None
            if self.pool is not None:
                self.pool.end(0)
                self.pool = None
            self._tried = ()  # the endpoint is not at fault
            self._connect_soon(fresh=True)
            return
        self._upstream_error(error)

    def _replayable(self) -> bool:
        return (
            self.plan.method in IDEMPOTENT_METHODS and self.request_done and self._body_bytes == 0
        )

    def upstream_write_paused(self, paused: bool) -> None:
        self.client.pause_reading(paused)

    def client_write_paused(self, paused: bool) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading(paused)

    # -- endings -----------------------------------------------------------
    def client_gone(self) -> None:
        self._cancel_deadline()
        if self.state == TUNNEL:
            self.plane.tunnels.closed(self)
        if self._pending is not None:
            self._pending.cancel()
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self._observe(101 if self.state == TUNNEL else 499)

    def _upstream_error(self, error: ProxyError) -> None:
        self._cancel_deadline()
        if self._upstream_start:
            self._upstream_over()
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        if self.target is not None and error.kind is not None:
            self.target.stats.upstream_error(error.kind)
        if self.state >= RESPONDING:
            # The client already has our status line: cut the connection so it
            # can tell the body is incomplete.
            self.flush()
            self.client.abort()
            self._observe(error.status)
            return
        self._respond_error(error)

    def _respond_error(self, error: ProxyError) -> None:
        status = error.status
        self._to(RESPONDING)
        close = self.close_after or not self.request_done or status in CLOSING_STATUSES
        self.close_after = close or self.plane.draining
        extra = self.plan.request_id
        target = self.target
        if target is not None:
            extra = target.response_header + extra
            if target.decision_header:
                extra += self._decision_line()
        response = error_response(
            status, error.detail, extra, self.close_after, self.plan.head_request
        )
        self.sent += len(response)
        self.client.write(response)
        self._finish(status)

    def _finish(self, status: int) -> None:
        self._observe(status)
        self.client.exchange_done(self, keep_alive=not self.close_after)

    def _observe(self, status: int) -> None:
        """Count the request once, for its version and its endpoint."""
        if self.state == DONE:
            return
        self.state = DONE  # from any state: an exchange may end at any point
        target = self.target
        writer = self.plane.access_log
        if target is not None or writer is not None:
            now = monotonic()
            if target is not None:
                target.stats.observe(status, now - self.started_at, now)
                if self.shadow is not None:
                    self.shadow.primary_done(status, now - self.started_at, now)
            if writer is not None:
                self._log(writer, status, now)
        if self.pool is not None:
            self.pool.end(status)
            self.pool = None

    # -- the decision trace and the access log ------------------------------
    def decision(self) -> str:
        """Why the version that serves was chosen: the plan's reason, and the
        fallback when it serves instead."""
        target = self.target
        if target is not None and target is not self.plan.target:
            return with_fallback(self.plan.reason, target.name)
        return self.plan.reason

    def _decision_line(self) -> bytes:
        decision = self.decision()
        line = _DECISION_LINES.get(decision)
        if line is None:
            if len(_DECISION_LINES) >= MAX_DECISION_LINES:
                _DECISION_LINES.clear()
            line = b"x-grayproxy-decision: " + header_value(decision) + b"\r\n"
            _DECISION_LINES[decision] = line
        return line

    def _upstream_over(self) -> None:
        """The upstream answered (its response head) or failed: how long it took."""
        if self._upstream_ms < 0:
            self._upstream_ms = monotonic() - self._upstream_start

    def _log(self, writer: LogWriter, status: int, now: float) -> None:
        elapsed = now - self.started_at
        plan = self.plan
        target = self.target
        upstream = self._upstream_ms
        if upstream < 0 and self._upstream_start:  # still waiting: the client left
            upstream = now - self._upstream_start
        pool = self.pool
        if pool is None and self._tried:  # it failed: the last one tried
            pool = self._tried[-1]
        line = format_line(
            self.started_at + writer.wall_offset,
            id_of(plan.request_id),
            quoted(self.client.client_ip),
            quoted_method(plan.method),
            plan.url.decode("latin-1") if plan.url else None,
            status,
            self.sent,
            elapsed,
            upstream,
            target.log_names if target is not None else NO_NAMES,
            endpoint_json(pool) if pool is not None else "null",
            quoted(self.decision()) if target is not None else "null",
        )
        writer.write(line)


# The decision header's lines by decision: the same few every time (a rule, a
# key source, the random draw, and those with a fallback).
_DECISION_LINES: Final[dict[str, bytes]] = {}
MAX_DECISION_LINES: Final = 1024
# The access log's JSON of each endpoint's address (str(Address) runs interpreted code).
_ENDPOINT_JSON: Final[dict[Endpoint, str]] = {}
MAX_ENDPOINT_JSON: Final = 1024


def endpoint_json(endpoint: Endpoint) -> str:
    json = _ENDPOINT_JSON.get(endpoint)
    if json is None:
        if len(_ENDPOINT_JSON) >= MAX_ENDPOINT_JSON:
            _ENDPOINT_JSON.clear()
        json = _ENDPOINT_JSON[endpoint] = quoted(str(endpoint.address))
    return json


def header_value(text: str) -> bytes:
    """`text` as a header value: as it is when printable ASCII, else escaped
    (a query parameter named in hash_on may hold anything)."""
    if text.isascii() and text.isprintable():
        return text.encode("ascii")
    return text.encode("unicode_escape")
