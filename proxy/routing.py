"""The grayscale decision: the facts of a request + a service's config -> a version.

Pure: no I/O, no asyncio, no aiohttp. Everything that can be is computed when a
router is built; a decision costs a few lookups and, for a keyed split, one
MurmurHash3 per version with a positive weight.

The keyed split is weighted rendezvous hashing: each version v with weight w > 0
scores ``w / -ln(u_v)`` where ``u_v`` in (0, 1) is the key hashed with a seed
derived from (salt, v); the highest score wins. ``-ln(u)`` is exponentially
distributed, so v wins with probability ``w_v / sum(w)``; a key's winner only
changes when the weight ratio between the old and the new winner changes in the
new winner's favour, for any number of versions.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from itertools import accumulate
from random import getrandbits, random
from typing import Final
from urllib.parse import parse_qsl

import mmh3

from proxy.config import FieldMatch, HashSource, IPNetwork, Rule, Service, split_problem

IPBits = tuple[int, int]  # (IP version, address as int)
Candidate = tuple[str, int, float]  # (version name, hash seed, 1 / weight)
_Route = tuple[int, str, "ServiceRouter"]  # (service order, path prefix, router)
HOST_CACHE_SIZE: Final = 4096  # distinct Host values whose candidate routes are remembered
# A regex condition remembers its verdict on this many distinct values (the same few
# User-Agent strings arrive over and over), each at most REGEX_CACHE_VALUE long.
REGEX_CACHE_SIZE: Final = 1024
REGEX_CACHE_VALUE: Final = 512

_murmur3: Final = mmh3.hash  # (data, seed, signed) -> int
# Maps a 32-bit hash h to u = (h + 0.5) * _UNIT_32, strictly inside (0, 1).
_UNIT_32: Final = 2.0**-32


class _Lazy(enum.Enum):
    UNPARSED = 0


class RequestView:
    """The facts of one request the decision may look at.

    ``headers`` maps lower-case names to values (repeated headers joined with
    ", ", Cookie headers with "; "); ``path`` excludes the query; ``query_string``
    is the raw text after "?". Cookies, query parameters and the client address
    are parsed on first use only.
    """

    __slots__ = (
        "_client_bits",
        "_cookies",
        "_query",
        "client_ip",
        "headers",
        "method",
        "path",
        "query_string",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query_string: str,
        headers: dict[str, str],
        client_ip: str,
    ) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.client_ip = client_ip
        self._cookies: dict[str, str] | None = None
        self._query: dict[str, str] | None = None
        self._client_bits: IPBits | _Lazy | None = _Lazy.UNPARSED

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (already lower-case), or None."""
        return self.headers.get(name)

    def cookie(self, name: str) -> str | None:
        """The first value of cookie ``name``, or None."""
        cookies = self._cookies
        if cookies is None:
            header = self.headers.get("cookie")
            if header is None or name not in header:
                return None  # cannot be there: the header is not parsed (a rule's cookie, often)
            cookies = self._cookies = parse_cookies(header)
        return cookies.get(name)

    def query_param(self, name: str) -> str | None:
        """The first value of query parameter ``name`` (decoded, blank kept), or None."""
        query = self._query
        if query is None:
            query = self._query = _parse_query(self.query_string)
        return query.get(name)

    def client_bits(self) -> IPBits | None:
        """(4 or 6, the client IP as int), IPv4-mapped IPv6 unwrapped; None if unparsable."""
        bits = self._client_bits
        if bits is _Lazy.UNPARSED:
            bits = self._client_bits = _parse_ip(self.client_ip)
        return bits


# What a request without cookies has: shared, never written to.
_NO_COOKIES: Final[dict[str, str]] = {}


def parse_cookies(header: str | None) -> dict[str, str]:
    if not header:
        return _NO_COOKIES
    cookies: dict[str, str] = {}
    for pair in header.split(";"):
        name, equals, value = pair.partition("=")
        name = name.strip()
        if not equals or not name:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = value[1:-1]
        cookies.setdefault(name, value)
    return cookies


def _parse_query(query_string: str) -> dict[str, str]:
    query: dict[str, str] = {}
    if query_string:
        for name, value in parse_qsl(query_string, keep_blank_values=True):
            query.setdefault(name, value)
    return query


