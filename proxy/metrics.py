"""Per-version request statistics: plain counters on the hot path, Prometheus text on scrape.

The data plane calls ``VersionStats`` once per finished request: plain int and
float arithmetic, no locks (each worker runs one event loop), no
prometheus_client call. ``Metrics.render`` builds the exposition at scrape time
with a custom collector that reads those counters.

Every raw counter is a plain int, list or dict, and the one-minute window is
keyed by whole seconds of the system-wide monotonic clock, so counters of
several worker processes on one host can be summed slot by slot.

A release's checks need the requests that finished in exactly one interval
(say 200 ms): they come from lifetime counters read twice, ``cumulative()``
at the interval's start and end, and ``between`` the two readings. The
latency histogram this needs (``latency_counts``, on the window's 5 % buckets)
costs ``observe`` one list increment.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate
from operator import add
from typing import TYPE_CHECKING, Final, NamedTuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.config import Address, Config

if TYPE_CHECKING:
    from proxy.state import Snapshot

Clock = Callable[[], float]
# (service, version, endpoint) -> in rotation; the control API's source of health.
EndpointHealth = Callable[[str, str, Address], bool]

# Bucket upper bounds (seconds) of grayproxy_request_duration_seconds: the
# prometheus_client defaults plus 1 ms and 2.5 ms for fast upstreams.
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,
    0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
UPSTREAM_ERROR_KINDS: Final = ("connect", "timeout", "reset")
# How a mirrored request ended: the shadow answered the primary's status or
# another one, failed, or was not sent (see proxy/mirror.py).
MIRROR_OUTCOMES: Final = ("match", "mismatch", "error", "skipped")
WINDOW_SECONDS: Final = 60


_WINDOW_LOW: Final = 0.00005
_WINDOW_STEP: Final = 1.05


def _log_spaced(low: float, high: float, step: float) -> tuple[float, ...]:
    bounds = [low]
    while bounds[-1] < high:
        bounds.append(bounds[-1] * step)
    return tuple(bounds)


# Upper bounds (seconds) of the window's latency buckets: 5 % steps from
# 0.05 ms to 60 s, so a reported p50/p99 is at most 5 % above the true value.
WINDOW_BOUNDS: Final = _log_spaced(_WINDOW_LOW, 60.0, _WINDOW_STEP)
_WINDOW_BUCKETS: Final = len(WINDOW_BOUNDS) + 1  # the last one holds everything slower than 60 s
_PER_LOG_STEP: Final = 1 / math.log(_WINDOW_STEP)


def window_bucket(seconds: float) -> int:
    """bisect_left(WINDOW_BOUNDS, seconds), from a logarithm instead of a search
    (the bounds are log-spaced); the two loops mend float rounding at a bound."""
    if seconds <= _WINDOW_LOW:
        return 0
    last = _WINDOW_BUCKETS - 1
    bucket = min(int(math.log(seconds / _WINDOW_LOW) * _PER_LOG_STEP), last)
    while bucket < last and WINDOW_BOUNDS[bucket] < seconds:
        bucket += 1
    while bucket > 0 and WINDOW_BOUNDS[bucket - 1] >= seconds:
        bucket -= 1
    return bucket


def _duration_tables() -> tuple[list[int], list[int]]:
    """For each window bucket: how many DURATION_BUCKETS bounds lie wholly below it,
    and which bound lies inside it (-1: none; window steps are finer than the bounds')."""
    below = [0] * _WINDOW_BUCKETS
    inside = [-1] * _WINDOW_BUCKETS
    for index, bound in enumerate(DURATION_BUCKETS):
        inside[window_bucket(bound)] = index
    for bucket in range(1, _WINDOW_BUCKETS):
        below[bucket] = below[bucket - 1] + (inside[bucket - 1] >= 0)
    return below, inside


_DURATION_TABLES: Final = _duration_tables()
_DURATION_BELOW: Final = _DURATION_TABLES[0]
_DURATION_INSIDE: Final = _DURATION_TABLES[1]


def duration_bucket(seconds: float, window: int) -> int:
    """bisect_left(DURATION_BUCKETS, seconds), given window_bucket(seconds)."""
    inside = _DURATION_INSIDE[window]
    return _DURATION_BELOW[window] + (inside >= 0 and DURATION_BUCKETS[inside] < seconds)


class Cumulative(NamedTuple):
    """A version's lifetime counts at one moment: what ``between`` subtracts."""

    requests: int
    errors: int  # 5xx, upstream failures included (the client got 502/504)
    latency_counts: tuple[int, ...]


class IntervalStats(NamedTuple):
    """The requests a version finished between two Cumulative readings."""

    requests: int
    errors: int
    p99_ms: float  # 0.0 without requests


def between(before: Cumulative, after: Cumulative) -> IntervalStats:
    """What finished after ``before`` up to ``after`` (the same version, read twice). A
    count that went down (the reader's counters were rebuilt) counts as nothing new."""
    pairs = zip(after.latency_counts, before.latency_counts, strict=True)
    latency = [max(0, later - earlier) for later, earlier in pairs]
    return IntervalStats(
        requests=max(0, after.requests - before.requests),
        errors=max(0, after.errors - before.errors),
        p99_ms=_quantile_ms(list(accumulate(latency)), 0.99),
    )


class StatsDump(NamedTuple):
    """Every counter of a VersionStats as plain values: picklable (a worker sends its own to
    the supervisor), and summed by VersionStats.absorb."""

    codes: dict[int, int]
    duration_buckets: list[int]
    duration_sum: float
    upstream_errors: dict[str, int]
    fallbacks: int
    # The window's ring, slot by slot: the second each holds, and its counts.
    slot_seconds: list[int]
    slot_requests: list[int]
    slot_errors: list[int]
    slot_latency: list[list[int]]
    latency_counts: list[int]
    mirror: MirrorDump | None = None  # this version's shadow traffic, if any


class MirrorDump(NamedTuple):
    """A MirrorStats as plain values (see StatsDump)."""

    outcomes: dict[str, int]
    primary: StatsDump
    shadow: StatsDump


class VersionStats:
    """Counters of one (service, version): lifetime totals and a 60 x 1 s ring (last minute)."""

    __slots__ = (
        "_clock",
        "_slot_errors",
        "_slot_latency",
        "_slot_requests",
        "_slot_second",
        "codes",
        "duration_buckets",
        "duration_sum",
        "fallbacks",
        "latency_counts",
        "mirror",
        "upstream_errors",
    )

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.codes: dict[int, int] = {}  # status code -> finished requests
        # Per DURATION_BUCKETS bound, plus a last +Inf bucket; not cumulative.
        self.duration_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.upstream_errors = dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)
        self.fallbacks = 0
        # Lifetime requests per window bucket (WINDOW_BOUNDS, then slower than 60 s).
        self.latency_counts = [0] * _WINDOW_BUCKETS
        self._slot_second = [-1] * WINDOW_SECONDS  # which whole monotonic second a slot holds
        self._slot_requests = [0] * WINDOW_SECONDS
        self._slot_errors = [0] * WINDOW_SECONDS
        # Allocated when a slot is first used, so idle versions stay small.
        self._slot_latency: list[list[int]] = [[] for _ in range(WINDOW_SECONDS)]
        self.mirror: MirrorStats | None = None  # created when this version is a mirror's shadow

    def __repr__(self) -> str:
        window = self.window()
        return (
            f"<VersionStats [total: {sum(self.codes.values())} | last minute: "
            f"{window['requests']} requests, {window['errors']} errors]>"
        )

    def observe(self, status: int, seconds: float, now: float | None = None) -> None:
        """Count one finished request: the status the client got and its
        duration; `now` is the clock's reading if the caller has it already."""
        codes = self.codes
        codes[status] = codes.get(status, 0) + 1
        window = window_bucket(seconds)
        self.latency_counts[window] += 1
        self.duration_buckets[duration_bucket(seconds, window)] += 1
        self.duration_sum += seconds
        second = int(self._clock() if now is None else now)
        slot = second % WINDOW_SECONDS
        if self._slot_second[slot] != second:
            self._start_slot(slot, second)
        self._slot_requests[slot] += 1
        if status >= 500:
            self._slot_errors[slot] += 1
        self._slot_latency[slot][window] += 1

    def upstream_error(self, kind: str) -> None:
        """Count an upstream failure: "connect", "timeout", "reset" (or another fixed kind).

        The request itself is counted by ``observe`` with the status the client
        got (502/504), which is what makes it an error in the window.
        """
        errors = self.upstream_errors
        errors[kind] = errors.get(kind, 0) + 1

    def fallback(self) -> None:
        """Count a request sent to the fallback because this version had no healthy endpoint."""
        self.fallbacks += 1

    def window(self) -> dict[str, float | int]:
        """The last 60 s: requests, errors (5xx), error_rate, p50_ms, p99_ms (0.0 when idle)."""
        oldest = int(self._clock()) - WINDOW_SECONDS + 1
        requests = errors = 0
        latency = [0] * _WINDOW_BUCKETS
        for slot, second in enumerate(self._slot_second):
            if second >= oldest:
                requests += self._slot_requests[slot]
                errors += self._slot_errors[slot]
                latency = list(map(add, latency, self._slot_latency[slot]))
        cumulative = list(accumulate(latency))
        return {
            "requests": requests,
            "errors": errors,
            "error_rate": round(errors / requests, 4) if requests else 0.0,
            "p50_ms": _quantile_ms(cumulative, 0.50),
            "p99_ms": _quantile_ms(cumulative, 0.99),
        }

    def cumulative(self) -> Cumulative:
        """The lifetime counts now; ``between`` two of them is one interval's requests."""
        codes = self.codes
        return Cumulative(
            requests=sum(codes.values()),
            errors=sum(count for code, count in codes.items() if code >= 500),
            latency_counts=tuple(self.latency_counts),
        )

    def dump(self) -> StatsDump:
        """Every counter as plain values, to be summed into another process's stats."""
        return StatsDump(
            codes=dict(self.codes),
            duration_buckets=list(self.duration_buckets),
            duration_sum=self.duration_sum,
            upstream_errors=dict(self.upstream_errors),
            fallbacks=self.fallbacks,
            slot_seconds=list(self._slot_second),
            slot_requests=list(self._slot_requests),
            slot_errors=list(self._slot_errors),
            slot_latency=[list(latency) for latency in self._slot_latency],
            latency_counts=list(self.latency_counts),
            mirror=self.mirror.dump() if self.mirror is not None else None,
        )

    def absorb(self, dump: StatsDump) -> None:
        """Add the counters of ``dump`` (another worker's) to these."""
        for code, count in dump.codes.items():
            self.codes[code] = self.codes.get(code, 0) + count
        self.duration_buckets = list(map(add, self.duration_buckets, dump.duration_buckets))
        self.duration_sum += dump.duration_sum
        for kind, count in dump.upstream_errors.items():
            self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + count
        self.fallbacks += dump.fallbacks
        self.latency_counts = list(map(add, self.latency_counts, dump.latency_counts))
        self._absorb_window(dump)
        if dump.mirror is not None:
            if self.mirror is None:
                self.mirror = MirrorStats(self._clock)
            self.mirror.absorb(dump.mirror)

    def _absorb_window(self, dump: StatsDump) -> None:
        requests, errors, latencies = dump.slot_requests, dump.slot_errors, dump.slot_latency
        for slot, second in enumerate(dump.slot_seconds):
            if second < self._slot_second[slot] or not latencies[slot]:
                continue  # older than what this slot holds, or never used
            if second > self._slot_second[slot]:
                self._start_slot(slot, second)
            self._slot_requests[slot] += requests[slot]
            self._slot_errors[slot] += errors[slot]
            self._slot_latency[slot] = list(map(add, self._slot_latency[slot], latencies[slot]))

    def _start_slot(self, slot: int, second: int) -> None:
        """The ring moved on: `slot` now counts `second`."""
        self._slot_second[slot] = second
        self._slot_requests[slot] = 0
        self._slot_errors[slot] = 0
        self._slot_latency[slot] = [0] * _WINDOW_BUCKETS


