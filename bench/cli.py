"""`python -m bench`: flags -> settings -> start everything -> rounds -> report."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import report, runner, tools
from bench.procs import CLIENT_CORE, StartError
from bench.runner import Settings

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK: dict[str, Any] = {"rounds": 1, "seconds": 3.0, "series_seconds": 2.0, "probe_requests": 300}


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Load grayproxy side by side with nginx, HAProxy and the upstream directly "
            "(same split, same upstreams, same run), then grayproxy as services, endpoints "
            "and rules grow. Prints a Markdown table and writes report.md, results.json and "
            "ratios.png to bench/results/<timestamp>/."
        ),
    )
    add = parser.add_argument
    add(
        "--quick",
        action="store_true",
        help="smoke run of everything: 1 round of 3 s, series 2 s, 300 probe requests",
    )
    add("--rounds", type=_positive_int, help=f"interleaved rounds (default {defaults.rounds})")
    add(
        "--duration",
        type=_positive_float,
        dest="seconds",
        metavar="SECONDS",
        help=f"wrk run per configuration and round (default {defaults.seconds:g})",
    )
    add(
        "--series-duration",
        type=_positive_float,
        dest="series_seconds",
        metavar="SECONDS",
        help=f"wrk run per scaling-series point (default {defaults.series_seconds:g})",
    )
    add(
        "--connections",
        type=_positive_int,
        default=defaults.connections,
        help=f"wrk keep-alive connections (default {defaults.connections})",
    )
    add(
        "--threads",
        type=_positive_int,
        default=defaults.threads,
        help=f"wrk threads (default {defaults.threads})",
    )
    add(
        "--users",
        type=_positive_int,
        default=defaults.users,
        help=f"distinct x-user-id values the requests cycle through (default {defaults.users})",
    )
    add(
        "--probe-requests",
        type=_positive_int,
        help=f"requests of the low-rate latency probe (default {defaults.probe_requests})",
    )
    add(
        "--probe-rate",
        type=_positive_float,
        default=defaults.probe_rate,
        help=f"requests/s of the probe (default {defaults.probe_rate:g})",
    )
    add(
        "--unpinned",
        action="store_true",
        help="do not pin (default: proxies on core 0, wrk and upstreams on core 1)",
    )
    add(
        "--workers",
        type=_positive_int,
        default=defaults.workers,
        help="proxy processes/threads: grayproxy --workers, nginx worker_processes, "
        f"HAProxy nbthread (default {defaults.workers})",
    )
    add(
        "--proxies",
        type=_names,
        default=defaults.proxies,
        help="which side-by-side configurations, comma-separated "
        f"(default {','.join(defaults.proxies)})",
    )
    add(
        "--series-services",
        type=_sizes,
        default=defaults.series_services,
        metavar="N,N",
        help="gateway sizes to compare with 1 service (default 10,100; '' for none)",
    )
    add(
        "--series-endpoints",
        type=_sizes,
        default=defaults.series_endpoints,
        metavar="N,N",
        help="endpoints per version to compare with 1 (default 10,50; '' for none)",
    )
    add(
        "--series-rules",
        type=_sizes,
        default=defaults.series_rules,
        metavar="N,N",
        help="unmatched rules to compare with 1 (default 10,50; '' for none)",
    )
    add("--no-series", action="store_true", help="skip the scaling series")
    add("--no-install", action="store_true", help="do not apt-get install missing programs")
    add("--out", type=Path, help="results directory (default bench/results/<timestamp>)")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    base = dataclasses.replace(Settings(), **QUICK) if args.quick else Settings()
    return Settings(
        rounds=args.rounds or base.rounds,
        seconds=args.seconds or base.seconds,
        series_seconds=args.series_seconds or base.series_seconds,
        connections=args.connections,
        threads=args.threads,
        users=args.users,
        probe_requests=args.probe_requests or base.probe_requests,
        probe_rate=args.probe_rate,
        pinned=not args.unpinned,
        workers=args.workers,
        proxies=args.proxies,
        series_services=() if args.no_series else args.series_services,
        series_endpoints=() if args.no_series else args.series_endpoints,
        series_rules=() if args.no_series else args.series_rules,
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def _sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(_positive_int(part) for part in text.split(",") if part.strip())
    return tuple(size for size in sizes if size > 1)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    known = Settings().proxies
    unknown = [name for name in names if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(known)}")
    return names


def say(message: str) -> None:
    print(message, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return bench(args)
    except KeyboardInterrupt:
        say("interrupted: everything it started is stopped")
        return 130


def bench(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    programs = tools.ensure_programs(install=not args.no_install, say=say)
    fatal = [name for name in ("wrk", "nginx") if name not in programs]
    if fatal:
        say(f"cannot run without {' and '.join(fatal)} (apt-get install {' '.join(fatal)})")
        return 1
    missing = {
        name: f"{name} is not installed"
        for name in settings.proxies
        if name in tools.PROGRAMS and name not in programs
    }
    settings = _usable(settings, programs)
    if settings.pinned:
        os.sched_setaffinity(0, {CLIENT_CORE})  # the harness and the probe stay off core 0
    out = args.out or RESULTS_DIR / time.strftime("%Y%m%d-%H%M%S")
    meta = _meta(settings, programs)
    say(f"starting on 127.0.0.1 ({'pinned' if settings.pinned else 'unpinned'}) ...")
    try:
        with runner.started(settings, say) as run:
            run.unavailable.update(missing)
            _measure(run, say)
    except StartError as exc:
        say(f"the upstreams could not start, nothing to measure: {exc}")
        return 1
    main_rows = report.main_rows(run.targets)
    series_rows = report.series_rows(run.targets)
    text = report.markdown(meta, main_rows, series_rows, run.unavailable)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text + "\n")
    report.write_json(
        out / "results.json", meta, main_rows, series_rows, run.unavailable, run.targets
    )
    say("\n" + text)
    files = "report.md, results.json"
    pyplot = tools.matplotlib_pyplot(say) if main_rows or series_rows else None
    if pyplot is not None:
        report.write_chart(out / "ratios.png", pyplot, main_rows, series_rows)
        files += ", ratios.png"
    say(f"\nwritten to {out}/ ({files})")
    return 0


def _usable(settings: Settings, programs: dict[str, str]) -> Settings:
    """Drop what cannot run here: pinning without two cores or taskset, HAProxy if missing."""
    if settings.pinned and ((os.cpu_count() or 1) < 2 or "taskset" not in programs):
        say("pinning needs 2 cores and taskset: running unpinned")
        settings = dataclasses.replace(settings, pinned=False)
    if "haproxy" not in programs and "haproxy" in settings.proxies:
        say("haproxy is not installed: measuring without it")
        proxies = tuple(name for name in settings.proxies if name != "haproxy")
        settings = dataclasses.replace(settings, proxies=proxies)
    return settings


def _measure(run: runner.Run, say: runner.Say) -> None:
    if not any(target.group == "main" for target in run.targets):
        say("nothing of the side-by-side comparison started")
    say("warming up ...")
    runner.warm_up(run, say)
    for index in range(run.settings.rounds):
        say(f"round {index + 1}/{run.settings.rounds}")
        runner.measure_round(run, index, "main", say)
        runner.measure_round(run, index, "series", say)
    runner.record_peak_rss(run)


def _interpreter_build() -> str:
    """Which interpreter, and whether it calls into a shared libpython (as pyenv
    builds it by default): that alone moves every Python figure by 10-20 %."""
    with open("/proc/self/maps") as maps:
        shared = any("libpython" in line for line in maps)
    return f"{sys.executable}, {'shared' if shared else 'static'} libpython"


def _meta(settings: Settings, programs: dict[str, str]) -> report.Row:
    versions = [
        tools.program_version(["nginx", "-v"]),
        tools.program_version(["haproxy", "-v"]).split(" - ")[0]
        if "haproxy" in programs
        else "no HAProxy",
        tools.program_version(["wrk", "-v"]),
        f"Python {platform.python_version()} ({_interpreter_build()})",
        f"{os.cpu_count()} cores, Linux {platform.release()}",
    ]
    return {
        **dataclasses.asdict(settings),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average": " ".join(f"{load:.2f}" for load in os.getloadavg()),
        "versions": " · ".join(versions),
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench", *sys.argv[1:]]),
    }
