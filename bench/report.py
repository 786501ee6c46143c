# ruff: noqa: RUF001  (the multiplication and minus signs are meant: output for people)
"""Medians, ratios and their presentation: a Markdown table, a JSON file, a PNG chart.

Every comparing figure is a ratio against a reference measured in the same run: nginx and
the upstream directly for the side-by-side table, the 1-service/1-endpoint/1-rule grayproxy
for the scaling series. Throughput and CPU ratios are medians of per-round ratios: each
round's figure over the reference's in that round, measured seconds apart (the machine
slows down for seconds at a time, which such a pair shares).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.runner import Metrics, Target

Row = dict[str, Any]

# What every landing must hold, against nginx on one pinned core in the same run
MIN_RPS_VS_NGINX = 0.75
MAX_CPU_VS_NGINX = 1.35
MAX_ADDED_OVER_NGINX_MS = 0.1
MAX_RSS_MB = 60.0
# Each grayproxy target's (least req/s, most CPU per request) against its reference
# (None: no target): the minimal heads, the realistic heads (issue 16), with the
# JSON access log on, HTTPS.
GOALS: dict[str, tuple[float, float | None]] = {
    "grayproxy": (MIN_RPS_VS_NGINX, MAX_CPU_VS_NGINX),
    "grayproxy-realistic": (0.9, 1.2),
    "grayproxy-log-realistic": (0.8, None),
    "grayproxy-https": (0.8, None),
}


def median_of(rounds: Sequence[Metrics], key: str) -> float | None:
    values = [value for metrics in rounds if (value := metrics.get(key)) is not None]
    return statistics.median(values) if values else None


def total_of(rounds: Sequence[Metrics], key: str) -> int:
    return int(sum(metrics.get(key) or 0 for metrics in rounds))


def paired_ratio(rounds: Sequence[Metrics], reference: Sequence[Metrics], key: str) -> float | None:
    """The median over rounds of `key` against the reference's in the same round."""
    by_round = {metrics.get("round"): metrics.get(key) for metrics in reference}
    ratios = [
        value / base
        for metrics in rounds
        if (value := metrics.get(key)) is not None and (base := by_round.get(metrics.get("round")))
    ]
    return statistics.median(ratios) if ratios else None


