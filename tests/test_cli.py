"""The `grayproxy` command as users run it: real subprocesses, real ports, real files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.procs import free_ports
from proxy import ctl
from proxy.cli import build_parser

from procs import (
    ProxyProcess,
    child_env,
    free_port,
    grayproxy_command,
    is_listening,
    run_cli,
)

GOOD = """\
listen: "127.0.0.1:${data_port}"
control:
  listen: "127.0.0.1:${control_port}"
  token_env: GRAYPROXY_TEST_TOKEN
services:
  - name: web
    baseline: stable
    versions:
      stable: {endpoints: ["127.0.0.1:9"]}
      canary: {endpoints: ["127.0.0.1:9"]}
    split:
      weights: {stable: 90, canary: 10}
      hash_on: [{header: x-user-id}]
    rules:
      - match: {header: {name: x-canary, value: always}}
        version: canary
  - name: api
    match: {path_prefix: /api}
    versions:
      blue: {endpoints: ["127.0.0.1:9"]}
      green: {endpoints: ["127.0.0.1:9"]}
"""

# One error each on lines 1, 8, 10, 11 and 12.
BAD = """\
listen: "127.0.0.1:99999"
services:
  - name: web
    versions:
      stable: {endpoints: ["127.0.0.1:9001"]}
      canary: {endpoints: ["127.0.0.1:9101"]}
    split:
      weights: {stable: 90, canary: -10}
    rules:
      - match: {header: {name: x-canary, value: always}}
        version: canry
      - match: {header: {name: user-agent, regex: "(iPhone"}}
        version: canary
"""
BAD_ERRORS = [
    ("listen", 1),
    ("services[0].split.weights.canary", 8),
    ("services[0].rules[0].version", 11),
    ("services[0].rules[1].match.header.regex", 12),
]

TOKEN = "s3cret-token"


def write(tmp_path: Path, text: str, name: str = "grayproxy.yaml") -> str:
    path = tmp_path / name
    path.write_text(text.replace("${data_port}", "8080").replace("${control_port}", "9901"))
    return str(path)


# ---- check ---------------------------------------------------------------------------------


def test_check_accepts_a_good_config_with_a_one_line_summary(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = run_cli("check", "-c", path, env={"GRAYPROXY_TEST_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: OK: 2 services: web (stable, canary), api (blue, green)\n"
    assert result.stderr == ""


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`grayproxy check -c FILE | head -0`: no traceback when the reader is gone."""
    path = write(tmp_path, GOOD)
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "wb") as closed:
        done = subprocess.run(
            grayproxy_command("check", "-c", path),
            stdout=closed,
            stderr=subprocess.PIPE,
            env=child_env({"GRAYPROXY_TEST_TOKEN": TOKEN}),
            check=False,
        )
    assert done.returncode == 1
    assert b"Traceback" not in done.stderr, done.stderr.decode()


