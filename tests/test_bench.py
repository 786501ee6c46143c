"""The bench harness's helpers: parsing, config text, medians, ratios, the probe. No load runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import cli, configs, instructions, load, procs, report, runner
from bench.configs import Shape, Upstreams
from bench.runner import Settings, Target, interleaved, series_shapes
from proxy.loader import parse_config

UPSTREAMS = Upstreams(stable=tuple(range(9001, 9051)), canary=tuple(range(9101, 9151)))

WRK_OUTPUT = """Running 3s test @ http://127.0.0.1:8080/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  300.00us   9.00ms   90.00%
  30000 requests in 3.00s, 4.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  10000.00
BENCH_JSON {"requests": 30000, "duration_us": 3000000, "bytes": 4000000, "p50_us": 1950, \
"p99_us": 8100, "mean_us": 2100.0, "max_us": 9000, "connect": 0, "read": 1, "write": 0, \
"status": 3, "timeout": 2}
"""


def test_parse_wrk_json_reads_the_done_summary() -> None:
    result = load.parse_wrk_json(WRK_OUTPUT)
    assert result.requests_per_s == pytest.approx(10_000)
    assert result.p50_ms == pytest.approx(1.95) and result.p99_ms == pytest.approx(8.1)
    assert (result.non_2xx, result.socket_errors, result.errors) == (3, 3, 6)


def test_parse_wrk_json_without_summary_says_what_wrk_printed() -> None:
    with pytest.raises(load.LoadError, match="unable to connect"):
        load.parse_wrk_json("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_wrk_command_has_latency_and_the_script() -> None:
    command = load.wrk_command(
        "http://127.0.0.1:1/", Path("/t/s.lua"), connections=64, threads=2, seconds=2.6
    )
    assert command[:4] == ["wrk", "-t2", "-c64", "-d3s"]
    assert "--latency" in command and command[-3:] == ["-s", "/t/s.lua", "http://127.0.0.1:1/"]


def test_wrk_lua_cycles_through_users_and_sets_the_host() -> None:
    script = configs.wrk_lua(500, "svc100.bench.test")
    assert "local count = 500" in script
    assert 'local host = "svc100.bench.test"' in script
    assert '"x-user-id"' in script and "BENCH_JSON" in script
    assert 'wrk.headers["Host"]' in configs.wrk_lua(10)


@pytest.mark.parametrize("shape", [configs.REALISTIC, *(s for _, s in series_shapes(Settings()))])
def test_grayproxy_configs_pass_grayproxys_own_validation(shape: Shape) -> None:
    config = parse_config(configs.grayproxy_yaml(8080, 9901, UPSTREAMS, shape))
    assert len(config.services) == shape.services
    last = config.services[-1]
    assert [len(version.endpoints) for version in last.versions] == [shape.endpoints] * 2
    assert len(last.rules) == (shape.rules or 4)
    assert last.split.weights == {"stable": 90, "canary": 10}
    expected_host = shape.host or "*"
    assert last.match.host == expected_host
    assert config.access_log is None


def test_the_log_target_writes_its_access_log_to_a_file(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    config = parse_config(
        configs.grayproxy_yaml(8080, 9901, UPSTREAMS, configs.REALISTIC, None, log)
    )
    assert config.access_log is not None and config.access_log.path == str(log)
    assert "grayproxy-log-realistic" in Settings().proxies


def test_series_shapes_share_one_baseline() -> None:
    settings = Settings(series_services=(10,), series_endpoints=(50,), series_rules=())
    shapes = list(series_shapes(settings))
    assert shapes == [
        ("baseline", Shape(1, 1, 1, gateway=True)),
        ("services", Shape(10, 1, 1, gateway=True)),
        ("endpoints", Shape(1, 50, 1, gateway=True)),
    ]


def test_unmatched_rules_mix_the_kinds() -> None:
    text = configs.unmatched_rules(5)
    for kind in ("header:", "cookie:", "query:", "path_prefix:", "regex:"):
        assert kind in text


def test_reference_proxies_do_the_same_split() -> None:
    nginx = configs.proxy_nginx_conf(Path("/tmp/x"), 8080, UPSTREAMS, workers=1)
    assert 'split_clients "${http_x_user_id}"' in nginx and "10% canary;" in nginx
    assert "keepalive 256;" in nginx and 'proxy_set_header Connection "";' in nginx
    haproxy = configs.haproxy_cfg(8080, UPSTREAMS, threads=1)
    assert "http-reuse always" in haproxy and "balance hdr(x-user-id)" in haproxy
    assert "weight 90" in haproxy and "weight 10" in haproxy and "nbthread 1" in haproxy


NGINX = shutil.which("nginx", path="/usr/sbin:/usr/bin")
HAPROXY = shutil.which("haproxy", path="/usr/sbin:/usr/bin")


@pytest.mark.skipif(NGINX is None, reason="no nginx")
def test_nginx_accepts_both_configs(tmp_path: Path) -> None:
    assert NGINX is not None
    for name, conf in (
        ("upstream", configs.upstream_nginx_conf(tmp_path, UPSTREAMS.stable[:3], "hi")),
        ("proxy", configs.proxy_nginx_conf(tmp_path, 8080, UPSTREAMS, workers=1)),
    ):
        path = tmp_path / f"{name}.conf"
        path.write_text(conf)
        command = [NGINX, "-t", "-p", str(tmp_path), "-c", str(path), "-e", "stderr"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr


@pytest.mark.skipif(HAPROXY is None, reason="no haproxy")
def test_haproxy_accepts_its_config(tmp_path: Path) -> None:
    assert HAPROXY is not None
    path = tmp_path / "haproxy.cfg"
    path.write_text(configs.haproxy_cfg(8080, UPSTREAMS, threads=1))
    done = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_proc_parsers() -> None:
    stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 0 0"
    fields = procs.parse_stat(stat)
    assert fields[0] == "S" and int(fields[1]) == 1
    assert procs.stat_cpu_seconds(fields) == pytest.approx(300 / procs.CLOCK_TICKS)
    assert procs.parse_vm_hwm("Name:\tx\nVmHWM:\t   45678 kB\nVmRSS:\t 1 kB\n") == 45678
    assert procs.parse_vm_hwm("Name:\tkthreadd\n") == 0


def test_core_shares_from_proc_stat() -> None:
    before = procs.parse_proc_stat(
        "cpu  1 2 3 4\ncpu0 100 0 100 800 0 0 0 0 0 0\ncpu1 0 0 0 1000 0 0 0 0 0 0\n"
    )
    after = procs.parse_proc_stat(
        "cpu  1 2 3 4\ncpu0 300 0 200 900 0 50 50 0 0 0\ncpu1 10 0 0 1090 0 0 0 0 0 0\n"
    )
    assert procs.core_shares(before, after, 0) == pytest.approx((0.8, 0.2))
    assert procs.core_shares(before, after, 1) == pytest.approx((0.1, 0.0))


def test_own_process_tree_and_figures() -> None:
    child = subprocess.Popen(["sleep", "5"])
    try:
        tree = procs.process_tree(os.getpid())
        assert tree[0] == os.getpid() and child.pid in tree
        assert procs.peak_rss_kb(os.getpid()) > 1000
        assert procs.cpu_seconds(os.getpid()) > 0
    finally:
        child.kill()
        child.wait()


def test_parse_stub_status() -> None:
    text = (
        "Active connections: 3 \nserver accepts handled requests\n 12 12 34567 \n"
        "Reading: 0 Writing: 1 Waiting: 2 \n"
    )
    assert load.parse_stub_status(text) == 34567


def test_response_reader_content_length_and_chunked() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello"
            b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
        )
        reader = load.ResponseReader(left)
        assert reader.read() == (200, {"content-length": "5", "x-a": "b"}, b"hello")
        status, _, body = reader.read()
        assert (status, body) == (503, b"abcde")


class _Upstream(socketserver.ThreadingTCPServer):
    """Answers keep-alive GETs with 200, after `fail_after` of them with 503; logs (its
    name, the request's x-user-id) in the shared `log` as each request arrives."""

    daemon_threads = True

    def __init__(self, name: str, log: list[tuple[str, str]], fail_after: int = 10**9) -> None:
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)
        self.name, self.log, self.fail_after = name, log, fail_after
        self.served = 0


