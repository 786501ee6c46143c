"""`grayproxy ctl release start|status|approve|pause|resume|abort SERVICE`.

``start -f FILE`` reads the release mapping from a YAML or JSON file (durations
stay as written: the proxy validates them). ``status --watch`` polls the
release and prints a line whenever its state, step, weight, reason or last
check changes, until it is over: exit 0 when promoted, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from proxy import fleet
from proxy.ctl import ControlCallFailed, ControlClient, Json, control_url, fail, if_match

COMMANDS = ("approve", "pause", "resume", "abort")
FINAL_STATES = ("promoted", "rolled_back", "aborted")
WATCH_INTERVAL = 1.0


def add_parser(
    actions: argparse._SubParsersAction[argparse.ArgumentParser], json_flag: argparse.ArgumentParser
) -> None:
    """Register `ctl release` and its sub-commands."""
    release = actions.add_parser(
        "release",
        help="run a release: start, status [--watch], approve, pause, resume, abort",
        description="Start, follow and steer a service's release (docs/releases.md).",
    )
    release.set_defaults(handler=run_release)
    commands = release.add_subparsers(dest="release_action", metavar="ACTION", required=True)
    start = commands.add_parser("start", parents=[json_flag], help="start a release")
    start.add_argument("service")
    start.add_argument(
        "-f", "--file", required=True, metavar="FILE", help="the release mapping (YAML or JSON)"
    )
    status = commands.add_parser("status", parents=[json_flag], help="the release's progress")
    status.add_argument("service")
    status.add_argument("--watch", action="store_true", help="follow it live until it ends")
    status.add_argument(
        "--interval", type=float, default=WATCH_INTERVAL, metavar="SECONDS", help="poll every"
    )
    for command in COMMANDS:
        parser = commands.add_parser(command, parents=[json_flag], help=f"{command} the release")
        parser.add_argument("service")


def run_release(args: argparse.Namespace) -> int:
    """Run one `ctl release` action (on every replica of a fleet, but --watch); 0 on
    success, 1 with the error on stderr."""
    token = os.environ.get("GRAYPROXY_TOKEN") or None
    watching = getattr(args, "watch", False)
    try:
        targets = fleet.resolve(control_url(args))
        if targets.fleet and watching:
            raise ControlCallFailed("status --watch follows one replica: give --url one URL")
        if targets.fleet:
            change = args.release_action != "status"
            return fleet.run(
                args, targets, token, release_call, change=change, render=format_release
            )
        client = ControlClient(targets.urls[0], token)
        if watching:
            return watch(client, release_path(args), args.interval, args.json)
        answer = release_call(client, args)
    except ControlCallFailed as exc:
        return fail(exc)
    print(json.dumps(answer, indent=2) if args.json else format_release(answer))
    return 0


def release_path(args: argparse.Namespace) -> str:
    return f"/api/v1/services/{urllib.parse.quote(args.service, safe='')}/release"


def release_call(client: ControlClient, args: argparse.Namespace) -> Json:
    """The API call of one `ctl release` action (but --watch), with ``--if-match`` if set."""
    path = release_path(args)
    if args.release_action == "start":
        return client.call("POST", path, read_spec(args.file), headers=if_match(args))
    if args.release_action == "status":
        return client.call("GET", path)
    return client.call("POST", f"{path}/{args.release_action}", {}, headers=if_match(args))


def read_spec(path: str) -> Json:
    """The release mapping in a YAML (or JSON) file."""
    import yaml  # here: the other ctl commands need no YAML

    try:
        with open(path, encoding="utf-8") as file:
            return yaml.safe_load(file)
    except OSError as exc:
        raise ControlCallFailed(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ControlCallFailed(f"{path}: not YAML or JSON", [str(exc)]) from None


def watch(client: ControlClient, path: str, interval: float, raw: bool) -> int:
    """Print the release whenever it changes, until it is over: 0 if promoted, else 1."""
    shown: tuple[Any, ...] | None = None
    while True:
        answer = client.call("GET", path)
        key = progress(answer)
        if key != shown:
            shown = key
            print(json.dumps(answer) if raw else watch_line(answer), flush=True)
        if answer.get("state") in FINAL_STATES:
            return 0 if answer["state"] == "promoted" else 1
        time.sleep(interval)


def progress(release: Mapping[str, Any]) -> tuple[Any, ...]:
    checks = release.get("checks") or [{}]
    return (
        release.get("state"),
        release.get("step"),
        release.get("weight"),
        release.get("reason"),
        checks[-1].get("at"),
    )


def watch_line(release: Mapping[str, Any]) -> str:
    clock = time.strftime("%H:%M:%S")
    line = f"{clock}  {_headline(release)}  {release.get('reason', '')}"
    checks = release.get("checks") or []
    if checks:
        line += f"  | last check {_check(checks[-1])}"
    return line


def _headline(release: Mapping[str, Any]) -> str:
    step = release.get("step", 0) + 1
    return (
        f"{release.get('state', '?'):<11}  step {step}/{release.get('steps', '?')}  "
        f"{release.get('canary', '?')} {release.get('weight', '?')}%"
    )


def _check(check: Mapping[str, Any]) -> str:
    return f"{check.get('result', '?')}: {check.get('reason', '')}"


def format_release(release: Json) -> str:
    """A release for people: state, step and weight, the reason, failures, recent checks."""
    if not isinstance(release, dict) or "state" not in release:
        return json.dumps(release)
    spec = release.get("spec") or {}
    analysis = spec.get("analysis") or {}
    lines = [
        f"{release.get('service', '?')}: {_headline(release)}  "
        f"(baseline {release.get('baseline', '?')})",
        f"  reason: {release.get('reason', '')}",
    ]
    if analysis:
        lines.append(
            f"  failed checks: {release.get('failures', 0)} of {analysis.get('failure_limit')}"
            f" allowed; inconclusive in a row: {release.get('inconclusive', 0)}"
        )
    if release.get("approval"):
        lines.append(f"  approval: {release['approval']}")
    for check in (release.get("checks") or [])[-5:]:
        lines.append(f"  {check.get('at', '?')}  {_check(check)}")
    return "\n".join(lines)
