"""`grayproxy release run`: a release driven across three real replicas, checked by a real
Prometheus scraping them every second, under light real traffic.

It reaches `promoted` (the canary at 100 % on every replica, exit 0) when the canary is as
good as the baseline, and `rolled_back` (the baseline at 100 % on every replica, exit 1)
when the canary answers 500 on every replica; SIGTERM aborts it the same way; a replica
running its own release, or a step that wants approval, is refused before any change.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.release import STATES

from fleet import fleet_config, running_fleet, served_by, urls, weights
from procs import REPO_ROOT, ProxyProcess, child_env, grayproxy_command, http_get, run_cli, tool
from prometheus import PrometheusProcess
from servers import AppServer, LoopThread, Upstream

RELEASE = """\
    release:
      canary: canary
      steps: [{weight: 20, pause: %(pause)s}, {weight: 50}, {weight: 100}]
      analysis:
        interval: 3s
        min_requests: 5
        max_inconclusive: 20
        failure_limit: 1
        error_rate: {max_increase: 0.05}
        latency_p99: {max_ratio: 5, min_ms: 500}
"""
BASELINE = {"stable": 100, "canary": 0}
REQUESTS_PER_SECOND = 60


class Canary(Upstream):
    """The canary's upstream: answers as Upstream does, or 500 to everything while failing."""

    failing = False

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.failing:
            await request.read()
            return web.Response(status=500, text="canary failing")
        return await super()._handle(request)


class Hooks(AppServer):
    """A webhook receiver: keeps each payload, answers 200."""

    def __init__(self, loops: LoopThread) -> None:
        super().__init__(loops, "hooks")
        self.payloads: list[dict[str, Any]] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.payloads.append(await request.json())
        return web.Response(text="ok")


class Traffic:
    """Requests to every replica in turn, each with a new user key, in a thread."""

    def __init__(self, replicas: Sequence[ProxyProcess]) -> None:
        self.replicas = replicas
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._send, daemon=True)

    def _send(self) -> None:
        for number in itertools.count():
            if self.stopped.wait(1 / REQUESTS_PER_SECOND):
                return
            replica = self.replicas[number % len(self.replicas)]
            with contextlib.suppress(OSError):
                http_get(f"{replica.data_url}/", headers={"x-user-id": f"u{number}"})


@pytest.fixture(scope="module")
def canary(loops: LoopThread) -> Iterator[Canary]:
    server = Canary(loops, "canary").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stable(loops: LoopThread) -> Iterator[Upstream]:
    server = Upstream(loops, "stable").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(stable: Upstream, canary: Canary) -> Iterator[list[ProxyProcess]]:
    tool("prometheus")
    config = fleet_config(stable.address, canary.address, (100, 0))
    with running_fleet(config) as fleet:
        traffic = Traffic(fleet)
        traffic.thread.start()
        try:
            yield fleet
        finally:
            traffic.stopped.set()
            traffic.thread.join(5)


@pytest.fixture(scope="module")
def prometheus(replicas: list[ProxyProcess]) -> Iterator[PrometheusProcess]:
    targets = [f"127.0.0.1:{replica.control_port}" for replica in replicas]
    with PrometheusProcess(targets) as server:
        server.wait_for('count(grayproxy_requests_total{service="web"}) >= 3')
        yield server


@pytest.fixture
def fleet(replicas: list[ProxyProcess], canary: Canary) -> list[ProxyProcess]:
    """Every replica at the baseline, the canary healthy."""
    canary.failing = False
    reset = run_cli("ctl", "--url", urls(replicas), "weights", "web", "stable=100", "canary=0")
    assert reset.returncode == 0, reset.stdout + reset.stderr
    return replicas


def release_file(tmp_path: Path, replica: ProxyProcess, *, pause: str = "1s") -> str:
    """The fleet's config with the release: what `release run -c` reads."""
    path = tmp_path / "fleet.yaml"
    config = fleet_config("127.0.0.1:1", "127.0.0.1:2", (100, 0))
    path.write_text(replica.substitute(config) + RELEASE % {"pause": pause})
    return str(path)


