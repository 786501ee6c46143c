"""Mirroring: a share of a service's requests, also sent to a shadow version.

`Mirroring` is one service's mirror as of one snapshot: it decides, from the
plan of a request, whether the request is mirrored (`shadow`). The choice is
keyed like the split: with a key (the split's `hash_on` sources, then its
sticky cookie) it is a MurmurHash3 of the key under a seed of its own (so it is
independent of the key's split bucket, and the same users are mirrored every
time); without one it is a random draw. Requests the shadow version serves
itself are never mirrored.

A `Shadow` is one mirrored request: the primary's upstream head plus
`x-grayproxy-mirror: PRIMARY`, then the same body, sent on a connection of its
own to an endpoint of the shadow version. Its response is parsed and
discarded; only its status and duration are kept, to be compared with the
primary's (`match`, `mismatch`), or it failed (`error`) or was never sent
(`skipped`). The exchange feeds it and forgets it: nothing here is awaited by
the client's exchange, and nothing pauses the client. That is what keeps it
bounded instead: a request whose body is over `max_body_bytes` (known from
Content-Length, or a chunked body once it grows past it) is not mirrored, so a
shadow never holds more than its head and `max_body_bytes`, waiting for its
connection or in its socket's buffer; at most `max_in_flight` shadows per
service and worker exist at once; and a shadow that stays silent for the
service's response timeout after its request ended is cut.

Shadow connections are plain HTTP/1.1 client connections (`ShadowConnection`),
kept alive in a `ShadowPool` per (service, version) and reused; endpoints are
chosen by the version's `Balancer`, so shadows go only to endpoints in
rotation, but their results do not count towards outlier ejection, and they
are not counted in the endpoints' requests in flight (the primary traffic's).
"""

from __future__ import annotations

import asyncio
import socket
from random import random
from time import monotonic
from typing import TYPE_CHECKING, Final, cast

import httptools
import mmh3

from .config import Address, Config, Service
from .endpoints import Balancer
from .errors import UpstreamOverflow
from .http1 import CHUNKED_END
from .metrics import Metrics, MirrorStats
from .routing import KeyReader, RequestView

if TYPE_CHECKING:
    from .plan import Plan

MIRROR_HEADER: Final = b"x-grayproxy-mirror: "
MAX_IDLE_PER_ENDPOINT: Final = 32  # idle shadow connections kept per endpoint
_UNIT_32: Final = 2**32

# How a shadow ended, before it is compared with the primary.
PENDING: Final = 0
ANSWERED: Final = 1
FAILED: Final = 2
ABANDONED: Final = 3  # never fully sent: its body grew too large, or the request broke off


def mirror_seed(salt: str) -> int:
    """The MurmurHash3 seed of the mirror's choice under the split's `salt`:
    another seed than any version's, so being mirrored is independent of the
    key's version."""
    return int(mmh3.hash(b"grayproxy-mirror\x00" + salt.encode("utf-8", "surrogatepass"), 0, False))


def mirrored_key(key: str, seed: int, threshold: int) -> bool:
    """Whether requests with this key are mirrored: its hash is below `threshold`
    (percent x 2**32 / 100)."""
    return int(mmh3.hash(key.encode("utf-8", "surrogatepass"), seed, False)) < threshold


def percent_threshold(percent: float) -> int:
    return int(percent * _UNIT_32 / 100)