def _parse_ip(text: str) -> IPBits | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.version, int(address)


# --- the keyed choice -------------------------------------------------------------------


def version_seed(salt: str, version: str) -> int:
    """The 32-bit MurmurHash3 seed of ``version`` under ``salt``: stable across processes."""
    salt_seed = mmh3.hash(_utf8(salt), 0, False)
    return int(mmh3.hash(_utf8(version), salt_seed, False))


def hash_candidates(weights: Mapping[str, float], salt: str) -> tuple[Candidate, ...]:
    """The versions that can win by hash (weight > 0), in order, with seeds precomputed."""
    _check_weights(weights)
    return tuple(
        (name, version_seed(salt, name), 1.0 / weight)
        for name, weight in weights.items()
        if weight > 0
    )


def rendezvous(key: str, candidates: tuple[Candidate, ...]) -> str:
    """The candidate with the highest ``weight / -ln(u)``; ties go to the earlier one."""
    best_name = candidates[0][0]
    if len(candidates) == 1:
        return best_name
    # mmh3 5.x segfaults on a str holding lone surrogates, so hash bytes.
    data = key.encode("utf-8", "surrogatepass")
    best_score = -math.inf
    for name, seed, inverse_weight in candidates:
        # ln(u) / w orders the versions like w / -ln(u), without a division.
        score = math.log((_murmur3(data, seed, False) + 0.5) * _UNIT_32) * inverse_weight
        if score > best_score:
            best_name, best_score = name, score
    return best_name


def hash_version(key: str, weights: Mapping[str, float], salt: str = "") -> str:
    """The version ``key`` is routed to by the keyed split (not the hot path: seeds recomputed)."""
    return rendezvous(key, hash_candidates(weights, salt))


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _check_weights(weights: Mapping[str, float]) -> None:
    if any(not (math.isfinite(w) and w >= 0) for w in weights.values()):
        raise ValueError(f"weights must be finite and >= 0: {dict(weights)}")
    if problem := split_problem(weights):
        raise ValueError(f"{problem}: {dict(weights)}")


# --- rules ---------------------------------------------------------------------------------


def _compile_rule(rule: Rule) -> tuple[Condition, ...]:
    """The rule's conditions, cheapest first; all must hold."""
    checks: list[Condition] = []
    if rule.methods:
        checks.append(MethodIn(rule.methods))
    if rule.path_prefix is not None:
        checks.append(PathPrefix(rule.path_prefix))
    checks += (FieldTest(KeyReader("header", m.name.lower()), m) for m in rule.headers)
    checks += (FieldTest(KeyReader("cookie", m.name), m) for m in rule.cookies)
    checks += (FieldTest(KeyReader("query", m.name), m) for m in rule.query)
    if rule.sources:
        checks.append(FromSource(rule.sources))
    return tuple(checks)


# Conditions and key readers are small classes rather than closures: compiled,
# the decision calls their methods directly, with no Python call in between.


class Condition:
    """One condition of a rule."""

    def holds(self, req: RequestView) -> bool:
        raise NotImplementedError


class MethodIn(Condition):
    def __init__(self, methods: frozenset[str]) -> None:
        self.methods = methods

    def holds(self, req: RequestView) -> bool:
        return req.method in self.methods


class PathPrefix(Condition):
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def holds(self, req: RequestView) -> bool:
        return req.path.startswith(self.prefix)


class KeyReader:
    """Reads one field of a request: a header, cookie or query parameter, or the client address."""

    def __init__(self, kind: str, name: str = "") -> None:
        if kind not in ("header", "cookie", "query", "client_ip"):
            raise ValueError(f"unknown field kind: {kind!r}")
        self.kind = kind
        self.name = name

    def read(self, req: RequestView) -> str | None:
        if self.kind == "header":
            return req.headers.get(self.name)
        if self.kind == "cookie":
            return req.cookie(self.name)
        if self.kind == "query":
            return req.query_param(self.name)
        return req.client_ip


STICKY: Final = "split;key=sticky"
RANDOM: Final = "split;random"


