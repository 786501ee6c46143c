"""Endpoints: which one serves a request, and whether each is fit to.

An `Endpoint` is one address of one version: its idle keep-alive connections,
its requests in flight and its health (outlier ejection from real requests,
verdicts of active checks). A `Balancer` holds one version's endpoints and
chooses among those in rotation: O(1) per request, since the in-rotation tuple
is rebuilt only when an endpoint's health changes. `Upstreams` keeps every
balancer in step with the live config and runs the active checks.

Time comes from an injected clock, and ejections end through injected timers
(by default `time.monotonic` and the running event loop), so that health and
choice can be driven without an event loop. The connections themselves are
`upstream.UpstreamConnection`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from collections.abc import Callable, Sequence
from random import random, randrange
from time import monotonic
from typing import Final, Protocol

from .config import Address, Config, HealthCheck, OutlierDetection, Service, Timeouts, Version
from .errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamOverflow,
    UpstreamTlsError,
)
from .health import Checked, HealthChecker
from .tls import ClientContexts, ClientTls, tls_failure
from .upstream import UpstreamConnection

log = logging.getLogger(__name__)

MAX_IDLE_PER_ENDPOINT: Final = 256
UNLIMITED: Final = sys.maxsize  # max_connections_per_endpoint: 0

Clock = Callable[[], float]  # seconds, monotonic


class Timer(Protocol):
    """A callback due later that can be called off (an `asyncio.TimerHandle`)."""

    def cancel(self) -> None: ...


class Timers(Protocol):
    """Where callbacks are scheduled: an ejection's end."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...


class LoopTimers:
    """The running event loop's timers (the default)."""

    __slots__ = ()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)


LOOP_TIMERS: Final = LoopTimers()


