"""Releases driven by a real grayproxy process against real upstreams that the test makes
fail, with real traffic, real webhooks and the real `ctl release`."""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.loader import parse_config
from proxy.metrics import Metrics
from proxy.releases import NoRelease, Releases
from proxy.state import LiveState

from procs import DIRECT, ProxyProcess, child_env, grayproxy_command, run_cli
from servers import AppServer, LoopThread

CONFIG = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
%(top)s
services:
  - name: web
    baseline: stable
    versions:
      stable: {endpoints: ["%(stable)s"]}
      canary: {endpoints: ["%(canary)s"]}
    split: {weights: %(weights)s, hash_on: [{header: x-user-id}]}
    outlier_detection: {consecutive_5xx: 0}   # a failing canary keeps its endpoint
%(release)s
"""
WAIT = 90.0  # seconds a release gets to reach a state: generous, the machine may be busy
INTERVAL = "200ms"
# Checks that a healthy canary passes on any machine: a few requests, latency not judged.
ANALYSIS: dict[str, Any] = {
    "interval": INTERVAL,
    "min_requests": 3,
    "max_inconclusive": 1000,
    "failure_limit": 2,
    "error_rate": {"max_increase": 0.05},
}


class Version(AppServer):
    """An upstream version that answers ``status`` after ``delay`` seconds, as the test says."""

    def __init__(self, loops: LoopThread, name: str) -> None:
        super().__init__(loops, name)
        self.status = 200
        self.delay = 0.0
        self.requests = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=self.status, text=self.name)


class Hooks(AppServer):
    """Webhook receiver: records each POST (path, JSON body) and answers ``statuses[path]``
    (200 by default), after calling ``on_post`` if set."""

    def __init__(self, loops: LoopThread) -> None:
        super().__init__(loops, "hooks")
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.statuses: dict[str, int] = {}
        self.on_post: Callable[[str, dict[str, Any]], None] | None = None

    def url(self, path: str) -> str:
        return f"http://{self.address}{path}"

    def posts(self, path: str) -> list[dict[str, Any]]:
        return [body for where, body in list(self.received) if where == path]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append((request.path, body))
        if self.on_post is not None:
            self.on_post(request.path, body)
        return web.Response(status=self.statuses.get(request.path, 200))


@pytest.fixture(scope="module")
def versions(loops: LoopThread) -> Iterator[dict[str, Version]]:
    servers = {name: Version(loops, name).start() for name in ("stable", "canary")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def upstream(versions: dict[str, Version]) -> Iterator[dict[str, Version]]:
    """Both versions healthy at the start of each test."""
    for server in versions.values():
        server.status, server.delay = 200, 0.0
    yield versions


@pytest.fixture
def hooks(loops: LoopThread) -> Iterator[Hooks]:
    server = Hooks(loops).start()
    yield server
    server.stop()


def config(
    upstream: dict[str, Version],
    *,
    weights: str = "{stable: 100, canary: 0}",
    release: str = "",
    top: str = "",
) -> str:
    return CONFIG % {
        "stable": upstream["stable"].address,
        "canary": upstream["canary"].address,
        "weights": weights,
        "release": release,
        "top": top,
    }


class Api:
    """JSON calls to the proxy's control API."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.base = proxy.control_url

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with DIRECT.open(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    def call_if_match(self, method: str, path: str, generation: int) -> tuple[int, Any]:
        request = urllib.request.Request(self.base + path, data=b"{}", method=method)
        request.add_header("If-Match", f'"{generation}"')
        try:
            with DIRECT.open(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    def start(self, spec: dict[str, Any]) -> dict[str, Any]:
        status, answer = self.call("POST", "/api/v1/services/web/release", spec)
        assert status == 201, answer
        return dict(answer)

    def release(self) -> dict[str, Any]:
        status, answer = self.call("GET", "/api/v1/services/web/release")
        assert status == 200, answer
        return dict(answer)

    def command(self, command: str) -> tuple[int, Any]:
        return self.call("POST", f"/api/v1/services/web/release/{command}", {})

    def service(self) -> dict[str, Any]:
        status, answer = self.call("GET", "/api/v1/services/web")
        assert status == 200, answer
        return dict(answer)

    def weights(self) -> dict[str, float]:
        return {name: v["weight"] for name, v in self.service()["versions"].items()}

    def wait(self, *states: str, timeout: float = WAIT) -> dict[str, Any]:
        """The release once it is in one of ``states``; fails if it ends in another."""
        deadline = time.monotonic() + timeout
        while True:
            release = self.release()
            if release["state"] in states:
                return release
            final = ("promoted", "rolled_back", "aborted")
            assert release["state"] not in final, release
            assert time.monotonic() < deadline, f"not {states} in {timeout}s: {release}"
            time.sleep(0.02)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with DIRECT.open(self.base + "/metrics", timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class Traffic:
    """Keyed requests to the proxy from a few threads (each about 100 a second at most)
    until stopped; ``versions`` counts the answers by version."""

    def __init__(self, proxy: ProxyProcess, threads: int = 3) -> None:
        self.port = proxy.data_port
        self.stopping = threading.Event()
        self.versions: Counter[str] = Counter()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(10)

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stopping.is_set():
            user = f"user-{random.randrange(1_000_000)}"
            try:
                connection.request("GET", "/", headers={"x-user-id": user})
                response = connection.getresponse()
                response.read()
                self.versions[response.getheader("x-grayproxy-version", "")] += 1
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self.stopping.wait(0.01)
        connection.close()


def versions_served(proxy: ProxyProcess, count: int = 30) -> set[str]:
    """The versions that answer ``count`` requests with different keys."""
    seen = set()
    connection = http.client.HTTPConnection("127.0.0.1", proxy.data_port, timeout=10)
    for index in range(count):
        connection.request("GET", "/", headers={"x-user-id": f"probe-{index}"})
        response = connection.getresponse()
        response.read()
        seen.add(response.getheader("x-grayproxy-version", ""))
    connection.close()
    return seen


# ---------------------------------------------------------------------------- promoted


def test_a_healthy_canary_is_promoted_step_by_step(upstream: dict[str, Version]) -> None:
    with ProxyProcess(config(upstream)) as proxy, Traffic(proxy):
        api = Api(proxy)
        started = api.start(
            {"canary": "canary", "steps": [{"weight": 20}, {"weight": 50}, {"weight": 100}]}
            | {"analysis": ANALYSIS}
        )
        assert started["state"] == "progressing" and started["weight"] == 20
        assert api.weights() == {"stable": 80, "canary": 20}
        release = api.wait("promoted")
        assert api.weights() == {"stable": 0, "canary": 100}
        assert versions_served(proxy) == {"canary"}
        assert (release["step"], release["steps"], release["weight"]) == (2, 3, 100)
        assert release["failures"] == 0
        passed = [check for check in release["checks"] if check["result"] == "passed"]
        assert len(passed) >= 2  # one per step below 100
        assert all(check["canary"]["requests"] >= 3 for check in passed)
        metrics = api.metrics()
        state = {
            labels[1][1]: value
            for (name, labels), value in metrics.items()
            if name == "grayproxy_release_state"
        }
        assert state == {
            "progressing": 0,
            "waiting": 0,
            "paused": 0,
            "promoted": 1,
            "rolled_back": 0,
            "aborted": 0,
        }
        assert metrics[("grayproxy_release_step", (("service", "web"),))] == 2
    assert "release of canary in web (admin): started" in proxy.stderr


# ---------------------------------------------------------------------------- rolled back


@pytest.mark.parametrize("fault", ["errors", "latency"])
def test_a_canary_that_fails_at_its_third_step_is_rolled_back(
    upstream: dict[str, Version], hooks: Hooks, fault: str
) -> None:
    canary = upstream["canary"]

    def third_step(path: str, body: dict[str, Any]) -> None:
        # Asked before the third step's weight is set: from then on the canary fails.
        if path == "/step" and body["step"] == 2:
            if fault == "errors":
                canary.status = 500
            else:
                canary.delay = 0.4

    hooks.on_post = third_step
    analysis = dict(ANALYSIS)
    if fault == "latency":
        analysis["interval"] = "1s"  # slow answers: fewer of them per interval
        analysis["latency_p99"] = {"max_ratio": 2, "min_ms": 200}
    spec = {
        "canary": "canary",
        "steps": [{"weight": 20}, {"weight": 40}, {"weight": 60}, {"weight": 100}],
        "analysis": analysis,
        "webhooks": [
            {"phase": "confirm-step", "url": hooks.url("/step")},
            {"phase": "rollback", "url": hooks.url("/rollback")},
        ],
    }
    with ProxyProcess(config(upstream)) as proxy, Traffic(proxy, threads=6):
        api = Api(proxy)
        api.start(spec)
        release = api.wait("rolled_back")
        assert (release["step"], release["weight"], release["failures"]) == (2, 0, 2)
        # The baseline has all traffic from the failing check on: in the same change.
        assert api.weights() == {"stable": 100, "canary": 0}
        assert versions_served(proxy) == {"stable"}
        failing = release["checks"][-1]
        assert failing["result"] == "failed" and failing["at"] == release["updated_at"]
        assert failing["reason"] in release["reason"]
        if fault == "errors":
            assert "error_rate: canary 1.00 > baseline 0.00 + 0.05" in release["reason"]
            assert failing["canary"]["error_rate"] == 1.0
        else:
            assert "latency_p99: canary " in release["reason"]
            assert "> max(2 x baseline " in release["reason"]
            assert failing["canary"]["p99_ms"] >= 400
        # Checks before the third step passed; every failure is from the third step.
        assert [c["result"] for c in release["checks"]].count("failed") == 2
        wait_until(lambda: bool(hooks.posts("/rollback")))
        notice = hooks.posts("/rollback")[0]
        assert set(notice) == {
            "service",
            "phase",
            "state",
            "step",
            "weight",
            "canary",
            "baseline",
            "reason",
            "checks",
        }
        assert (notice["phase"], notice["state"], notice["service"]) == (
            "rollback",
            "rolled_back",
            "web",
        )
        assert [body["step"] for body in hooks.posts("/step")] == [0, 1, 2]


# ---------------------------------------------------------------------------- traffic


def test_too_little_traffic_is_inconclusive_then_paused_and_resume_goes_on(
    upstream: dict[str, Version],
) -> None:
    spec = {
        "canary": "canary",
        "steps": [{"weight": 50}, {"weight": 100}],
        "analysis": {**ANALYSIS, "min_requests": 5, "max_inconclusive": 3},
    }
    with ProxyProcess(config(upstream)) as proxy:
        api = Api(proxy)
        api.start(spec)
        release = api.wait("paused")
        assert release["reason"].startswith("paused: not enough traffic (3 inconclusive checks")
        assert release["failures"] == 0
        assert [c["result"] for c in release["checks"]] == ["inconclusive"] * 3
        assert "canary 0 requests, baseline 0 (min_requests 5)" in release["checks"][0]["reason"]
        assert api.weights() == {"stable": 50, "canary": 50}  # paused where it was
        with Traffic(proxy):
            status, resumed = api.command("resume")
            assert status == 200 and resumed["state"] == "progressing"
            assert resumed["reason"] == "step 1 of 2 (canary 50%): waiting for a passing check"
            api.wait("promoted")
        assert api.command("resume")[0] == 409


# ---------------------------------------------------------------------------- people and gates


def test_an_approval_step_waits_until_approved(upstream: dict[str, Version]) -> None:
    spec = {"canary": "canary", "steps": [{"weight": 30, "approval": True}, {"weight": 100}]}
    with ProxyProcess(config(upstream)) as proxy:
        api = Api(proxy)
        assert api.command("approve")[0] == 404  # no release yet
        assert api.call("GET", "/api/v1/releases") == (200, {"releases": {}})
        api.start(spec)
        release = api.wait("waiting")
        assert api.call("GET", "/api/v1/releases") == (200, {"releases": {"web": release}})
        assert release["approval"] == "pending"
        assert "waiting for approval of step 1 of 2 (canary 30%)" in release["reason"]
        time.sleep(0.5)  # ticks go by: it still waits
        assert api.release()["state"] == "waiting"
        assert api.weights() == {"stable": 70, "canary": 30}
        status, approved = api.command("approve")
        assert status == 200 and approved["state"] == "promoted"
        assert api.weights() == {"stable": 0, "canary": 100}
        status, refused = api.command("approve")
        assert status == 409 and "is over (promoted)" in refused["error"]


def test_a_refusing_confirm_step_gate_holds_the_release_and_is_asked_again(
    upstream: dict[str, Version], hooks: Hooks
) -> None:
    hooks.statuses["/gate"] = 500
    spec = {
        "canary": "canary",
        "steps": [{"weight": 30}, {"weight": 100}],
        "analysis": ANALYSIS,
        "webhooks": [{"phase": "confirm-step", "url": hooks.url("/gate"), "timeout": "2s"}],
    }
    with ProxyProcess(config(upstream)) as proxy, Traffic(proxy):
        api = Api(proxy)
        api.start(spec)
        release = api.wait("waiting")
        assert f"{hooks.url('/gate')} answered 500" in release["reason"]
        assert "asked again every 200ms" in release["reason"]
        wait_until(lambda: len(hooks.posts("/gate")) >= 3)  # asked again, interval after interval
        assert api.release()["state"] == "waiting"
        assert api.weights() == {"stable": 100, "canary": 0}  # the step's weight is not set
        asked = hooks.posts("/gate")[0]
        assert (asked["phase"], asked["state"], asked["step"]) == ("confirm-step", "progressing", 0)
        hooks.statuses["/gate"] = 200
        api.wait("promoted")
        assert api.weights() == {"stable": 0, "canary": 100}


def test_a_refusing_pre_release_webhook_fails_the_release_with_the_weights_untouched(
    upstream: dict[str, Version], hooks: Hooks
) -> None:
    hooks.statuses["/pre"] = 503
    spec = {
        "canary": "canary",
        "steps": [{"weight": 50}, {"weight": 100}],
        "webhooks": [
            {"phase": "pre-release", "url": hooks.url("/pre")},
            {"phase": "post-release", "url": hooks.url("/post")},
        ],
    }
    with ProxyProcess(config(upstream, weights="{stable: 90, canary: 10}")) as proxy:
        api = Api(proxy)
        generation = api.service()["generation"]
        api.start(spec)
        release = api.wait("aborted")
        assert release["reason"] == (
            f"aborted: the pre-release webhooks refused ({hooks.url('/pre')} answered 503); "
            "nothing was changed"
        )
        assert api.weights() == {"stable": 90, "canary": 10}
        status, audit = api.call("GET", "/api/v1/audit")
        assert status == 200, audit
        since = [r for r in audit["records"] if r["generation"] > generation]
        # The two transitions (started, aborted) are recorded; no weight was changed.
        assert [(r["action"], r["after"]["state"]) for r in reversed(since)] == [
            ("release", "progressing"),
            ("release", "aborted"),
        ]
        assert release["weight"] == 10
        wait_until(lambda: bool(hooks.posts("/post")))
        assert hooks.posts("/post")[0]["state"] == "aborted"


# ---------------------------------------------------------------------------- the weights' hold


def test_while_active_a_release_holds_the_weights_and_force_aborts_it(
    upstream: dict[str, Version],
) -> None:
    spec = {"canary": "canary", "steps": [{"weight": 10, "pause": "10m"}, {"weight": 100}]}
    with ProxyProcess(config(upstream)) as proxy:
        api = Api(proxy)
        api.start(spec)
        for method, path, body in [
            ("PUT", "weights", {"stable": 50, "canary": 50}),
            ("POST", "promote", {"version": "canary"}),
            ("POST", "rollback", {}),
        ]:
            status, answer = api.call(method, f"/api/v1/services/web/{path}", body)
            assert status == 409, (path, answer)
            assert answer["error"].startswith(
                "the release of canary in web (progressing, step 1, canary 10%) holds the weights"
            )
        assert api.weights() == {"stable": 90, "canary": 10}
        status, again = api.call("POST", "/api/v1/services/web/release", spec)
        assert status == 409 and "is in progress; abort it first" in again["error"]
        status, answer = api.call(
            "PUT", "/api/v1/services/web/weights?force=true", {"stable": 40, "canary": 60}
        )
        assert status == 200, answer
        assert api.weights() == {"stable": 40, "canary": 60}
        release = api.release()
        assert release["state"] == "aborted"
        assert release["reason"] == "aborted by admin: PUT weights with force=true"
        # Once it is over, the weights are everyone's again, and a new release can start.
        assert api.call("POST", "/api/v1/services/web/rollback", {})[0] == 200
        assert api.start(spec)["state"] == "progressing"
        status, aborted = api.command("abort")
        assert status == 200 and aborted["state"] == "aborted"
        assert api.weights() == {"stable": 100, "canary": 0}


def test_a_reload_keeps_an_active_release_and_its_weights(upstream: dict[str, Version]) -> None:
    spec = {"canary": "canary", "steps": [{"weight": 30, "pause": "10m"}, {"weight": 100}]}
    with ProxyProcess(config(upstream)) as proxy:
        api = Api(proxy)
        api.start(spec)
        status, answer = api.call("POST", "/api/v1/reload", {})
        assert status == 200, answer
        assert answer["warnings"] == [
            "services.web: the release of canary in web (progressing, step 1, canary 30%) "
            "keeps its weights (canary 30%)"
        ]
        assert api.weights() == {"stable": 70, "canary": 30}
        assert api.release()["state"] == "progressing"


# ---------------------------------------------------------------------------- bad input


def test_an_invalid_spec_is_refused_with_every_error(upstream: dict[str, Version]) -> None:
    bad = {
        "canary": "nope",
        "steps": [{"weight": 50}, {"weight": 40}, {"weight": 120}],
        "analysis": {"interval": 0, "error_rate": {"max_increase": 0.01}},
        "webhooks": [{"phase": "confirm-step", "url": "127.0.0.1:9000/gate"}],
    }
    with ProxyProcess(config(upstream)) as proxy:
        api = Api(proxy)
        status, answer = api.call("POST", "/api/v1/services/web/release", bad)
        assert status == 400
        assert answer["error"] == "refused; nothing changed"
        assert answer["details"] == [
            "canary: unknown version 'nope' (versions: stable, canary)",
            "steps[2].weight: must be at most 100 (percent)",
            "steps[1].weight: must be above the previous step's (50): steps only rise",
            "analysis.interval: must be greater than zero",
            "webhooks[0].url: '127.0.0.1:9000/gate': expected an http:// or https:// URL "
            "with a host",
        ]
        assert api.call("GET", "/api/v1/services/web/release")[0] == 404  # nothing started
        assert api.call("POST", "/api/v1/services/nope/release", bad)[0] == 404
        assert api.call("GET", "/api/v1/services/nope/release")[0] == 404
        assert api.call("POST", "/api/v1/services/web/release/dance", {})[0] == 404
        status, answer = api.call("POST", "/api/v1/services/web/release", [1])
        assert status == 400 and answer["details"] == ["expected a mapping, got a list"]


def test_check_names_a_release_in_the_file_and_lists_its_errors_with_lines(
    upstream: dict[str, Version], tmp_path: Path
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        config(upstream, release=RELEASE_IN_FILE)
        .replace("${data_port}", "1")
        .replace("${control_port}", "2")
    )
    result = run_cli("check", "-c", str(good))
    assert result.returncode == 0, result.stderr
    assert "web (stable, canary; release of canary in 3 steps)" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("{weight: 50}", "{weight: 5}"))
    result = run_cli("check", "-c", str(bad))
    assert result.returncode == 2
    line = good.read_text().splitlines().index("        - {weight: 50}") + 1
    assert result.stderr == (
        f"{bad}: services[0].release.steps[1].weight: line {line}: "
        "must be above the previous step's (20): steps only rise\n"
    )


# ---------------------------------------------------------------------------- workers


RELEASE_IN_FILE = """\
    release:
      canary: canary
      steps:
        - {weight: 20}
        - {weight: 50}
        - {weight: 100}
      analysis:
        interval: 200ms
        min_requests: 3
        max_inconclusive: 1000
        error_rate: {max_increase: 0.05}
"""


def test_with_two_workers_a_release_from_the_file_promotes(upstream: dict[str, Version]) -> None:
    text = config(upstream, top="workers: 2", release=RELEASE_IN_FILE)
    with ProxyProcess(text) as proxy, Traffic(proxy, threads=4):
        api = Api(proxy)
        release = api.wait("promoted")
        assert release["failures"] == 0
        checked = [c for c in release["checks"] if c["result"] == "passed"]
        assert len(checked) >= 2
        wait_until(lambda: versions_served(proxy) == {"canary"})  # every worker follows
    assert "release of canary in web (file): started" in proxy.stderr


# ---------------------------------------------------------------------------- ctl


def test_ctl_release_starts_watches_approves_and_aborts(
    upstream: dict[str, Version], tmp_path: Path
) -> None:
    spec_file = tmp_path / "release.yaml"
    spec_file.write_text(
        "canary: canary\nsteps:\n  - {weight: 25, approval: true}\n  - {weight: 100}\n"
    )
    with ProxyProcess(config(upstream)) as proxy:
        env = {"GRAYPROXY_CONTROL": proxy.control_url}

        def ctl(*args: str) -> subprocess.CompletedProcess[str]:
            return run_cli("ctl", "release", *args, env=env)

        assert ctl("status", "web").returncode == 1
        started = ctl("start", "web", "-f", str(spec_file))
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith(
            "web: waiting      step 1/2  canary 25%  (baseline stable)"
        )
        watcher = subprocess.Popen(
            grayproxy_command("ctl", "release", "status", "web", "--watch", "--interval", "0.1"),
            env=child_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert watcher.stdout is not None
            first = watcher.stdout.readline()  # printed at once
            assert "waiting      step 1/2  canary 25%  waiting for approval" in first
            approved = ctl("approve", "web")
            assert approved.returncode == 0, approved.stderr
            assert "promoted" in approved.stdout
            out, err = watcher.communicate(timeout=30)
        finally:
            watcher.kill()
        assert watcher.returncode == 0, err
        assert "promoted     step 2/2  canary 100%" in out
        refused = ctl("approve", "web")
        assert refused.returncode == 1
        assert "HTTP 409: the release of canary is over (promoted)" in refused.stderr
        spec_file.write_text(
            json.dumps(
                {"canary": "canary", "steps": [{"weight": 10, "pause": 600}, {"weight": 100}]}
            )
        )
        assert ctl("start", "web", "-f", str(spec_file)).returncode == 0
        paused = ctl("pause", "web", "--json")
        assert json.loads(paused.stdout)["state"] == "paused"
        assert "reason: paused by admin" in ctl("status", "web").stdout
        assert ctl("resume", "web").returncode == 0
        aborted = ctl("abort", "web")
        assert aborted.returncode == 0 and "aborted" in aborted.stdout
        watched = ctl("status", "web", "--watch")
        assert watched.returncode == 1  # over, and not promoted
        missing = ctl("start", "web", "-f", str(tmp_path / "nope.yaml"))
        assert missing.returncode == 1 and "cannot read" in missing.stderr


# ---------------------------------------------------------------------------- in process: hooks


IN_PROCESS = """
services:
  - name: web
    versions:
      stable: {endpoints: ["127.0.0.1:9"]}
      canary: {endpoints: ["127.0.0.1:9"]}
"""


def test_dump_and_restore_carry_a_release_at_its_step_and_every_change_is_reported() -> None:
    spec = {
        "canary": "canary",
        "steps": [{"weight": 10}, {"weight": 50, "approval": True}, {"weight": 100}],
    }
    heard: list[tuple[str, str | None, str, str]] = []

    def on_transition(service: str, before: Any, after: Any, actor: str) -> None:
        heard.append((service, before and before["state"], after["state"], actor))

    async def scenario() -> None:
        state = LiveState(parse_config(IN_PROCESS), None)
        releases = Releases(state, Metrics(), on_transition=on_transition)
        releases.start("web", spec, "ops")
        assert releases.get("web")["state"] == "waiting"
        saved = json.loads(json.dumps(releases.dump()))
        await releases.close()

        fresh = LiveState(parse_config(IN_PROCESS), None)  # the file's weights: stable 100
        restored = Releases(fresh, Metrics(), on_transition=on_transition)
        assert restored.restore(saved) == []
        shown = restored.get("web")
        assert (shown["state"], shown["step"], shown["weight"]) == ("waiting", 1, 50)
        assert dict(fresh.service("web").split.weights) == {"stable": 50, "canary": 50}
        assert restored.command("web", "approve", "ops")["state"] == "promoted"
        await restored.close()

        broken = {"web": {**saved["web"], "release": {"state": "progressing"}}}
        other = Releases(LiveState(parse_config(IN_PROCESS), None), Metrics())
        assert other.restore({"api": saved["web"], **broken}) == [
            "release of service 'api' not restored: unknown service 'api'",
            "release of service 'web' not restored: missing 'checks'",
        ]
        with pytest.raises(NoRelease):
            other.get("web")

    asyncio.run(scenario())
    assert heard == [
        ("web", None, "waiting", "ops"),
        ("web", "waiting", "promoted", "ops"),
    ]


def test_kill_9_mid_release_then_restart_resumes_at_the_same_step(
    upstream: dict[str, Version], tmp_path: Path
) -> None:
    """With a state file, a release survives kill -9: same step, same weights, and a
    generation that does not go back; every transition is in the audit."""
    state_file = tmp_path / "state.json"
    spec = {
        "canary": "canary",
        "steps": [{"weight": 10}, {"weight": 50, "approval": True}, {"weight": 100}],
    }
    text = config(upstream, top=f"state_file: {state_file}")
    with ProxyProcess(text) as first:
        api = Api(first)
        api.start(spec)
        waiting = api.wait("waiting")
        assert (waiting["step"], waiting["weight"]) == (1, 50)
        seen = api.service()["generation"]
        first.stop(signal.SIGKILL)
    with ProxyProcess(text) as second:
        api = Api(second)
        release = api.release()
        assert (release["state"], release["step"], release["weight"]) == ("waiting", 1, 50)
        assert api.weights() == {"stable": 50, "canary": 50}
        restarted = api.service()["generation"]
        assert restarted >= seen
        status, stale = api.call_if_match("POST", "/api/v1/services/web/release/approve", seen - 1)
        assert status == 412, stale
        assert api.release()["state"] == "waiting"
        status, approved = api.call_if_match(
            "POST", "/api/v1/services/web/release/approve", restarted
        )
        assert status == 200, approved
        assert api.wait("promoted")["weight"] == 100
        assert api.service()["generation"] > restarted
        status, audit = api.call("GET", "/api/v1/audit?service=web")
        assert status == 200, audit
        moves = [(r["actor"], r["action"], r["after"].get("state")) for r in audit["records"]]
        # The approval, by the caller, ends the release (its last step has no pause).
        assert moves[1] == ("admin", "release", "promoted")
        assert ("release", "weights", None) in moves  # the steps' weights, by the release