def release_run_args(
    file: str, fleet: Sequence[ProxyProcess], prometheus: PrometheusProcess
) -> list[str]:
    return ["release", "run", "-c", file, "--service", "web", "--url", urls(fleet),
            "--prometheus", prometheus.url]  # fmt: skip


def release_run(
    tmp_path: Path, fleet: Sequence[ProxyProcess], prometheus: PrometheusProcess
) -> subprocess.CompletedProcess[str]:
    file = release_file(tmp_path, fleet[0])
    return run_cli(*release_run_args(file, fleet, prometheus), timeout=60)


def started_release_run(
    file: str, fleet: Sequence[ProxyProcess], prometheus: PrometheusProcess
) -> subprocess.Popen[str]:
    """`release run` started, its output readable as it goes."""
    command = grayproxy_command(*release_run_args(file, fleet, prometheus))
    return subprocess.Popen(
        command, env=child_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )


def wait_for_weights(replicas: Sequence[ProxyProcess], expected: dict[str, float]) -> None:
    deadline = time.monotonic() + 15
    while any(weights(replica) != expected for replica in replicas):
        assert time.monotonic() < deadline, [weights(replica) for replica in replicas]
        time.sleep(0.05)


def states(output: str) -> list[str]:
    """The state of each release line (`HH:MM:SS  STATE  step ...`), repeats folded."""
    words = [line.split() for line in output.splitlines() if line[:2].isdigit()]
    shown = [line[1] for line in words if line[1] in STATES]
    return [state for state, _ in itertools.groupby(shown)]


def test_a_fleet_release_reaches_promoted(
    tmp_path: Path, fleet: list[ProxyProcess], prometheus: PrometheusProcess
) -> None:
    result = release_run(tmp_path, fleet, prometheus)
    assert result.returncode == 0, result.stdout + result.stderr
    assert states(result.stdout) == ["progressing", "promoted"]
    for weight in ("stable=80 canary=20", "stable=50 canary=50", "stable=0 canary=100"):
        assert f"weights {weight}:" in result.stdout
    assert result.stdout.count(": ok generation ") == 3 * 3  # three replicas, three steps
    assert "passed: error_rate: canary 0.00 <= baseline 0.00" in result.stdout
    for replica in fleet:
        assert weights(replica) == {"stable": 0, "canary": 100}
        assert {served_by(replica, f"user-{n}") for n in range(20)} == {"canary"}


def test_a_canary_failing_on_every_replica_is_rolled_back(
    tmp_path: Path, fleet: list[ProxyProcess], canary: Canary, prometheus: PrometheusProcess
) -> None:
    canary.failing = True
    result = release_run(tmp_path, fleet, prometheus)
    assert result.returncode == 1, result.stdout + result.stderr
    assert states(result.stdout) == ["progressing", "rolled_back"]
    assert "rolled back at step 1 of 3 (canary 20%): error_rate: canary 1.00 >" in result.stdout
    assert "weights stable=50" not in result.stdout
    for replica in fleet:
        assert weights(replica) == BASELINE
        assert {served_by(replica, f"user-{n}") for n in range(20)} == {"stable"}


