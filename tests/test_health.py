"""Endpoint health, outlier ejection, load balancing and retries.

Two tiers: the balancer and the health state driven directly (no proxy, and
for ejection and choice no event loop either: a fake clock whose timers fire
when the test moves time on), then real grayproxy processes in front of real
upstreams that fail, hang, answer 5xx or get killed."""

from __future__ import annotations

import asyncio
import http.client
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import (
    Address,
    Config,
    HealthCheck,
    OutlierDetection,
    Service,
    Split,
    Timeouts,
    Version,
)
from proxy.endpoints import Balancer, Endpoint, Upstreams
from proxy.errors import UpstreamOverflow
from proxy.health import HealthChecker, check_request, probe, status_passes
from proxy.metrics import Metrics
from proxy.state import LiveState
from proxy.upstream import UpstreamConnection

from procs import ProxyProcess, free_port, http_get
from servers import AppServer, LoopThread, decode_json

T = TypeVar("T")

# ---------------------------------------------------------------------------- in-process


@dataclass
class FakeTimer:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Time that moves only when the test says, and the timers due on it:
    both the endpoints' clock and their timers."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.timers: list[FakeTimer] = []

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def pending(self) -> list[FakeTimer]:
        return [timer for timer in self.timers if not timer.cancelled]

    def advance(self, seconds: float) -> None:
        """Move on by `seconds`, running the timers that fall due, in order."""
        end = self.now + seconds
        while due := [timer for timer in self.pending() if timer.when <= end]:
            timer = min(due, key=lambda timer: timer.when)
            self.timers.remove(timer)
            self.now = timer.when
            timer.callback()
        self.now = end


def service(endpoints: int = 2, **settings: Any) -> Service:
    addresses = tuple(Address("127.0.0.1", 20000 + i) for i in range(endpoints))
    return Service(
        name="web",
        versions=(Version("v1", addresses),),
        split=Split(weights={"v1": 100.0}),
        baseline="v1",
        **settings,
    )


