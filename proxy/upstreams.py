"""Upstream endpoints: keep-alive connection pools, health, load balancing,
the HTTP/1.1 client side of one exchange.

An `UpstreamConnection` parses responses with httptools (llhttp, strict) and
hands every event to the exchange currently using it (`dataplane.Exchange`); it knows
nothing about clients. An `EndpointPool` is one endpoint of one version: its
idle connections, its requests in flight and its health (outlier ejection from
real requests, verdicts of active checks). A `Balancer` holds one version's
endpoints and chooses among those in rotation: O(1) per request, since the
in-rotation tuple is rebuilt only when an endpoint's health changes.
`Upstreams` keeps every balancer in step with the live config.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Sequence
from random import random, randrange
from time import monotonic
from typing import TYPE_CHECKING, Final, cast

import httptools

from .config import Address, Config, HealthCheck, OutlierDetection, Service, Timeouts, Version
from .errors import (
    BadUpstreamResponse,
    ProxyError,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamOverflow,
    UpstreamReset,
)
from .health import Checked, HealthChecker

log = logging.getLogger(__name__)

MAX_IDLE_PER_ENDPOINT: Final = 256
UNLIMITED: Final = sys.maxsize  # max_connections_per_endpoint: 0

if TYPE_CHECKING:
    # The one receiver of response events. Named exactly, not by a Protocol,
    # so that the compiled data path calls it directly.
    from .dataplane import Exchange


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_headers",
        "_in_body",
        "_informational",
        "_parser",
        "_skip_body",
        "idle_since",
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
        self.sink: Exchange | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._informational = False
        self._skip_body = False
        self._in_body = False  # between a response's head and its end
        self.received = False  # any byte of the current response arrived
        self.reused = False
        self.upgraded = False  # a 101 turned this connection into a byte tunnel
        self.idle_since = 0.0  # when it went back to the pool (time.monotonic)

    def __repr__(self) -> str:
        state = "busy" if self.sink else "idle"
        return f"<UpstreamConnection {self.pool.address} {state}>"

    # -- used by the exchange --------------------------------------------
    def start(self, sink: Exchange, head: bytes, skip_body: bool) -> None:
        """Begin an exchange: `skip_body` for HEAD, whose response has no body."""
        self.sink = sink
        self.received = False
        self._skip_body = skip_body
        self._headers = []  # here rather than in on_message_begin: one callback less
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
        sink = self.sink
        try:
            self._parser.feed_data(data)
            sink.flush()
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
        elif self.sink is not None and self._in_body and self._close_delimited():
            self.sink.response_complete()  # the close is how such a body ends
        elif self.sink is not None:
            self._fail(UpstreamReset("upstream closed the connection before the response ended"))

    def _close_delimited(self) -> bool:
        """A response with neither Content-Length nor Transfer-Encoding."""
        framing = (b"content-length", b"transfer-encoding")
        return not any(name.lower() in framing for name, _ in self._headers)

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
            self._headers = []  # the final response's follow
            return
        if status == 101 and not sink.upgrade:
            self._fail(BadUpstreamResponse("upstream switched protocols unasked"))
            return
        self.upgraded = status == 101
        self._in_body = True
        sink.response_head(status, self._headers, not self._parser.should_keep_alive())
        if self._skip_body and self.sink is sink:
            # llhttp cannot be told that this answers a HEAD: end the message
            # here and start the next one with a fresh parser.
            self._parser = httptools.HttpResponseParser(self)
            self._in_body = False
            sink.response_complete()

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.response_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._informational:
            self._informational = False
            return
        if self.upgraded:
            return
        if self.sink is not None:
            self.sink.response_complete()


class EndpointPool:
    """One endpoint of one version: idle keep-alive connections, requests in
    flight, and health, passive (outlier ejection) and active (checks)."""

    __slots__ = (
        "_idle",
        "_loop",
        "_return_timer",
        "address",
        "balancer",
        "check_failures",
        "check_passes",
        "checked_healthy",
        "closed",
        "connect_failures",
        "connecting",
        "ejected",
        "ejections",
        "errors_5xx",
        "idle_timeout",
        "max_connections",
        "outstanding",
        "returned_at",
    )

    def __init__(self, address: Address, balancer: Balancer) -> None:
        self.address = address
        self.balancer = balancer
        self.idle_timeout = Timeouts().idle  # both set by Balancer.configure
        self.max_connections = UNLIMITED
        self._idle: list[UpstreamConnection] = []
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self.outstanding = 0  # requests in flight on this endpoint
        self.connecting = 0  # connections being opened
        # Passive health: consecutive failures of real requests, ejections.
        self.errors_5xx = 0
        self.connect_failures = 0
        self.ejected = False
        self.ejections = 0  # the ejection time multiplier
        self.returned_at = 0.0  # when the last ejection ended (loop time)
        self._return_timer: asyncio.TimerHandle | None = None
        # Active health: the verdict of the health checks and the current run.
        self.checked_healthy = True
        self.check_passes = 0
        self.check_failures = 0

    def __repr__(self) -> str:
        return (
            f"<EndpointPool {self.balancer.name} {self.address} healthy={self.healthy} "
            f"[{self.outstanding} in flight | {len(self._idle)} idle]>"
        )

    @property
    def healthy(self) -> bool:
        """In rotation: not ejected and not failing its health checks."""
        return self.checked_healthy and not self.ejected

    @property
    def has_room(self) -> bool:
        return self.outstanding + self.connecting < self.max_connections

    # -- connections -------------------------------------------------------
    def take_idle(self) -> UpstreamConnection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    async def connect(self, timeout: float) -> UpstreamConnection:
        self.connecting += 1
        try:
            async with asyncio.timeout(timeout):
                _, conn = await self._loop.create_connection(
                    lambda: UpstreamConnection(self), self.address.host, self.address.port
                )
        except TimeoutError:
            self._connect_failed()
            raise UpstreamConnectTimeout(f"connect to {self.address} timed out") from None
        except OSError as exc:
            self._connect_failed()
            raise UpstreamConnectError(
                f"connect to {self.address} failed: {exc.strerror or exc}"
            ) from None
        finally:
            self.connecting -= 1
        self.connect_failures = 0
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if self.closed or len(self._idle) >= MAX_IDLE_PER_ENDPOINT:
            conn.abort()
            return
        conn.idle_since = monotonic()
        self._idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    def close_expired(self, now: float) -> None:
        """Close the connections idle for longer than `idle_timeout` (oldest first)."""
        idle = self._idle
        while idle and now - idle[0].idle_since > self.idle_timeout:
            idle.pop(0).abort()

    def close(self) -> None:
        """Left the configuration, or the process stops: idle connections are
        closed now, busy ones when their requests end."""
        self.closed = True
        if self._return_timer is not None:
            self._return_timer.cancel()
            self._return_timer = None
        for conn in self._idle[:]:
            conn.abort()
        self._idle.clear()

    # -- passive health ----------------------------------------------------
    def begin(self) -> None:
        """A request was assigned to this endpoint."""
        self.outstanding += 1

    def end(self, status: int) -> None:
        """That request ended with `status`: 502/504 for upstream failures,
        499 when the client left, 0 when the endpoint was not at fault. A 5xx
        counts towards ejection; any other answer of the endpoint resets the count."""
        self.outstanding -= 1
        if status >= 500:
            self.errors_5xx += 1
            threshold = self.balancer.outlier.consecutive_5xx
            if threshold and self.errors_5xx >= threshold:
                self.balancer.eject(self, f"{self.errors_5xx} consecutive 5xx")
        elif status and status != 499:
            self.errors_5xx = 0

    def _connect_failed(self) -> None:
        self.connect_failures += 1
        threshold = self.balancer.outlier.consecutive_connect_failures
        if threshold and self.connect_failures >= threshold:
            self.balancer.eject(self, f"{self.connect_failures} consecutive connect failures")

    def eject(self, outlier: OutlierDetection) -> float:
        """Out of rotation for base_ejection_time x the ejection count (capped);
        the count wears off by one for each base time spent back in rotation."""
        now = self._loop.time()
        base = outlier.base_ejection_time
        worn_off = int((now - self.returned_at) / base)
        self.ejections = max(0, self.ejections - worn_off) + 1
        seconds = min(base * self.ejections, max(base, outlier.max_ejection_time))
        self.ejected = True
        self.errors_5xx = self.connect_failures = 0
        self._return_timer = self._loop.call_later(seconds, self.end_ejection)
        return seconds

    def end_ejection(self) -> None:
        if self._return_timer is not None:
            self._return_timer.cancel()
            self._return_timer = None
        if self.ejected:
            self.ejected = False
            self.returned_at = self._loop.time()
            log.info("%s: endpoint %s back in rotation", self.balancer.name, self.address)
            self.balancer.refresh()

    # -- active health -----------------------------------------------------
    def check_result(self, passed: bool, check: HealthCheck) -> None:
        """One health check's verdict; thresholds decide when the state flips."""
        if self.closed:
            return
        if passed:
            self.check_failures = 0
            self.check_passes += 1
            self.end_ejection()  # as in Envoy, a passing check ends an ejection early
            if not self.checked_healthy and self.check_passes >= check.healthy_threshold:
                self._set_checked_healthy(True)
        else:
            self.check_passes = 0
            self.check_failures += 1
            if self.checked_healthy and self.check_failures >= check.unhealthy_threshold:
                self._set_checked_healthy(False)

    def forget_checks(self) -> None:
        """The service no longer has a health check."""
        self.check_passes = self.check_failures = 0
        self.checked_healthy = True

    def _set_checked_healthy(self, healthy: bool) -> None:
        self.checked_healthy = healthy
        verdict = "passes its health checks" if healthy else "fails its health checks"
        level = logging.INFO if healthy else logging.WARNING
        log.log(level, "%s: endpoint %s %s", self.balancer.name, self.address, verdict)
        self.balancer.refresh()


