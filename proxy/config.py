"""The configuration: frozen, validated values, and the checks of runtime weight changes.

The YAML file is read into these by proxy/loader.py, with every error's path and line.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # release.py imports this module; a Service only holds the spec
    from proxy.release import ReleaseSpec

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Weights are ratios ({stable: 9, canary: 1} splits like {stable: 90, canary: 10}); the bound
# keeps every weight exact at the split resolution of 0.01 (a float has 15-17 digits).
MAX_WEIGHT = 1_000_000
# What the data path does with a request header whose name contains "_" (Envoy's
# headers_with_underscores_action, nginx's underscores_in_headers): drop the header,
# reject the request with 400, or pass it on.
HEADERS_WITH_UNDERSCORES = ("drop", "reject", "allow")
# What a control-API token may do: "admin" reads and changes, "read" only reads (GET).
TOKEN_ROLES = ("admin", "read")
# The actors of changes no token makes (docs/change-safety.md): no token may take these names.
RESERVED_ACTORS = ("release", "file", "signal")


class ConfigError(Exception):
    """A refused configuration (or runtime change): every problem, one string each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 2.0
    response: float = 30.0
    idle: float = 60.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 32768
    header_read_timeout: float = 10.0
    max_body_bytes: int = 0  # 0 = no limit
    max_connections: int = 10000  # concurrent client connections per worker; 0 = no limit


@dataclass(frozen=True, slots=True)
class FieldMatch:
    """A condition on a header, cookie or query parameter: exactly one of value/regex/present."""

    name: str  # header names are stored lower-cased
    value: str | None = None
    regex: re.Pattern[str] | None = None
    present: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    """All conditions must hold; an empty condition set matches every request."""

    version: str
    headers: tuple[FieldMatch, ...] = ()
    cookies: tuple[FieldMatch, ...] = ()
    query: tuple[FieldMatch, ...] = ()
    path_prefix: str | None = None
    methods: frozenset[str] = frozenset()  # upper-case
    sources: tuple[IPNetwork, ...] = ()
    name: str | None = None  # shown in the decision trace: rule=N;name=NAME


@dataclass(frozen=True, slots=True)
class HashSource:
    kind: str  # "header" | "cookie" | "query" | "client_ip"
    name: str = ""  # header names lower-cased; "" for client_ip


@dataclass(frozen=True, slots=True)
class StickyCookie:
    name: str
    max_age: int | None = None


@dataclass(frozen=True, slots=True)
class Split:
    weights: Mapping[str, float]  # every version of the service, in version order; never mutated
    hash_on: tuple[HashSource, ...] = ()
    sticky_cookie: StickyCookie | None = None
    salt: str = ""


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """A listener's certificate and key (``tls:`` beside ``listen``, ``control.tls``).

    ``digest`` is a hash of both files' bytes as the loader read them: a reload
    that finds other bytes (a rotated certificate) gives a different value,
    so comparing two values says whether the listener must load them again.
    """

    cert: str  # the file's path, made absolute against the config file's directory
    key: str
    digest: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """HTTPS to a version's endpoints (``versions.NAME.tls``); every field optional.

    ``ca`` replaces the system's CA certificates; ``server_name`` is sent as
    SNI and verified (default: the endpoint's host); ``cert`` and ``key``
    (together) are the client certificate for mTLS. ``digest`` hashes the
    files' bytes, as for ListenerTls: equal values can share one SSLContext.
    """

    ca: str | None = None
    server_name: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: bool = True
    digest: str = ""


@dataclass(frozen=True, slots=True)
class Version:
    name: str
    endpoints: tuple[Address, ...]
    tls: UpstreamTls | None = None  # None: plain HTTP to its endpoints


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health checks: GET ``path`` on every endpoint each ``interval``."""

    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2  # passes in a row that bring an unhealthy endpoint back
    unhealthy_threshold: int = 3  # failures in a row that take a healthy endpoint out
    host: str | None = None  # the Host header; None: the endpoint's address


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Passive ejection of endpoints that fail real requests; a threshold of 0 turns it off."""

    consecutive_5xx: int = 5
    consecutive_connect_failures: int = 1
    base_ejection_time: float = 10.0  # times the number of ejections, up to max_ejection_time
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 50  # of a version's endpoints; one can always be ejected


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int = 2  # further endpoints tried when a connect fails (nothing was sent)


LOAD_BALANCING = ("round_robin", "least_request")


@dataclass(frozen=True, slots=True)
class Mirror:
    """Shadow traffic: ``percent`` of the requests the other versions serve are
    also sent to version ``to``, whose answers are compared and discarded."""

    to: str
    percent: float = 100.0  # 0-100
    max_body_bytes: int = 65536  # larger request bodies are not mirrored; 0: only bodyless ones
    max_in_flight: int = 100  # shadow requests at once, per worker process


@dataclass(frozen=True, slots=True)
class RerouteTunnels:
    """After a routing change, close the tunnels whose request now routes
    elsewhere, spread over ``within`` seconds."""

    within: float = 30.0


