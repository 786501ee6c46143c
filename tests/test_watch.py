"""`grayproxy run --watch`: the config file is reloaded when it changes.

Real grayproxy processes and real upstreams. The file is edited in place, or laid out
exactly as the kubelet lays out a ConfigMap volume and updated as it does (a new timestamped
directory, a `..data` symlink renamed over the old one), and each reload is seen three ways:
the weights the control API reports, the version that serves real requests, and the audit
trail (a reload by the watcher is audited with the actor "file").
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.watch import POLL_INTERVAL, SETTLE

from procs import ProxyProcess, http_get, run_cli
from servers import Upstream

# Long enough for several polls and settles, on a busy machine too.
RELOAD_TIMEOUT = 20.0
# What a watcher needs to see a change and act on it, twice over: waited before asserting
# that nothing happened.
QUIET = 2 * (POLL_INTERVAL + SETTLE) + 1.0

CONFIG = """\
listen: "127.0.0.1:${data_port}"
workers: %(workers)d
control: {listen: "127.0.0.1:${control_port}"}
services:
  - name: web
    versions:
      stable: {endpoints: ["%(stable)s"]}
      canary: {endpoints: ["%(canary)s"]}
    split: {weights: {stable: %(stable_weight)d, canary: %(canary_weight)d}}
"""

# A misspelt key: refused with its YAML path.
BROKEN = CONFIG.replace("stable: {endpoints:", "stable: {endpoint:")


def config(
    upstreams: dict[str, Upstream], canary: int, workers: int = 1, template: str = CONFIG
) -> str:
    """Service `web` with `canary` percent on the canary, the rest on stable."""
    return template % {
        "workers": workers,
        "stable": upstreams["stable"].address,
        "canary": upstreams["canary"].address,
        "stable_weight": 100 - canary,
        "canary_weight": canary,
    }


class ConfigMapVolume:
    """A directory laid out as the kubelet lays out a ConfigMap volume:

    grayproxy.yaml -> ..data/grayproxy.yaml
    ..data -> ..2026_12_06_10_00_00.000000001
    ..2026_12_06_10_00_00.000000001/grayproxy.yaml

    and updated as the kubelet updates it (pkg/volume/util/atomic_writer.go): the new content
    in a new timestamped directory, a symlink to it made under a temporary name and renamed
    over `..data`, then the old directory removed. The file is never written in place."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "grayproxy.yaml"
        self._serial = itertools.count(1)

    def publish(self, text: str) -> None:
        previous = self._current()
        version = f"..2026_12_06_10_00_00.{next(self._serial):09d}"
        (self.directory / version).mkdir()
        (self.directory / version / "grayproxy.yaml").write_text(text)
        temporary = self.directory / "..data_tmp"
        os.symlink(version, temporary)
        os.replace(temporary, self.directory / "..data")
        if not self.path.is_symlink():
            os.symlink("..data/grayproxy.yaml", self.path)
        if previous is not None:
            shutil.rmtree(self.directory / previous)

    def _current(self) -> str | None:
        data = self.directory / "..data"
        return os.readlink(data) if data.is_symlink() else None


def get_json(proxy: ProxyProcess, path: str) -> dict[str, Any]:
    status, _, body = http_get(proxy.control_url + path)
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def weights(proxy: ProxyProcess) -> dict[str, float]:
    versions = get_json(proxy, "/api/v1/services/web")["versions"]
    return {name: version["weight"] for name, version in versions.items()}


def served_by(proxy: ProxyProcess, requests: int = 20) -> set[str]:
    """The versions that served `requests` real requests through the data port."""
    seen = set()
    for _ in range(requests):
        status, headers, _ = http_get(proxy.data_url + "/")
        assert status == 200
        seen.add(headers["x-grayproxy-version"])
    return seen


def file_reloads(proxy: ProxyProcess) -> list[dict[str, Any]]:
    """The audit records of the reloads the watcher made."""
    records = get_json(proxy, "/api/v1/audit")["records"]
    return [r for r in records if r["action"] == "reload" and r["actor"] == "file"]


def ctl_env(proxy: ProxyProcess) -> dict[str, str | None]:
    return {"GRAYPROXY_CONTROL": proxy.control_url}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = RELOAD_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout}s")
        time.sleep(0.1)


def wait_for_canary(proxy: ProxyProcess, canary: int) -> None:
    wait_for(lambda: weights(proxy)["canary"] == canary, f"canary at {canary}")


@pytest.mark.parametrize("workers", [1, 2])
def test_an_edited_file_is_reloaded_and_traffic_follows(
    upstreams: dict[str, Upstream], workers: int
) -> None:
    with ProxyProcess(config(upstreams, 0, workers), extra_args=["--watch"]) as proxy:
        assert served_by(proxy) == {"stable"}
        proxy.write_config(config(upstreams, 100, workers))
        wait_for_canary(proxy, 100)
        # Each worker adopts the supervisor's new config within a second (SPEC §4).
        wait_for(lambda: served_by(proxy) == {"canary"}, "all traffic on the canary")
        assert [r["after"]["changed"] for r in file_reloads(proxy)] == [["web"]]
        assert "reloaded: generation 2" in proxy.stderr