class Balancer:
    """The endpoints of one version of one service: which are in rotation,
    and the choice among those (round robin, or least request by power of
    two random choices). Kept across reloads; `configure` adopts new settings."""

    __slots__ = ("_next", "healthy", "least_request", "max_attempts", "name", "outlier", "pools")

    def __init__(self, name: str) -> None:
        self.name = name  # "service/version", for logs
        self.pools: tuple[EndpointPool, ...] = ()
        self.healthy: tuple[EndpointPool, ...] = ()  # in rotation; rebuilt when health changes
        self.least_request = False
        self.max_attempts = 1  # endpoints one request may try: 1 + retries.attempts
        self.outlier = OutlierDetection()
        self._next = randrange(1 << 16)  # workers do not all start on the same endpoint

    def __repr__(self) -> str:
        return f"<Balancer {self.name} [{len(self.healthy)}/{len(self.pools)} in rotation]>"

    def configure(self, service: Service, version: Version) -> None:
        """Adopt a (re)loaded version: endpoints that stay keep their connections and health."""
        old = {pool.address: pool for pool in self.pools}
        self.pools = tuple(old.get(a) or EndpointPool(a, self) for a in version.endpoints)
        for address, pool in old.items():
            if address not in version.endpoints:
                pool.close()
        self.least_request = service.load_balancing == "least_request"
        self.max_attempts = 1 + service.retries.attempts
        self.outlier = service.outlier_detection
        limit = service.max_connections_per_endpoint or UNLIMITED
        for pool in self.pools:
            pool.idle_timeout = service.timeouts.idle
            pool.max_connections = limit
            if service.health_check is None:
                pool.forget_checks()
        self.refresh()

    def refresh(self) -> None:
        self.healthy = tuple(pool for pool in self.pools if pool.healthy)

    def choose(self, tried: Sequence[EndpointPool] = ()) -> EndpointPool | None:
        """An endpoint in rotation, not `tried` yet by this request, with room
        for a connection. None when none is left to try; UpstreamOverflow
        when those left are all at their connection limit."""
        healthy = self.healthy
        count = len(healthy)
        if not count:
            return None
        if self.least_request and count > 1:
            first = int(random() * count)
            second = int(random() * (count - 1))
            second += second >= first
            a, b = healthy[first], healthy[second]
            pool = a if a.outstanding + a.connecting <= b.outstanding + b.connecting else b
        else:
            pool = healthy[self._next % count]
            self._next += 1
        if pool.outstanding + pool.connecting < pool.max_connections and pool not in tried:
            return pool
        return self._choose_among_all(tried)

    def _choose_among_all(self, tried: Sequence[EndpointPool]) -> EndpointPool | None:
        """The slow path, for a retry or a full endpoint: look at every one."""
        left = [pool for pool in self.healthy if pool not in tried]
        if not left:
            return None
        with_room = [pool for pool in left if pool.has_room]
        if not with_room:
            raise UpstreamOverflow(
                f"every endpoint of {self.name} is at its limit of "
                f"{left[0].max_connections} connections"
            )
        if self.least_request:
            return min(with_room, key=lambda pool: pool.outstanding + pool.connecting)
        pool = with_room[self._next % len(with_room)]
        self._next += 1
        return pool

    def eject(self, pool: EndpointPool, reason: str) -> None:
        """Take `pool` out of rotation, unless more than max_ejection_percent
        of the version would then be ejected; one endpoint always can be."""
        if pool.ejected or pool.closed:
            return
        ejected = sum(other.ejected for other in self.pools)
        if ejected and (ejected + 1) * 100 > len(self.pools) * self.outlier.max_ejection_percent:
            return
        seconds = pool.eject(self.outlier)
        log.warning("%s: endpoint %s ejected for %gs: %s", self.name, pool.address, seconds, reason)
        self.refresh()

    def close(self) -> None:
        for pool in self.pools:
            pool.close()


