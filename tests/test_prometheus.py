"""Prometheus for real: a real Prometheus scrapes a grayproxy under traffic, and every PromQL
query of docs/metrics.md and every panel of the Grafana dashboard is evaluated in it.

The queries are read out of the docs (the "Queries" section's promql blocks, each after a
`# title` comment), so what is tested is what users copy. Each title has a check here: a
query added to the docs without one, or a check left without its query, fails.

Two replicas of grayproxy (a fleet: the queries sum over them) share the traffic. Their
service `web` has two versions, split 75/25 and held there by a release waiting for approval:
`stable`, fast and healthy, and `canary`, which answers after CANARY_DELAY and, of every
eight requests, fails one with a 500 and one with a connection reset mid-body (the
client gets 502, counted under kind="reset").
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import json
import math
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from procs import REPO_ROOT, ProxyProcess, http_get, tool
from prometheus import PrometheusProcess
from servers import LoopThread, Upstream

DOCS = REPO_ROOT / "docs" / "metrics.md"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "grayproxy.json"

CANARY_DELAY = 0.05  # seconds, a bucket bound: the canary's p50 lies above it, stable's below
FAILURE_SHARE = 2 / 8  # the canary's 500s and resets
RESET_SHARE = 1 / 8
WEIGHTS = {"stable": 75.0, "canary": 25.0}
REPLICAS = 2
TOKEN_ENV = "PROMETHEUS_TEST_TOKEN"

CONFIG = f"""
listen: "127.0.0.1:${{data_port}}"
control:
  listen: "127.0.0.1:${{control_port}}"
  token_env: {TOKEN_ENV}            # /metrics is scraped without it
services:
  - name: web
    baseline: stable
    versions:
      stable: {{endpoints: ["${{stable}}"]}}
      canary: {{endpoints: ["${{canary}}"]}}
    split:
      weights: {{stable: 75, canary: 25}}
    outlier_detection: {{consecutive_5xx: 0}}   # a replica may see the canary fail in a row
    release:                        # holds the weights: waiting for approval at step 1
      canary: canary
      steps:
        - {{weight: 25, approval: true}}
        - {{weight: 100}}
"""

# Replicas that disagree: no traffic, only their weights are read.
FLEET_CONFIG = """
listen: "127.0.0.1:${data_port}"
control:
  listen: "127.0.0.1:${control_port}"
services:
  - name: web
    versions:
      stable: {endpoints: ["127.0.0.1:9"]}
      canary: {endpoints: ["127.0.0.1:19"]}
    split:
      weights: {${weights}}
