"""Reloads of a large config: parsed off the event loop, so traffic keeps flowing; the size cap.

A real grayproxy process, a real upstream, a client sending GETs one after another on a
thread while a 5 MB config is reloaded by `POST /api/v1/reload` or SIGHUP. With `workers: 1`
the process that parses is the one that serves; with `workers: 2` the supervisor parses and
each worker unpacks what it is sent. Before the parse moved to a thread, a GET that arrived
during a 5 MB reload with one worker waited for the whole parse (seconds).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import ctl
from proxy import state as state_module
from proxy.cli import build_parser
from proxy.config import ConfigError
from proxy.control import create_app
from proxy.loader import MAX_CONFIG_BYTES, load_config
from proxy.metrics import Metrics
from proxy.state import LiveState, Snapshot

from procs import DIRECT, ProxyProcess, free_port, http_get, is_listening, run_cli
from servers import AppServer, LoopThread, Upstream

# A GET through the proxy takes milliseconds; a parse on the event loop held one for the whole
# parse (3 s for this 5 MB file before the fix). Generous: only a stall can reach it.
STALL = 1.0
BIG_BYTES = 5_000_000
TENANT_RULES = 25
USER_IDS_PER_RULE = 100


def big_config(upstream: str, release: int, workers: int) -> str:
    """A valid config of about 5 MB. Service `web` serves the probes; its one version is named
    after ``release``, so each response says which config served it (x-grayproxy-version).
    Tenants follow, each with long rule lists (user-id allow lists of about 2 KB a rule),
    on hosts the probes never use."""
    parts = [
        f"""\
listen: "127.0.0.1:${{data_port}}"
workers: {workers}
control: {{listen: "127.0.0.1:${{control_port}}"}}
services:
  - name: web
    versions:
      r{release}: {{endpoints: ["{upstream}"]}}
"""
    ]
    size = len(parts[0])
    tenant = 0
    while size < BIG_BYTES:
        lines = [
            f"""\
  - name: tenant-{tenant:04d}
    match: {{host: "tenant-{tenant:04d}.example.com"}}
    versions:
      stable: {{endpoints: ["{upstream}"]}}
      canary: {{endpoints: ["{upstream}"]}}
    split: {{weights: {{stable: {100 - release}, canary: {release}}}}}
    rules:
"""
        ]
        for rule in range(TENANT_RULES):
            users = "|".join(
                f"user-{tenant:04d}-{rule:02d}-{user:04d}" for user in range(USER_IDS_PER_RULE)
            )
            lines.append(
                f'      - match: {{header: {{name: x-user-id, value: "{users}"}}}}\n'
                "        version: canary\n"
            )
        block = "".join(lines)
        parts.append(block)
        size += len(block)
        tenant += 1
    return "".join(parts)


class Prober:
    """GETs through the proxy on one keep-alive connection, one after another, on a thread;
    each one's start (monotonic), duration and x-grayproxy-version are kept."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.samples: list[tuple[float, float, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        deadline = time.monotonic() + 10
        while len(self.samples) < 20 and not self.failures:  # warmed up: the loop answers
            assert time.monotonic() < deadline, "no probe got through"
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                conn.request("GET", "/probe")
                response = conn.getresponse()
                response.read()
                took = time.monotonic() - started
                self.samples.append((started, took, response.getheader("x-grayproxy-version", "")))
                if response.status != 200:
                    self.failures.append(f"status {response.status}")
        except OSError as exc:
            self.failures.append(repr(exc))
        finally:
            conn.close()

    def wait_for(self, version: str, timeout: float = 60) -> float:
        """When the first response from ``version`` came: the reload reached this data path."""
        deadline = time.monotonic() + timeout
        while True:
            for began, took, seen in self.samples:
                if seen == version:
                    return began + took
            assert not self.failures, self.failures
            assert time.monotonic() < deadline, f"no response from {version} in {timeout} s"
            time.sleep(0.05)

    def overlapping(self, start: float, end: float) -> list[float]:
        """Durations of the GETs that were in flight at some moment between start and end."""
        return [took for began, took, _ in self.samples if began < end and began + took > start]


