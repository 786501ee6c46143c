"""The `grayproxy` command: flags -> config -> run. Nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence

from proxy import ctl
from proxy.config import Config, ConfigError, Service
from proxy.loader import load_config

EXIT_CONFIG = 2
EXIT_LISTEN = 1
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except BrokenPipeError:  # `grayproxy ... | head`: whoever reads has stopped, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grayproxy",
        description="A reverse proxy for grayscale releases: canary, blue-green, A/B.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="serve with a config file")
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config")
    run.add_argument(
        "--workers", type=_positive_int, metavar="N", help="processes sharing the port"
    )
    run.add_argument("--watch", action="store_true", help="reload when the config file changes")
    _add_log_level(run)
    run.set_defaults(handler=_run)

    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config")
    check.set_defaults(handler=_check)

    demo = commands.add_parser("demo", help="two built-in versions with the proxy in front")
    demo.add_argument("--host", default="127.0.0.1", help="data-plane address (127.0.0.1)")
    demo.add_argument("--port", type=_port, default=8080, help="data-plane port (8080)")
    demo.add_argument("--control-port", type=_port, default=9901, help="control port (9901)")
    _add_log_level(demo)
    demo.set_defaults(handler=_demo)

    ctl.add_parser(commands)
    _add_release(commands)
    return parser


def _add_release(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    release = commands.add_parser("release", help="drive a release across a fleet of replicas")
    actions = release.add_subparsers(dest="release_command", metavar="ACTION", required=True)
    run = actions.add_parser(
        "run",
        help="the release of a service in FILE, on every replica, checked in Prometheus",
        description="Drive the release section of SERVICE in FILE (the fleet's config) across "
        "every replica: weights to each, checks from Prometheus. Exit 0 when promoted, 1 when "
        "rolled back or aborted (Ctrl-C, SIGTERM), 2 when refused before any change "
        "(docs/fleets.md).",
    )
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config")
    run.add_argument("--service", required=True, metavar="NAME", help="the service to release")
    run.add_argument(
        "--url",
        help="the replicas' control URLs: URL1,URL2,... or dns+http://NAME:PORT "
        "(default GRAYPROXY_CONTROL); GRAYPROXY_TOKEN: their token",
    )
    run.add_argument(
        "--prometheus", required=True, metavar="URL", help="Prometheus scraping every replica"
    )
    run.set_defaults(handler=_release_run)


def _release_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from proxy import fleet_release  # imports aiohttp: not for the other commands

    return fleet_release.run(config, args)


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="log verbosity on stderr (info)",
    )


def setup_logging(level: int | str) -> None:
    """Log to stderr from ``level`` up (a number, or a name such as "DEBUG"): this process's
    logging, and each worker process's (proxy/workers.py)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def _port(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a port is 1..65535")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not an integer") from None


def _load(path: str) -> Config | None:
    """The config, or None after printing every error on stderr, one a line, named by file."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(error if error.startswith(f"{path}:") else f"{path}: {error}", file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    setup_logging(args.log_level.upper())
    as_in_file = config
    if args.workers is not None:
        config = dataclasses.replace(config, workers=args.workers)
    # Imported here, not at the top: `check` and `ctl` stay quick without aiohttp and uvloop.
    from proxy import server

    return _serve(lambda: server.run(config, args.config, as_in_file=as_in_file, watch=args.watch))


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    print(f"{args.config}: OK: {summary(config)}")
    return 0


def summary(config: Config) -> str:
    """`2 services: web (stable, canary; release of canary in 4 steps), api (blue, green)`."""
    count = len(config.services)
    services = ", ".join(
        f"{s.name} ({', '.join(v.name for v in s.versions)}{_release_summary(s)})"
        for s in config.services
    )
    return f"{count} service{'s' if count != 1 else ''}: {services}"


def _release_summary(service: Service) -> str:
    release = service.release
    if release is None:
        return ""
    steps = len(release.steps)
    return f"; release of {release.canary} in {steps} step{'s' if steps != 1 else ''}"


def _demo(args: argparse.Namespace) -> int:
    from proxy import demo

    setup_logging(args.log_level.upper())
    return _serve(lambda: demo.run_demo(args.port, args.control_port, args.host))


def _serve(serve: Callable[[], int]) -> int:
    """Run the server; a listener that cannot be opened is a message, not a traceback."""
    try:
        return serve()
    except OSError as exc:
        print(f"grayproxy: {exc}", file=sys.stderr)
        return EXIT_LISTEN
