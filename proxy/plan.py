"""What to do with one request, decided from its head before any I/O.

`plan_request` is a pure function of the parsed request head, the routing
table, the limits and the client's address: it checks the head (http1), picks
the service and the version (routing) and says why, and frames the head to
send upstream. A refused request is a plan too, carrying the error and its
status, and whatever was decided before the refusal (a 413 still names its
version). The exchange then only carries the plan out.
"""

from __future__ import annotations

from typing import Final, Protocol

from . import errors
from .accesslog import names_json
from .config import Config, Timeouts
from .endpoints import Balancer, Upstreams
from .errors import ProxyError
from .http1 import (
    RequestHead,
    SeenRequestLine,
    origin_form,
    request_head,
    tunnelled_upgrade,
    upstream_head,
)
from .metrics import Metrics, VersionStats
from .mirror import Mirroring, Mirrors
from .requestid import HEADER_KEY, IDS, client_id_line
from .routing import RequestView, Router
from .state import Snapshot


class UpgradeFlag(Protocol):
    """The parser's word on whether the head it just read asks for an upgrade."""

    def should_upgrade(self) -> bool: ...


class PathLimits:
    """The data path's limits and client timeouts, as plain fields: read per
    request, they are then native fields rather than lookups on the config's
    dataclasses. A reload replaces them whole."""

    __slots__ = (
        "header_read_timeout",
        "headers_with_underscores",
        "idle_timeout",
        "max_body_bytes",
        "max_connections",
        "max_header_bytes",
    )

    def __init__(self, config: Config) -> None:
        limits = config.limits
        self.max_header_bytes = limits.max_header_bytes
        self.header_read_timeout = limits.header_read_timeout
        self.max_body_bytes = limits.max_body_bytes
        self.max_connections = limits.max_connections
        self.idle_timeout = config.timeouts.idle
        self.headers_with_underscores = config.headers_with_underscores


class VersionTarget:
    """Where one version's traffic goes, precomputed per snapshot."""

    __slots__ = (
        "balancer",
        "decision_header",
        "log_names",
        "name",
        "response_header",
        "stats",
    )

    def __init__(
        self,
        name: str,
        balancer: Balancer,
        stats: VersionStats,
        tag: bool,
        decision_header: bool = False,
        service: str = "",
    ) -> None:
        self.name = name
        self.balancer = balancer
        self.stats = stats
        self.response_header = b"x-grayproxy-version: %s\r\n" % name.encode() if tag else b""
        self.decision_header = decision_header  # the service's: x-grayproxy-decision on responses
        self.log_names = names_json(service, name)  # the access log's service and version


class ServiceTarget:
    __slots__ = ("fallback", "keeps_view", "mirror", "name", "timeouts", "versions")

    def __init__(
        self,
        versions: dict[str, VersionTarget],
        fallback: str | None,
        timeouts: Timeouts,
        name: str = "",
    ) -> None:
        self.versions = versions
        self.fallback = versions[fallback] if fallback else None
        self.timeouts = timeouts
        self.name = name
        self.mirror: Mirroring | None = None  # its shadow traffic, if it has a mirror
        # Its plans keep the request's routing facts (Plan.view): for the mirror's
        # choice, and for its tunnels when they follow the split.
        self.keeps_view = False


