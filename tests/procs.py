"""Real grayproxy processes for tests: free ports, start, wait until ready, stop, read output.

with ProxyProcess(CONFIG) as proxy:         # CONFIG may say ${data_port} / ${control_port}
    urlopen(proxy.data_url + "/")
    assert proxy.stop(signal.SIGTERM) == 0

with ProxyProcess(args=["demo", "--port", "${data_port}", "--control-port", "${control_port}"]):
    ...
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import pytest

from bench.procs import free_ports

REPO_ROOT = Path(__file__).resolve().parent.parent
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def tool(name: str) -> str:
    """The path of the program ``name``; the test is skipped where it is not installed, and
    fails under .ci/run (GRAYPROXY_NEED_TOOLS=1), which installs every tool a test asks for."""
    path = shutil.which(name)
    if path is not None:
        return path
    if os.environ.get("GRAYPROXY_NEED_TOOLS"):
        pytest.fail(f"{name} is not installed: .ci/run should have installed it")
    pytest.skip(f"{name} is not installed")


def terminate(process: subprocess.Popen[bytes]) -> None:
    """Stop ``process`` if it runs: SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def is_listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(
    url: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """GET without any proxy from the environment: status, headers (lower-case names), body."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with DIRECT.open(request, timeout=timeout) as response:
            return response.status, _lower(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _lower(exc.headers.items()), exc.read()


def _lower(items: Sequence[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in items}


def grayproxy_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", *args]


def run_cli(
    *args: str, env: Mapping[str, str | None] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run `python -m proxy ARGS` to completion and capture its output."""
    return subprocess.run(
        grayproxy_command(*args),
        env=child_env(env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def child_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment with overrides; None removes a variable."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    for name in ("GRAYPROXY_CONTROL", "GRAYPROXY_TOKEN"):
        env.pop(name, None)
    for name, value in (overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


class ProxyProcess:
    """`python -m proxy ...` on two free ports, ready when /healthz answers and data accepts.

    ``config`` is YAML text (written to a temporary file) or ``config_file`` an existing file;
    ``${data_port}`` and ``${control_port}`` in the text and in ``args`` are replaced by the
    chosen ports. Without ``args`` it runs ``run -c FILE``; ``extra_args`` are appended.
    stdout and stderr go to files (no pipe to fill up); read them with ``.stdout``, ``.stderr``
    or ``.output``, also after the process ended.
    """

    def __init__(
        self,
        config: str | None = None,
        *,
        config_file: str | Path | None = None,
        args: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str | None] | None = None,
        ready_timeout: float = 15.0,
        wait_ready: bool = True,
    ) -> None:
        self.data_port, self.control_port = free_ports(2)
        self.data_url = f"http://127.0.0.1:{self.data_port}"
        self.control_url = f"http://127.0.0.1:{self.control_port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="grayproxy-test-"))
        self.config_path = None if config_file is None else Path(config_file)
        if config is not None:
            self.config_path = self.workdir / "grayproxy.yaml"
            self.write_config(config)
        if args is None:
            if self.config_path is None:
                raise ValueError("give a config, a config_file or args")
            args = ["run", "-c", str(self.config_path)]
        self.args = [self.substitute(arg) for arg in [*args, *extra_args]]
        self.env = env
        self.ready_timeout = ready_timeout
        self.wait_ready = wait_ready
        self._captured: dict[str, str] = {}
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "not started" if self.process is None else f"pid {self.process.pid}"
        return f"<ProxyProcess {' '.join(self.args)} [{state}] data={self.data_port}>"

    def substitute(self, text: str) -> str:
        ports = {"data_port": self.data_port, "control_port": self.control_port}
        return string.Template(text).safe_substitute(ports)

    def write_config(self, config: str) -> None:
        """(Re)write the config file, e.g. before a reload."""
        assert self.config_path is not None
        self.config_path.write_text(self.substitute(config))

    def __enter__(self) -> ProxyProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        with (
            open(self.workdir / "stdout", "ab") as stdout,
            open(self.workdir / "stderr", "ab") as stderr,
        ):
            self.process = subprocess.Popen(
                grayproxy_command(*self.args),
                env=child_env(self.env),
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        if self.wait_ready:
            try:
                self.wait_until_ready()
            except BaseException:
                self.close()
                raise

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.returncode is not None:
                raise RuntimeError(f"{self!r} exited with {self.returncode}:\n{self.output}")
            if self._healthy() and is_listening(self.data_port):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self!r} not ready in {self.ready_timeout}s:\n{self.output}")

    def _healthy(self) -> bool:
        try:
            status, _, _ = http_get(self.control_url + "/healthz", timeout=1.0)
        except OSError:
            return False
        return status == 200

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def send_signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send `sig` (if still running), wait for the exit and return its code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def wait(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    @property
    def stdout(self) -> str:
        return self._read("stdout")

    @property
    def stderr(self) -> str:
        return self._read("stderr")

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def _read(self, name: str) -> str:
        if name in self._captured:
            return self._captured[name]
        path = self.workdir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Stop it if it runs (SIGTERM, then SIGKILL); keep its output, remove its files."""
        if self.process is not None:
            terminate(self.process)
        self._captured = {name: self._read(name) for name in ("stdout", "stderr")}
        shutil.rmtree(self.workdir, ignore_errors=True)