class Mirroring:
    """The mirror of one service, as one snapshot configures it."""

    __slots__ = (
        "_keys",
        "_seed",
        "_sticky",
        "_threshold",
        "balancer",
        "connect_timeout",
        "idle_timeout",
        "max_body_bytes",
        "max_in_flight",
        "percent",
        "pool",
        "response_timeout",
        "stats",
        "to",
    )

    def __init__(
        self, service: Service, balancer: Balancer, pool: ShadowPool, stats: MirrorStats
    ) -> None:
        mirror = service.mirror
        assert mirror is not None
        split = service.split
        self.to = mirror.to
        self.percent = mirror.percent
        self.max_body_bytes = mirror.max_body_bytes
        self.max_in_flight = mirror.max_in_flight
        self.balancer = balancer
        self.pool = pool
        self.stats = stats
        self.connect_timeout = service.timeouts.connect
        self.response_timeout = service.timeouts.response
        self.idle_timeout = service.timeouts.idle
        self._seed = mirror_seed(split.salt)
        self._threshold = percent_threshold(mirror.percent)
        # Where the split reads a key (header names are stored lower-case).
        self._keys = tuple(KeyReader(source.kind, source.name) for source in split.hash_on)
        self._sticky = split.sticky_cookie is not None
        if split.sticky_cookie is not None:
            self._keys += (KeyReader("cookie", split.sticky_cookie.name),)

    def __repr__(self) -> str:
        return (
            f"<Mirroring to {self.to} {self.percent:g}% "
            f"[{self.pool.in_flight}/{self.max_in_flight} in flight]>"
        )

    def shadow(self, plan: Plan) -> Shadow | None:
        """The shadow of this request, sent now, if it is mirrored; None if not
        (a request chosen but not mirrorable is counted as skipped)."""
        target = plan.target
        view = plan.view
        if plan.error is not None or target is None or view is None or target.name == self.to:
            return None
        if not self.chosen(view, plan.set_cookie):
            return None
        if (
            plan.upgrade is not None
            or not self._body_fits(view, plan.chunked)
            or self.pool.in_flight >= self.max_in_flight
        ):
            self.stats.count("skipped")
            return None
        head = plan.head[:-2] + MIRROR_HEADER + target.name.encode() + b"\r\n\r\n"
        return Shadow(self, head, plan.chunked, plan.head_request)

    def chosen(self, view: RequestView, set_cookie: str | None) -> bool:
        """Whether the request is in the mirrored share: by its key, else at random."""
        if self.percent >= 100:
            return True
        if self.percent <= 0:
            return False
        for reader in self._keys:
            key = reader.read(view)
            if key:
                return mirrored_key(key, self._seed, self._threshold)
        if self._sticky and set_cookie:  # a sticky key drawn for this request: "NAME=KEY; ..."
            key = set_cookie.partition(";")[0].partition("=")[2]
            return mirrored_key(key, self._seed, self._threshold)
        return random() * 100 < self.percent

    def _body_fits(self, view: RequestView, chunked: bool) -> bool:
        if chunked:
            return self.max_body_bytes > 0  # checked as it arrives (Shadow.body)
        length = view.headers.get("content-length")
        return length is None or int(length) <= self.max_body_bytes


class ShadowPool:
    """The shadow side of one version in one worker, kept across snapshots:
    the shadows in flight and the idle keep-alive connections per endpoint."""

    __slots__ = ("closed", "idle", "in_flight")

    def __init__(self) -> None:
        self.in_flight = 0
        self.idle: dict[Address, list[ShadowConnection]] = {}
        self.closed = False

    def __repr__(self) -> str:
        idle = sum(len(conns) for conns in self.idle.values())
        return f"<ShadowPool [{self.in_flight} in flight | {idle} idle]>"

    def take(self, address: Address, idle_timeout: float) -> ShadowConnection | None:
        conns = self.idle.get(address)
        now = monotonic()
        while conns:
            conn = conns.pop()
            transport = conn.transport
            if transport is None or transport.is_closing():
                continue
            if now - conn.idle_since <= idle_timeout:
                return conn
            transport.abort()  # the newest is too old: so are the others
            self._close_all(conns)
        return None

    def release(self, conn: ShadowConnection) -> None:
        conns = self.idle.setdefault(conn.address, [])
        if self.closed or len(conns) >= MAX_IDLE_PER_ENDPOINT or conn.transport is None:
            conn.abort()
            return
        conn.idle_since = monotonic()
        conns.append(conn)

    def discard(self, conn: ShadowConnection) -> None:
        conns = self.idle.get(conn.address)
        if conns and conn in conns:
            conns.remove(conn)

    def close(self) -> None:
        """No longer mirrored to: idle connections close now, busy ones when done."""
        self.closed = True
        for conns in self.idle.values():
            self._close_all(conns)
        self.idle.clear()

    @staticmethod
    def _close_all(conns: list[ShadowConnection]) -> None:
        for conn in conns:
            conn.abort()
        conns.clear()


