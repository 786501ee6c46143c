"""A bench run: start every target, then measure them interleaved, round after round.

A target is something wrk can load: the upstream directly, a reference proxy, grayproxy with
the realistic config, or grayproxy with one of the scaling-series configs. The `-https` pair
is nginx and grayproxy terminating TLS with one certificate made for the run (keep-alive
connections, the same upstreams over plain HTTP); grayproxy's is compared with nginx's. The
`-realistic` targets are the same processes loaded with browser-like heads (configs.realistic_
request, and the upstreams' page response); theirs are compared with nginx-realistic, as is
grayproxy-log-realistic's: a grayproxy of its own with the JSON access log on. What
cannot start, or stops answering, is recorded with the reason and left out; the others go on.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import configs, load
from bench.configs import Certificate, Shape, Upstreams
from bench.procs import (
    CLIENT_CORE,
    PROXY_CORE,
    Proc,
    StartError,
    core_shares,
    core_times,
    free_ports,
    pinned,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
Metrics = dict[str, float | None]
Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Settings:
    # Many short rounds rather than a few long ones: on a shared machine the CPU
    # slows down by up to 2x for seconds at a time, and a median of six copes
    # with that better than a median of three.
    rounds: int = 6
    seconds: float = 5.0
    series_seconds: float = 3.0
    connections: int = 64
    threads: int = 1
    users: int = 10_000
    probe_requests: int = 1000
    probe_rate: float = 500.0
    pinned: bool = True
    workers: int = 1
    proxies: tuple[str, ...] = (
        "direct",
        "nginx",
        "haproxy",
        "grayproxy",
        "nginx-realistic",
        "haproxy-realistic",
        "grayproxy-realistic",
        "grayproxy-log-realistic",
        "nginx-https",
        "grayproxy-https",
    )
    series_services: tuple[int, ...] = (10, 100)
    series_endpoints: tuple[int, ...] = (10, 50)
    series_rules: tuple[int, ...] = (10, 50)

    @property
    def proxy_core(self) -> int | None:
        return PROXY_CORE if self.pinned else None

    @property
    def client_core(self) -> int | None:
        return CLIENT_CORE if self.pinned else None

    @property
    def max_endpoints(self) -> int:
        return max((1, *self.series_endpoints))

    @property
    def has_series(self) -> bool:
        return bool(self.series_services or self.series_endpoints or self.series_rules)


@dataclass(eq=False, slots=True)
class Target:
    name: str
    port: int
    group: str  # "main" or "series"
    host: str = ""  # the Host header to send; "" = wrk's default (127.0.0.1:port)
    proc: Proc | None = None  # the proxy; None for the upstream itself
    series: str | None = None  # "services" | "endpoints" | "rules"; "baseline" for 1/1/1
    size: int | None = None
    script: Path | None = None
    rounds: list[Metrics] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    peak_rss_mb: float | None = None
    alive: bool = True
    tls: bool = False  # wrk and the checks speak HTTPS to it
    reference: str = "nginx"  # the target its ratios to nginx are taken against
    realistic: bool = False  # loaded with the realistic heads, not the minimal ones

    @property
    def host_header(self) -> str:
        return self.host or f"127.0.0.1:{self.port}"


@dataclass(slots=True)
class Run:
    """Everything a run started and measured."""

    settings: Settings
    workdir: Path
    upstreams: Upstreams
    targets: list[Target] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- starting


@contextmanager
def started(settings: Settings, say: Say) -> Iterator[Run]:
    """Upstreams and every target that starts; all stopped and cleaned up on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="grayproxy-bench-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        upstreams = _start_upstreams(settings, workdir, stack)
        run = Run(settings, workdir, upstreams)
        for name, start in _target_starters(settings, run):
            try:
                target = start(stack)
                body = load.check_answers(
                    target.port, target.host_header, target.tls, target.realistic
                )
            except (StartError, OSError, ValueError) as exc:
                run.unavailable[name] = str(exc)
                say(f"  {name}: could not start: {exc}")
                continue
            target.script = _wrk_script(run, target.host, target.realistic)
            run.targets.append(target)
            say(f"  {name}: ready on 127.0.0.1:{target.port} (answers {body[:40]!r})")
        yield run