"""

Result = list[dict[str, Any]]
T = TypeVar("T")


# --- what the docs and the dashboard say ---------------------------------------------------


def section(markdown: str, heading: str) -> str:
    """The text under `## heading`, up to the next `## ` heading."""
    start = markdown.index(f"\n## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end >= 0 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def doc_queries() -> dict[str, str]:
    """Each query of the docs' Queries section, by its `# title` comment."""
    queries: dict[str, list[str]] = {}
    for block in code_blocks(section(DOCS.read_text(), "Queries"), "promql"):
        title = None
        for line in block.splitlines():
            if line.startswith("# "):
                title = line[2:]
                assert title not in queries, f"two queries titled {title!r}"
                queries[title] = []
            elif line.strip():
                assert title is not None, f"a query without a # title: {line!r}"
                queries[title].append(line)
    return {title: "\n".join(lines) for title, lines in queries.items()}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_targets() -> list[Any]:
    """Every target of every panel, as a pytest param named PANEL/REFID."""
    return [
        pytest.param(target, id=f"{panel['title']}/{target['refId']}")
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variables ($name, ${name}) replaced; an unknown one raises KeyError."""
    return re.sub(r"\$\{?(\w+)\}?", lambda match: variables[match[1]], expr)


# --- the running system ---------------------------------------------------------------------


class CanaryUpstream(Upstream):
    """Answers after CANARY_DELAY; request 8n+3 gets a 500, request 8n+7 a reset mid-body."""

    def __init__(self, loops: LoopThread) -> None:
        super().__init__(loops, "canary")
        self.count = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.count += 1
        await asyncio.sleep(CANARY_DELAY)
        path = {3: "/status/500", 7: "/reset"}.get(self.count % 8, request.path)
        return await super()._handle(request.clone(rel_url=path))


def send_traffic(urls: list[str], stop: threading.Event) -> None:
    """One request after another, to each URL in turn, about 20 a second, until `stop`."""
    for url in itertools.cycle(urls):
        if stop.is_set():
            return
        with contextlib.suppress(OSError, http.client.HTTPException):  # the resets
            http_get(url, timeout=5.0)
        stop.wait(0.02)


@pytest.fixture(scope="module")
def proxies(loops: LoopThread) -> Iterator[list[ProxyProcess]]:
    """The replicas, under traffic from a background thread for the whole module."""
    stable = Upstream(loops, "stable").start()
    canary = CanaryUpstream(loops).start()
    config = CONFIG.replace("${stable}", stable.address).replace("${canary}", canary.address)
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        replicas = [
            stack.enter_context(ProxyProcess(config, env={TOKEN_ENV: "prometheus-test-token"}))
            for _ in range(REPLICAS)
        ]
        urls = [replica.data_url + "/" for replica in replicas]
        traffic = threading.Thread(target=send_traffic, args=(urls, stop))
        traffic.start()
        stack.callback(traffic.join, 10)
        stack.callback(stop.set)
        yield replicas
    stable.stop()
    canary.stop()


@pytest.fixture(scope="module")
def prometheus(proxies: list[ProxyProcess]) -> Iterator[PrometheusProcess]:
    """A real Prometheus that has scraped both versions' requests and the canary's resets."""
    with PrometheusProcess(control_addresses(proxies)) as prometheus:
        prometheus.wait_for("count(sum by (version) (rate(grayproxy_requests_total[1m]) > 0)) == 2")
        prometheus.wait_for('rate(grayproxy_upstream_errors_total{kind="reset"}[1m]) > 0')
        yield prometheus


def control_addresses(proxies: list[ProxyProcess]) -> list[str]:
    return [f"127.0.0.1:{proxy.control_port}" for proxy in proxies]


def eventually(check: Callable[[], T], timeout: float = 30.0) -> T:
    """Run `check` until it passes (rates settle as samples come in): its result, or its
    last failure."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1.0)


# --- reading results ------------------------------------------------------------------------


def value(series: dict[str, Any]) -> float:
    return float(series["value"][1])


def labels(series: dict[str, Any]) -> dict[str, str]:
    metric: dict[str, str] = series["metric"]
    return metric


def by_version(result: Result) -> dict[str, float]:
    """Each series' value by its version, for service web (one series per version)."""
    assert all(labels(series)["service"] == "web" for series in result), result
    values = {labels(series)["version"]: value(series) for series in result}
    assert len(values) == len(result), result
    return values


def by_labels(result: Result, *names: str) -> dict[tuple[str, ...], float]:
    return {tuple(labels(series)[name] for name in names): value(series) for series in result}


# --- the checks, one per query of the docs, by title ----------------------------------------

Check = Callable[[Result, PrometheusProcess], None]


def check_requests(result: Result, prometheus: PrometheusProcess) -> None:
    rates = by_version(result)
    assert rates.keys() == WEIGHTS.keys()
    assert all(rate > 0 for rate in rates.values()), rates
    share = rates["canary"] / sum(rates.values())
    assert share == pytest.approx(WEIGHTS["canary"] / 100, abs=0.12), rates


def check_error_ratio(result: Result, prometheus: PrometheusProcess) -> None:
    ratios = by_version(result)
    assert ratios["stable"] == 0, ratios
    assert ratios["canary"] == pytest.approx(FAILURE_SHARE, abs=0.08), ratios


def check_p99(result: Result, prometheus: PrometheusProcess) -> None:
    latencies = by_version(result)
    assert latencies.keys() == WEIGHTS.keys()
    assert all(0 < seconds < 10 for seconds in latencies.values()), latencies
    assert latencies["canary"] > CANARY_DELAY, latencies


def check_p50(result: Result, prometheus: PrometheusProcess) -> None:
    latencies = by_version(result)
    assert 0 < latencies["stable"] < CANARY_DELAY < latencies["canary"] < 10, latencies


def check_weights(result: Result, prometheus: PrometheusProcess) -> None:
    assert by_version(result) == WEIGHTS


def check_upstream_errors(result: Result, prometheus: PrometheusProcess) -> None:
    rates = by_labels(result, "version", "kind")
    assert {kind for (version, kind) in rates} >= {"connect", "timeout", "reset"}, rates
    failing = {key for key, rate in rates.items() if rate > 0}
    assert failing == {("canary", "reset")}, rates
    requests = prometheus.query('sum(rate(grayproxy_requests_total{version="canary"}[1m]))')
    share = rates["canary", "reset"] / value(requests[0])
    assert share == pytest.approx(RESET_SHARE, abs=0.06), (rates, requests)


def check_release_state(result: Result, prometheus: PrometheusProcess) -> None:
    assert by_labels(result, "service", "state") == {("web", "waiting"): 1.0}


def check_release_step(result: Result, prometheus: PrometheusProcess) -> None:
    assert by_labels(result, "service") == {("web",): 0.0}


def check_no_endpoint_down(result: Result, prometheus: PrometheusProcess) -> None:
    assert result == []
    assert len(prometheus.query("grayproxy_endpoint_healthy")) == 2 * REPLICAS  # all up


def check_replicas_agree(result: Result, prometheus: PrometheusProcess) -> None:
    assert result == []
    assert len(prometheus.query("grayproxy_weight")) == 2 * REPLICAS


CHECKS: dict[str, Check] = {
    "requests per second": check_requests,
    "error ratio: 5xx answers over all answers, 0 when there were none": check_error_ratio,
    "p99 latency, in seconds": check_p99,
    "p50 latency, in seconds": check_p50,
    "weight, in percent": check_weights,
    "upstream failures per second, by kind": check_upstream_errors,
    "the state of each service's release: one series, its state in the label": (
        check_release_state
    ),
    "the release's current step, from 0": check_release_step,
    "endpoints out of rotation (none: no series)": check_no_endpoint_down,
    "replicas that disagree on a weight (none: no series)": check_replicas_agree,
}


# --- the docs -------------------------------------------------------------------------------


def test_every_documented_query_has_a_check() -> None:
    assert list(doc_queries()) == list(CHECKS)


@pytest.mark.parametrize("title", list(doc_queries()))
def test_documented_query(prometheus: PrometheusProcess, title: str) -> None:
    query = doc_queries()[title]
    eventually(lambda: CHECKS[title](prometheus.query(query), prometheus))


def test_p99_is_at_least_p50(prometheus: PrometheusProcess) -> None:
    queries = doc_queries()
    p50 = by_version(prometheus.query(queries["p50 latency, in seconds"]))
    p99 = by_version(prometheus.query(queries["p99 latency, in seconds"]))
    assert p50.keys() == p99.keys() == WEIGHTS.keys()
    assert all(p99[version] >= p50[version] > 0 for version in p50), (p50, p99)


def test_documented_scrape_configs_are_valid(tmp_path: Path) -> None:
    blocks = code_blocks(section(DOCS.read_text(), "Scraping"), "yaml")
    assert blocks
    for index, block in enumerate(blocks):
        path = tmp_path / f"prometheus-{index}.yml"
        path.write_text(block)
        checked = subprocess.run(
            [tool("promtool"), "check", "config", str(path)], capture_output=True, text=True
        )
        assert checked.returncode == 0, block + checked.stdout + checked.stderr


def test_scraped_without_the_token(
    prometheus: PrometheusProcess, proxies: list[ProxyProcess]
) -> None:
    assert http_get(proxies[0].control_url + "/api/v1/services")[0] == 401  # the API needs it
    targets = prometheus.targets_up()
    assert len(targets) == REPLICAS
    assert all(target["health"] == "up" for target in targets), targets


def test_replicas_that_disagree_on_a_weight_are_found() -> None:
    """The fleet query finds the versions whose weights differ between two replicas."""
    config = FLEET_CONFIG.replace("${weights}", "stable: 90, canary: 10")
    other = FLEET_CONFIG.replace("${weights}", "stable: 50, canary: 50")
    with (
        ProxyProcess(config) as replica,
        ProxyProcess(other) as other_replica,
        PrometheusProcess(control_addresses([replica, other_replica])) as prometheus,
    ):
        title = "replicas that disagree on a weight (none: no series)"
        result = prometheus.wait_for(doc_queries()[title])
        assert by_labels(result, "service", "version") == {
            ("web", "stable"): 90.0,
            ("web", "canary"): 50.0,
        }


def test_promtool_check_metrics(proxies: list[ProxyProcess]) -> None:
    def scrape_with_failures() -> bytes:
        status, _, body = http_get(proxies[0].control_url + "/metrics")
        assert status == 200 and b'code="502"' in body and b'code="500"' in body
        return body

    body = eventually(scrape_with_failures)
    checked = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=body, capture_output=True
    )
    problems = (checked.stdout + checked.stderr).decode()
    assert checked.returncode == 0 and problems == "", problems