def test_webhooks_are_asked_and_notified_as_the_proxy_does(
    tmp_path: Path, fleet: list[ProxyProcess], prometheus: PrometheusProcess, loops: LoopThread
) -> None:
    hooks = Hooks(loops).start()
    try:
        url = f"http://{hooks.address}/"
        file = tmp_path / "fleet.yaml"
        config = fleet[0].substitute(fleet_config("127.0.0.1:1", "127.0.0.1:2", (100, 0)))
        file.write_text(
            config + "    release:\n"
            "      canary: canary\n"
            "      steps: [{weight: 50, pause: 200ms}, {weight: 100}]\n"
            f"      webhooks: [{{phase: confirm-step, url: '{url}'}}, "
            f"{{phase: post-release, url: '{url}'}}]\n"
        )
        result = run_cli(
            "release", "run", "-c", str(file), "--service", "web", "--url", urls(fleet),
            "--prometheus", prometheus.url, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        asked = [(p["phase"], p["step"], p["state"]) for p in hooks.payloads]
        assert asked == [
            ("confirm-step", 0, "progressing"),
            ("confirm-step", 1, "progressing"),
            ("post-release", 1, "promoted"),
        ]
    finally:
        hooks.stop()
    for replica in fleet:
        assert weights(replica) == {"stable": 0, "canary": 100}


def test_sigterm_aborts_and_gives_the_baseline_back_everywhere(
    tmp_path: Path, fleet: list[ProxyProcess], prometheus: PrometheusProcess
) -> None:
    with started_release_run(
        release_file(tmp_path, fleet[0], pause="10m"), fleet, prometheus
    ) as driver:
        assert driver.stdout is not None
        lines = iter(driver.stdout.readline, "")
        assert any(line.startswith("  ") and "ok generation" in line for line in lines)
        wait_for_weights(fleet, {"stable": 80, "canary": 20})
        driver.send_signal(signal.SIGTERM)
        rest = driver.stdout.read()
        assert driver.wait(30) == 1
    assert "aborted by release run: interrupted (Ctrl-C or SIGTERM)" in rest
    for replica in fleet:
        assert weights(replica) == BASELINE


def test_a_replica_changed_behind_the_release_aborts_it(
    tmp_path: Path, fleet: list[ProxyProcess], prometheus: PrometheusProcess
) -> None:
    with started_release_run(release_file(tmp_path, fleet[0]), fleet, prometheus) as driver:
        wait_for_weights(fleet, {"stable": 80, "canary": 20})
        by_hand = ("ctl", "--url", fleet[1].control_url, "weights", "web", "stable=70", "canary=30")
        assert run_cli(*by_hand).returncode == 0
        output, _ = driver.communicate(timeout=60)
    assert driver.returncode == 1, output
    assert f"{fleet[1].control_url}: failed: HTTP 412: precondition failed" in output
    assert "aborted by release run: weights not applied on 1 of 3 replicas" in output
    for replica in fleet:
        assert weights(replica) == BASELINE


def test_a_replica_running_its_own_release_is_refused(
    tmp_path: Path, fleet: list[ProxyProcess], prometheus: PrometheusProcess
) -> None:
    own = tmp_path / "own.yaml"
    own.write_text("canary: canary\nsteps: [{weight: 10, approval: true}, {weight: 100}]\n")
    path = f"{fleet[1].control_url}/api/v1/services/web"
    started = run_cli(
        "ctl", "--url", fleet[1].control_url, "release", "start", "web", "-f", str(own)
    )
    assert started.returncode == 0, started.stderr
    generations = [generation(replica) for replica in fleet]
    try:
        result = release_run(tmp_path, fleet, prometheus)
        assert [generation(replica) for replica in fleet] == generations  # nothing changed
    finally:
        run_cli("ctl", "--url", fleet[1].control_url, "release", "abort", "web")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "grayproxy release run: "
        f"{fleet[1].control_url}: it runs its own release of canary in web (waiting): give the "
        "replicas a config without it, or abort it there (grayproxy ctl release abort)",
        "  nothing was changed",
    ]
    assert json.loads(http_get(f"{path}/release")[2])["state"] == "aborted"


def generation(replica: ProxyProcess) -> int:
    answer: dict[str, Any] = json.loads(http_get(f"{replica.control_url}/api/v1/services")[2])
    return int(answer["generation"])


def test_a_step_that_wants_approval_is_refused(tmp_path: Path, fleet: list[ProxyProcess]) -> None:
    file = tmp_path / "fleet.yaml"
    config = fleet[0].substitute(fleet_config("127.0.0.1:1", "127.0.0.1:2", (100, 0)))
    file.write_text(
        config + "    release: {canary: canary, steps: [{weight: 50, approval: true}, "
        "{weight: 100}]}\n"
    )
    result = run_cli(
        "release", "run", "-c", str(file), "--service", "web", "--url", urls(fleet),
        "--prometheus", "http://127.0.0.1:1",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "grayproxy release run: step 1 of the release wants approval: release run has nobody "
        "to ask",
        "  gate the step with a confirm-step webhook instead (docs/fleets.md)",
    ]