@dataclass(frozen=True, slots=True)
class ServiceMatch:
    host: str = "*"  # "*", an exact host, or "*.example.com"; lower-case, no port
    path_prefix: str = "/"


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    versions: tuple[Version, ...]
    split: Split
    baseline: str
    match: ServiceMatch = ServiceMatch()
    fallback: str | None = None
    timeouts: Timeouts = Timeouts()  # the global timeouts with the service's overrides applied
    rules: tuple[Rule, ...] = ()
    version_header: bool = True
    load_balancing: str = "round_robin"  # one of LOAD_BALANCING
    max_connections_per_endpoint: int = 0  # per worker process; 0 = no limit
    health_check: HealthCheck | None = None  # None: no active checks
    outlier_detection: OutlierDetection = OutlierDetection()
    retries: Retries = Retries()
    release: ReleaseSpec | None = None  # started when the proxy starts (docs/releases.md)
    mirror: Mirror | None = None  # None: no shadow traffic
    reroute_tunnels: RerouteTunnels | None = None  # None: tunnels stay where they started
    decision_header: bool = False  # x-grayproxy-decision on responses
    # A digest of the service's part of the config file as written (loader.node_digest);
    # kept through runtime weight changes, so a state file can tell whether the file changed it.
    source_digest: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Token:
    """A named control-API bearer token; ``name`` is the actor of the changes it makes."""

    name: str
    secret: str = field(repr=False)
    role: str = "admin"  # one of TOKEN_ROLES


@dataclass(frozen=True, slots=True)
class Control:
    listen: Address = Address("127.0.0.1", 9901)
    token: str | None = None  # resolved at load from token_env / token_file
    token_env: str | None = None
    token_file: str | None = None
    tls: ListenerTls | None = None  # None: plain HTTP
    # Every accepted token: control.tokens, or token_env / token_file as one admin named "admin".
    tokens: tuple[Token, ...] = ()


ACCESS_LOG_FORMATS = ("json",)


@dataclass(frozen=True, slots=True)
class AccessLog:
    """One JSON line per request (proxy/accesslog.py)."""

    path: str  # "-" for stdout, else an absolute file path
    format: str = "json"  # one of ACCESS_LOG_FORMATS


@dataclass(frozen=True, slots=True)
class Config:
    services: tuple[Service, ...]
    listen: Address = Address("127.0.0.1", 8080)
    workers: int = 1
    control: Control = Control()
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    drain_timeout: float = 30.0
    headers_with_underscores: str = "drop"  # one of HEADERS_WITH_UNDERSCORES
    tls: ListenerTls | None = None  # the data listener's; None: plain HTTP
    state_file: str | None = None  # absolute path; runtime state kept across restarts
    access_log: AccessLog | None = None  # None: off
    source: str = field(default="<string>", compare=False)


def check_weights(service: Service, raw: object) -> dict[str, float]:
    """Validate a runtime weight change (e.g. a decoded JSON body) against ``service``.

    Same rules as the config; versions left out get 0. Returns every version, in order.
    """
    names = [version.name for version in service.versions]
    if not isinstance(raw, Mapping):
        raise ConfigError(["weights: expected a mapping of version name to weight"])
    errors: list[str] = []
    given: dict[str, float] = {}
    for name, value in raw.items():
        path = f"weights.{name}"
        if name not in names:
            errors.append(f"{path}: {unknown_version(str(name), names)}")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{path}: expected a number")
        elif problem := weight_problem(value):
            errors.append(f"{path}: {problem}")
        else:
            given[name] = float(value)
    if not errors and (problem := split_problem(given)):
        errors.append(f"weights: {problem}")
    if errors:
        raise ConfigError(errors)
    return all_weights(names, given)


def weight_problem(weight: float) -> str | None:
    """Why ``weight`` (a float, or an int of any size) is refused, or None."""
    if isinstance(weight, float) and not math.isfinite(weight):
        return "must be a finite number"
    if weight < 0:
        return "must not be negative"
    if weight > MAX_WEIGHT:  # before float(): 1e35 would pass the resolution check below
        return f"must be at most {MAX_WEIGHT} (weights are ratios: 9 and 1 split like 90 and 10)"
    # repr() is the shortest text that reads back as this float: "0.07", not 0.0700000000000000067
    exponent = Decimal(repr(float(weight))).as_tuple().exponent
    if isinstance(exponent, int) and exponent < -2:
        return "must be a multiple of 0.01 (the split resolution)"
    return None


def all_weights(names: list[str], given: Mapping[str, float]) -> dict[str, float]:
    """Every version's weight, in version order: the versions left out get 0."""
    return {name: given.get(name, 0.0) for name in names}


def split_problem(weights: Mapping[str, float]) -> str | None:
    """Why these weights, taken together, cannot split traffic, or None: the one check (and
    message) that some version gets traffic, for the file and for runtime changes alike."""
    if any(weight > 0 for weight in weights.values()):
        return None
    return "at least one weight must be above zero"


def unknown_version(name: str, names: list[str]) -> str:
    return f"unknown version {name!r} (versions: {', '.join(names)})"