class MirrorStats:
    """The shadow traffic sent to one version: how each mirrored request ended
    (lifetime counts by outcome), and the latencies of both sides (the last
    minute, in VersionStats windows: the primary's for every request that was
    mirrored, the shadow's for every shadow that answered)."""

    __slots__ = ("outcomes", "primary", "shadow")

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.outcomes = dict.fromkeys(MIRROR_OUTCOMES, 0)
        self.primary = VersionStats(clock)
        self.shadow = VersionStats(clock)

    def __repr__(self) -> str:
        counts = " ".join(f"{name}={count}" for name, count in self.outcomes.items())
        return f"<MirrorStats [{counts}]>"

    def count(self, outcome: str) -> None:
        """One request ended with `outcome` (one of MIRROR_OUTCOMES)."""
        self.outcomes[outcome] += 1

    def observe(self, status: int, seconds: float, now: float) -> None:
        """A shadow answered `status` after `seconds`."""
        self.shadow.observe(status, seconds, now)

    def observe_primary(self, status: int, seconds: float, now: float) -> None:
        """The primary of a mirrored request answered `status` after `seconds`."""
        self.primary.observe(status, seconds, now)

    def summary(self) -> dict[str, float | int]:
        """The service JSON's mirror stats: lifetime counts, last-minute latencies."""
        outcomes = self.outcomes
        primary = self.primary.window()
        shadow = self.shadow.window()
        return {
            "mirrored": outcomes["match"] + outcomes["mismatch"] + outcomes["error"],
            **outcomes,
            "primary_p50_ms": primary["p50_ms"],
            "shadow_p50_ms": shadow["p50_ms"],
            "shadow_p99_ms": shadow["p99_ms"],
        }

    def dump(self) -> MirrorDump:
        return MirrorDump(dict(self.outcomes), self.primary.dump(), self.shadow.dump())

    def absorb(self, dump: MirrorDump) -> None:
        for outcome, count in dump.outcomes.items():
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + count
        self.primary.absorb(dump.primary)
        self.shadow.absorb(dump.shadow)