def rule_reason(index: int, name: str | None) -> str:
    """How the decision trace names rule `index`: rule=N, or rule=N;name=NAME."""
    return f"rule={index}" if name is None else f"rule={index};name={name}"


def with_fallback(reason: str, fallback: str) -> str:
    """The decision trace of a request that the fallback version served."""
    return f"{reason};fallback={fallback}"


def _key_name(source: HashSource) -> str:
    """How the decision trace names a key's source: header:x-user-id, cookie:NAME, client_ip."""
    if source.kind == "client_ip":
        return source.kind
    return f"{source.kind}:{_key_reader(source).name}"


def _key_reader(source: HashSource) -> KeyReader:
    name = source.name.lower() if source.kind == "header" else source.name
    return KeyReader(source.kind, name)


class FieldTest(Condition):
    """A field's value: equal to a string, matching a regex, or present."""

    def __init__(self, field: KeyReader, match: FieldMatch) -> None:
        if match.regex is None and match.value is None and not match.present:
            raise ValueError(f"condition on {match.name!r}: expected one of value, regex, present")
        self.field = field
        self.value = match.value
        self.regex = match.regex
        self._verdicts: dict[str, bool] = {}  # value -> regex found in it

    def holds(self, req: RequestView) -> bool:
        value = self.field.read(req)
        if value is None:
            return False
        if self.regex is not None:
            return self._search(value)
        if self.value is not None:
            return value == self.value
        return True  # present

    def _search(self, value: str) -> bool:
        found = self._verdicts.get(value)
        if found is None:
            assert self.regex is not None
            found = self.regex.search(value) is not None
            if len(value) <= REGEX_CACHE_VALUE:
                if len(self._verdicts) >= REGEX_CACHE_SIZE:  # many distinct values: start over
                    self._verdicts.clear()
                self._verdicts[value] = found
        return found


class FromSource(Condition):
    def __init__(self, networks: tuple[IPNetwork, ...]) -> None:
        # Plain int masks: `address in network` costs ~1 us per network in ipaddress.
        self.masks: dict[int, tuple[tuple[int, int], ...]] = {
            version: tuple(
                (int(n.network_address), int(n.netmask)) for n in networks if n.version == version
            )
            for version in (4, 6)
        }

    def holds(self, req: RequestView) -> bool:
        bits = req.client_bits()
        if bits is None:
            return False
        version, address = bits
        return any(address & mask == network for network, mask in self.masks[version])


# --- one service --------------------------------------------------------------------------


class ServiceRouter:
    """Decides the version of one service for a request; immutable once built."""

    __slots__ = (
        "_candidates",
        "_cookie_prefix",
        "_cookie_suffix",
        "_draw_cumulative",
        "_draw_last",
        "_draw_names",
        "_keys",
        "_rules",
        "_sticky",
        "service",
    )

    def __init__(self, service: Service) -> None:
        split = service.split
        weights = {v.name: split.weights.get(v.name, 0.0) for v in service.versions}
        unknown = (set(split.weights) | {r.version for r in service.rules}) - set(weights)
        if unknown:
            raise ValueError(f"service {service.name}: unknown versions {sorted(unknown)}")
        self.service = service
        self._rules = tuple(
            (_compile_rule(rule), rule.version, rule_reason(index, rule.name))
            for index, rule in enumerate(service.rules)
        )
        self._candidates = hash_candidates(weights, split.salt)
        positive = {name: w for name, w in weights.items() if w > 0}
        self._draw_names = tuple(positive)
        self._draw_cumulative = tuple(accumulate(positive.values()))
        self._draw_last = len(positive) - 1
        keys = [(_key_reader(source), f"split;key={_key_name(source)}") for source in split.hash_on]
        sticky = split.sticky_cookie
        self._sticky = sticky is not None
        self._cookie_prefix = self._cookie_suffix = ""
        if sticky is not None:
            keys.append((KeyReader("cookie", sticky.name), STICKY))
            self._cookie_prefix = f"{sticky.name}="
            max_age = "" if sticky.max_age is None else f"; Max-Age={sticky.max_age}"
            self._cookie_suffix = f"; Path=/{max_age}; HttpOnly; SameSite=Lax"
        self._keys = tuple(keys)  # where a key may be read, and the reason each gives

    def decide(self, req: RequestView) -> tuple[str, str | None, str]:
        """(version, Set-Cookie value to add to the response or None, why):
        why is what the decision trace shows (rule=N[;name=NAME],
        split;key=SOURCE, split;random)."""
        for checks, version, reason in self._rules:
            for check in checks:
                if not check.holds(req):
                    break
            else:
                return version, None, reason
        for reader, reason in self._keys:
            key = reader.read(req)
            if key:
                return rendezvous(key, self._candidates), None, reason
        if self._sticky:
            key = getrandbits(64).to_bytes(8, "big").hex()
            cookie = self._cookie_prefix + key + self._cookie_suffix
            return rendezvous(key, self._candidates), cookie, STICKY
        return self._draw(), None, RANDOM

    def _draw(self) -> str:
        cumulative = self._draw_cumulative
        index = bisect_right(cumulative, random() * cumulative[-1])
        # random() * total can round up to total itself.
        return self._draw_names[index if index <= self._draw_last else self._draw_last]

    def __repr__(self) -> str:
        weights = {name: 1.0 / inverse for name, _, inverse in self._candidates}
        return f"<ServiceRouter {self.service.name} rules={len(self._rules)} weights={weights}>"