def difference(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def medians(target: Target) -> Row:
    """A target's figures: medians over its rounds, errors summed over them."""
    rounds = target.rounds
    keys = (
        "requests_per_s",
        "p50_ms",
        "p99_ms",
        "cpu_s_per_10k",
        "proxy_busy",
        "proxy_core_busy",
        "proxy_core_irq",
        "client_core_busy",
        "canary_share",
        "probe_p50_ms",
    )
    row: Row = {"name": target.name, "rounds": len(rounds)}
    row.update({key: median_of(rounds, key) for key in keys})
    row["non_2xx"] = total_of(rounds, "non_2xx")
    row["socket_errors"] = total_of(rounds, "socket_errors")
    row["errors"] = row["non_2xx"] + row["socket_errors"]
    row["peak_rss_mb"] = target.peak_rss_mb
    row["failures"] = list(target.failures)
    return row


def main_rows(targets: Iterable[Target]) -> list[Row]:
    """The side-by-side table: each configuration's medians and its ratios to nginx (nginx-https
    for grayproxy-https: its target's reference) and direct."""
    main = [target for target in targets if target.group == "main" and target.rounds]
    rows = [medians(target) for target in main]
    by_name = {row["name"]: row for row in rows}
    rounds = {target.name: target.rounds for target in main}
    nginx, direct = by_name.get("nginx", {}), by_name.get("direct", {})
    for target, row in zip(main, rows, strict=True):
        row["reference"] = target.reference
        reference = rounds.get(target.reference, [])
        row["rps_vs_nginx"] = paired_ratio(target.rounds, reference, "requests_per_s")
        row["rps_vs_direct"] = paired_ratio(
            target.rounds, rounds.get("direct", []), "requests_per_s"
        )
        row["cpu_vs_nginx"] = paired_ratio(target.rounds, reference, "cpu_s_per_10k")
        row["added_ms"] = difference(row["probe_p50_ms"], direct.get("probe_p50_ms"))
    nginx_added = nginx.get("added_ms") if nginx else None
    for row in rows:
        row["added_vs_nginx_ms"] = difference(row["added_ms"], nginx_added)
        if row["name"] == "direct":
            row["added_ms"] = row["added_vs_nginx_ms"] = None
    return rows


def series_rows(targets: Iterable[Target]) -> list[Row]:
    """The scaling series, each with the shared baseline first and ratios against it."""
    series_targets = [target for target in targets if target.group == "series" and target.rounds]
    baseline = next((t for t in series_targets if t.series == "baseline"), None)
    if baseline is None:
        return []
    rows = []
    for series in ("services", "endpoints", "rules"):
        points = [t for t in series_targets if t.series == series]
        if not points:
            continue
        for target in (baseline, *sorted(points, key=lambda t: t.size or 0)):
            row = medians(target)
            row["series"], row["size"] = series, target.size or 1
            row["cpu_us_per_request"] = _per_request_us(row["cpu_s_per_10k"])
            row["rps_vs_base"] = paired_ratio(target.rounds, baseline.rounds, "requests_per_s")
            row["cpu_vs_base"] = paired_ratio(target.rounds, baseline.rounds, "cpu_s_per_10k")
            rows.append(row)
    return rows


def _per_request_us(cpu_s_per_10k: float | None) -> float | None:
    return None if cpu_s_per_10k is None else cpu_s_per_10k * 100


def target_checks(rows: Sequence[Row]) -> list[tuple[str, str, bool]]:
    """grayproxy's targets against their GOALS, and its latency and memory: (what,
    measured, met)."""
    by_name = {row["name"]: row for row in rows}
    checks = []
    for name, (min_rps, max_cpu) in GOALS.items():
        row = by_name.get(name)
        if row is None:
            continue
        reference = row["reference"]
        if (value := row["rps_vs_nginx"]) is not None:
            checks.append(
                (f"{name}: req/s ≥ {min_rps}× {reference}", f"{value:.2f}×", value >= min_rps)
            )
        if max_cpu is not None and (value := row["cpu_vs_nginx"]) is not None:
            checks.append(
                (
                    f"{name}: CPU per request ≤ {max_cpu}× {reference}",
                    f"{value:.2f}×",
                    value <= max_cpu,
                )
            )
    gray = by_name.get("grayproxy")
    if gray is not None and (value := gray["added_vs_nginx_ms"]) is not None:
        checks.append(
            (
                f"added p50 at a low rate within {MAX_ADDED_OVER_NGINX_MS} ms of nginx's",
                f"{value:+.3f} ms",
                value <= MAX_ADDED_OVER_NGINX_MS,
            )
        )
    if gray is not None and (value := gray["peak_rss_mb"]) is not None:
        checks.append(
            (f"peak RSS per worker < {MAX_RSS_MB:g} MB", f"{value:.1f} MB", value < MAX_RSS_MB)
        )
    return checks


# --------------------------------------------------------------------------- Markdown


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> str:
    rows = [header, ["---"] * len(header), *lines]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main_table(rows: Sequence[Row], probe_rate: float) -> str:
    header = [
        "configuration",
        "req/s",
        "× nginx",
        "× direct",
        "p50 ms",
        "p99 ms",
        "CPU s/10k req",
        "CPU × nginx",
        f"added p50 ms @{probe_rate:g}/s",
        "added − nginx's",
        "peak RSS MB",
        "canary share",
        "errors",
    ]
    lines = [
        [
            row["name"],
            fmt(row["requests_per_s"], ",.0f"),
            fmt(row["rps_vs_nginx"], ".2f", "×"),
            fmt(row["rps_vs_direct"], ".2f", "×"),
            fmt(row["p50_ms"], ".2f"),
            fmt(row["p99_ms"], ".2f"),
            fmt(row["cpu_s_per_10k"], ".3f"),
            fmt(row["cpu_vs_nginx"], ".2f", "×"),
            fmt(row["added_ms"], ".3f"),
            fmt(row["added_vs_nginx_ms"], "+.3f"),
            fmt(row["peak_rss_mb"], ".1f"),
            fmt(None if row["canary_share"] is None else row["canary_share"] * 100, ".1f", " %"),
            str(row["errors"]),
        ]
        for row in rows
    ]
    return table(header, lines)


def series_table(rows: Sequence[Row]) -> str:
    header = [
        "series",
        "size",
        "req/s",
        "× base",
        "CPU µs/req",
        "× base",
        "p50 ms",
        "p99 ms",
        "errors",
    ]
    lines = [
        [
            row["series"],
            str(row["size"]),
            fmt(row["requests_per_s"], ",.0f"),
            fmt(row["rps_vs_base"], ".2f", "×"),
            fmt(row["cpu_us_per_request"], ".1f"),
            fmt(row["cpu_vs_base"], ".2f", "×"),
            fmt(row["p50_ms"], ".2f"),
            fmt(row["p99_ms"], ".2f"),
            str(row["errors"]),
        ]
        for row in rows
    ]
    return table(header, lines)


def percent(share: float | None) -> str:
    return fmt(None if share is None else share * 100, ".0f", " %")


def diagnostics_table(rows: Sequence[Row]) -> str:
    header = [
        "configuration",
        "rounds ok",
        "proxy CPU busy",
        "proxy core busy",
        "of it interrupts",
        "client core busy",
        "non-2xx",
        "socket errors",
        "failures",
    ]
    lines = [
        [
            row["name"],
            str(row["rounds"]),
            percent(row["proxy_busy"]),
            percent(row["proxy_core_busy"]),
            percent(row["proxy_core_irq"]),
            percent(row["client_core_busy"]),
            str(row["non_2xx"]),
            str(row["socket_errors"]),
            "; ".join(row["failures"]) or "—",
        ]
        for row in rows
    ]
    return table(header, lines)


CONTENTION = 0.15  # core 0 busier than the proxy and interrupts by this: others were using it


def contended(rows: Sequence[Row]) -> list[str]:
    """Proxies whose core was also busy with other processes while they were measured."""
    flagged = []
    for row in rows:
        if row["proxy_busy"] is None or row["proxy_core_busy"] is None:
            continue
        others = row["proxy_core_busy"] - (row["proxy_core_irq"] or 0) - row["proxy_busy"]
        if others > CONTENTION:
            flagged.append(f"{row['name']} (others took {percent(others)} of its core)")
    return flagged


def markdown(meta: Row, main: Sequence[Row], series: Sequence[Row], unavailable: Row) -> str:
    parts = [f"# grayproxy bench — {meta['started']}", "", _describe(meta), ""]
    if unavailable:
        parts += ["**Could not start or measure:**", ""]
        parts += [f"- {name}: {reason}" for name, reason in unavailable.items()]
        parts.append("")
    parts += [
        f"## Side by side (medians over {meta['rounds']} rounds)",
        "",
        main_table(main, meta["probe_rate"]),
        "",
    ]
    checks = target_checks(main)
    if checks:
        parts += ["## grayproxy against the targets", ""]
        parts += [f"- {'✅' if met else '❌'} {what}: {value}" for what, value, met in checks]
        parts.append("")
    if series:
        parts += [
            "## Cost as the config grows (grayproxy; × base = against 1 service, "
            "1 endpoint per version, 1 rule, same run)",
            "",
            series_table(series),
            "",
        ]
    measured = [*main, *_unique_series(series)]
    parts += ["## Diagnostics", "", diagnostics_table(measured), ""]
    if busy := contended(measured):
        parts += [
            "⚠️ Other processes used the proxy core while these were measured, so their "
            "figures are unreliable; rerun on a quiet machine: " + ", ".join(busy) + ".",
            "",
        ]
    parts += [_NOTES]
    return "\n".join(parts)


def _unique_series(rows: Sequence[Row]) -> list[Row]:
    seen, unique = set(), []
    for row in rows:
        if row["name"] not in seen:
            seen.add(row["name"])
            unique.append(row)
    return unique


def _describe(meta: Row) -> str:
    mode = (
        "pinned: each proxy on core 0; wrk, the upstreams and the probe on core 1"
        if meta["pinned"]
        else "unpinned: every process on any core"
    )
    return (
        f"{mode} · {meta['rounds']} round(s) × {meta['seconds']:g} s "
        f"(series {meta['series_seconds']:g} s), wrk {meta['connections']} connections / "
        f"{meta['threads']} thread(s), {meta['users']} distinct x-user-id · "
        f"proxy workers {meta['workers']} · probe {meta['probe_requests']} requests at "
        f"{meta['probe_rate']:g}/s per target on one keep-alive connection each, the targets "
        "taking turns\n\n"
        f"{meta['versions']} · load average before the run {meta['load_average']}"
    )


_NOTES = """How to read it: ratios (×) compare figures measured in this run; absolute numbers
swing between runs on shared machines. *CPU s/10k req* is the proxy process tree's
utime+stime during the wrk run per 10 000 requests. *added p50* is the probe's median
latency through the proxy minus the median straight to the upstream. *canary share* is
counted by the upstreams (expected 10 %). *proxy CPU busy* is the proxy's CPU time over
the run's time; *proxy core busy* and *client core busy* are core 0's and core 1's load
from /proc/stat (pinned mode); *of it interrupts* is the kernel's network work on core 0,
which no process is charged for. Core 0 busier than the proxy plus interrupts means other
processes shared it (flagged above). A proxy under ~90 % busy was not the bottleneck: if the
client core is at 100 %, the load generator and upstreams were, and req/s understates the
proxy (CPU per request still holds). The *-https* rows terminate TLS (one certificate made
for the run, keep-alive connections, plain HTTP upstream); grayproxy-https's × nginx is
against nginx-https, and the probe (plain HTTP) leaves them out. The *-realistic* rows are
the same processes loaded with a browser's request (11 header lines, a cookie, a query
string) answered with a page's head and 2 KB body; their × nginx is against
nginx-realistic, and they share their process's probe and peak RSS; grayproxy-log-realistic
is a grayproxy of its own, the same config with its JSON access log written to a file.
Every × nginx is the median of per-round ratios, each against the reference's run of the
same round."""


# --------------------------------------------------------------------------- files


def write_json(
    path: Path,
    meta: Row,
    main: Sequence[Row],
    series: Sequence[Row],
    unavailable: Row,
    targets: Sequence[Target],
) -> None:
    raw = {
        target.name: {
            "rounds": target.rounds,
            "failures": target.failures,
            "peak_rss_mb": target.peak_rss_mb,
        }
        for target in targets
    }
    document = {
        "meta": meta,
        "unavailable": unavailable,
        "main": list(main),
        "series": list(series),
        "targets": [
            {"target": what, "measured": value, "met": met}
            for what, value, met in target_checks(main)
        ],
        "raw": raw,
    }
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def write_chart(path: Path, pyplot: ModuleType, main: Sequence[Row], series: Sequence[Row]) -> None:
    """Three panels: the proxies against nginx; req/s and CPU per request against the baseline."""
    figure, (left, middle, right) = pyplot.subplots(1, 3, figsize=(16, 5))
    proxies = [row for row in main if row["name"] != "direct"]
    names = [row["name"] for row in proxies]
    positions = range(len(names))
    width = 0.38
    rps_bars = left.bar(
        [p - width / 2 for p in positions],
        [row["rps_vs_nginx"] or 0 for row in proxies],
        width,
        label="req/s × nginx",
    )
    cpu_bars = left.bar(
        [p + width / 2 for p in positions],
        [row["cpu_vs_nginx"] or 0 for row in proxies],
        width,
        label="CPU per request × nginx",
    )
    left.bar_label(rps_bars, fmt="%.2f")
    left.bar_label(cpu_bars, fmt="%.2f")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.axhline(MIN_RPS_VS_NGINX, color="C0", linestyle=":", linewidth=0.8)
    left.axhline(MAX_CPU_VS_NGINX, color="C1", linestyle=":", linewidth=0.8)
    left.set_xticks(list(positions), names)
    left.set_title("against nginx, same run (dotted: the targets)")
    left.legend()
    for axis, key, title in (
        (middle, "rps_vs_base", "req/s × baseline"),
        (right, "cpu_vs_base", "CPU per request × baseline"),
    ):
        for name in ("services", "endpoints", "rules"):
            points = [row for row in series if row["series"] == name and row[key] is not None]
            if points:
                axis.plot(
                    [row["size"] for row in points],
                    [row[key] for row in points],
                    marker="o",
                    label=name,
                )
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_xlabel("services / endpoints per version / rules")
        axis.set_title(f"grayproxy: {title}")
        axis.set_ylim(bottom=0)
        if series:  # --no-series: nothing to label
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
