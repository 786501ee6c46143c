"""The size cap on config files: refused at start (exit 2) and at reload (old config kept).

Real grayproxy processes, real files one byte over MAX_CONFIG_BYTES.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from proxy.config import MAX_CONFIG_BYTES

from procs import DIRECT, ProxyProcess, free_port, http_get, is_listening, run_cli


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