def test_check_lists_every_error_with_its_path_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    result = run_cli("check", "-c", path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == len(BAD_ERRORS)
    for line, (yaml_path, number) in zip(lines, BAD_ERRORS, strict=True):
        assert line.startswith(f"{path}: {yaml_path}: line {number}: "), line


def test_check_names_a_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.yaml")
    result = run_cli("check", "-c", path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}: cannot read")
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2() -> None:
    assert run_cli("check").returncode == 2
    result = run_cli("run", "-c", "x.yaml", "--workers", "0")
    assert result.returncode == 2
    assert "--workers" in result.stderr


# ---- run -----------------------------------------------------------------------------------


def test_run_refuses_a_bad_config_and_listens_on_nothing(tmp_path: Path) -> None:
    data_port, control_port = free_ports(2)
    text = GOOD.replace("${data_port}", str(data_port)).replace(
        "${control_port}", str(control_port)
    )
    path = tmp_path / "grayproxy.yaml"
    path.write_text(text.replace("{stable: 90, canary: 10}", "{stable: 0, canary: 0}"))
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 2
    assert re.search(r"services\[0\]\.split\.weights: line \d+: ", stderr), stderr
    assert "Traceback" not in stderr
    assert not is_listening(data_port)
    assert not is_listening(control_port)


def test_run_serves_and_exits_0_on_sigterm() -> None:
    with ProxyProcess(GOOD, env={"GRAYPROXY_TEST_TOKEN": TOKEN}) as proxy:
        assert proxy.stop(signal.SIGTERM) == 0
    assert "data on http://127.0.0.1:" in proxy.stderr


def test_run_workers_flag_overrides_the_file() -> None:
    env = {"GRAYPROXY_TEST_TOKEN": TOKEN}
    with ProxyProcess(GOOD, extra_args=["--workers", "2"], env=env) as proxy:
        assert proxy.process is not None
        pid = proxy.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert len(children) == 2
        assert proxy.stop(signal.SIGTERM) == 0


# ---- ctl against a running proxy -------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    with ProxyProcess(GOOD, env={"GRAYPROXY_TEST_TOKEN": TOKEN}) as running:
        yield running


def ctl_cli(
    proxy: ProxyProcess, *args: str, token: str | None = TOKEN
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "ctl", *args, env={"GRAYPROXY_CONTROL": proxy.control_url, "GRAYPROXY_TOKEN": token}
    )


def weights_of(proxy: ProxyProcess, service: str) -> dict[str, Any]:
    result = ctl_cli(proxy, "status", service, "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    return {name: version["weight"] for name, version in answer["versions"].items()}


def test_ctl_status_is_a_table_of_every_service(proxy: ProxyProcess) -> None:
    result = ctl_cli(proxy, "status")
    assert result.returncode == 0, result.stderr
    assert "web  generation" in result.stdout
    assert "api  generation" in result.stdout
    header = result.stdout.splitlines()[1].split()
    assert header == list(ctl.STATUS_COLUMNS)
    assert re.search(r"^\s+stable\s+\d+\s+[\d.]+%\s+\d/1\s+\d+", result.stdout, re.M)
    assert re.search(r"^\s+green\s+0\s+", result.stdout, re.M)


def test_ctl_status_json_is_the_api_answer(proxy: ProxyProcess) -> None:
    everything = json.loads(ctl_cli(proxy, "status", "--json").stdout)
    assert [s["name"] for s in ctl.services_of(everything)] == ["web", "api"]
    one = ctl_cli(proxy, "--json", "status", "web")
    assert one.returncode == 0
    service = json.loads(one.stdout)
    assert service["name"] == "web"
    assert set(service["versions"]) == {"stable", "canary"}


def test_ctl_weights_sets_the_split(proxy: ProxyProcess) -> None:
    result = ctl_cli(proxy, "weights", "web", "stable=80", "canary=20")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"web: stable=80 canary=20 \(generation \d+\)\n", result.stdout)
    assert weights_of(proxy, "web") == {"stable": 80, "canary": 20}


def test_ctl_weights_refused_shows_the_api_error(proxy: ProxyProcess) -> None:
    result = ctl_cli(proxy, "weights", "web", "stable=0", "canary=0")
    assert result.returncode == 1
    assert result.stderr.startswith("grayproxy ctl: HTTP 400: ")
    assert len(result.stderr.splitlines()) >= 2  # the details, one a line
    unknown = ctl_cli(proxy, "weights", "nosuch", "stable=1")
    assert unknown.returncode == 1
    assert "HTTP 404" in unknown.stderr
    assert "nosuch" in unknown.stderr


def test_ctl_weights_syntax_is_checked_before_any_call(proxy: ProxyProcess) -> None:
    result = ctl_cli(proxy, "weights", "web", "stable80")
    assert result.returncode == 2
    assert "VERSION=WEIGHT" in result.stderr


def test_ctl_promote_and_rollback(proxy: ProxyProcess) -> None:
    promoted = ctl_cli(proxy, "promote", "web", "canary")
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.startswith("web: stable=0 canary=100 ")
    assert weights_of(proxy, "web") == {"stable": 0, "canary": 100}
    rolled_back = ctl_cli(proxy, "rollback", "web", "--json")
    assert rolled_back.returncode == 0, rolled_back.stderr
    assert json.loads(rolled_back.stdout)["versions"]["stable"]["weight"] == 100
    assert weights_of(proxy, "web") == {"stable": 100, "canary": 0}


def test_ctl_reload_reports_the_generation_or_every_error(proxy: ProxyProcess) -> None:
    before = json.loads(ctl_cli(proxy, "status", "web", "--json").stdout)["generation"]
    reloaded = ctl_cli(proxy, "reload")
    assert reloaded.returncode == 0, reloaded.stderr
    match = re.fullmatch(r"reloaded: generation (\d+)\n", reloaded.stdout)
    assert match, reloaded.stdout
    assert int(match[1]) > before
    proxy.write_config(GOOD.replace("canary: 10", "canary: -10"))
    try:
        refused = ctl_cli(proxy, "reload")
    finally:
        proxy.write_config(GOOD)
    assert refused.returncode == 1
    assert refused.stderr.startswith("grayproxy ctl: HTTP 400: ")
    assert re.search(r"services\[0\]\.split\.weights\.canary: line \d+", refused.stderr)


def test_ctl_with_a_wrong_or_missing_token_fails_with_the_error(proxy: ProxyProcess) -> None:
    for token in ("wrong", None):
        result = ctl_cli(proxy, "status", token=token)
        assert result.returncode == 1
        assert result.stderr.startswith("grayproxy ctl: HTTP 401: ")
        assert result.stdout == ""


def test_ctl_url_flag_overrides_the_environment(proxy: ProxyProcess) -> None:
    result = run_cli(
        "ctl",
        "--url",
        proxy.control_url,
        "status",
        env={"GRAYPROXY_CONTROL": f"http://127.0.0.1:{free_port()}", "GRAYPROXY_TOKEN": TOKEN},
    )
    assert result.returncode == 0, result.stderr


# ---- ctl without a server ------------------------------------------------------------------


def test_ctl_connection_refused_is_a_clear_message() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli("ctl", "status", env={"GRAYPROXY_CONTROL": url})
    assert result.returncode == 1
    assert result.stderr.startswith(f"grayproxy ctl: cannot reach the control API at {url}: ")
    assert "connection refused" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctl_weights_parse_into_a_json_body() -> None:
    args = build_parser().parse_args(["ctl", "weights", "web", "stable=87.5", "canary=12.5"])
    assert args.weights == {"stable": 87.5, "canary": 12.5}
    args = build_parser().parse_args(["ctl", "weights", "web", "blue=0", "green=100"])
    assert args.weights == {"blue": 0, "green": 100}
    assert json.dumps(args.weights) == '{"blue": 0, "green": 100}'
    for bad in ("canary=nan", "canary=inf", "canary=", "=20", "stable=1 stable=2"):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["ctl", "weights", "web", *bad.split()])
        assert exit_info.value.code == 2