def _start_upstreams(settings: Settings, workdir: Path, stack: ExitStack) -> Upstreams:
    count = settings.max_endpoints
    ports = free_ports(2 * count)
    upstreams = Upstreams(stable=tuple(ports[:count]), canary=tuple(ports[count:]))
    for name, version_ports in (("stable", upstreams.stable), ("canary", upstreams.canary)):
        directory = _subdir(workdir, f"upstream-{name}")
        conf = configs.upstream_nginx_conf(directory, version_ports, f"hello from {name}")
        proc = _start_nginx(f"upstream-{name}", directory, conf, settings.client_core, stack)
        proc.wait_listening([version_ports[0], version_ports[-1]])
    return upstreams


def _subdir(workdir: Path, name: str) -> Path:
    directory = workdir / name
    directory.mkdir()
    return directory


def _start_nginx(name: str, directory: Path, conf: str, core: int | None, stack: ExitStack) -> Proc:
    conf_path = directory / "nginx.conf"
    conf_path.write_text(conf)
    command = [
        "nginx",
        "-p",
        str(directory),
        "-c",
        str(conf_path),
        "-e",
        str(directory / "error.log"),
    ]
    proc = Proc(name, pinned(command, core), directory)
    stack.callback(proc.stop)
    return proc


Starter = Callable[[ExitStack], Target]


def _target_starters(settings: Settings, run: Run) -> Iterator[tuple[str, Starter]]:
    main = {
        "direct": lambda stack: Target("direct", run.upstreams.stable[0], "main"),
        "nginx": lambda stack: _start_nginx_proxy(run, stack),
        "haproxy": lambda stack: _start_haproxy(run, stack),
        "grayproxy": lambda stack: _start_grayproxy(run, "grayproxy", configs.REALISTIC, stack),
        "grayproxy-log": lambda stack: _start_grayproxy(
            run, "grayproxy-log", configs.REALISTIC, stack, access_log=True
        ),
        "nginx-https": lambda stack: _start_nginx_proxy(run, stack, _certificate(run)),
        "grayproxy-https": lambda stack: _start_grayproxy_https(run, stack),
    }
    for name in settings.proxies:
        base = name.removesuffix(REALISTIC_SUFFIX)
        yield name, main[name] if base == name else _realistic_starter(run, base, main[base])
    if not settings.has_series:
        return
    for series, shape in series_shapes(settings):
        name = series_name(series, shape)
        yield name, _series_starter(run, name, series, shape)


REALISTIC_SUFFIX = "-realistic"


def _realistic_starter(run: Run, base: str, start_base: Starter) -> Starter:
    """The target `base` loaded with the realistic heads: the same process as `base`'s
    when that one runs (started first), else one of its own."""

    def start(stack: ExitStack) -> Target:
        started = next((t for t in run.targets if t.name == base), None) or start_base(stack)
        return realistic_twin(started)

    return start


def realistic_twin(target: Target) -> Target:
    """The same process as `target`, loaded with the realistic heads and compared with
    nginx-realistic."""
    return Target(
        target.name + REALISTIC_SUFFIX,
        target.port,
        target.group,
        host=target.host,
        proc=target.proc,
        tls=target.tls,
        reference="nginx" + REALISTIC_SUFFIX,
        realistic=True,
    )


def series_shapes(settings: Settings) -> Iterator[tuple[str, Shape]]:
    """(series, shape) for the shared 1-service/1-endpoint/1-rule baseline and each point."""
    yield "baseline", Shape(services=1, endpoints=1, rules=1, gateway=True)
    for size in settings.series_services:
        yield "services", Shape(services=size, endpoints=1, rules=1, gateway=True)
    for size in settings.series_endpoints:
        yield "endpoints", Shape(services=1, endpoints=size, rules=1, gateway=True)
    for size in settings.series_rules:
        yield "rules", Shape(services=1, endpoints=1, rules=size, gateway=True)


def series_name(series: str, shape: Shape) -> str:
    if series == "baseline":
        return "grayproxy 1 svc/1 ep/1 rule"
    return f"grayproxy {series}={series_size(series, shape)}"


def series_size(series: str, shape: Shape) -> int:
    return {"services": shape.services, "endpoints": shape.endpoints, "rules": shape.rules}.get(
        series, 1
    )


def _series_starter(run: Run, name: str, series: str, shape: Shape) -> Starter:
    def start(stack: ExitStack) -> Target:
        target = _start_grayproxy(run, name, shape, stack)
        target.group, target.series, target.size = "series", series, series_size(series, shape)
        return target

    return start


