"""What a feature costs when it is on: grayproxy with it against grayproxy without it.

    python -m bench.features                      # every feature, 6 rounds
    python -m bench.features --rounds 8 --seconds 5 --only release,mirror
    python -m bench.features --realistic --only log  # loaded with the realistic heads

One grayproxy per variant runs side by side, pinned to core 0, in front of two
nginx upstreams. Each round, wrk on core 1 loads every variant in turn (the
order rotates from round to round) for `--seconds` with keyed keep-alive GETs,
then a low-rate probe measures the latency one request sees, the variants
taking turns request by request. A variant's figures are taken against the
feature-less one of the same round: the machine slows down for seconds at a
time, and a ratio within a round is steadier than a ratio of medians.

The variants:

- release: a release running, its analysis every second (the issue's budget:
  at most 5 % more CPU per request);
- log: the JSON access log to a file and the decision header (at most 15 %);
- mirror: 10 % of the requests mirrored to the canary (the client's p50 at the
  low rate moves by under 0.05 ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.configs import REALISTIC, Upstreams, grayproxy_yaml, upstream_nginx_conf, wrk_lua
from bench.load import probe_latencies, run_wrk, wrk_command
from bench.procs import Proc, free_ports, pinned

ROOT = Path(__file__).resolve().parent.parent
RELEASE = """    release:
      canary: canary
      steps: [{weight: 50, pause: 1h}, {weight: 100}]
      analysis: {interval: 1s, min_requests: 1, max_inconclusive: 1000000,
                 failure_limit: 1000, error_rate: {max_increase: 1}}
"""
MIRROR = "    mirror: {to: canary, percent: 10}\n"
BASELINE_LINE = "    baseline: stable\n"


def variant_yaml(name: str, base: str, workdir: Path) -> str:
    """The feature-less config `base` with the feature `name` on."""
    if name == "release":
        return base.replace(BASELINE_LINE, BASELINE_LINE + RELEASE)
    if name == "log":
        with_header = base.replace(BASELINE_LINE, BASELINE_LINE + "    decision_header: true\n")
        return with_header + f'access_log: {{path: "{workdir / "access.log"}"}}\n'
    if name == "mirror":
        return base.replace(BASELINE_LINE, BASELINE_LINE + MIRROR)
    return base


VARIANTS = ("release", "log", "mirror")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.features", description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0, help="wrk's load per run")
    parser.add_argument("--probe", type=int, default=1000, help="low-rate requests per run")
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    parser.add_argument(
        "--realistic",
        action="store_true",
        help="load with the realistic heads (a browser's request, a page's response)",
    )
    args = parser.parse_args(argv)
    variants = tuple(name for name in args.only.split(",") if name)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="grayproxy-features-") as tmp:
        names = ("off", *variants)
        rows = measure(Path(tmp), names, args.rounds, args.seconds, args.probe, args.realistic)
    report(rows, variants)
    return 0


Figures = tuple[float, float, float]  # requests per second, CPU seconds per request, probe p50 ms


def measure(
    workdir: Path,
    names: Sequence[str],
    rounds: int,
    seconds: float,
    probe: int,
    realistic: bool = False,
) -> list[dict[str, Figures]]:
    stable, canary, *ports = free_ports(2 + 2 * len(names))
    (workdir / "upstream").mkdir()
    conf = workdir / "upstream" / "nginx.conf"
    conf.write_text(upstream_nginx_conf(workdir / "upstream", [stable, canary], "ok"))
    started = [Proc("upstream", pinned(["nginx", "-c", str(conf)], 1), workdir / "upstream")]
    script = workdir / "load.lua"
    script.write_text(wrk_lua(10_000, realistic=realistic))
    upstreams = Upstreams((stable,), (canary,))
    try:
        started[0].wait_listening([stable, canary])
        proxies: dict[str, tuple[Proc, int]] = {}
        for index, name in enumerate(names):
            data, control = ports[2 * index : 2 * index + 2]
            base = grayproxy_yaml(data, control, upstreams, REALISTIC)
            proxies[name] = (start_proxy(workdir, name, variant_yaml(name, base, workdir)), data)
            started.append(proxies[name][0])
        for proxy, data in proxies.values():
            proxy.wait_listening([data])
            load(proxy, data, script, 1)  # warm up: connections, caches, the first release tick
        rows = []
        for index in range(rounds):
            turn = index % len(names)
            loaded = {
                name: load(*proxies[name], script, seconds)
                for name in [*names[turn:], *names[:turn]]
            }
            targets = [(data, "bench.test") for _, data in proxies.values()]
            p50s = probe_latencies(targets, probe, rate=200.0)
            row = {}
            for name, p50 in zip(proxies, p50s, strict=True):
                if isinstance(p50, Exception):
                    raise p50
                row[name] = (*loaded[name], p50)
            rows.append(row)
            print(f"round {index + 1}: " + "  ".join(_shown(n, row[n]) for n in names), flush=True)
        return rows
    finally:
        for proc in reversed(started):
            proc.stop()


def start_proxy(workdir: Path, name: str, yaml: str) -> Proc:
    config = workdir / f"{name}.yaml"
    config.write_text(yaml)
    command = [sys.executable, "-m", "proxy", "run", "-c", str(config), "--log-level", "warning"]
    return Proc(f"grayproxy-{name}", pinned(command, 0), workdir, cwd=ROOT)


def load(proxy: Proc, port: int, script: Path, seconds: float) -> tuple[float, float]:
    """wrk on `port` for `seconds`: requests per second, and the proxy's CPU per request."""
    url = f"http://127.0.0.1:{port}/"
    command = pinned(wrk_command(url, script, connections=32, threads=1, seconds=seconds), 1)
    before = proxy.cpu_seconds()
    result = run_wrk(command, seconds)
    return result.requests_per_s, (proxy.cpu_seconds() - before) / max(result.requests, 1)


def _shown(name: str, figures: Figures) -> str:
    rps, cpu, p50 = figures
    return f"{name} {rps:,.0f}/s {cpu * 1e6:.1f}us {p50:.3f}ms"


def report(rows: list[dict[str, Figures]], variants: Sequence[str]) -> None:
    print("\nmedian over rounds, each against the feature-less run of its round:")
    print(f"{'variant':<10}{'req/s ratio':>12}{'CPU/request ratio':>20}{'probe p50 delta':>18}")
    for name in variants:
        rps = statistics.median(row[name][0] / row["off"][0] for row in rows)
        cpu = statistics.median(row[name][1] / row["off"][1] for row in rows)
        p50 = statistics.median(row[name][2] - row["off"][2] for row in rows)
        print(f"{name:<10}{rps:>12.3f}{cpu:>20.3f}{p50 * 1000:>15.1f} us")


if __name__ == "__main__":
    sys.exit(main())