EXAMPLE_SERVICE = {
    "name": "web",
    "generation": 7,
    "baseline": "stable",
    "versions": {
        "stable": {
            "weight": 90,
            "endpoints": [
                {"address": "127.0.0.1:9001", "healthy": True},
                {"address": "127.0.0.1:9002", "healthy": False},
            ],
            "stats": {
                "requests": 1234,
                "errors": 2,
                "error_rate": 0.0016,
                "p50_ms": 3.1,
                "p99_ms": 12.0,
            },
        },
        "canary": {
            "weight": 10,
            "endpoints": [{"address": "127.0.0.1:9101", "healthy": True}],
            "stats": {"requests": 0, "errors": 0, "error_rate": None, "p50_ms": None},
        },
    },
}


def test_status_table_for_people() -> None:
    assert ctl.format_status({"generation": 7, "services": [EXAMPLE_SERVICE]}) == (
        "web  generation 7  baseline stable\n"
        "  VERSION  WEIGHT  SHARE   HEALTHY  REQUESTS  ERRORS  P50    P99\n"
        "  stable   90      90.00%  1/2      1234      0.16%   3.1ms  12.0ms\n"
        "  canary   10      10.00%  1/1      0         -       -      -"
    )
    assert ctl.format_change(EXAMPLE_SERVICE) == "web: stable=90 canary=10 (generation 7)"
    assert ctl.format_reload({"generation": 8, "warnings": ["x"]}) == (
        "reloaded: generation 8\nwarning: x"
    )