def _start_nginx_proxy(run: Run, stack: ExitStack, tls: Certificate | None = None) -> Target:
    settings = run.settings
    name = "nginx" if tls is None else "nginx-https"
    directory = _subdir(run.workdir, f"{name}-proxy")
    (port,) = free_ports(1)
    conf = configs.proxy_nginx_conf(directory, port, run.upstreams, settings.workers, tls)
    proc = _start_nginx(name, directory, conf, settings.proxy_core, stack)
    proc.wait_listening([port])
    return Target(name, port, "main", proc=proc, tls=tls is not None, reference=name)


def _start_grayproxy_https(run: Run, stack: ExitStack) -> Target:
    tls = _certificate(run)
    target = _start_grayproxy(run, "grayproxy-https", configs.REALISTIC, stack, tls)
    target.tls, target.reference = True, "nginx-https"
    return target


def _certificate(run: Run) -> Certificate:
    """The run's certificate for the https targets, made once (by openssl)."""
    certificate = Certificate(run.workdir / "bench.crt", run.workdir / "bench.key")
    if not certificate.cert.exists():
        try:
            done = subprocess.run(
                configs.openssl_command(certificate),
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except OSError as exc:
            raise StartError(f"openssl: {exc}") from None
        if done.returncode != 0:
            raise StartError(f"openssl could not make a certificate: {done.stderr[-300:]}")
    return certificate


def _start_haproxy(run: Run, stack: ExitStack) -> Target:
    directory = _subdir(run.workdir, "haproxy")
    (port,) = free_ports(1)
    cfg_path = directory / "haproxy.cfg"
    cfg_path.write_text(configs.haproxy_cfg(port, run.upstreams, run.settings.workers))
    command = ["haproxy", "-f", str(cfg_path), "-db"]
    proc = Proc("haproxy", pinned(command, run.settings.proxy_core), directory)
    stack.callback(proc.stop)
    proc.wait_listening([port])
    return Target("haproxy", port, "main", proc=proc)


def _start_grayproxy(
    run: Run,
    name: str,
    shape: Shape,
    stack: ExitStack,
    tls: Certificate | None = None,
    access_log: bool = False,
) -> Target:
    """grayproxy with `shape`'s config; with `access_log`, its JSON access log to a file."""
    directory = _subdir(run.workdir, name.replace(" ", "_").replace("/", "-"))
    port, control_port = free_ports(2)
    config_path = directory / "grayproxy.yaml"
    log = directory / "access.log" if access_log else None
    config_path.write_text(
        configs.grayproxy_yaml(port, control_port, run.upstreams, shape, tls, log)
    )
    command = [sys.executable, "-m", "proxy", "run", "-c", str(config_path)]
    if run.settings.workers > 1:
        command += ["--workers", str(run.settings.workers)]
    command += ["--log-level", "warning"]
    proc = Proc("grayproxy", pinned(command, run.settings.proxy_core), directory, cwd=REPO_ROOT)
    stack.callback(proc.stop)
    proc.wait_listening([port, control_port], timeout=30)
    return Target(name, port, "main", host=shape.host, proc=proc)


def _wrk_script(run: Run, host: str, realistic: bool = False) -> Path:
    path = run.workdir / f"wrk-{host or 'default'}{'-realistic' if realistic else ''}.lua"
    if not path.exists():
        path.write_text(configs.wrk_lua(run.settings.users, host, realistic))
    return path


# --------------------------------------------------------------------------- measuring


def interleaved(targets: Sequence[Target], round_index: int) -> list[Target]:
    """The targets in a rotated order, so that no one always goes first or last."""
    if not targets:
        return []
    shift = round_index % len(targets)
    return [*targets[shift:], *targets[:shift]]


def warm_up(run: Run, say: Say) -> None:
    """One second of load on each target, to open the keep-alive connections on both sides."""
    for target in run.targets:
        try:
            _wrk(run, target, 1)
        except load.LoadError as exc:
            say(f"  warm-up of {target.name} failed: {exc}")


def measure_round(run: Run, round_index: int, group: str, say: Say) -> None:
    targets = [target for target in run.targets if target.group == group and target.alive]
    measured = []
    for target in interleaved(targets, round_index):
        seconds = run.settings.seconds if group == "main" else run.settings.series_seconds
        try:
            metrics = measure(run, target, seconds)
        except (load.LoadError, OSError, ValueError) as exc:
            target.failures.append(f"round {round_index + 1}: {exc}")
            say(f"  {target.name}: failed: {exc}")
            _notice_death(run, target, say)
            continue
        metrics["round"] = round_index  # what its ratios pair it with
        target.rounds.append(metrics)
        measured.append(target)
        say(f"  {target.name:32} {_one_line(metrics)}")
    # The probe speaks plain HTTP with the minimal heads, once per process.
    probed = [target for target in measured if not target.tls and not target.realistic]
    if group == "main" and probed:
        probe_round(run, round_index, probed, say)


def probe_round(run: Run, round_index: int, targets: Sequence[Target], say: Say) -> None:
    """The low-rate probe of the round's targets, all at once (see load.probe_latencies);
    each result goes into the target's last round."""
    results = load.probe_latencies(
        [(target.port, target.host_header) for target in targets],
        run.settings.probe_requests,
        run.settings.probe_rate,
    )
    shown = []
    for target, result in zip(targets, results, strict=True):
        if isinstance(result, Exception):
            target.failures.append(f"round {round_index + 1}: probe: {result}")
            say(f"  {target.name}: probe failed: {result}")
            _notice_death(run, target, say)
            continue
        target.rounds[-1]["probe_p50_ms"] = result
        shown.append(f"{target.name} {result:.3f}")
    say(f"  low-rate p50 ms: {', '.join(shown)}")


def _notice_death(run: Run, target: Target, say: Say) -> None:
    if target.proc is not None and target.proc.popen.poll() is not None:
        target.alive = False
        reason = f"exited with {target.proc.popen.returncode}: {target.proc.tail()}"
        run.unavailable[target.name] = reason
        say(f"  {target.name}: {reason}")


def _one_line(metrics: Metrics) -> str:
    parts = [f"{metrics['requests_per_s'] or 0:9.0f} req/s", f"p99 {metrics['p99_ms'] or 0:.2f} ms"]
    if metrics.get("cpu_s_per_10k") is not None:
        parts.append(f"{metrics['cpu_s_per_10k']:.3f} CPU-s/10k")
    return ", ".join(parts)


def measure(run: Run, target: Target, seconds: float) -> Metrics:
    """One wrk run of one target (the round's probe fills in probe_p50_ms)."""
    stable, canary = run.upstreams.stable[0], run.upstreams.canary[0]
    served_before = (load.served_requests(stable), load.served_requests(canary))
    cpu_before = target.proc.cpu_seconds() if target.proc else None
    cores_before = core_times()
    result = _wrk(run, target, seconds)
    cores_after = core_times()
    cpu_after = target.proc.cpu_seconds() if target.proc else None
    # each stub_status read counts itself once
    served = (
        load.served_requests(stable) - served_before[0] - 1,
        load.served_requests(canary) - served_before[1] - 1,
    )
    metrics: Metrics = {
        "requests_per_s": result.requests_per_s,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "non_2xx": float(result.non_2xx),
        "socket_errors": float(result.socket_errors),
        "cpu_s_per_10k": None,
        "proxy_busy": None,
        "proxy_core_busy": None,
        "proxy_core_irq": None,
        "client_core_busy": None,
        "canary_share": None,
        "probe_p50_ms": None,
    }
    if cpu_before is not None and cpu_after is not None and result.requests:
        cpu = cpu_after - cpu_before
        metrics["cpu_s_per_10k"] = cpu / result.requests * 10_000
        metrics["proxy_busy"] = cpu / result.seconds
    if run.settings.pinned:
        busy, irq = core_shares(cores_before, cores_after, PROXY_CORE)
        metrics["proxy_core_busy"], metrics["proxy_core_irq"] = busy, irq
        metrics["client_core_busy"], _ = core_shares(cores_before, cores_after, CLIENT_CORE)
    if target.proc is not None and sum(served) > 0:
        metrics["canary_share"] = served[1] / sum(served)
    return metrics


def _wrk(run: Run, target: Target, seconds: float) -> load.WrkResult:
    settings = run.settings
    assert target.script is not None
    command = load.wrk_command(
        f"{'https' if target.tls else 'http'}://127.0.0.1:{target.port}/",
        target.script,
        connections=settings.connections,
        threads=settings.threads,
        seconds=seconds,
    )
    return load.run_wrk(pinned(command, settings.client_core), seconds)


def record_peak_rss(run: Run) -> None:
    for target in run.targets:
        if target.proc is not None and target.proc.popen.poll() is None:
            target.peak_rss_mb = target.proc.peak_rss_kb() / 1024