def _quantile_ms(cumulative: list[int], q: float) -> float:
    """The upper bound, in ms, of the bucket holding the q-quantile."""
    total = cumulative[-1]
    if not total:
        return 0.0
    bucket = bisect_left(cumulative, q * total)
    return round(WINDOW_BOUNDS[min(bucket, len(WINDOW_BOUNDS) - 1)] * 1000, 3)


class Metrics:
    """All VersionStats of a worker, kept across reloads (counters never go backwards)."""

    __slots__ = ("_clock", "_collectors", "_stats")

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._stats: dict[tuple[str, str], VersionStats] = {}
        self._collectors: list[Collector] = []

    def __repr__(self) -> str:
        return f"<Metrics [{len(self._stats)} versions]>"

    def version(self, service: str, version: str) -> VersionStats:
        """The stats of one version, created on first use."""
        key = (service, version)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = VersionStats(self._clock)
        return stats

    def mirror(self, service: str, version: str) -> MirrorStats:
        """The stats of the shadow traffic to one version, created on first use."""
        stats = self.version(service, version)
        if stats.mirror is None:
            stats.mirror = MirrorStats(self._clock)
        return stats.mirror

    def dump(self) -> dict[tuple[str, str], StatsDump]:
        return {key: stats.dump() for key, stats in self._stats.items()}

    def absorb(self, dumps: dict[tuple[str, str], StatsDump]) -> None:
        for (service, version), dump in dumps.items():
            self.version(service, version).absorb(dump)

    def clear(self) -> None:
        self._stats = {}

    def add_collector(self, collector: Collector) -> None:
        """Render ``collector``'s families with every scrape too (the releases' state)."""
        self._collectors.append(collector)

    def render(self, snapshot: Snapshot, endpoint_health: EndpointHealth | None = None) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every version's counters,
        and of every endpoint's health if ``endpoint_health`` is given."""
        for service in snapshot.config.services:
            for version in service.versions:
                self.version(service.name, version.name)
            if service.mirror is not None:
                self.mirror(service.name, service.mirror.to)
        registry = CollectorRegistry()
        registry.register(_ScrapeCollector(self._stats, snapshot.config, endpoint_health))
        for collector in self._collectors:
            registry.register(collector)
        return generate_latest(registry)


