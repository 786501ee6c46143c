"""Which version the data path would choose for a request, and why, without sending it.

`POST /api/v1/services/{name}/explain` answers from the data path's own code,
not from a second implementation: the facts given (method, path, headers,
client address) are read by plan.request_view, the same checks and the same
RequestView that plan_request builds for a real request, and the service's
live router decides (routing.ServiceRouter.decide). Then, as the exchange does
when it picks an endpoint, a version with no endpoint in rotation gives way to
the service's fallback, and the decision says so (`;fallback=VERSION`).

What only the real request can know is said, not guessed:
- A keyless request whose version is drawn at random (`split;random`), or
  that gets a new random sticky key (`split;key=sticky` with no cookie yet):
  `version` is null, `random` true, and `chances` gives each version's share
  (unless one version has all the weight: the draw can only pick it).
- Endpoint health is the proxy's current view (health checks and ejections;
  with several workers, an endpoint counts as down when any worker has it
  ejected). A real request whose connects fail at that moment may still move
  to the fallback, and one that finds every endpoint at its connection limit
  gets 503; explain cannot see either.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import InvalidRequest, ProxyError
from proxy.plan import request_view
from proxy.routing import RANDOM, ServiceRouter, with_fallback

FACT_KEYS = ("method", "path", "headers", "client_ip")
DEFAULT_CLIENT_IP = "127.0.0.1"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110: header names, methods
_TARGET = re.compile(r"/[\x21-\x7e]*")  # origin form: printable ASCII, no space
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # what llhttp (strict) accepts

# Does this version of the service have an endpoint in rotation?
HasEndpoint = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What explain is told about a request: the facts routing may look at."""

    method: str = "GET"
    path: str = "/"  # the request target: path and query
    headers: tuple[tuple[str, str], ...] = ()  # in order; a name may repeat
    client_ip: str = DEFAULT_CLIENT_IP


def read_facts(body: object) -> RequestFacts:
    """The facts in an explain body; InvalidRequest listing every problem.

    `{"method": "GET", "path": "/x?a=1", "headers": {"x-user-id": "alice",
    "cookie": ["a=1", "b=2"]}, "client_ip": "10.0.0.7"}`; every key may be
    left out (GET, /, no headers, 127.0.0.1)."""
    if not isinstance(body, dict):
        raise InvalidRequest(
            'body must be a JSON object like {"method": "GET", "path": "/", '
            '"headers": {"x-user-id": "alice"}, "client_ip": "10.0.0.7"}'
        )
    problems = [
        f"{key}: unknown key (expected: {', '.join(FACT_KEYS)})"
        for key in body
        if key not in FACT_KEYS
    ]
    default = RequestFacts()
    method = _method(body.get("method", default.method), problems)
    path = _path(body.get("path", default.path), problems)
    headers = _headers(body.get("headers", {}), problems)
    client_ip = _client_ip(body.get("client_ip", default.client_ip), problems)
    if problems:
        raise InvalidRequest("invalid explain request", problems)
    return RequestFacts(method, path, headers, client_ip)


def _method(value: object, problems: list[str]) -> str:
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        return value.upper()  # llhttp only reads methods written in capitals
    problems.append(f"method: expected an HTTP method such as GET, got {value!r}")
    return ""


def _path(value: object, problems: list[str]) -> str:
    if isinstance(value, str) and _TARGET.fullmatch(value):
        return value
    problems.append(
        f"path: expected a path starting with '/' (a query may follow), printable ASCII "
        f"without spaces, got {value!r}"
    )
    return ""


def _headers(value: object, problems: list[str]) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        problems.append('headers: expected an object such as {"x-user-id": "alice"}')
        return ()
    headers = []
    for name, given in value.items():
        values = given if isinstance(given, list) else [given]
        if not _TOKEN.fullmatch(name):
            problems.append(f"headers: {name!r} is not a valid header name")
        for item in values:
            if isinstance(item, str) and _FIELD_VALUE.fullmatch(item):
                headers.append((name, item))
            else:
                problems.append(
                    f"headers.{name}: expected a string (or a list of them) of "
                    f"printable characters, got {item!r}"
                )
    return tuple(headers)


def _client_ip(value: object, problems: list[str]) -> str:
    try:
        return str(ipaddress.ip_address(value if isinstance(value, str) else ""))
    except ValueError:
        problems.append(f"client_ip: expected an IPv4 or IPv6 address, got {value!r}")
        return ""


def explain(
    router: ServiceRouter, facts: RequestFacts, underscores: str, has_endpoint: HasEndpoint
) -> dict[str, object]:
    """{"version", "decision", "random", ...} for these facts: see the module docstring.
    `underscores` is the config's headers_with_underscores. InvalidRequest if the
    data path would refuse such a request."""
    raw_headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in facts.headers]
    try:
        view = request_view(
            facts.method.encode("ascii"),
            facts.path.encode("ascii"),
            raw_headers,
            facts.client_ip,
            underscores,
        )
    except ProxyError as exc:
        raise InvalidRequest(
            f"the data path would refuse this request with {exc.status}", [exc.detail]
        ) from None
    version, new_sticky_cookie, reason = router.decide(view)
    service = router.service
    drawn = reason == RANDOM or new_sticky_cookie is not None
    if drawn and sum(weight > 0 for weight in service.split.weights.values()) > 1:
        how = "a new sticky key drawn" if new_sticky_cookie else "a draw"
        return {
            "version": None,
            "decision": reason,
            "random": True,
            "chances": chances(router),
            "note": f"no key in the request: the version comes from {how} at random by weight",
        }
    decision = reason
    healthy = has_endpoint(version)
    fallback = service.fallback
    if not healthy and fallback is not None and fallback != version:
        version, decision = fallback, with_fallback(reason, fallback)
        healthy = has_endpoint(fallback)
    return {"version": version, "decision": decision, "random": False, "healthy": healthy}


def chances(router: ServiceRouter) -> dict[str, float]:
    """Each version's chance, in percent, of a random draw: its share of the weights."""
    weights = router.service.split.weights
    total = sum(weights.values())
    return {name: round(weight * 100 / total, 2) for name, weight in weights.items()}
