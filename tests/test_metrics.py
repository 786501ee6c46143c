"""Per-version counters, the one-minute window and the Prometheus exposition."""

from __future__ import annotations

import math
import pickle
import random
from bisect import bisect_left

from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Address, Config, Service, Split, Version
from proxy.metrics import (
    DURATION_BUCKETS,
    WINDOW_BOUNDS,
    Cumulative,
    IntervalStats,
    Metrics,
    StatsDump,
    VersionStats,
    between,
    duration_bucket,
    window_bucket,
)
from proxy.routing import Router
from proxy.state import Snapshot


class FakeClock:
    """Monotonic seconds that a test moves by hand (the window spans a real minute)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def snapshot_of(weights: dict[str, float]) -> Snapshot:
    versions = tuple(
        Version(name, (Address("127.0.0.1", 9000 + i),)) for i, name in enumerate(weights)
    )
    service = Service("web", versions, Split(weights=weights), baseline=versions[0].name)
    config = Config(services=(service,))
    return Snapshot(1, config, Router(config.services))


def scrape(
    metrics: Metrics, snapshot: Snapshot
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by (sample name, sorted labels)."""
    text = metrics.render(snapshot).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**pairs: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(pairs.items()))


def test_requests_are_counted_by_code() -> None:
    metrics = Metrics()
    stable = metrics.version("web", "stable")
    for status in (200, 200, 200, 503):
        stable.observe(status, 0.010)
    metrics.version("web", "canary").observe(404, 0.002)

    samples = scrape(metrics, snapshot_of({"stable": 90, "canary": 10}))

    assert (
        samples["grayproxy_requests_total", labels(service="web", version="stable", code="200")]
        == 3
    )
    assert (
        samples["grayproxy_requests_total", labels(service="web", version="stable", code="503")]
        == 1
    )
    assert (
        samples["grayproxy_requests_total", labels(service="web", version="canary", code="404")]
        == 1
    )


def test_duration_histogram_buckets_and_sum() -> None:
    metrics = Metrics()
    stats = metrics.version("web", "stable")
    for seconds in (0.0005, 0.001, 0.003, 0.2, 20.0):
        stats.observe(200, seconds)

    samples = scrape(metrics, snapshot_of({"stable": 1}))
    web = {"service": "web", "version": "stable"}

    def bucket(le: str) -> float:
        return samples["grayproxy_request_duration_seconds_bucket", labels(**web, le=le)]

    assert bucket("0.001") == 2  # an observation equal to a bound falls into it (le)
    assert bucket("0.0025") == 2
    assert bucket("0.005") == 3
    assert bucket("0.25") == 4
    assert bucket("10.0") == 4
    assert bucket("+Inf") == 5
    assert samples["grayproxy_request_duration_seconds_count", labels(**web)] == 5
    assert abs(samples["grayproxy_request_duration_seconds_sum", labels(**web)] - 20.2045) < 1e-9


def test_upstream_errors_and_fallbacks() -> None:
    metrics = Metrics()
    canary = metrics.version("web", "canary")
    canary.upstream_error("connect")
    canary.upstream_error("connect")
    canary.upstream_error("reset")
    canary.fallback()

    samples = scrape(metrics, snapshot_of({"stable": 90, "canary": 10}))

    def upstream(version: str, kind: str) -> float:
        key = labels(service="web", version=version, kind=kind)
        return samples["grayproxy_upstream_errors_total", key]

    assert upstream("canary", "connect") == 2
    assert upstream("canary", "reset") == 1
    assert upstream("canary", "timeout") == 0
    assert upstream("stable", "connect") == 0  # every configured version is exported from zero
    assert samples["grayproxy_fallback_total", labels(service="web", version="canary")] == 1
    assert samples["grayproxy_fallback_total", labels(service="web", version="stable")] == 0


def test_weight_gauge_is_the_percent_share() -> None:
    samples = scrape(Metrics(), snapshot_of({"stable": 1, "canary": 3, "idle": 0}))

    def weight(version: str) -> float:
        return samples["grayproxy_weight", labels(service="web", version=version)]

    assert weight("stable") == 25.0
    assert weight("canary") == 75.0
    assert weight("idle") == 0.0


