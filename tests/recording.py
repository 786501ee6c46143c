"""A raw upstream that keeps every byte it receives, and a strict reader of
raw responses: what the black-box hardening tests check against."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field

import httptools

from servers import LoopThread


@dataclass
class Forwarded:
    """One complete request as the upstream parsed it."""

    method: bytes
    url: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name]


class RecordingUpstream:
    """A raw HTTP/1.1 server, parsed with strict llhttp, that keeps every byte.

    It answers each complete request with ``200`` (``x-recorded: N``, body
    ``ok``). ``raw`` holds every byte received, over all connections, in
    arrival order; ``errors`` the parse errors (bytes no strict parser
    accepts); ``aborted`` counts requests whose head arrived but that never
    completed before the connection ended; ``open_partials`` those still open.
    """

    def __init__(self, loops: LoopThread) -> None:
        self.loops = loops
        self.raw = bytearray()
        self.requests: list[Forwarded] = []
        self.errors: list[str] = []
        self.aborted = 0
        self.open_partials = 0
        self.port = 0
        self.connections: set[_Recording] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RecordingUpstream:
        async def serve() -> asyncio.Server:
            loop = asyncio.get_running_loop()
            return await loop.create_server(lambda: _Recording(self), "127.0.0.1", 0)

        self._server = self.loops.call(serve())
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()

        self.loops.call(close())

    def cut_open_requests(self) -> None:
        """Close the connections in the middle of a request (after a failed check)."""

        async def cut() -> None:
            for conn in list(self.connections):
                if conn.head_done and conn.transport is not None:
                    conn.transport.abort()

        self.loops.call(cut())


@dataclass
class _Message:
    method: bytes = b""
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)


class _Recording(asyncio.Protocol):
    def __init__(self, owner: RecordingUpstream) -> None:
        self.owner = owner
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.message: _Message | None = None
        self.head_done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.owner.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.owner.raw += data
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.parser = httptools.HttpRequestParser(self)
            if rest := data[exc.args[0] :]:
                self._feed(rest)
        except httptools.HttpParserError as exc:
            self.owner.errors.append(f"{exc}: {bytes(self.owner.raw[-400:])!r}")
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_done:
            self.owner.aborted += 1
            self.owner.open_partials -= 1
        self.transport = None
        self.owner.connections.discard(self)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.message = _Message()

    def on_url(self, url: bytes) -> None:
        assert self.message is not None
        self.message.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.message is not None
        self.message.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.owner.open_partials += 1

    def on_body(self, body: bytes) -> None:
        assert self.message is not None
        self.message.body += body

    def on_message_complete(self) -> None:
        message, self.message = self.message, None
        assert message is not None and self.transport is not None
        self.head_done = False
        self.owner.open_partials -= 1
        method = self.parser.get_method()
        self.owner.requests.append(
            Forwarded(
                method,
                message.url,
                self.parser.get_http_version(),
                message.headers,
                bytes(message.body),
            )
        )
        body = b"" if method == b"HEAD" else b"ok"
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-recorded: %d\r\n\r\n%b"
            % (len(self.owner.requests), body)
        )
        if not self.parser.should_keep_alive():
            self.transport.close()


# --------------------------------------------------------------------------- raw client side


def exchange(
    port: int, data: bytes | list[bytes], timeout: float = 2.0, total: float | None = None
) -> tuple[bytes, bool]:
    """Send raw bytes (a list: one send each, 20 ms apart) and read until the
    proxy closes, is quiet for `timeout`, or `total` (default: `timeout`) has
    passed. Returns the reply and whether it closed."""
    pieces = [data] if isinstance(data, bytes) else data
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            for index, piece in enumerate(pieces):
                if index:
                    time.sleep(0.02)
                sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before everything was sent: read what it answered
        deadline = time.monotonic() + (timeout if total is None else total)
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


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    complete: bool


class _ResponseCollector:
    def __init__(self) -> None:
        self.responses: list[Response] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.responses.append(Response(0, {}, b"", False))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.responses[-1].headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.responses[-1].status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.responses[-1].body += body

    def on_message_complete(self) -> None:
        self.responses[-1].complete = True


def parse_responses(reply: bytes) -> list[Response]:
    """The HTTP/1.1 responses in `reply`, checked by a strict parser; the last
    one may be incomplete (`complete` False)."""
    collector = _ResponseCollector()
    try:
        collector.parser.feed_data(reply)
    except httptools.HttpParserError as exc:
        raise AssertionError(
            f"the proxy answered malformed HTTP ({exc}): {reply[:600]!r}"
        ) from None
    return collector.responses


# --------------------------------------------------------------------------- fixtures