class _UpstreamHandler(socketserver.StreamRequestHandler):
    server: _Upstream

    def handle(self) -> None:
        while head := self._head():
            user = next(line for line in head if line.startswith("x-user-id:")).split(": ")[1]
            self.server.log.append((self.server.name, user))
            self.server.served += 1
            status = 200 if self.server.served <= self.server.fail_after else 503
            self.wfile.write(b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n\r\nok" % status)

    def _head(self) -> list[str]:
        lines = []
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            lines.append(line.decode().strip())
        return lines


@pytest.fixture
def upstream_log() -> Iterator[tuple[list[tuple[str, str]], list[_Upstream]]]:
    log: list[tuple[str, str]] = []
    servers = [_Upstream("a", log), _Upstream("b", log), _Upstream("c", log, fail_after=2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield log, servers
    for server in servers:
        server.shutdown()
        server.server_close()


def test_probe_takes_turns_and_keeps_each_targets_error(
    upstream_log: tuple[list[tuple[str, str]], list[_Upstream]],
) -> None:
    log, servers = upstream_log
    closed = free_port()
    targets = [(server.server_address[1], "h") for server in servers] + [(closed, "h")]
    results = load.probe_latencies(targets, count=3, rate=200.0, warmup=1)
    a, b, c, refused = results
    assert isinstance(a, float) and isinstance(b, float) and 0 < a < 1000 and 0 < b < 1000
    assert isinstance(c, ValueError) and "503" in str(c)  # its third request
    assert isinstance(refused, OSError)
    # One request to each target per tick, who goes first rotating; c drops out once failed.
    assert log[:6] == [("a", "user-0"), ("b", "user-0"), ("c", "user-0"),
                       ("b", "user-1"), ("c", "user-1"), ("a", "user-1")]  # fmt: skip
    assert [name for name, _ in log[6:]] == ["c", "a", "b", "a", "b"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_interleaved_rotates_the_order() -> None:
    targets = [Target(name, 0, "main") for name in "abc"]
    orders = ["".join(t.name for t in interleaved(targets, index)) for index in range(4)]
    assert orders == ["abc", "bca", "cab", "abc"]


def _target(name: str, group: str = "main", **metrics: float | None) -> Target:
    rounds = [dict(metrics), {**metrics, "requests_per_s": (metrics["requests_per_s"] or 0) * 3}]
    rounds.append(dict(metrics))
    for index, figures in enumerate(rounds):
        figures["round"] = index
    return Target(name, 0, group, rounds=rounds, peak_rss_mb=10.0)


def _figures(rps: float, cpu: float | None, probe: float, **extra: float | None) -> dict[str, Any]:
    return {
        "requests_per_s": rps,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "cpu_s_per_10k": cpu,
        "probe_p50_ms": probe,
        "non_2xx": 1.0,
        "socket_errors": 0.0,
        "proxy_busy": 1.0,
        "proxy_core_busy": 1.0,
        "proxy_core_irq": 0.1,
        "client_core_busy": 0.5,
        "canary_share": 0.1,
        **extra,
    }


def test_main_rows_take_medians_and_ratios_against_nginx_and_direct() -> None:
    targets = [
        _target("direct", **_figures(40_000, None, 0.20)),
        _target("nginx", **_figures(20_000, 0.5, 0.30)),
        _target("grayproxy", **_figures(15_000, 0.65, 0.35)),
    ]
    rows = {row["name"]: row for row in report.main_rows(targets)}
    gray = rows["grayproxy"]
    assert gray["requests_per_s"] == 15_000  # the median, not the 45 000 outlier
    assert gray["rps_vs_nginx"] == pytest.approx(0.75)
    assert gray["rps_vs_direct"] == pytest.approx(0.375)
    assert gray["cpu_vs_nginx"] == pytest.approx(1.3)
    assert gray["added_ms"] == pytest.approx(0.15)
    assert gray["added_vs_nginx_ms"] == pytest.approx(0.05)
    assert gray["errors"] == 3  # summed over the rounds
    assert rows["direct"]["added_ms"] is None
    checks = report.target_checks(list(rows.values()))
    assert [met for _, _, met in checks] == [True, True, True, True]
    text = report.markdown(_meta(), list(rows.values()), [], {"haproxy": "not installed"})
    assert "| grayproxy | 15,000 | 0.75\N{MULTIPLICATION SIGN} |" in text
    assert "- haproxy: not installed" in text
    assert "Other processes used the proxy core" not in text


def test_series_rows_compare_with_the_shared_baseline() -> None:
    base = _target("base", "series", **_figures(10_000, 1.0, 0.0))
    base.series = "baseline"
    wide = _target("svc", "series", **_figures(8_000, 1.25, 0.0))
    wide.series, wide.size = "services", 100
    rows = report.series_rows([wide, base])
    assert [(row["series"], row["size"]) for row in rows] == [("services", 1), ("services", 100)]
    assert rows[1]["rps_vs_base"] == pytest.approx(0.8)
    assert rows[1]["cpu_vs_base"] == pytest.approx(1.25)
    assert rows[1]["cpu_us_per_request"] == pytest.approx(125)


def test_contention_is_flagged() -> None:
    row = report.medians(_target("nginx", **_figures(1.0, 1.0, 0.1, proxy_busy=0.4)))
    assert report.contended([row]) == ["nginx (others took 50 % of its core)"]


def _meta() -> dict[str, Any]:
    return {
        "started": "now",
        "pinned": True,
        "rounds": 3,
        "seconds": 10.0,
        "series_seconds": 5.0,
        "connections": 64,
        "threads": 1,
        "users": 10,
        "workers": 1,
        "probe_requests": 100,
        "probe_rate": 500.0,
        "versions": "v",
        "load_average": "0.00 0.00 0.00",
    }


def test_quick_and_flags_make_settings() -> None:
    quick = cli.settings_from(cli.build_parser().parse_args(["--quick", "--rounds", "2"]))
    assert (quick.rounds, quick.seconds, quick.series_seconds) == (2, 3.0, 2.0)
    assert quick.pinned
    args = cli.build_parser().parse_args(
        ["--unpinned", "--no-series", "--proxies", "nginx,grayproxy", "--series-rules", "1,5"]
    )
    settings = cli.settings_from(args)
    assert not settings.pinned and settings.proxies == ("nginx", "grayproxy")
    assert not settings.has_series
    assert cli.build_parser().parse_args(["--series-rules", "1,5"]).series_rules == (5,)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--proxies", "envoy"])


# ---------------------------------------------------------------------------- the https pair

OPENSSL = shutil.which("openssl")


@pytest.fixture
def certificate(tmp_path: Path) -> configs.Certificate:
    if OPENSSL is None:
        pytest.skip("no openssl: the https pair cannot get its certificate")
    made = configs.Certificate(tmp_path / "bench.crt", tmp_path / "bench.key")
    subprocess.run(configs.openssl_command(made), capture_output=True, check=True)
    return made


def test_the_https_pair_serves_one_certificate(certificate: configs.Certificate) -> None:
    config = parse_config(
        configs.grayproxy_yaml(8080, 9901, UPSTREAMS, configs.REALISTIC, certificate)
    )
    assert config.tls is not None and config.tls.cert == str(certificate.cert)
    nginx = configs.proxy_nginx_conf(Path("/tmp/x"), 8443, UPSTREAMS, 1, certificate)
    assert "listen 127.0.0.1:8443 ssl reuseport;" in nginx
    assert f"ssl_certificate {certificate.cert};" in nginx
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in nginx


@pytest.mark.skipif(NGINX is None, reason="no nginx")
def test_nginx_accepts_the_https_config(tmp_path: Path, certificate: configs.Certificate) -> None:
    assert NGINX is not None
    path = tmp_path / "https.conf"
    path.write_text(configs.proxy_nginx_conf(tmp_path, 8443, UPSTREAMS, 1, certificate))
    command = [NGINX, "-t", "-p", str(tmp_path), "-c", str(path), "-e", "stderr"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_grayproxy_https_is_compared_with_nginx_https() -> None:
    targets = [
        _target("nginx", **_figures(20_000, 0.5, 0.30)),
        _target("grayproxy", **_figures(15_000, 0.65, 0.35)),
        _target("nginx-https", **_figures(16_000, 0.6, 0.30)),
        _target("grayproxy-https", **_figures(12_000, 0.9, 0.35)),
    ]
    targets[2].reference = "nginx-https"
    targets[3].reference = "nginx-https"
    rows = {row["name"]: row for row in report.main_rows(targets)}
    assert rows["grayproxy"]["rps_vs_nginx"] == pytest.approx(0.75)
    assert rows["grayproxy-https"]["rps_vs_nginx"] == pytest.approx(0.75)
    assert rows["grayproxy-https"]["cpu_vs_nginx"] == pytest.approx(1.5)
    assert rows["nginx-https"]["rps_vs_nginx"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------- the realistic heads


def test_the_realistic_request_is_a_browsers() -> None:
    head = configs.realistic_request("127.0.0.1:8080", 7, 42)
    lines = head.decode().split("\r\n")
    assert lines[0] == "GET /app/items?page=2&sort=price&q=blue+shoes HTTP/1.1"
    assert lines[-2:] == ["", ""] and len(lines) - 3 == 11  # 11 header lines
    names = [line.split(":")[0].lower() for line in lines[1:-2]]
    assert names == ["host", "user-agent", "accept", "accept-language", "accept-encoding",
                     "cookie", "referer", "x-request-id", "sec-fetch-mode", "cache-control",
                     "x-user-id"]  # fmt: skip
    assert "x-user-id: user-42" in lines and lines[1] == "Host: 127.0.0.1:8080"
    assert lines[8].endswith("-000000000007") and lines[6].count("=") == 3  # three cookies
    assert 600 <= len(head) <= 800
    # Fewer lines for the per-line cost: Host first, x-user-id last, the rest in order.
    six = configs.realistic_request("h", 7, 42, header_lines=6).decode().split("\r\n")
    assert [line.split(":")[0] for line in six[1:-2]] == [
        "Host", "User-Agent", "Accept", "Accept-Language", "Accept-Encoding", "x-user-id"
    ]  # fmt: skip
    assert configs.realistic_request("h", 7, 42, header_lines=2).count(b"\r\n") == 4


def test_the_realistic_response_is_a_pages() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.sendall(configs.realistic_response())
        status, headers, body = load.ResponseReader(left).read()
    assert status == 200 and body.decode() == configs.REALISTIC_BODY and len(body) == 2048
    assert headers["content-type"] == configs.REALISTIC_CONTENT_TYPE
    assert {"date", "cache-control", "etag", "vary", "set-cookie"} <= set(headers)
    assert len(headers) == 9


def test_realistic_targets_share_their_process_and_compare_with_nginx_realistic() -> None:
    assert {"nginx-realistic", "haproxy-realistic", "grayproxy-realistic"} <= set(
        Settings().proxies
    )
    base = Target("grayproxy", 8080, "main", host="h", proc=None)
    twin = runner.realistic_twin(base)
    assert (twin.name, twin.port, twin.host, twin.proc) == ("grayproxy-realistic", 8080, "h", None)
    assert twin.realistic and not base.realistic
    assert twin.reference == "nginx-realistic"


WRK = shutil.which("wrk")


@pytest.mark.skipif(WRK is None, reason="no wrk")
def test_wrk_sends_the_realistic_heads_every_proxy_gets(tmp_path: Path) -> None:
    """nginx, HAProxy and grayproxy get one script; what wrk sends with it is exactly
    realistic_request, request after request."""
    received: list[bytes] = []
    server = _RecordingServer(received)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        script = tmp_path / "realistic.lua"
        script.write_text(configs.wrk_lua(3, realistic=True))
        command = load.wrk_command(
            f"http://127.0.0.1:{port}/", script, connections=1, threads=1, seconds=1
        )
        load.run_wrk(command, 1)
    finally:
        server.shutdown()
        server.server_close()
    host = f"127.0.0.1:{port}"
    expected = [configs.realistic_request(host, n, n) for n in (1, 2, 3)]
    # In turn (wrk asks its script for one request before it connects).
    assert received[:4] == [expected[1], expected[2], expected[0], expected[1]]


class _RecordingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self, received: list[bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        self.received = received


class _RecordingHandler(socketserver.StreamRequestHandler):
    server: _RecordingServer

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError):  # wrk resets its connections at the end
            while head := self._head():
                self.server.received.append(head)
                self.wfile.write(configs.realistic_response())

    def _head(self) -> bytes:
        head = b""
        while (line := self.rfile.readline()) != b"\r\n":
            if not line:
                return b""
            head += line
        return head + line


@pytest.mark.skipif(NGINX is None, reason="no nginx")
def test_the_upstream_answers_the_realistic_request_with_the_page(tmp_path: Path) -> None:
    assert NGINX is not None
    (port,) = procs.free_ports(1)
    conf = tmp_path / "nginx.conf"
    conf.write_text(configs.upstream_nginx_conf(tmp_path, [port], "hello"))
    command = [NGINX, "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")]
    upstream = procs.Proc("upstream", command, tmp_path)
    try:
        upstream.wait_listening([port])
        body = load.check_answers(port, f"127.0.0.1:{port}", realistic=True)
        assert body == configs.REALISTIC_BODY.strip()
        assert load.check_answers(port, f"127.0.0.1:{port}") == "hello"
    finally:
        upstream.stop()


def test_the_realistic_check_wants_the_page(
    upstream_log: tuple[list[tuple[str, str]], list[_Upstream]],
) -> None:
    _, servers = upstream_log
    port = servers[0].server_address[1]
    assert load.check_answers(port, "h") == "ok"
    with pytest.raises(ValueError, match="not the realistic page"):
        load.check_answers(port, "h", realistic=True)


def test_ratios_pair_each_round_with_the_references_same_round() -> None:
    nginx: list[dict[str, float | None]] = [
        {"round": 0, "requests_per_s": 100.0},
        {"round": 1, "requests_per_s": 50.0},
        {"round": 2, "requests_per_s": 100.0},
    ]
    # Round 1 was a slow spell for both; round 0 of grayproxy failed.
    gray: list[dict[str, float | None]] = [
        {"round": 1, "requests_per_s": 45.0},
        {"round": 2, "requests_per_s": 80.0},
    ]
    assert report.paired_ratio(gray, nginx, "requests_per_s") == pytest.approx(0.85)
    assert report.paired_ratio(gray, [], "requests_per_s") is None


def test_the_realistic_and_https_targets_are_checked_against_their_goals() -> None:
    targets = [
        _target("nginx", **_figures(20_000, 0.5, 0.30)),
        _target("grayproxy", **_figures(15_000, 0.65, 0.35)),
        _target("nginx-realistic", **_figures(10_000, 1.0, 0.30)),
        _target("grayproxy-realistic", **_figures(8_500, 1.25, 0.35)),
        _target("grayproxy-log-realistic", **_figures(7_900, 1.4, 0.35)),
        _target("nginx-https", **_figures(10_000, 1.0, 0.30)),
        _target("grayproxy-https", **_figures(8_500, 1.5, 0.35)),
    ]
    for target in targets[2:]:
        target.reference = "nginx-" + target.name.split("-")[-1]
    checks = report.target_checks(report.main_rows(targets))
    x = "\N{MULTIPLICATION SIGN}"
    assert [(what.split(":")[0], value, met) for what, value, met in checks[:6]] == [
        ("grayproxy", f"0.75{x}", True),
        ("grayproxy", f"1.30{x}", True),
        ("grayproxy-realistic", f"0.85{x}", False),
        ("grayproxy-realistic", f"1.25{x}", False),
        ("grayproxy-log-realistic", f"0.79{x}", False),  # no CPU goal
        ("grayproxy-https", f"0.85{x}", True),  # no CPU goal
    ]
    assert f"1.2{x} nginx-realistic" in checks[3][0]
    assert checks[4][0].endswith(f"0.8{x} nginx-realistic")


def test_instructions_count_the_realistic_heads_with_fewer_lines_on_request() -> None:
    exchange = instructions.Exchange.realistic(6)
    assert exchange.request("h", 3) == configs.realistic_request("h", 3, 3, 6)
    assert exchange.response == configs.realistic_response()
    assert instructions.Exchange.realistic(None).request("h", 3) == configs.realistic_request(
        "h", 3, 3
    )
    assert b"x-user-id: user-3" in instructions.Exchange().request("h", 3)
    with pytest.raises(SystemExit):
        instructions.main(["--header-lines", "6"])  # without --realistic