def test_exposition_format_names_and_types() -> None:
    metrics = Metrics()
    metrics.version("web", "stable").observe(200, 0.01)
    text = metrics.render(snapshot_of({"stable": 1})).decode()

    assert "# TYPE grayproxy_requests_total counter" in text
    assert "# TYPE grayproxy_request_duration_seconds histogram" in text
    assert "# TYPE grayproxy_upstream_errors_total counter" in text
    assert "# TYPE grayproxy_fallback_total counter" in text
    assert "# TYPE grayproxy_weight gauge" in text


def test_stats_are_kept_per_version_across_snapshots() -> None:
    metrics = Metrics()
    stats = metrics.version("web", "canary")
    stats.observe(200, 0.01)
    assert metrics.version("web", "canary") is stats
    # The canary left the config (a reload): its counters stay, never going backwards.
    samples = scrape(metrics, snapshot_of({"stable": 1}))
    assert (
        samples["grayproxy_requests_total", labels(service="web", version="canary", code="200")]
        == 1
    )
    assert ("grayproxy_weight", labels(service="web", version="canary")) not in samples


def test_window_quantiles_are_within_five_percent() -> None:
    stats = VersionStats()
    for ms in range(1, 101):
        stats.observe(200, ms / 1000)

    window = stats.window()

    assert window["requests"] == 100
    assert window["errors"] == 0
    assert window["error_rate"] == 0.0
    assert 50.0 <= window["p50_ms"] <= 50.0 * 1.05
    assert 99.0 <= window["p99_ms"] <= 99.0 * 1.05


def test_window_counts_5xx_as_errors() -> None:
    stats = VersionStats()
    for status in (200, 200, 200, 404, 500, 502, 504, 200):
        stats.observe(status, 0.001)

    window = stats.window()

    assert window["requests"] == 8
    assert window["errors"] == 3
    assert window["error_rate"] == 0.375


def test_window_of_an_idle_version_is_zero() -> None:
    assert VersionStats().window() == {
        "requests": 0,
        "errors": 0,
        "error_rate": 0.0,
        "p50_ms": 0.0,
        "p99_ms": 0.0,
    }


def test_window_extremes_stay_in_range() -> None:
    stats = VersionStats()
    stats.observe(200, 0.0)
    stats.observe(200, 600.0)  # slower than the last bound
    window = stats.window()
    assert window["p50_ms"] == round(WINDOW_BOUNDS[0] * 1000, 3)
    assert window["p99_ms"] == round(WINDOW_BOUNDS[-1] * 1000, 3)


def test_window_forgets_requests_older_than_a_minute() -> None:
    clock = FakeClock(1000.0)
    stats = VersionStats(clock)
    stats.observe(500, 0.100)  # at 1000 s
    clock.now = 1030.5
    stats.observe(200, 0.010)
    stats.observe(200, 0.010)

    clock.now = 1059.9  # both seconds still inside the last minute
    assert stats.window()["requests"] == 3
    clock.now = 1060.0  # second 1000 has left the window
    window = stats.window()
    assert (window["requests"], window["errors"]) == (2, 0)
    assert window["p99_ms"] < 11

    stats.observe(200, 0.020)  # reuses the slot of second 1000, which must start empty
    assert stats.window()["requests"] == 3
    clock.now = 1200.0
    assert stats.window()["requests"] == 0
    # Lifetime counters are not windowed.
    assert sum(stats.codes.values()) == 4


def test_repr_shows_live_counts() -> None:
    stats = VersionStats()
    stats.observe(502, 0.01)
    assert repr(stats) == "<VersionStats [total: 1 | last minute: 1 requests, 1 errors]>"


def test_buckets_are_the_bisection_of_the_bounds() -> None:
    bounds = (*WINDOW_BOUNDS, *DURATION_BUCKETS)
    edges = [b for bound in bounds for b in (bound, math.nextafter(bound, 0), bound * 1.01)]
    values = [0.0, 1e-9, 30.0, 59.99, 60.0, 61.0, 3600.0, *edges]
    values += [random.Random(seed).uniform(0, 70) for seed in range(2000)]
    for seconds in values:
        window = window_bucket(seconds)
        assert window == bisect_left(WINDOW_BOUNDS, seconds), seconds
        assert duration_bucket(seconds, window) == bisect_left(DURATION_BUCKETS, seconds), seconds