class Upstreams:
    """Every version's balancer, following the live config (endpoints that
    stay keep their connections and health across reloads), and the active
    health checks of this process."""

    def __init__(self) -> None:
        self._balancers: dict[tuple[str, str], Balancer] = {}
        self._checker = HealthChecker()

    def __repr__(self) -> str:
        return f"<Upstreams [{len(self._balancers)} versions]>"

    def update(self, config: Config) -> None:
        """Adopt a new snapshot's services (call from the event loop)."""
        balancers: dict[tuple[str, str], Balancer] = {}
        checks: dict[Checked, HealthCheck] = {}
        for service in config.services:
            for version in service.versions:
                key = (service.name, version.name)
                balancer = self._balancers.pop(key, None) or Balancer("/".join(key))
                balancer.configure(service, version)
                balancers[key] = balancer
                if service.health_check is not None:
                    checks.update(dict.fromkeys(balancer.pools, service.health_check))
        for gone in self._balancers.values():
            gone.close()
        self._balancers = balancers
        self._checker.follow(checks)

    def close_expired(self, now: float) -> None:
        for balancer in self._balancers.values():
            for pool in balancer.pools:
                pool.close_expired(now)

    def balancer(self, service: str, version: str) -> Balancer:
        return self._balancers[(service, version)]

    def endpoint_healthy(self, service: str, version: str, address: Address) -> bool:
        balancer = self._balancers.get((service, version))
        pools = balancer.pools if balancer is not None else ()
        return all(pool.healthy for pool in pools if pool.address == address)

    def close(self) -> None:
        self._checker.close()
        for balancer in self._balancers.values():
            balancer.close()