def run(body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(body())


def balancer_for(svc: Service, clock: FakeClock | None = None) -> Balancer:
    clock = clock or FakeClock()
    balancer = Balancer("web/v1", clock, clock)
    balancer.configure(svc, svc.versions[0])
    return balancer


def test_round_robin_takes_each_endpoint_in_turn() -> None:
    balancer = balancer_for(service(3))
    picks = [balancer.choose() for _ in range(300)]
    assert Counter(endpoint.address.port for endpoint in picks if endpoint) == {
        20000: 100,
        20001: 100,
        20002: 100,
    }
    assert picks[0] is not picks[1] is not picks[2]


def test_a_retry_never_goes_back_to_an_endpoint_already_tried() -> None:
    balancer = balancer_for(service(3))
    tried: list[Endpoint] = []
    while (endpoint := balancer.choose(tried)) is not None:
        assert endpoint not in tried
        tried.append(endpoint)
    assert len(tried) == 3


def test_least_request_prefers_the_endpoint_with_fewer_requests_in_flight() -> None:
    balancer = balancer_for(service(2, load_balancing="least_request"))
    busy, idle = balancer.endpoints
    busy.begin()
    assert all(balancer.choose() is idle for _ in range(100))
    busy.end(200)
    assert {balancer.choose() for _ in range(100)} == {busy, idle}


def test_least_request_on_many_endpoints_avoids_the_loaded_ones() -> None:
    balancer = balancer_for(service(10, load_balancing="least_request"))
    for endpoint in balancer.endpoints[:5]:
        for _ in range(3):
            endpoint.begin()
    picks = Counter(balancer.choose() for _ in range(1000))
    loaded = sum(picks[endpoint] for endpoint in balancer.endpoints[:5])
    # A loaded endpoint wins only when both random choices are loaded ones.
    assert loaded < 1000 * 0.35


def test_a_full_endpoint_is_skipped_then_overflow_is_503() -> None:
    balancer = balancer_for(service(2, max_connections_per_endpoint=1))
    first, second = balancer.endpoints
    first.begin()
    assert all(balancer.choose() is second for _ in range(10))
    second.begin()
    with pytest.raises(UpstreamOverflow) as overflow:
        balancer.choose()
    assert overflow.value.status == 503 and overflow.value.kind == "overflow"
    assert balancer.choose([first, second]) is None  # nothing left to try is not overflow
    first.end(200)
    assert balancer.choose() is first


def test_consecutive_5xx_eject_and_any_other_answer_resets_the_count() -> None:
    clock = FakeClock()
    outlier = OutlierDetection(consecutive_5xx=3, base_ejection_time=30.0)
    balancer = balancer_for(service(2, outlier_detection=outlier), clock)
    endpoint = balancer.endpoints[0]
    for status in (500, 502, 404, 503, 0, 499, 504):  # 404 resets; 0 and 499 do not
        endpoint.begin()
        endpoint.end(status)
    assert endpoint.healthy
    endpoint.begin()
    endpoint.end(500)
    assert not endpoint.healthy
    assert balancer.healthy == (balancer.endpoints[1],)
    assert [timer.when for timer in clock.pending()] == [clock.now + 30.0]


def test_consecutive_connect_failures_eject() -> None:
    clock = FakeClock()
    outlier = OutlierDetection(consecutive_connect_failures=2)
    balancer = balancer_for(service(2, outlier_detection=outlier), clock)
    endpoint = balancer.endpoints[0]
    endpoint._connect_failed()
    assert endpoint.healthy
    endpoint._connect_failed()
    assert not endpoint.healthy and endpoint not in balancer.healthy


def test_an_ejected_endpoint_returns_after_its_ejection_time() -> None:
    clock = FakeClock()
    outlier = OutlierDetection(base_ejection_time=30.0)
    balancer = balancer_for(service(2, outlier_detection=outlier), clock)
    endpoint = balancer.endpoints[0]
    balancer.eject(endpoint, "test")
    assert not endpoint.healthy and balancer.healthy == (balancer.endpoints[1],)
    clock.advance(29.9)
    assert not endpoint.healthy
    clock.advance(0.1)
    assert endpoint.healthy and balancer.healthy == balancer.endpoints
    assert endpoint.returned_at == clock.now and not clock.pending()


def test_ejection_time_grows_with_each_ejection_up_to_the_cap() -> None:
    clock = FakeClock()
    outlier = OutlierDetection(base_ejection_time=10.0, max_ejection_time=25.0)
    balancer = balancer_for(service(2, outlier_detection=outlier), clock)
    endpoint = balancer.endpoints[0]
    durations = []
    for _ in range(4):  # ejected again as soon as it is back
        durations.append(endpoint.eject(outlier))
        clock.advance(durations[-1])
        assert endpoint.healthy
    assert durations == [10.0, 20.0, 25.0, 25.0]


def test_the_ejection_multiplier_wears_off_by_one_per_base_time_in_rotation() -> None:
    clock = FakeClock()
    outlier = OutlierDetection(base_ejection_time=10.0, max_ejection_time=300.0)
    balancer = balancer_for(service(2, outlier_detection=outlier), clock)
    endpoint = balancer.endpoints[0]

    def eject_after(in_rotation: float) -> float:
        clock.advance(in_rotation)
        seconds = endpoint.eject(outlier)
        clock.advance(seconds)  # and back
        return seconds

    assert [eject_after(0.0) for _ in range(3)] == [10.0, 20.0, 30.0]
    assert eject_after(9.9) == 40.0  # less than one base time back: nothing worn off
    assert eject_after(10.0) == 40.0  # one worn off, one added
    assert eject_after(25.0) == 30.0  # two worn off
    assert eject_after(1000.0) == 10.0  # all of it


@pytest.mark.parametrize(
    ("endpoints", "percent", "ejectable"),
    [(1, 50, 1), (2, 50, 1), (3, 50, 1), (4, 50, 2), (5, 50, 2), (10, 10, 1), (10, 0, 1),
     (4, 100, 4), (3, 34, 1), (3, 67, 2)],
)  # fmt: skip
def test_max_ejection_percent_but_one_endpoint_always_can_be(
    endpoints: int, percent: int, ejectable: int
) -> None:
    clock = FakeClock()
    outlier = OutlierDetection(max_ejection_percent=percent)
    balancer = balancer_for(service(endpoints, outlier_detection=outlier), clock)
    for endpoint in balancer.endpoints:
        balancer.eject(endpoint, "test")
    assert sum(endpoint.ejected for endpoint in balancer.endpoints) == ejectable
    assert len(balancer.healthy) == endpoints - ejectable
    assert len(clock.pending()) == ejectable
    balancer.close()
    assert not clock.pending()  # closing calls off the returns


def test_active_check_thresholds() -> None:
    check = HealthCheck(healthy_threshold=2, unhealthy_threshold=3)
    balancer = balancer_for(service(1, health_check=check))
    (endpoint,) = balancer.endpoints
    for passed in (False, False, True, False, False):
        endpoint.check_result(passed, check)
    assert endpoint.healthy  # never three failures in a row
    endpoint.check_result(False, check)
    assert not endpoint.healthy and balancer.choose() is None
    endpoint.check_result(True, check)
    assert not endpoint.healthy
    endpoint.check_result(True, check)
    assert endpoint.healthy and balancer.choose() is endpoint


def test_a_passing_check_ends_an_ejection_early() -> None:
    clock = FakeClock()
    check = HealthCheck()
    balancer = balancer_for(service(2, health_check=check), clock)
    endpoint = balancer.endpoints[0]
    balancer.eject(endpoint, "test")
    assert not endpoint.healthy
    clock.advance(1.0)
    endpoint.check_result(True, check)
    assert endpoint.healthy and endpoint in balancer.healthy
    assert endpoint.returned_at == clock.now and not clock.pending()


def test_idle_connections_expire_on_the_endpoints_clock() -> None:
    class Transport:
        closed = False

        def is_closing(self) -> bool:
            return self.closed

        def abort(self) -> None:
            self.closed = True

    clock = FakeClock()
    balancer = balancer_for(service(1, timeouts=Timeouts(idle=60.0)), clock)
    (endpoint,) = balancer.endpoints
    old, new = UpstreamConnection(endpoint), UpstreamConnection(endpoint)
    for conn in (old, new):
        conn.transport = cast(asyncio.Transport, Transport())
        endpoint.release(conn)
        clock.advance(30.0)
    endpoint.close_expired(clock.now)  # old: idle 60 s, not over
    assert "2 idle" in repr(endpoint)
    clock.advance(0.5)
    endpoint.close_expired(clock.now)
    assert "1 idle" in repr(endpoint)
    assert endpoint.take_idle() is new and endpoint.take_idle() is None


def config_of(*services: Service) -> Config:
    return Config(services=services)


def test_reload_keeps_the_health_of_endpoints_that_stay() -> None:
    clock = FakeClock()
    upstreams = Upstreams(clock, clock)
    svc = service(2)
    upstreams.update(config_of(svc))
    balancer = upstreams.balancer("web", "v1")
    kept, dropped = balancer.endpoints
    balancer.eject(kept, "test")
    added = Address("127.0.0.1", 20100)
    moved = replace(svc, versions=(Version("v1", (kept.address, added)),))
    upstreams.update(config_of(replace(moved, load_balancing="least_request")))
    assert upstreams.balancer("web", "v1") is balancer  # in-flight requests keep theirs
    assert balancer.endpoints[0] is kept and not kept.healthy
    assert dropped.closed and balancer.endpoints[1].address == added
    assert balancer.least_request
    assert [endpoint.address for endpoint in balancer.endpoints] == [kept.address, added]
    assert not upstreams.endpoint_healthy("web", "v1", kept.address)
    assert upstreams.endpoint_healthy("web", "v1", added)
    clock.advance(30.0)  # the default base_ejection_time
    assert upstreams.endpoint_healthy("web", "v1", kept.address)
    upstreams.close()


def test_health_checks_follow_the_config() -> None:
    async def body() -> None:
        upstreams = Upstreams()
        check = HealthCheck(interval=30.0)
        upstreams.update(config_of(service(2, health_check=check)))
        checker = upstreams._checker
        assert len(checker._running) == 2
        first_tasks = {task for _, task in checker._running.values()}
        upstreams.update(config_of(service(3, health_check=check)))
        assert len(checker._running) == 3
        assert first_tasks <= {task for _, task in checker._running.values()}  # not restarted
        upstreams.update(config_of(service(3, health_check=replace(check, path="/ready"))))
        assert not first_tasks & {task for _, task in checker._running.values()}
        upstreams.update(config_of(service(3)))
        assert not checker._running
        await asyncio.sleep(0)
        assert all(task.cancelled() for task in first_tasks)
        upstreams.close()

    run(body)


def test_endpoints_without_checks_are_healthy_again_when_checks_are_removed() -> None:
    async def body() -> None:
        upstreams = Upstreams()
        check = HealthCheck(unhealthy_threshold=1)
        upstreams.update(config_of(service(1, health_check=check)))
        (endpoint,) = upstreams.balancer("web", "v1").endpoints
        endpoint.check_result(False, check)
        assert not endpoint.healthy
        upstreams.update(config_of(service(1)))
        assert endpoint.healthy
        upstreams.close()

    run(body)


@pytest.mark.parametrize(
    ("line", "passes"),
    [
        (b"HTTP/1.1 200 OK\r\n", True),
        (b"HTTP/1.0 204 No Content\r\n", True),
        (b"HTTP/1.1 302 Found\r\n", True),
        (b"HTTP/1.1 404 Not Found\r\n", False),
        (b"HTTP/1.1 503 Service Unavailable\r\n", False),
        (b"HTTP/1.1 199\r\n", False),
        (b"SSH-2.0-OpenSSH\r\n", False),
        (b"", False),
    ],
)
def test_what_counts_as_a_passing_check(line: bytes, passes: bool) -> None:
    assert status_passes(line) is passes


def test_check_request_names_the_path_and_host() -> None:
    address = Address("10.0.0.1", 8080)
    request = check_request(address, HealthCheck(path="/ready?deep=1"))
    assert request.startswith(b"GET /ready?deep=1 HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n")
    assert b"Connection: close\r\n" in request and request.endswith(b"\r\n\r\n")
    named = check_request(address, HealthCheck(host="app.internal"))
    assert b"\r\nHost: app.internal\r\n" in named


def test_probe_over_real_sockets() -> None:
    async def body() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                request = await reader.readuntil(b"\r\n\r\n")
                seen.append(request)
                if b"/silent" not in request:
                    status = b"200 OK" if b"/up " in request else b"503 Unavailable"
                    writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
                await reader.read()  # until the checker hangs up
            finally:
                writer.close()

        seen: list[bytes] = []
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        address = Address("127.0.0.1", server.sockets[0].getsockname()[1])

        async def check(path: str) -> bool:
            return await probe(address, check_request(address, HealthCheck(path=path)), 0.3)

        assert await check("/up")
        assert not await check("/down")
        started = time.monotonic()
        assert not await check("/silent")
        assert 0.25 < time.monotonic() - started < 1.0
        assert not await probe(Address("127.0.0.1", free_port()), b"GET / HTTP/1.1\r\n\r\n", 0.3)
        assert len(seen) == 3
        server.close()
        await server.wait_closed()

    run(body)


def test_the_checker_reports_every_verdict() -> None:
    class Target:
        def __init__(self, address: Address) -> None:
            self.address = address
            self.tls = None
            self.verdicts: list[bool] = []

        def check_result(self, passed: bool, check: HealthCheck) -> None:
            self.verdicts.append(passed)

    async def body() -> None:
        async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Closed on every path: a check cut short by checker.close() fails the read, and
            # asyncio in Python 3.11.2 leaves a failed handler's connection open until it is
            # collected (a ResourceWarning in whichever later test runs); 3.11.7 closes it.
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(ok, "127.0.0.1", 0)
        up = Target(Address("127.0.0.1", server.sockets[0].getsockname()[1]))
        down = Target(Address("127.0.0.1", free_port()))
        checker = HealthChecker()
        check = HealthCheck(interval=0.02, timeout=0.2)
        checker.follow({up: check, down: check})
        await asyncio.sleep(0.3)
        checker.close()
        server.close()
        await server.wait_closed()
        assert len(up.verdicts) >= 3 and all(up.verdicts)
        assert len(down.verdicts) >= 3 and not any(down.verdicts)

    run(body)


def test_the_endpoint_gauge() -> None:
    svc = service(2)
    state = LiveState(config_of(svc), None)
    down = svc.versions[0].endpoints[1]
    text = Metrics().render(state.snapshot, lambda s, v, address: address != down).decode()
    gauge = {
        sample.labels["endpoint"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "grayproxy_endpoint_healthy"
        for sample in family.samples
    }
    assert gauge == {"127.0.0.1:20000": 1.0, "127.0.0.1:20001": 0.0}
    assert "grayproxy_endpoint_healthy" not in Metrics().render(state.snapshot).decode()


# ---------------------------------------------------------------------------- real processes


class Backend(AppServer):
    """An upstream whose answers the test changes while it runs: the status of
    its health path and of every other path, a delay, and counts of what it served."""

    def __init__(self, loops: LoopThread, name: str) -> None:
        super().__init__(loops, name)
        self.health = 200
        self.status = 200
        self.delay = 0.0
        self.in_flight = 0
        self.served = 0

    async def _handle(self, request: web.Request) -> web.Response:
        if request.path == "/healthz":
            return web.Response(status=self.health, text=self.name)
        self.in_flight += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            self.served += 1
            return web.Response(status=self.status, text=self.name)
        finally:
            self.in_flight -= 1


@pytest.fixture
def backends(loops: LoopThread) -> Iterator[dict[str, Backend]]:
    servers = {name: Backend(loops, name).start() for name in ("a", "b", "c", "d")}
    yield servers
    for server in servers.values():
        server.stop()


HEADER = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
services:
"""


def get(
    proxy: ProxyProcess, path: str = "/", conn: http.client.HTTPConnection | None = None
) -> tuple[int, str]:
    """Status and body text; over `conn` if given (keep-alive), else a new connection."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", proxy.data_port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        if own:
            conn.close()


def endpoint_health(proxy: ProxyProcess, service: str) -> dict[str, bool]:
    """address -> healthy, as the control API reports it."""
    status, _, body = http_get(f"{proxy.control_url}/api/v1/services/{service}")
    assert status == 200, body
    return {
        endpoint["address"]: endpoint["healthy"]
        for version in decode_json(body)["versions"].values()
        for endpoint in version["endpoints"]
    }


def metric_samples(proxy: ProxyProcess, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = http_get(proxy.control_url + "/metrics")[2].decode()
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def gauge(proxy: ProxyProcess) -> dict[str, float]:
    samples = metric_samples(proxy, "grayproxy_endpoint_healthy")
    return {dict(labels)["endpoint"]: value for labels, value in samples.items()}


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


KILLABLE = """
import asyncio, sys
from aiohttp import web

async def main():
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", lambda request: web.Response(text="doomed"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1])).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_an_endpoint_killed_under_load_is_ejected_and_the_other_takes_the_traffic(
    backends: dict[str, Backend],
) -> None:
    port = free_port()
    doomed = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert doomed.stdout is not None and doomed.stdout.readline() == "ready\n"
        config = (
            HEADER
            + f"""
  - name: web
    versions: {{v1: {{endpoints: ["{backends["a"].address}", "127.0.0.1:{port}"]}}}}
"""
        )
        with ProxyProcess(config) as proxy:
            results, killed_at = load_while(proxy, lambda: kill(doomed), seconds=2.0)
            health = endpoint_health(proxy, "web")
            healthy_gauge = gauge(proxy)
    finally:
        kill(doomed)
        assert doomed.stdout is not None
        doomed.stdout.close()
    before = {body for at, _, body in results if at < killed_at}
    after = [(status, body) for at, status, body in results if at > killed_at + 0.3]
    assert {"a", "doomed"} <= before
    assert len(after) > 100
    assert set(after) == {(200, "a")}  # errors stopped: every request served by the survivor
    failures = [status for _, status, _ in results if status != 200]
    assert len(failures) <= 4  # at most the requests in flight when it died
    assert health == {backends["a"].address: True, f"127.0.0.1:{port}": False}
    assert healthy_gauge == {backends["a"].address: 1.0, f"127.0.0.1:{port}": 0.0}


def kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def load_while(
    proxy: ProxyProcess, fault: Callable[[], None], seconds: float, clients: int = 4
) -> tuple[list[tuple[float, int, str]], float]:
    """`clients` keep-alive clients send requests for `seconds`; `fault` runs
    halfway. Returns every request as (when it ended, status, body), a
    connection error as status 0, and when the fault happened."""
    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.data_port, timeout=10)
        while not stop.is_set():
            try:
                status, body = get(proxy, "/", conn)
            except (OSError, http.client.HTTPException):
                status, body = 0, ""
                conn.close()
            results.append((time.monotonic(), status, body))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds / 2)
    fault()
    fault_at = time.monotonic()
    time.sleep(seconds / 2)
    stop.set()
    for thread in threads:
        thread.join()
    return results, fault_at


def test_consecutive_5xx_eject_an_endpoint_and_the_errors_stop(
    backends: dict[str, Backend],
) -> None:
    a, b = backends["a"], backends["b"]
    config = (
        HEADER
        + f"""
  - name: web
    outlier_detection: {{consecutive_5xx: 3, base_ejection_time: 1m}}
    versions: {{v1: {{endpoints: ["{a.address}", "{b.address}"]}}}}
"""
    )
    b.status = 500
    with ProxyProcess(config) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.data_port, timeout=10)
        statuses = [get(proxy, "/", conn)[0] for _ in range(40)]
        conn.close()
        assert statuses.count(500) == 3  # the third in a row ejected it
        assert statuses[-30:] == [200] * 30
        assert endpoint_health(proxy, "web") == {a.address: True, b.address: False}


def test_max_ejection_percent_keeps_part_of_the_pool_in_rotation(
    backends: dict[str, Backend],
) -> None:
    servers = [backends[name] for name in "abcd"]
    for server in servers[1:]:
        server.status = 500  # three of four endpoints fail
    endpoints = ", ".join(f'"{server.address}"' for server in servers)
    config = (
        HEADER
        + f"""
  - name: web
    outlier_detection: {{consecutive_5xx: 1, base_ejection_time: 1m, max_ejection_percent: 50}}
    versions: {{v1: {{endpoints: [{endpoints}]}}}}
"""
    )
    with ProxyProcess(config) as proxy:
        statuses = [get(proxy)[0] for _ in range(60)]
        health = endpoint_health(proxy, "web")
    assert health[servers[0].address]
    assert sorted(health.values()) == [False, False, True, True]  # 2 of 4 at most
    assert statuses[-20:].count(500) >= 5  # the failing one left in rotation still gets traffic


def test_active_checks_take_an_endpoint_out_and_bring_it_back(
    backends: dict[str, Backend],
) -> None:
    a, b = backends["a"], backends["b"]
    config = (
        HEADER
        + f"""
  - name: web
    health_check: {{path: /healthz, interval: 50ms, timeout: 2s,
                   healthy_threshold: 2, unhealthy_threshold: 2}}
    versions: {{v1: {{endpoints: ["{a.address}", "{b.address}"]}}}}
"""
    )
    with ProxyProcess(config) as proxy:
        assert {get(proxy)[1] for _ in range(10)} == {"a", "b"}
        b.health = 503
        wait_until(lambda: not endpoint_health(proxy, "web")[b.address])
        assert gauge(proxy) == {a.address: 1.0, b.address: 0.0}
        assert {get(proxy)[1] for _ in range(20)} == {"a"}
        b.health = 200
        wait_until(lambda: endpoint_health(proxy, "web")[b.address])
        assert gauge(proxy) == {a.address: 1.0, b.address: 1.0}
        assert {get(proxy)[1] for _ in range(10)} == {"a", "b"}


def test_every_worker_checks_and_the_supervisor_reports_it(
    backends: dict[str, Backend],
) -> None:
    a, b = backends["a"], backends["b"]
    config = (
        "workers: 2\n"
        + HEADER
        + f"""
  - name: web
    health_check: {{interval: 50ms, timeout: 2s, unhealthy_threshold: 1}}
    versions: {{v1: {{endpoints: ["{a.address}", "{b.address}"]}}}}
"""
    )
    b.health = 500
    with ProxyProcess(config) as proxy:
        wait_until(lambda: gauge(proxy) == {a.address: 1.0, b.address: 0.0})
        assert endpoint_health(proxy, "web") == {a.address: True, b.address: False}
        # The supervisor shows an endpoint down as soon as one worker has it
        # down; each worker's own checks take it out of that worker's rotation.
        wait_until(lambda: {get(proxy)[1] for _ in range(20)} == {"a"})


def test_fallback_while_a_version_has_no_healthy_endpoint_else_503(
    backends: dict[str, Backend],
) -> None:
    a, b, c = backends["a"], backends["b"], backends["c"]
    config = (
        HEADER
        + f"""
  - name: guarded
    match: {{path_prefix: /guarded}}
    fallback: stable
    health_check: {{interval: 50ms, timeout: 2s, unhealthy_threshold: 1}}
    versions:
      canary: {{endpoints: ["{b.address}", "{c.address}"]}}
      stable: {{endpoints: ["{a.address}"]}}
    split: {{weights: {{canary: 100, stable: 0}}}}
  - name: bare
    health_check: {{interval: 50ms, timeout: 2s, unhealthy_threshold: 1}}
    versions:
      canary: {{endpoints: ["{b.address}", "{c.address}"]}}
"""
    )
    with ProxyProcess(config) as proxy:
        assert get(proxy, "/guarded")[1] in ("b", "c")
        b.health = c.health = 503
        wait_until(lambda: not any(endpoint_health(proxy, "bare").values()))
        wait_until(lambda: endpoint_health(proxy, "guarded") == {
            a.address: True, b.address: False, c.address: False})  # fmt: skip
        for _ in range(5):
            assert get(proxy, "/guarded") == (200, "a")
        status, body = get(proxy, "/bare")
        assert status == 503 and "no healthy endpoint" in body
        fallbacks = metric_samples(proxy, "grayproxy_fallback_total")
        assert fallbacks[(("service", "guarded"), ("version", "canary"))] >= 5
        b.health = 200
        wait_until(lambda: get(proxy, "/bare") == (200, "b"))


def test_fallback_when_every_endpoint_of_a_version_refuses(backends: dict[str, Backend]) -> None:
    dead = [f'"127.0.0.1:{free_port()}"' for _ in range(2)]
    config = (
        HEADER
        + f"""
  - name: web
    fallback: stable
    versions:
      canary: {{endpoints: [{", ".join(dead)}]}}
      stable: {{endpoints: ["{backends["a"].address}"]}}
    split: {{weights: {{canary: 100, stable: 0}}}}
"""
    )
    with ProxyProcess(config) as proxy:
        assert [get(proxy) for _ in range(10)] == [(200, "a")] * 10


def test_least_request_sends_new_requests_to_the_idle_endpoint(
    backends: dict[str, Backend],
) -> None:
    slow, fast = backends["a"], backends["b"]
    slow.delay = 2.0
    config = (
        HEADER
        + f"""
  - name: web
    load_balancing: least_request
    timeouts: {{response: 5s}}
    versions: {{v1: {{endpoints: ["{slow.address}", "{fast.address}"]}}}}
"""
    )
    with ProxyProcess(config) as proxy:
        background = []
        while slow.in_flight == 0:  # until a request is held by the slow endpoint
            thread = threading.Thread(target=get, args=(proxy,))
            thread.start()
            background.append(thread)
            time.sleep(0.05)
            assert len(background) < 40
        served = Counter(get(proxy)[1] for _ in range(30))
        for thread in background:
            thread.join()
    assert served == {"b": 30}


def test_connection_limit_overflow_is_503_and_counted(backends: dict[str, Backend]) -> None:
    slow = backends["a"]
    slow.delay = 1.0
    config = (
        HEADER
        + f"""
  - name: web
    max_connections_per_endpoint: 1
    versions: {{v1: {{endpoints: ["{slow.address}"]}}}}
"""
    )
    with ProxyProcess(config) as proxy:
        holder = threading.Thread(target=get, args=(proxy,))
        holder.start()
        wait_until(lambda: slow.in_flight == 1)
        status, body = get(proxy)
        holder.join()
        assert status == 503 and "limit of 1 connections" in body
        errors = metric_samples(proxy, "grayproxy_upstream_errors_total")
        assert errors[(("kind", "overflow"), ("service", "web"), ("version", "v1"))] == 1
        assert get(proxy) == (200, "a")  # the connection is free again


@pytest.mark.parametrize("attempts", [0, 1, 3])
def test_connect_retries_are_bounded(attempts: int) -> None:
    dead = ", ".join(f'"127.0.0.1:{free_port()}"' for _ in range(5))
    config = (
        HEADER
        + f"""
  - name: web
    retries: {{attempts: {attempts}}}
    outlier_detection: {{consecutive_connect_failures: 0}}
    versions: {{v1: {{endpoints: [{dead}]}}}}
"""
    )
    with ProxyProcess(config) as proxy:
        status, body = get(proxy)
        assert status == 502 and "connect" in body
        errors = metric_samples(proxy, "grayproxy_upstream_errors_total")
        assert errors[(("kind", "connect"), ("service", "web"), ("version", "v1"))] == attempts + 1


def test_health_survives_a_weight_change_and_follows_a_reload(
    backends: dict[str, Backend],
) -> None:
    a, b, c = backends["a"], backends["b"], backends["c"]
    template = (
        HEADER
        + """
  - name: web
    health_check: {interval: 50ms, timeout: 2s, unhealthy_threshold: 1}
    versions:
      v1: {endpoints: [%s]}
      v2: {endpoints: ["%s"]}
    split: {weights: {v1: 100, v2: 0}}
"""
    )
    b.health = 503
    with ProxyProcess(template % (f'"{a.address}", "{b.address}"', c.address)) as proxy:
        wait_until(lambda: not endpoint_health(proxy, "web")[b.address])
        conn = http.client.HTTPConnection("127.0.0.1", proxy.control_port, timeout=10)
        conn.request("PUT", "/api/v1/services/web/weights", body=b'{"v1": 50, "v2": 50}')
        assert conn.getresponse().status == 200
        conn.close()
        assert not endpoint_health(proxy, "web")[b.address]  # not reset by the new snapshot
        proxy.write_config(template % (f'"{a.address}", "{c.address}"', c.address))
        assert proxy.process is not None
        proxy.process.send_signal(1)  # SIGHUP
        wait_until(lambda: b.address not in endpoint_health(proxy, "web"))
        assert gauge(proxy) == {a.address: 1.0, c.address: 1.0}
        assert re.search(r"ejected|fails its health checks", proxy.output)