class _ScrapeCollector(Collector):
    """Reads the plain counters (and the weights of the live config) once per scrape."""

    def __init__(
        self,
        stats: dict[tuple[str, str], VersionStats],
        config: Config,
        endpoint_health: EndpointHealth | None,
    ) -> None:
        self._stats = stats
        self._config = config
        self._endpoint_health = endpoint_health

    def collect(self) -> Iterable[Metric]:
        labels = ("service", "version")
        requests = CounterMetricFamily(
            "grayproxy_requests_total", "Finished requests.", labels=(*labels, "code")
        )
        durations = HistogramMetricFamily(
            "grayproxy_request_duration_seconds", "Request duration in seconds.", labels=labels
        )
        upstream_errors = CounterMetricFamily(
            "grayproxy_upstream_errors_total", "Upstream failures.", labels=(*labels, "kind")
        )
        fallbacks = CounterMetricFamily(
            "grayproxy_fallback_total",
            "Requests sent to the fallback because the version had no healthy endpoint.",
            labels=labels,
        )
        for (service, version), stats in sorted(self._stats.items()):
            for code, count in sorted(stats.codes.items()):
                requests.add_metric([service, version, str(code)], count)
            durations.add_metric(
                [service, version],
                buckets=_cumulative_buckets(stats.duration_buckets),
                sum_value=stats.duration_sum,
            )
            for kind, count in stats.upstream_errors.items():
                upstream_errors.add_metric([service, version, kind], count)
            fallbacks.add_metric([service, version], stats.fallbacks)
        families = [requests, durations, upstream_errors, fallbacks, self._weights()]
        families += self._mirrors()
        if self._endpoint_health is not None:
            families.append(self._endpoints_healthy(self._endpoint_health))
        return families

    def _weights(self) -> GaugeMetricFamily:
        weights = GaugeMetricFamily(
            "grayproxy_weight",
            "The version's share of the weighted split, in percent.",
            labels=("service", "version"),
        )
        for service in self._config.services:
            total = sum(service.split.weights.values())
            for version, weight in service.split.weights.items():
                weights.add_metric([service.name, version], 100 * weight / total if total else 0.0)
        return weights

    def _mirrors(self) -> list[Metric]:
        mirrors = CounterMetricFamily(
            "grayproxy_mirror_total",
            "Mirrored requests by outcome (version: the shadow's).",
            labels=("service", "version", "outcome"),
        )
        durations = HistogramMetricFamily(
            "grayproxy_mirror_duration_seconds",
            "Duration of the shadow requests that were answered, in seconds.",
            labels=("service", "version"),
        )
        for (service, version), stats in sorted(self._stats.items()):
            mirror = stats.mirror
            if mirror is None:
                continue
            for outcome, count in mirror.outcomes.items():
                mirrors.add_metric([service, version, outcome], count)
            durations.add_metric(
                [service, version],
                buckets=_cumulative_buckets(mirror.shadow.duration_buckets),
                sum_value=mirror.shadow.duration_sum,
            )
        return [mirrors, durations]

    def _endpoints_healthy(self, endpoint_health: EndpointHealth) -> GaugeMetricFamily:
        healthy = GaugeMetricFamily(
            "grayproxy_endpoint_healthy",
            "1 while the endpoint is in rotation (not ejected, passing its health checks).",
            labels=("service", "version", "endpoint"),
        )
        for service in self._config.services:
            for version in service.versions:
                for address in version.endpoints:
                    up = endpoint_health(service.name, version.name, address)
                    healthy.add_metric([service.name, version.name, str(address)], float(up))
        return healthy


def _cumulative_buckets(counts: Sequence[int]) -> list[tuple[str, float]]:
    bounds = [repr(bound) for bound in DURATION_BUCKETS] + ["+Inf"]
    return list(zip(bounds, accumulate(counts), strict=True))