# --- all services ---------------------------------------------------------------------------


class Router:
    """Picks the service of a request by Host and path prefix; the first matching one wins.

    Exact hosts and ``*.suffix`` wildcards are indexed by dict, so a lookup costs
    O(labels in the host + services sharing that host), not O(services).
    """

    __slots__ = ("_any_host", "_by_host", "_by_name", "_exact", "_suffix", "services")

    def __init__(self, services: Sequence[Service]) -> None:
        self.services = tuple(ServiceRouter(service) for service in services)
        self._by_name = {router.service.name: router for router in self.services}
        exact: dict[str, list[_Route]] = {}
        suffix: dict[str, list[_Route]] = {}
        any_host: list[_Route] = []
        for order, router in enumerate(self.services):
            match = router.service.match
            host = normalize_host(match.host)
            route = (order, match.path_prefix, router)
            if host == "*":
                any_host.append(route)
            elif host.startswith("*."):
                suffix.setdefault(host[1:], []).append(route)
            else:
                exact.setdefault(host, []).append(route)
        self._exact = {host: tuple(routes) for host, routes in exact.items()}
        self._suffix = {host: tuple(routes) for host, routes in suffix.items()}
        self._any_host = tuple(any_host)
        # Raw Host value -> the routes that can serve it, in config order.
        self._by_host: dict[str, tuple[_Route, ...]] = {}

    def match(self, host: str, path: str) -> ServiceRouter | None:
        """The first service whose host and path prefix match, or None."""
        routes = self._by_host.get(host)
        if routes is None:
            routes = self._routes_for(normalize_host(host))
            if len(self._by_host) >= HOST_CACHE_SIZE:  # many distinct Hosts: start over
                self._by_host.clear()
            self._by_host[host] = routes
        for _, prefix, router in routes:
            if path.startswith(prefix):
                return router
        return None

    def _routes_for(self, host: str) -> tuple[_Route, ...]:
        routes = list(self._exact.get(host, ()))
        dot = host.find(".", 1)  # "*.example.com" needs a non-empty label before the dot
        while dot != -1 and self._suffix:
            routes.extend(self._suffix.get(host[dot:], ()))
            dot = host.find(".", dot + 1)
        routes.extend(self._any_host)
        routes.sort(key=lambda route: route[0])
        return tuple(routes)

    def service(self, name: str) -> ServiceRouter:
        """The router of service ``name``; KeyError if unknown."""
        return self._by_name[name]

    def __repr__(self) -> str:
        return f"<Router services={[router.service.name for router in self.services]}>"


def normalize_host(host: str) -> str:
    """A Host value without port, brackets or trailing dot, lower-case: "[::1]:80" -> "::1"."""
    if ":" in host:
        if host.startswith("["):
            host = host[1:].partition("]")[0]
        elif host.count(":") == 1:
            host = host.partition(":")[0]
    return host.rstrip(".").lower()