# --- the Grafana dashboard ------------------------------------------------------------------

DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# What Grafana puts in: the service, every version (the "All" value), its default window.
ALL_VERSIONS = {"service": "web", "version": ".*", "__rate_interval": "1m"}


def test_dashboard_is_consistent() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("service", "version"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
    assert variables["version"]["includeAll"] and variables["version"]["allValue"] == ".*"
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"], f"{panel['title']}: no query"
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]


def test_dashboard_variables_resolve(prometheus: PrometheusProcess) -> None:
    """Each variable's label_values(metric, label) gives the label's values in Prometheus."""
    values = {}
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
        assert match, query
        metric, label = substitute(match[1], ALL_VERSIONS), match[2]
        result = prometheus.query(f"group by ({label}) ({metric})")
        values[variable["name"]] = {labels(series)[label] for series in result}
    assert values == {"service": {"web"}, "version": set(WEIGHTS)}


@pytest.mark.parametrize("target", panel_targets())
def test_dashboard_query(prometheus: PrometheusProcess, target: dict[str, str]) -> None:
    """Evaluates, returns data with the labels its legend names, and follows $version."""
    expr = target["expr"]
    legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))

    def check() -> None:
        result = prometheus.query(substitute(expr, ALL_VERSIONS))
        assert result, "no data"
        for series in result:
            assert not math.isnan(value(series)), series
            assert legend_labels <= labels(series).keys(), series
        canary_only = prometheus.query(substitute(expr, {**ALL_VERSIONS, "version": "canary"}))
        versions = {labels(series).get("version", "canary") for series in canary_only}
        assert versions == {"canary"}, canary_only

    eventually(check)