def test_a_dump_survives_pickling_and_sums_into_another_workers_stats() -> None:
    clock = FakeClock()
    mine, theirs = VersionStats(clock), VersionStats(clock)
    mine.observe(200, 0.004)
    theirs.observe(200, 0.004)
    theirs.observe(502, 0.2)
    theirs.upstream_error("connect")
    theirs.fallback()
    dump = pickle.loads(pickle.dumps(theirs.dump()))
    assert isinstance(dump, StatsDump)
    assert dump.codes == {200: 1, 502: 1}
    assert dump.fallbacks == 1
    mine.absorb(dump)
    assert mine.codes == {200: 2, 502: 1}
    assert mine.upstream_errors["connect"] == 1
    assert mine.fallbacks == 1
    assert mine.duration_sum == 0.004 + 0.004 + 0.2
    assert sum(mine.duration_buckets) == 3
    window = mine.window()
    assert (window["requests"], window["errors"]) == (3, 1)


def test_an_older_dump_does_not_overwrite_a_newer_window_slot() -> None:
    clock = FakeClock()
    old, new = VersionStats(clock), VersionStats(clock)
    old.observe(500, 0.01)
    clock.now += 60  # the same slot of the ring, one minute later
    new.observe(200, 0.01)
    new.absorb(old.dump())
    window = new.window()
    assert (window["requests"], window["errors"]) == (1, 0)
    old.absorb(new.dump())  # the newer second takes the slot over
    window = old.window()
    assert (window["requests"], window["errors"]) == (1, 0)


def test_an_interval_counts_only_the_requests_that_finished_in_it() -> None:
    stats = VersionStats(FakeClock())
    for _ in range(50):
        stats.observe(200, 0.5)  # slow, but before the interval
    start = stats.cumulative()
    for _ in range(97):
        stats.observe(200, 0.002)
    stats.observe(404, 0.002)  # a 4xx is a request, not an error
    stats.observe(502, 0.010)  # an upstream failure, as the client got it
    stats.observe(504, 0.010)
    end = stats.cumulative()
    interval = between(start, end)
    assert (interval.requests, interval.errors) == (100, 2)
    # The 99th of 100 requests is one of the two at 10 ms (within the 5 % bucket step).
    assert 10.0 <= interval.p99_ms <= 10.5
    assert between(end, end) == IntervalStats(0, 0, 0.0)
    assert end.requests == 150 and end.errors == 2


def test_the_p99_of_an_interval_is_the_bucket_bound_holding_it() -> None:
    stats = VersionStats(FakeClock())
    start = stats.cumulative()
    latencies = [random.uniform(0.001, 0.050) for _ in range(1000)]
    for seconds in latencies:
        stats.observe(200, seconds)
    p99 = sorted(latencies)[989] * 1000
    assert p99 <= between(start, stats.cumulative()).p99_ms <= p99 * 1.05 + 1e-9


def test_counts_that_went_down_count_as_nothing_new() -> None:
    before = Cumulative(10, 3, (5, 5))
    after = Cumulative(4, 1, (2, 2))  # e.g. a reader whose counters were rebuilt
    assert between(before, after) == IntervalStats(0, 0, 0.0)


def test_lifetime_latency_counts_sum_over_workers() -> None:
    clock = FakeClock()
    mine, theirs = VersionStats(clock), VersionStats(clock)
    start = mine.cumulative()
    mine.observe(200, 0.001)
    theirs.observe(500, 0.3)
    dump = pickle.loads(pickle.dumps(theirs.dump()))
    assert sum(dump.latency_counts) == 1
    mine.absorb(dump)
    interval = between(start, mine.cumulative())
    assert (interval.requests, interval.errors) == (2, 1)
    assert 300.0 <= interval.p99_ms <= 315.0
    assert sum(mine.latency_counts) == 2