class RoutingTable:
    """A snapshot compiled for the data path; requests read it once."""

    __slots__ = ("router", "services", "snapshot")

    def __init__(
        self,
        snapshot: Snapshot,
        upstreams: Upstreams,
        metrics: Metrics,
        mirrors: Mirrors | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.router: Router = snapshot.router
        self.services: dict[str, ServiceTarget] = {}
        upstreams.update(snapshot.config)
        for service in snapshot.config.services:
            versions = {
                v.name: VersionTarget(
                    v.name,
                    upstreams.balancer(service.name, v.name),
                    metrics.version(service.name, v.name),
                    service.version_header,
                    service.decision_header,
                    service.name,
                )
                for v in service.versions
            }
            target = self.services[service.name] = ServiceTarget(
                versions, service.fallback, service.timeouts, service.name
            )
            if service.mirror is not None and mirrors is not None:
                balancer = versions[service.mirror.to].balancer
                target.mirror = mirrors.mirroring(service, balancer, metrics)
            target.keeps_view = target.mirror is not None or service.reroute_tunnels is not None
        if mirrors is not None:
            mirrors.follow(snapshot.config)


class Plan:
    """One request's plan: how it is framed, where it goes and why, or why not."""

    __slots__ = (
        "chunked",
        "close",
        "error",
        "head",
        "head_request",
        "http10",
        "method",
        "reason",
        "request_id",
        "service",
        "set_cookie",
        "target",
        "upgrade",
        "url",
        "view",
        "want_continue",
    )

    def __init__(self, method: bytes) -> None:
        self.method = method
        self.head_request = method == b"HEAD"
        self.error: ProxyError | None = None  # refused: the response says why
        self.http10 = False
        self.close = False  # the connection closes after this exchange
        self.chunked = False  # the request body is chunked
        self.want_continue = False
        self.upgrade: bytes | None = None  # the Upgrade to tunnel after a 101 (WebSocket)
        self.service: ServiceTarget | None = None
        self.target: VersionTarget | None = None
        self.set_cookie: str | None = None  # a sticky cookie to set on the response
        self.reason = ""  # why this version: rule=N, split;key=SOURCE, split;random
        self.head = b""  # the request head to send upstream
        self.view: RequestView | None = None  # kept only if the service keeps_view
        self.url = b""  # the request target as received, when there was one
        # The request id as its header line (see requestid.py): on the head sent
        # upstream and on the response, whoever answers it.
        self.request_id = b""

    def __repr__(self) -> str:
        where = self.target.name if self.target is not None else None
        return f"<Plan {self.method!r} -> {where} ({self.reason}) error={self.error!r}>"


def refusal(error: ProxyError) -> Plan:
    """The plan of a request that could not be parsed: answer, then close."""
    plan = Plan(b"")
    plan.error = error
    plan.close = True
    plan.request_id = IDS.next_line()
    return plan


def plan_request(
    method: bytes,
    url: bytes,
    lines: list[SeenRequestLine],
    version: str,
    keep_alive: bool,
    upgrade: UpgradeFlag,
    table: RoutingTable,
    limits: PathLimits,
    forwarded_for: bytes,
    client_ip: str,
    verbatim: bytes,
) -> Plan:
    """The plan for a request head as the parser gave it, its header `lines`
    read by http1.seen_headers or seen_lines: `version` and
    `keep_alive` as it read them, and `upgrade` says whether the head asks for
    an upgrade (Connection: upgrade and an Upgrade header; asked only when there
    is an Upgrade header: it costs a call into the parser); `forwarded_for` is
    http1.forwarded_for_lines(client_ip); `verbatim` is its request line and
    header lines as received, to be sent on as they are if nothing in them
    changes (see http1.verbatim_head), or b"" when they cannot be."""
    plan = Plan(method)
    plan.url = url
    try:
        head = _checked_head(plan, lines, version, keep_alive, upgrade, limits)
        made_id = _request_id(plan, head)
        target = origin_form(url, head.host, method)
        _route(plan, table, head.host, routing_view(method, target, head, client_ip))
        max_body = limits.max_body_bytes
        length = head.content_length
        if max_body and length is not None and int(length) > max_body:
            raise errors.PayloadTooLarge(f"request body over {max_body} bytes")
        unchanged = head.unchanged and target is url
        plan.head = upstream_head(
            method,
            target,
            head,
            forwarded_for,
            plan.upgrade,
            verbatim if unchanged else b"",
            made_id,
        )
    except ProxyError as exc:
        plan.error = exc
        if not plan.request_id:  # refused before its head was read
            plan.request_id = IDS.next_line()
    return plan


def _request_id(plan: Plan, head: RequestHead) -> bytes:
    """Set the plan's request id: the client's, or a new one. Returns the line
    to add to the head sent upstream: b"" when the client's goes as it came."""
    value = head.headers.get(HEADER_KEY)
    if value is not None:
        plan.request_id = client_id_line(value)
        if plan.request_id:
            return b""
        # Unfit to pass on: the client's lines are replaced by a new one.
        head.drop(HEADER_KEY)
    plan.request_id = IDS.next_line()
    return plan.request_id


def routing_view(method: bytes, target: bytes, head: RequestHead, client_ip: str) -> RequestView:
    """What routing sees of a request: its method, the path and query of its
    target in origin form, its checked headers and the client's address."""
    text = _target_text(target)
    return RequestView(method.decode("latin-1"), text[0], text[1], head.headers, client_ip)


class TargetText:
    """A request target in origin form, and its path and query as text."""

    __slots__ = ("path", "query", "target")

    def __init__(self, target: bytes) -> None:
        self.target = target
        path, _, query = target.partition(b"?")
        self.path = path.decode("latin-1")
        self.query = query.decode("latin-1")


# The target last read: a client asks for the same one again and again (an API,
# a health check, a page reloaded), and then it is one comparison.
_LAST_TARGET: Final = [TargetText(b"/")]


def _target_text(target: bytes) -> tuple[str, str]:
    last = _LAST_TARGET[0]
    if last.target != target:
        last = _LAST_TARGET[0] = TargetText(target)
    return last.path, last.query


def request_view(
    method: bytes,
    url: bytes,
    raw_headers: list[tuple[bytes, bytes]],
    client_ip: str,
    underscores: str,
) -> RequestView:
    """The view routing would get of a request with these facts, read by the
    same checks as plan_request (for explain; not the hot path). Its Host is
    not required: without one, routing sees no host header, as it is given.
    ProxyError if the data path would refuse the request."""
    head = request_head(raw_headers, True, underscores)  # True: HTTP/1.0 may omit Host
    return routing_view(method, origin_form(url, head.host, method), head, client_ip)


def _checked_head(
    plan: Plan,
    lines: list[SeenRequestLine],
    version: str,
    keep_alive: bool,
    upgrade: UpgradeFlag,
    limits: PathLimits,
) -> RequestHead:
    """The head's checks, and what they tell the plan of its framing."""
    method = plan.method
    if version not in ("1.1", "1.0"):
        raise errors.VersionNotSupported(f"HTTP/{version} is not supported")
    plan.http10 = version == "1.0"
    plan.close = not keep_alive
    if method == b"CONNECT":
        raise errors.BadRequest("CONNECT is not supported: grayproxy is not a forward proxy")
    head = RequestHead(lines, plan.http10, limits.headers_with_underscores)
    plan.chunked = head.chunked
    plan.want_continue = head.want_continue
    if "upgrade" in head.headers and upgrade.should_upgrade():
        plan.upgrade = tunnelled_upgrade(method, head, plan.http10)
        # The bytes after a tunnelled upgrade's head are the tunnel's: unless
        # the upstream answers 101, the connection ends with this exchange.
        plan.close = plan.close or plan.upgrade is not None
    return head


def _route(plan: Plan, table: RoutingTable, host: str, view: RequestView) -> None:
    service_router = table.router.match(host, view.path)
    if service_router is None:
        raise errors.NoService(f"no service matches host {host!r} and path {view.path!r}")
    service = table.services[service_router.service.name]
    version, plan.set_cookie, plan.reason = service_router.decide(view)
    plan.service = service
    plan.target = service.versions[version]
    if service.keeps_view:
        plan.view = view