class Endpoint:
    """One endpoint of one version: idle keep-alive connections, requests in
    flight, and health, passive (outlier ejection) and active (checks)."""

    __slots__ = (
        "_idle",
        "_return_timer",
        "address",
        "balancer",
        "check_failures",
        "check_passes",
        "checked_healthy",
        "clock",
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
        "timers",
        "tls",
    )

    def __init__(
        self,
        address: Address,
        balancer: Balancer,
        clock: Clock = monotonic,
        timers: Timers = LOOP_TIMERS,
    ) -> None:
        self.address = address
        self.balancer = balancer
        self.clock = clock
        self.timers = timers
        self.idle_timeout = Timeouts().idle  # both set by Balancer.configure
        self.max_connections = UNLIMITED
        self.tls: ClientTls | None = None  # HTTPS to this endpoint; set by Upstreams.update
        self._idle: list[UpstreamConnection] = []
        self.closed = False
        self.outstanding = 0  # requests in flight on this endpoint
        self.connecting = 0  # connections being opened
        # Passive health: consecutive failures of real requests, ejections.
        self.errors_5xx = 0
        self.connect_failures = 0
        self.ejected = False
        self.ejections = 0  # the ejection time multiplier
        self.returned_at = 0.0  # when the last ejection ended (clock time)
        self._return_timer: Timer | None = None
        # Active health: the verdict of the health checks and the current run.
        self.checked_healthy = True
        self.check_passes = 0
        self.check_failures = 0

    def __repr__(self) -> str:
        return (
            f"<Endpoint {self.balancer.name} {self.address} healthy={self.healthy} "
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
        tls = self.tls
        if tls is not None and tls.context is None:
            raise UpstreamTlsError(f"TLS to {self.address}: {tls.problem}")
        self.connecting += 1
        try:
            async with asyncio.timeout(timeout):
                if tls is None:
                    _, conn = await asyncio.get_running_loop().create_connection(
                        lambda: UpstreamConnection(self), self.address.host, self.address.port
                    )
                else:
                    _, conn = await asyncio.get_running_loop().create_connection(
                        lambda: UpstreamConnection(self),
                        self.address.host,
                        self.address.port,
                        ssl=tls.context,
                        server_hostname=tls.server_name,
                    )
        except TimeoutError:
            self._connect_failed()
            raise UpstreamConnectTimeout(f"connect to {self.address} timed out") from None
        except ssl.SSLError as exc:  # before OSError, its base class
            self._connect_failed()
            raise UpstreamTlsError(
                f"TLS handshake with {self.address} failed: {tls_failure(exc)}"
            ) from None
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
        conn.idle_since = self.clock()
        self._idle.append(conn)

    def use_tls(self, tls: ClientTls | None) -> None:
        """Open connections with ``tls`` from now on; idle ones opened with other
        settings (another CA, certificate or name, or none) are closed."""
        if tls != self.tls:
            self.tls = tls
            for conn in self._idle[:]:
                conn.abort()
            self._idle.clear()

    def discard(self, conn: UpstreamConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    def close_expired(self, now: float) -> None:
        """Close the connections idle for longer than `idle_timeout` (oldest
        first); `now` on this endpoint's clock."""
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
        now = self.clock()
        base = outlier.base_ejection_time
        worn_off = int((now - self.returned_at) / base)
        self.ejections = max(0, self.ejections - worn_off) + 1
        seconds = min(base * self.ejections, max(base, outlier.max_ejection_time))
        self.ejected = True
        self.errors_5xx = self.connect_failures = 0
        self._return_timer = self.timers.call_later(seconds, self.end_ejection)
        return seconds

    def end_ejection(self) -> None:
        if self._return_timer is not None:
            self._return_timer.cancel()
            self._return_timer = None
        if self.ejected:
            self.ejected = False
            self.returned_at = self.clock()
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

    __slots__ = (
        "_next",
        "clock",
        "endpoints",
        "healthy",
        "least_request",
        "max_attempts",
        "name",
        "outlier",
        "timers",
    )

    def __init__(self, name: str, clock: Clock = monotonic, timers: Timers = LOOP_TIMERS) -> None:
        self.name = name  # "service/version", for logs
        self.clock = clock  # for the endpoints it creates
        self.timers = timers
        self.endpoints: tuple[Endpoint, ...] = ()
        self.healthy: tuple[Endpoint, ...] = ()  # in rotation; rebuilt when health changes
        self.least_request = False
        self.max_attempts = 1  # endpoints one request may try: 1 + retries.attempts
        self.outlier = OutlierDetection()
        self._next = randrange(1 << 16)  # workers do not all start on the same endpoint

    def __repr__(self) -> str:
        return f"<Balancer {self.name} [{len(self.healthy)}/{len(self.endpoints)} in rotation]>"

    def configure(self, service: Service, version: Version) -> None:
        """Adopt a (re)loaded version: endpoints that stay keep their connections and health."""
        old = {endpoint.address: endpoint for endpoint in self.endpoints}
        self.endpoints = tuple(
            old.get(a) or Endpoint(a, self, self.clock, self.timers) for a in version.endpoints
        )
        for address, endpoint in old.items():
            if address not in version.endpoints:
                endpoint.close()
        self.least_request = service.load_balancing == "least_request"
        self.max_attempts = 1 + service.retries.attempts
        self.outlier = service.outlier_detection
        limit = service.max_connections_per_endpoint or UNLIMITED
        for endpoint in self.endpoints:
            endpoint.idle_timeout = service.timeouts.idle
            endpoint.max_connections = limit
            if service.health_check is None:
                endpoint.forget_checks()
        self.refresh()

    def refresh(self) -> None:
        self.healthy = tuple(endpoint for endpoint in self.endpoints if endpoint.healthy)

    def choose(self, tried: Sequence[Endpoint] = ()) -> Endpoint | None:
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
            endpoint = a if a.outstanding + a.connecting <= b.outstanding + b.connecting else b
        else:
            endpoint = healthy[self._next % count]
            self._next += 1
        if (
            endpoint.outstanding + endpoint.connecting < endpoint.max_connections
            and endpoint not in tried
        ):
            return endpoint
        return self._choose_among_all(tried)

    def _choose_among_all(self, tried: Sequence[Endpoint]) -> Endpoint | None:
        """The slow path, for a retry or a full endpoint: look at every one."""
        left = [endpoint for endpoint in self.healthy if endpoint not in tried]
        if not left:
            return None
        with_room = [endpoint for endpoint in left if endpoint.has_room]
        if not with_room:
            raise UpstreamOverflow(
                f"every endpoint of {self.name} is at its limit of "
                f"{left[0].max_connections} connections"
            )
        if self.least_request:
            return min(with_room, key=lambda endpoint: endpoint.outstanding + endpoint.connecting)
        endpoint = with_room[self._next % len(with_room)]
        self._next += 1
        return endpoint

    def eject(self, endpoint: Endpoint, reason: str) -> None:
        """Take `endpoint` out of rotation, unless more than max_ejection_percent
        of the version would then be ejected; one endpoint always can be."""
        if endpoint.ejected or endpoint.closed:
            return
        ejected = sum(other.ejected for other in self.endpoints)
        if (
            ejected
            and (ejected + 1) * 100 > len(self.endpoints) * self.outlier.max_ejection_percent
        ):
            return
        seconds = endpoint.eject(self.outlier)
        log.warning(
            "%s: endpoint %s ejected for %gs: %s", self.name, endpoint.address, seconds, reason
        )
        self.refresh()

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()


class Upstreams:
    """Every version's balancer, following the live config (endpoints that
    stay keep their connections and health across reloads), and the active
    health checks of this process."""

    def __init__(self, clock: Clock = monotonic, timers: Timers = LOOP_TIMERS) -> None:
        self._clock = clock
        self._timers = timers
        self._balancers: dict[tuple[str, str], Balancer] = {}
        self._checker = HealthChecker()
        self._tls = ClientContexts()

    def __repr__(self) -> str:
        return f"<Upstreams [{len(self._balancers)} versions]>"

    def update(self, config: Config) -> None:
        """Adopt a new snapshot's services (call from the event loop when any
        service has a health check: the checks run there)."""
        balancers: dict[tuple[str, str], Balancer] = {}
        checks: dict[Checked, HealthCheck] = {}
        self._tls.follow(v.tls for s in config.services for v in s.versions if v.tls is not None)
        for service in config.services:
            for version in service.versions:
                key = (service.name, version.name)
                balancer = self._balancers.pop(key, None) or Balancer(
                    "/".join(key), self._clock, self._timers
                )
                balancer.configure(service, version)
                for endpoint in balancer.endpoints:
                    endpoint.use_tls(self._tls.get(version.tls, endpoint.address.host))
                balancers[key] = balancer
                if service.health_check is not None:
                    checks.update(dict.fromkeys(balancer.endpoints, service.health_check))
        for gone in self._balancers.values():
            gone.close()
        self._balancers = balancers
        self._checker.follow(checks)

    def close_expired(self, now: float) -> None:
        """`now` on the endpoints' clock."""
        for balancer in self._balancers.values():
            for endpoint in balancer.endpoints:
                endpoint.close_expired(now)

    def balancer(self, service: str, version: str) -> Balancer:
        return self._balancers[(service, version)]

    def endpoint_healthy(self, service: str, version: str, address: Address) -> bool:
        balancer = self._balancers.get((service, version))
        endpoints = balancer.endpoints if balancer is not None else ()
        return all(endpoint.healthy for endpoint in endpoints if endpoint.address == address)

    def close(self) -> None:
        self._checker.close()
        for balancer in self._balancers.values():
            balancer.close()
