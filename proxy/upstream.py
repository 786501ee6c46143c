"""The upstream side of one exchange: an HTTP/1.1 client connection.

An `UpstreamConnection` writes what the exchange sends, parses responses with
httptools (llhttp, strict) and hands every event to the exchange currently
using it (`dataplane.Exchange`); it knows nothing about clients, and nothing
about choosing endpoints or their health (`endpoints`): when its exchange is
done it goes back to its endpoint, or is closed.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING, Final, cast

import httptools

from .errors import BadUpstreamResponse, ProxyError, UpstreamReset, UpstreamTlsError
from .http1 import ResponseHead, header_field, response_head, whole_response

if TYPE_CHECKING:
    # The one receiver of response events, and the endpoint a connection goes
    # back to. Named exactly, not by a Protocol, so that the compiled data path
    # calls them directly.
    from .dataplane import Exchange
    from .endpoints import Endpoint


# A response head longer than this is refused with a 502 (nginx's proxy_buffer_size
# refuses past 4-8 KB; llhttp itself sets no bound).
MAX_RESPONSE_HEAD: Final = 64 * 1024


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream. Response heads are read from the bytes
    as received once llhttp has accepted them (http1.response_head): the parser is
    given no per-header callback, which would cost a call and two objects per
    header line."""

    __slots__ = (
        "_ended",
        "_head",
        "_head_size",
        "_head_start",
        "_in_body",
        "_informational",
        "_parser",
        "_reads",
        "_skip_body",
        "endpoint",
        "idle_since",
        "received",
        "reused",
        "sink",
        "transport",
        "upgraded",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.sink: Exchange | None = None
        self._parser = httptools.HttpResponseParser(self)
        # The reads since the current response head began (the first from
        # _head_start on), their size, and the final response's head.
        self._reads: list[bytes] = []
        self._head_start = 0
        self._head_size = 0
        self._head: ResponseHead | None = None
        self._informational = False
        self._ended = False  # a response ended in the read being parsed
        self._skip_body = False
        self._in_body = False  # between a response's head and its end
        self.received = False  # any byte of the current response arrived
        self.reused = False
        self.upgraded = False  # a 101 turned this connection into a byte tunnel
        self.idle_since = 0.0  # when it went back to its endpoint (the endpoint's clock)

    def __repr__(self) -> str:
        state = "busy" if self.sink else "idle"
        return f"<UpstreamConnection {self.endpoint.address} {state}>"

    # -- used by the exchange --------------------------------------------
    def start(self, sink: Exchange, head: bytes, skip_body: bool) -> None:
        """Begin an exchange: `skip_body` for HEAD, whose response has no body."""
        self.sink = sink
        self.received = False
        self._skip_body = skip_body
        self._reads = []  # here rather than in on_message_begin: one callback less
        self._head_start = self._head_size = 0
        assert self.transport is not None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def finish(self, reusable: bool) -> None:
        """The exchange is done with this connection: back to its endpoint, or closed."""
        self.sink = None
        if reusable and self.transport is not None and not self.transport.is_closing():
            self.endpoint.release(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.sink = None
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self, paused: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # -- asyncio.Protocol ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.sink is None:  # bytes on an idle connection: the upstream misbehaves
            self.abort()
            return
        if self.upgraded:
            self.sink.tunnel_data(data)
            return
        self.received = True
        sink = self.sink
        if not self._in_body:  # a response head begins or goes on in this read
            if not self._reads and not self._skip_body:
                head = whole_response(data)
                if head is not None:
                    self._read_whole(data, head, sink)
                    return
            self._reads.append(data)
            self._head_size += len(data)
        try:
            self._parser.feed_data(data)
            if self._ended:
                self._complete()
            elif self._reads and self._head_size - self._head_start > MAX_RESPONSE_HEAD:
                self._fail(BadUpstreamResponse("response head from upstream too large"))
                return  # (a head still incomplete)
            sink.flush()
        except httptools.HttpParserError as exc:
            if self._ended:  # the response, then bytes of no response asked for
                if self.transport is not None:  # never used again (as nginx and HAProxy do)
                    self.transport.abort()
                self._complete()
                sink.flush()
                return
            self._fail(BadUpstreamResponse(f"invalid response from upstream: {exc}"))
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0] :]
            if rest and self.sink is not None:
                self.sink.tunnel_data(rest)

    def _read_whole(self, data: bytes, head: ResponseHead, sink: Exchange) -> None:
        """`data` is a whole response, whose head is the last one llhttp read
        (http1.whole_response): what its callbacks would do, without it."""
        self._head = head
        self._in_body = True
        sink.response_head(head.status, head, head.close)
        if len(data) > len(head.raw) and self.sink is not None:
            self.sink.response_body(data[len(head.raw) :])
        self._in_body = False
        self._complete()
        sink.flush()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.endpoint.discard(self)
        self.transport = None
        if self.upgraded and self.sink is not None:
            sink, self.sink = self.sink, None
            sink.tunnel_closed()
        elif self.sink is not None and self._in_body and self._close_delimited():
            self.sink.response_complete()  # the close is how such a body ends
        elif self.sink is not None and isinstance(exc, ssl.SSLError):
            # e.g. TLS 1.3: a server refuses the client certificate after the handshake
            reason = str(exc.reason or exc).lower().replace("_", " ")
            self._fail(UpstreamTlsError(f"TLS error from upstream: {reason}"))
        elif self.sink is not None:
            self._fail(UpstreamReset("upstream closed the connection before the response ended"))

    def _close_delimited(self) -> bool:
        """A response with neither Content-Length nor Transfer-Encoding."""
        framing = (b"content-length", b"transfer-encoding")
        lines = self._head.header_lines() if self._head is not None else []
        return not any(header_field(line)[0].lower() in framing for line in lines)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_write_paused(True)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_write_paused(False)

    def _fail(self, error: ProxyError) -> None:
        sink, self.sink = self.sink, None
        if self.transport is not None:
            self.transport.abort()
        if sink is not None:
            sink.upstream_failed(error)

    # -- httptools callbacks ---------------------------------------------
    def on_headers_complete(self) -> None:
        sink = self.sink
        if sink is None:
            return
        reads = self._reads
        raw = reads[0] if len(reads) == 1 else b"".join(reads)
        status = self._parser.get_status_code()
        head, end = response_head(raw, self._head_start, status)
        if 100 <= status < 200 and status != 101:
            self._informational = True
            self._reads = [raw]  # the final response's head follows from `end`
            self._head_start = end
            sink.response_informational(status)
            return
        self._reads = []
        self._head = head
        if status == 101 and not sink.plan.upgrade:
            self._fail(BadUpstreamResponse("upstream switched protocols unasked"))
            return
        self.upgraded = status == 101
        self._in_body = True
        head.close = not self._parser.should_keep_alive()
        sink.response_head(status, head, head.close)
        if self._skip_body and self.sink is sink:
            # llhttp cannot be told that this answers a HEAD: end the message
            # here and start the next one with a fresh parser.
            self._parser = httptools.HttpResponseParser(self)
            self._in_body = False
            sink.response_complete()

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.response_body(body)

    def on_message_begin(self) -> None:
        if self._ended:
            raise BadUpstreamResponse("bytes after the response")  # stops the parser

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._informational:
            self._informational = False
            return
        if not self.upgraded:
            # The exchange completes once the read is parsed: until then the
            # connection is not given back, for bytes after the response.
            self._ended = True

    def _complete(self) -> None:
        self._ended = False
        if self.sink is not None:
            self.sink.response_complete()