class Mirrors:
    """The shadow pools of one worker, following the live config (see RoutingTable)."""

    __slots__ = ("_pools",)

    def __init__(self) -> None:
        self._pools: dict[tuple[str, str], ShadowPool] = {}

    def __repr__(self) -> str:
        return f"<Mirrors {sorted(self._pools)}>"

    def mirroring(self, service: Service, balancer: Balancer, metrics: Metrics) -> Mirroring:
        """The mirror of `service` (which has one) as now configured; `balancer`
        is its shadow version's."""
        assert service.mirror is not None
        key = (service.name, service.mirror.to)
        pool = self._pools.get(key)
        if pool is None or pool.closed:
            pool = self._pools[key] = ShadowPool()
        return Mirroring(service, balancer, pool, metrics.mirror(*key))

    def follow(self, config: Config) -> None:
        """Close the pools of mirrors the config no longer has."""
        wanted = {
            (service.name, service.mirror.to)
            for service in config.services
            if service.mirror is not None
        }
        for key in [key for key in self._pools if key not in wanted]:
            self._pools.pop(key).close()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


class Shadow:
    """One mirrored request, from the primary's head to its outcome. Fed by the
    client's exchange (body, request_complete, primary_done), never awaited."""

    __slots__ = (
        "_concluded",
        "_last_read",
        "_pending",
        "_timer",
        "body_done",
        "chunked",
        "conn",
        "connecting",
        "head_request",
        "mirroring",
        "primary_status",
        "result",
        "started_at",
        "status",
    )

    def __init__(
        self, mirroring: Mirroring, head: bytes, chunked: bool, head_request: bool
    ) -> None:
        self.mirroring = mirroring
        self.chunked = chunked
        self.head_request = head_request
        self.started_at = monotonic()
        self.result = PENDING
        self.status = 0  # the shadow's
        self.primary_status = 0  # 0: the primary has not ended yet
        self.body_done = False  # the whole request was handed to it
        self._concluded = False  # its outcome was counted
        self.conn: ShadowConnection | None = None
        self.connecting: asyncio.Task[None] | None = None
        # What waits for a connection: the head and the body so far (bounded
        # by max_body_bytes, see body).
        self._pending: list[bytes] | None = [head]
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        mirroring.pool.in_flight += 1
        self._connect()

    def __repr__(self) -> str:
        states = ("pending", "answered", "failed", "abandoned")
        return f"<Shadow to {self.mirroring.to} {states[self.result]} status={self.status}>"

    # -- fed by the client's exchange ----------------------------------------
    def body(self, chunk: bytes, total: int) -> None:
        """A piece of the body, framed as the primary gets it; `total`: the
        body's bytes so far, without chunk framing."""
        if self.result != PENDING:
            return
        if total > self.mirroring.max_body_bytes:
            self._end(ABANDONED)  # a chunked body grew too large
            return
        self._send(chunk)

    def request_complete(self) -> None:
        if self.result != PENDING:
            return
        if self.chunked:
            self._send(CHUNKED_END)
        self.body_done = True
        self._arm(monotonic())

    def primary_done(self, status: int, seconds: float, now: float) -> None:
        """The client's exchange ended with `status` after `seconds`."""
        self.primary_status = status
        self.mirroring.stats.observe_primary(status, seconds, now)
        if self.result != PENDING:
            self._conclude()
        elif not self.body_done:
            self._end(ABANDONED)  # the request broke off, or its body was refused

    # -- the shadow's own side ---------------------------------------------
    def _connect(self) -> None:
        mirroring = self.mirroring
        try:
            endpoint = mirroring.balancer.choose()
        except UpstreamOverflow:
            endpoint = None
        if endpoint is None:
            self._end(FAILED)
            return
        conn = mirroring.pool.take(endpoint.address, mirroring.idle_timeout)
        if conn is not None:
            self._attach(conn)
        else:
            loop = asyncio.get_running_loop()
            self.connecting = loop.create_task(self._open(endpoint.address))

    async def _open(self, address: Address) -> None:
        mirroring = self.mirroring
        pool = mirroring.pool
        try:
            async with asyncio.timeout(mirroring.connect_timeout):
                _, conn = await asyncio.get_running_loop().create_connection(
                    lambda: ShadowConnection(pool, address), address.host, address.port
                )
        except (OSError, TimeoutError):
            self.connecting = None
            self._end(FAILED)
            return
        self.connecting = None
        if self.result != PENDING:  # abandoned while connecting
            conn.abort()
            return
        self._attach(conn)

    def _attach(self, conn: ShadowConnection) -> None:
        self.conn = conn
        pending, self._pending = self._pending, None
        conn.start(self, b"".join(pending or ()))

    def _send(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.write(data)
        elif self._pending is not None:
            self._pending.append(data)

    def _arm(self, now: float) -> None:
        """The response timeout runs from `now`: checked by a timer that, when
        it fires early (the shadow read since), is set again for the rest."""
        self._last_read = now
        if self._timer is None:
            timeout = self.mirroring.response_timeout
            self._timer = asyncio.get_running_loop().call_later(timeout, self._check_timeout)

    def _check_timeout(self) -> None:
        self._timer = None
        if self.result != PENDING:
            return
        timeout = self.mirroring.response_timeout
        left = self._last_read + timeout - monotonic()
        if left > 0:
            self._timer = asyncio.get_running_loop().call_later(left, self._check_timeout)
        else:
            self._end(FAILED)

    # -- called by the connection ------------------------------------------
    def response_head(self, status: int) -> None:
        self.status = status
        if self.body_done:
            self._last_read = monotonic()

    def response_read(self) -> None:
        if self.body_done:
            self._last_read = monotonic()

    def response_complete(self, keep_alive: bool) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.shadow = None
            if keep_alive and self.body_done and not self.head_request:
                conn.reset()
                self.mirroring.pool.release(conn)
            else:
                conn.abort()
        self._end(ANSWERED)

    def failed(self) -> None:
        self.conn = None
        self._end(FAILED)

    # -- endings -------------------------------------------------------------
    def _end(self, result: int) -> None:
        """The shadow is over (once): free its connection, its slot and its buffer."""
        if self.result != PENDING:
            return
        self.result = result
        self._pending = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.conn is not None:
            self.conn.shadow = None
            self.conn.abort()
            self.conn = None
        self.mirroring.pool.in_flight -= 1
        if result == ANSWERED:
            now = monotonic()
            self.mirroring.stats.observe(self.status, now - self.started_at, now)
        if self.primary_status:
            self._conclude()

    def _conclude(self) -> None:
        """Both sides are over: count the outcome, once."""
        if self._concluded:
            return
        self._concluded = True
        stats = self.mirroring.stats
        if self.result == ABANDONED or self.primary_status == 499:
            stats.count("skipped")  # nothing was sent whole, or nothing to compare with
        elif self.result == FAILED:
            stats.count("error")
        elif self.status == self.primary_status:
            stats.count("match")
        else:
            stats.count("mismatch")


class ShadowConnection(asyncio.Protocol):
    """A client connection to one endpoint of a shadow version: writes what
    its shadow sends, reads the response's status and drops the rest."""

    __slots__ = (
        "_framed",
        "_in_body",
        "_informational",
        "_parser",
        "address",
        "idle_since",
        "pool",
        "shadow",
        "transport",
    )

    def __init__(self, pool: ShadowPool, address: Address) -> None:
        self.pool = pool
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.shadow: Shadow | None = None
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._informational = False
        self._in_body = False
        self._framed = False  # the response has Content-Length or Transfer-Encoding

    def __repr__(self) -> str:
        return f"<ShadowConnection {self.address} {'busy' if self.shadow else 'idle'}>"

    def start(self, shadow: Shadow, data: bytes) -> None:
        self.shadow = shadow
        self.write(data)

    def write(self, data: bytes) -> None:
        # Never paused: what a shadow sends is bounded by max_body_bytes.
        if self.transport is not None:
            self.transport.write(data)

    def reset(self) -> None:
        """Ready for the next request (a HEAD's response would need a new parser)."""
        self._in_body = self._framed = False

    def abort(self) -> None:
        self.shadow = None
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        shadow = self.shadow
        if shadow is None:  # bytes on an idle connection: the upstream misbehaves
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._fail()
            return
        if self.shadow is shadow:
            shadow.response_read()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.discard(self)
        self.transport = None
        shadow, self.shadow = self.shadow, None
        if shadow is None:
            return
        if self._in_body and not self._framed:  # such a body ends with the connection
            shadow.response_complete(keep_alive=False)
        else:
            shadow.failed()

    def pause_writing(self) -> None:
        pass  # see write

    def resume_writing(self) -> None:
        pass

    def _fail(self) -> None:
        shadow, self.shadow = self.shadow, None
        if self.transport is not None:
            self.transport.abort()
        if shadow is not None:
            shadow.failed()

    # -- httptools callbacks -----------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        shadow = self.shadow
        if shadow is None:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._informational = True
            self._framed = False
            return
        self._in_body = True
        shadow.response_head(status)
        if shadow.head_request:
            shadow.response_complete(keep_alive=False)  # llhttp cannot be told it answers a HEAD

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._in_body = False
        shadow = self.shadow
        if shadow is not None:
            shadow.response_complete(self._parser.should_keep_alive())
