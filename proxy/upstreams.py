"""Upstream endpoints: keep-alive connection pools, passive health, the
HTTP/1.1 client side of one exchange.

An `UpstreamConnection` parses responses with httptools (llhttp, strict) and
hands every event to the exchange currently using it (`ResponseSink`); it knows
nothing about clients. An `EndpointPool` keeps idle connections to one address
and the endpoint's health. `choose_endpoint` is the load-balancing decision.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence
from typing import Protocol, cast

import httptools

from .config import Address
from .errors import (
    BadUpstreamResponse,
    ProxyError,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamReset,
)

# After a failed connect an endpoint is left out of rotation for this long,
# doubled for each consecutive failure up to MAX_EJECTION.
BASE_EJECTION = 2.0
MAX_EJECTION = 30.0
MAX_IDLE_PER_ENDPOINT = 256


class ResponseSink(Protocol):
    def response_head(
        self, status: int, headers: list[tuple[bytes, bytes]], close: bool
    ) -> None: ...
    def response_informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def response_body(self, chunk: bytes) -> None: ...
    def response_complete(self) -> None: ...
    def upstream_failed(self, error: ProxyError) -> None: ...
    def upstream_write_paused(self, paused: bool) -> None: ...
    def tunnel_data(self, data: bytes) -> None: ...
    def tunnel_closed(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_headers",
        "_informational",
        "_parser",
        "_skip_body",
        "idle_timer",
        "pool",
        "received",
        "reused",
        "sink",
        "transport",
        "upgraded",
    )

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._informational = False
        self._skip_body = False
        self.received = False  # any byte of the current response arrived
        self.reused = False
        self.upgraded = False  # a 101 turned this connection into a byte tunnel
        self.idle_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        state = "busy" if self.sink else "idle"
        return f"<UpstreamConnection {self.pool.address} {state}>"

    # -- used by the exchange --------------------------------------------
    def start(self, sink: ResponseSink, head: bytes, skip_body: bool) -> None:
        """Begin an exchange: `skip_body` for HEAD, whose response has no body."""
        self.sink = sink
        self.received = False
        self._skip_body = skip_body
        assert self.transport is not None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def finish(self, reusable: bool) -> None:
        """The exchange is done with this connection: back to the pool or closed."""
        self.sink = None
        if reusable and self.transport is not None and not self.transport.is_closing():
            self.pool.release(self)
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
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadUpstreamResponse(f"invalid response from upstream: {exc}"))
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0] :]
            if rest and self.sink is not None:
                self.sink.tunnel_data(rest)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.discard(self)
        self.transport = None
        if self.upgraded and self.sink is not None:
            sink, self.sink = self.sink, None
            sink.tunnel_closed()
        elif self.sink is not None:
            self._fail(UpstreamReset("upstream closed the connection before the response ended"))

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
    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        sink = self.sink
        if sink is None:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._informational = True
            sink.response_informational(status, self._headers)
            return
        self.upgraded = status == 101
        sink.response_head(status, self._headers, not self._parser.should_keep_alive())
        if self._skip_body and self.sink is sink:
            # llhttp cannot be told that this answers a HEAD: end the message
            # here and start the next one with a fresh parser.
            self._parser = httptools.HttpResponseParser(self)
            sink.response_complete()

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.response_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self.upgraded:
            return
        if self.sink is not None:
            self.sink.response_complete()


class EndpointPool:
    """Idle keep-alive connections to one endpoint, and its passive health."""

    __slots__ = (
        "_idle",
        "_loop",
        "address",
        "ejected_until",
        "failures",
        "idle_timeout",
        "outstanding",
    )

    def __init__(self, address: Address, idle_timeout: float) -> None:
        self.address = address
        self.idle_timeout = idle_timeout
        self._idle: list[UpstreamConnection] = []
        self._loop = asyncio.get_running_loop()
        self.ejected_until = 0.0
        self.failures = 0
        self.outstanding = 0  # requests in flight on this endpoint

    def __repr__(self) -> str:
        return f"<EndpointPool {self.address} idle={len(self._idle)} healthy={self.healthy}>"

    @property
    def healthy(self) -> bool:
        return self.ejected_until <= time.monotonic()

    def take_idle(self) -> UpstreamConnection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    async def connect(self, timeout: float) -> UpstreamConnection:
        try:
            async with asyncio.timeout(timeout):
                _, conn = await self._loop.create_connection(
                    lambda: UpstreamConnection(self), self.address.host, self.address.port
                )
        except TimeoutError:
            self.record_failure()
            raise UpstreamConnectTimeout(f"connect to {self.address} timed out") from None
        except OSError as exc:
            self.record_failure()
            raise UpstreamConnectError(
                f"connect to {self.address} failed: {exc.strerror or exc}"
            ) from None
        self.failures = 0
        return conn

    def begin(self) -> None:
        """A request was assigned to this endpoint."""
        self.outstanding += 1

    def end(self, status: int) -> None:
        """That request ended with `status` (502/504 for upstream failures, 499 client gone)."""
        self.outstanding -= 1

    def record_failure(self) -> None:
        self.failures += 1
        ejection = min(MAX_EJECTION, BASE_EJECTION * 2 ** (self.failures - 1))
        self.ejected_until = time.monotonic() + ejection

    def release(self, conn: UpstreamConnection) -> None:
        if len(self._idle) >= MAX_IDLE_PER_ENDPOINT:
            conn.abort()
            return
        conn.idle_timer = self._loop.call_later(self.idle_timeout, conn.abort)
        self._idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        for conn in self._idle[:]:
            conn.abort()
        self._idle.clear()


class Upstreams:
    """Every endpoint pool, by address, shared by all services and versions."""

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self._pools: dict[Address, EndpointPool] = {}

    def pool(self, address: Address) -> EndpointPool:
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = EndpointPool(address, self.idle_timeout)
        return pool

    def addresses(self) -> list[Address]:
        return list(self._pools)

    def is_healthy(self, address: Address) -> bool:
        pool = self._pools.get(address)
        return pool is None or pool.healthy

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


class Balancer:
    """Round robin over the healthy endpoints of one version."""

    __slots__ = ("_next", "pools")

    def __init__(self, pools: Sequence[EndpointPool]) -> None:
        self.pools = tuple(pools)
        self._next = 0

    def choose(self, exclude: Sequence[EndpointPool] = ()) -> EndpointPool | None:
        pools = self.pools
        count = len(pools)
        for _ in range(count):
            pool = pools[self._next % count]
            self._next += 1
            if pool.healthy and pool not in exclude:
                return pool
        return None