def test_a_configmap_update_is_reloaded(upstreams: dict[str, Upstream], tmp_path: Path) -> None:
    volume = ConfigMapVolume(tmp_path)
    proxy = ProxyProcess(config_file=volume.path, extra_args=["--watch"])
    volume.publish(proxy.substitute(config(upstreams, 0)))
    with proxy:
        assert served_by(proxy) == {"stable"}
        volume.publish(proxy.substitute(config(upstreams, 100)))
        wait_for_canary(proxy, 100)
        assert served_by(proxy) == {"canary"}
        volume.publish(proxy.substitute(config(upstreams, 40)))
        wait_for_canary(proxy, 40)
        assert len(file_reloads(proxy)) == 2


def test_a_broken_configmap_is_refused_and_the_running_config_kept(
    upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    volume = ConfigMapVolume(tmp_path)
    proxy = ProxyProcess(config_file=volume.path, extra_args=["--watch"])
    volume.publish(proxy.substitute(config(upstreams, 100)))
    with proxy:
        volume.publish(proxy.substitute(config(upstreams, 0, template=BROKEN)))
        wait_for(lambda: "reload refused" in proxy.stderr, "the refusal logged")
        assert "services[0].versions.stable.endpoint" in proxy.stderr  # the error, by path
        assert weights(proxy) == {"stable": 0, "canary": 100}
        assert served_by(proxy) == {"canary"}
        # Refused once, not retried while the file stays as it is.
        time.sleep(QUIET)
        assert proxy.stderr.count("reload refused") == 1
        assert file_reloads(proxy) == []

        volume.publish(proxy.substitute(config(upstreams, 30)))
        wait_for_canary(proxy, 30)
        assert len(file_reloads(proxy)) == 1


def test_a_burst_of_writes_is_one_reload(upstreams: dict[str, Upstream]) -> None:
    with ProxyProcess(config(upstreams, 0), extra_args=["--watch"]) as proxy:
        # Writes every 0.1 s for longer than two polls: each poll in the burst sees a change,
        # and the file never stays the same for SETTLE until the last write.
        burst = range(1, 31)
        written_at = []
        for canary in burst:
            proxy.write_config(config(upstreams, canary))
            written_at.append(time.monotonic())
            time.sleep(0.1)
        wait_for_canary(proxy, burst[-1])
        time.sleep(QUIET)
        # One reload, unless this test stalled between two writes for longer than SETTLE
        # (a busy machine): the watcher rightly took the file as settled there.
        stalls = sum(b - a >= SETTLE for a, b in itertools.pairwise(written_at))
        assert 1 <= len(file_reloads(proxy)) <= 1 + stalls
        assert proxy.stderr.count("reloaded: generation") == len(file_reloads(proxy))


def test_a_touch_or_an_identical_rewrite_does_not_reload(
    upstreams: dict[str, Upstream],
) -> None:
    """A reload puts the file's weights back over runtime ones: only new content reloads."""
    text = config(upstreams, 0)
    with ProxyProcess(text, extra_args=["--watch"]) as proxy:
        assert proxy.config_path is not None
        changed = run_cli("ctl", "weights", "web", "stable=50", "canary=50", env=ctl_env(proxy))
        assert changed.returncode == 0, changed.stderr
        proxy.config_path.touch()
        proxy.write_config(text)
        time.sleep(QUIET)
        assert weights(proxy) == {"stable": 50, "canary": 50}
        assert file_reloads(proxy) == []


def test_a_file_gone_keeps_the_running_config_until_it_is_back(
    upstreams: dict[str, Upstream],
) -> None:
    with ProxyProcess(config(upstreams, 100), extra_args=["--watch"]) as proxy:
        assert proxy.config_path is not None
        proxy.config_path.unlink()
        wait_for(lambda: "cannot be found" in proxy.stderr, "the missing file logged")
        assert served_by(proxy) == {"canary"}
        assert "reload refused" not in proxy.stderr
        proxy.write_config(config(upstreams, 20))
        wait_for_canary(proxy, 20)
        assert len(file_reloads(proxy)) == 1


def test_without_watch_a_changed_file_is_not_reloaded(upstreams: dict[str, Upstream]) -> None:
    with ProxyProcess(config(upstreams, 0)) as proxy:
        proxy.write_config(config(upstreams, 100))
        time.sleep(QUIET)
        assert weights(proxy) == {"stable": 100, "canary": 0}
        assert served_by(proxy) == {"stable"}
        assert "watching" not in proxy.stderr
        # The file was valid all along: SIGHUP applies it.
        proxy.send_signal(signal.SIGHUP)
        wait_for_canary(proxy, 100)