def control(proxy: ProxyProcess, method: str, path: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(proxy.control_url + path, data=b"{}", method=method)
    try:
        with DIRECT.open(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def service(proxy: ProxyProcess, name: str) -> dict[str, Any]:
    status, _, body = http_get(f"{proxy.control_url}/api/v1/services/{name}", timeout=30)
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def generation(proxy: ProxyProcess) -> int:
    return int(service(proxy, "web")["generation"])


def canary_weight(proxy: ProxyProcess) -> float:
    return float(service(proxy, "tenant-0000")["versions"]["canary"]["weight"])


class BigProxy:
    def __init__(self, proxy: ProxyProcess, upstream: str, workers: int) -> None:
        self.proxy = proxy
        self.upstream = upstream
        self.workers = workers

    def rewrite(self, release: int) -> None:
        self.proxy.write_config(big_config(self.upstream, release, self.workers))


@pytest.fixture(scope="module", params=[1, 2], ids=["workers-1", "workers-2"])
def big_proxy(request: pytest.FixtureRequest, upstreams: dict[str, Upstream]) -> Iterator[BigProxy]:
    workers: int = request.param
    text = big_config(upstreams["stable"].address, 5, workers)
    assert BIG_BYTES <= len(text.encode()) < MAX_CONFIG_BYTES
    with ProxyProcess(text, ready_timeout=120) as proxy:
        yield BigProxy(proxy, upstreams["stable"].address, workers)


def assert_no_stall(prober: Prober, start: float, end: float) -> None:
    during = prober.overlapping(start, end)
    assert not prober.failures, prober.failures
    assert max(during) < STALL, (
        f"a GET took {max(during):.2f} s during a {end - start:.2f} s reload "
        f"(GETs in flight then: {len(during)})"
    )
    assert len(during) >= 5, f"only {len(during)} GETs overlapped the reload"


def test_api_reload_of_5_mb_does_not_stall_requests(big_proxy: BigProxy) -> None:
    proxy = big_proxy.proxy
    before = generation(proxy)
    big_proxy.rewrite(20)
    with Prober(proxy.data_port) as prober:
        start = time.monotonic()
        status, answer = control(proxy, "POST", "/api/v1/reload")
        assert status == 200, answer
        end = prober.wait_for("r20")  # with workers, once the probed one has unpacked it
    assert answer["generation"] > before
    assert canary_weight(proxy) == 20
    assert_no_stall(prober, start, end)


def test_sighup_reload_of_5_mb_does_not_stall_requests(big_proxy: BigProxy) -> None:
    proxy = big_proxy.proxy
    before = generation(proxy)
    big_proxy.rewrite(30)
    with Prober(proxy.data_port) as prober:
        start = time.monotonic()
        proxy.send_signal(signal.SIGHUP)
        end = prober.wait_for("r30")
    assert generation(proxy) > before
    assert canary_weight(proxy) == 30
    assert_no_stall(prober, start, end)


# --- the size cap ------------------------------------------------------------------------------

SMALL = """\
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
services:
  - name: web
    versions:
      stable: {endpoints: ["127.0.0.1:9"]}
"""


def oversized(text: str) -> str:
    """``text`` padded with a comment to one byte over the cap: valid YAML, only too large."""
    padding = MAX_CONFIG_BYTES + 1 - len(text.encode()) - 2
    return text + "#" + "x" * padding + "\n"


def size_error(path: Path | str) -> str:
    return (
        f"{path}: too large: {MAX_CONFIG_BYTES + 1} bytes; "
        f"the limit is {MAX_CONFIG_BYTES} bytes (8 MiB)"
    )


def test_check_and_run_refuse_a_config_over_the_cap(tmp_path: Path) -> None:
    data_port, control_port = free_port(), free_port()
    path = tmp_path / "grayproxy.yaml"
    text = SMALL.replace("${data_port}", str(data_port)).replace(
        "${control_port}", str(control_port)
    )
    path.write_text(oversized(text))
    assert path.stat().st_size == MAX_CONFIG_BYTES + 1
    for command in ("check", "run"):
        result = run_cli(command, "-c", str(path))
        assert result.returncode == 2, result
        assert result.stderr.splitlines() == [size_error(path)]
    assert not is_listening(data_port)
    assert not is_listening(control_port)


def test_reload_refuses_a_config_over_the_cap_and_keeps_the_running_one() -> None:
    with ProxyProcess(SMALL) as proxy:
        before = generation(proxy)
        assert proxy.config_path is not None
        proxy.config_path.write_text(oversized(proxy.substitute(SMALL)).replace("stable", "canary"))
        assert proxy.config_path.stat().st_size == MAX_CONFIG_BYTES + 1
        status, answer = control(proxy, "POST", "/api/v1/reload")
        assert status == 400, answer
        assert answer["details"] == [size_error(proxy.config_path)]

        proxy.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reload refused" not in proxy.stderr:
            assert time.monotonic() < deadline, proxy.output
            time.sleep(0.05)
        assert size_error(proxy.config_path) in proxy.stderr

        assert generation(proxy) == before
        assert list(service(proxy, "web")["versions"]) == ["stable"]
        assert proxy.returncode is None


class SlowReload(AppServer):
    """A control API whose reload answers after ``delay`` seconds, as a large file would."""

    delay = 1.0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(self.delay)
        return web.json_response({"generation": 2, "warnings": []})


def test_ctl_reload_waits_for_a_long_parse(
    loops: LoopThread, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server = SlowReload(loops, "control").start()
    try:
        # Five times shorter than the reload takes: the reload must not use it.
        monkeypatch.setattr(ctl, "REQUEST_TIMEOUT_SECONDS", SlowReload.delay / 5)
        args = build_parser().parse_args(["ctl", "--url", server.address, "reload"])
        assert args.handler(args) == 0
        assert capsys.readouterr().out == "reloaded: generation 2\n"
        assert ctl.RELOAD_TIMEOUT_SECONDS >= 60
    finally:
        server.stop()


# --- weight changes that land while a reload reads the file ------------------------------------

TWO_SERVICES = """\
services:
  - name: web
    versions:
      stable: {endpoints: ["127.0.0.1:9001"]}
      canary: {endpoints: ["127.0.0.1:9002"]}
    split: {weights: {stable: 90, canary: 10}}
  - name: api
    match: {path_prefix: /api}
    versions:
      blue: {endpoints: ["127.0.0.1:9003"]}
      green: {endpoints: ["127.0.0.1:9004"]}
    split: {weights: {blue: 100, green: 0}}
"""


class Gate:
    """Holds each reload's read of the file until ``open()``, so that a test can act while a
    reload is in progress, without sleeping."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = 0
        self._reading = threading.Event()
        self._open = threading.Event()
        real = state_module.load_and_route

        def gated(path: str) -> Any:
            self.reads += 1
            self._reading.set()
            assert self._open.wait(30)
            return real(path)

        monkeypatch.setattr(state_module, "load_and_route", gated)

    async def reading(self) -> None:
        """Return once a reload is reading the file (in its thread)."""
        assert await asyncio.to_thread(self._reading.wait, 30)

    def open(self) -> None:
        self._open.set()


def live_state(tmp_path: Path) -> LiveState:
    path = tmp_path / "grayproxy.yaml"
    path.write_text(TWO_SERVICES)
    return LiveState(load_config(str(path)), str(path))


def rewrite(state: LiveState, text: str) -> None:
    assert state.config_path is not None
    Path(state.config_path).write_text(text)


def weights(snapshot: Snapshot, service: str) -> dict[str, float]:
    return dict(snapshot.router.service(service).service.split.weights)


def test_a_weight_change_during_a_reload_is_kept_and_the_loop_keeps_answering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = live_state(tmp_path)
    rewrite(state, TWO_SERVICES.replace("{blue: 100, green: 0}", "{blue: 50, green: 50}"))
    gate = Gate(monkeypatch)

    async def main() -> None:
        app = create_app(state, Metrics(), endpoint_health=lambda *_: True, is_ready=lambda: True)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with aiohttp.ClientSession(url) as session:
                reload = asyncio.ensure_future(session.post("/api/v1/reload"))
                await gate.reading()
                # The file is being read in a thread: this loop still answers, and applies.
                body = {"stable": 40, "canary": 60}
                async with session.put("/api/v1/services/web/weights", json=body) as response:
                    assert response.status == 200
                    assert (await response.json())["generation"] == 2
                assert not reload.done()
                gate.open()
                async with await reload as response:
                    assert response.status == 200
                    answer = await response.json()
        finally:
            await runner.cleanup()
        assert answer == {
            "generation": 3,
            "warnings": [
                "services.web: weights changed during the reload are kept: stable 40, canary 60"
            ],
        }

    asyncio.run(main())
    assert weights(state.snapshot, "web") == {"stable": 40, "canary": 60}  # the PUT's
    assert weights(state.snapshot, "api") == {"blue": 50, "green": 50}  # the file's
    assert state.snapshot.config.services[0] is state.snapshot.router.service("web").service


def test_a_weight_change_while_a_reload_waits_for_another_is_kept_by_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = live_state(tmp_path)
    gate = Gate(monkeypatch)

    async def main() -> tuple[Snapshot, Snapshot]:
        first = asyncio.ensure_future(state.reload())
        await gate.reading()
        second = asyncio.ensure_future(state.reload())
        await asyncio.sleep(0)  # the second is asked for, and waits for the first
        state.set_weights("web", {"stable": 40, "canary": 60})
        gate.open()
        return await first, await second

    first, second = asyncio.run(main())
    assert gate.reads == 2  # each reload read the file
    assert (first.generation, second.generation) == (3, 4)
    assert weights(first, "web") == weights(second, "web") == {"stable": 40, "canary": 60}
    assert weights(second, "api") == {"blue": 100, "green": 0}


def test_a_weight_change_before_the_reload_was_asked_gives_way_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = live_state(tmp_path)
    state.set_weights("web", {"stable": 40, "canary": 60})
    gate = Gate(monkeypatch)
    gate.open()
    snapshot = asyncio.run(state.reload())
    assert snapshot.generation == 3
    assert weights(snapshot, "web") == {"stable": 90, "canary": 10}
    assert snapshot.warnings == ()


def test_weight_changes_during_a_reload_that_no_longer_fit_give_way_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = live_state(tmp_path)
    web_only = TWO_SERVICES[: TWO_SERVICES.index("  - name: api")]
    rewrite(
        state,
        web_only.replace('      canary: {endpoints: ["127.0.0.1:9002"]}\n', "").replace(
            "{stable: 90, canary: 10}", "{stable: 100}"
        ),
    )
    gate = Gate(monkeypatch)

    async def main() -> Snapshot:
        reload = asyncio.ensure_future(state.reload())
        await gate.reading()
        state.set_weights("web", {"stable": 40, "canary": 60})
        state.promote("api", "green")
        gate.open()
        return await reload

    snapshot = asyncio.run(main())
    assert snapshot.generation == 4
    assert [service.name for service in snapshot.config.services] == ["web"]
    assert weights(snapshot, "web") == {"stable": 100}
    assert snapshot.warnings == (
        "services.web: weights changed during the reload do not fit the file "
        "(weights.canary: unknown version 'canary' (versions: stable)); the file's weights apply",
        "services.api: weights changed during the reload are dropped: "
        "the service is no longer in the file",
    )


def test_a_weight_change_set_to_zero_for_a_version_the_file_dropped_still_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = live_state(tmp_path)
    three = TWO_SERVICES.replace(
        '      canary: {endpoints: ["127.0.0.1:9002"]}\n',
        '      canary: {endpoints: ["127.0.0.1:9002"]}\n      dark: {endpoints: ["h:1"]}\n',
    )
    rewrite(
        state,
        three.replace("canary: {endpoints", "beta: {endpoints").replace("canary: 10", "beta: 10"),
    )
    gate = Gate(monkeypatch)

    async def main() -> Snapshot:
        reload = asyncio.ensure_future(state.reload())
        await gate.reading()
        state.promote("web", "stable")  # canary 0: nothing of it needs the version
        gate.open()
        return await reload

    snapshot = asyncio.run(main())
    assert weights(snapshot, "web") == {"stable": 100, "beta": 0, "dark": 0}


def test_a_refused_reload_leaves_a_concurrent_weight_change_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = live_state(tmp_path)
    rewrite(state, TWO_SERVICES.replace("canary: 10", "canary: -10"))
    gate = Gate(monkeypatch)

    async def main() -> str:
        reload = asyncio.ensure_future(state.reload())
        await gate.reading()
        changed = state.set_weights("web", {"stable": 40, "canary": 60})
        gate.open()
        with pytest.raises(ConfigError) as refused:
            await reload
        assert state.snapshot is changed
        return refused.value.errors[0]

    error = asyncio.run(main())
    assert "must not be negative" in error
    assert state.snapshot.generation == 2
    assert weights(state.snapshot, "web") == {"stable": 40, "canary": 60}
