"""A real Prometheus (Debian's `prometheus`) on loopback, scraping given targets every second.

with PrometheusProcess(["127.0.0.1:9901"]) as prometheus:
    prometheus.wait_for_samples('grayproxy_requests_total')
    result = prometheus.query('sum by (version) (rate(grayproxy_requests_total[30s]))')

Tests that need it ask for it with ``procs.tool("prometheus")``: skipped where it is missing,
a failure under .ci/run (which installs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from procs import DIRECT, free_port, http_get, terminate, tool

SCRAPE_INTERVAL = "1s"


class PrometheusProcess:
    """Prometheus scraping ``targets`` (host:port of control listeners, path /metrics)."""

    def __init__(self, targets: Sequence[str]) -> None:
        self.program = tool("prometheus")  # first: a skipped test leaves no directory behind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="grayproxy-prometheus-"))
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(json.dumps(_config(targets), indent=2))
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrometheusProcess:
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
        with open(self.workdir / "log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.program,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log}")
            try:
                if http_get(self.url + "/-/ready", timeout=1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.close()
        raise TimeoutError(f"prometheus not ready in 30 s:\n{self.log}")

    @property
    def log(self) -> str:
        path = self.workdir / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def query(self, promql: str) -> list[dict[str, object]]:
        """An instant query's result vector (raises on a PromQL error)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with DIRECT.open(url, timeout=10) as response:
            answer = json.load(response)
        if answer.get("status") != "success":
            raise ValueError(f"{promql}: {answer}")
        result: list[dict[str, object]] = answer["data"]["result"]
        return result

    def wait_for(self, promql: str, timeout: float = 30.0) -> list[dict[str, object]]:
        """Query until the result is not empty; the last result, or TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{promql}: no samples in {timeout}s\n{self.log}")
            time.sleep(0.5)

    def targets_up(self) -> list[dict[str, object]]:
        with DIRECT.open(f"{self.url}/api/v1/targets", timeout=10) as response:
            active: list[dict[str, object]] = json.load(response)["data"]["activeTargets"]
        return active

    def close(self) -> None:
        if self.process is not None:
            terminate(self.process)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _config(targets: Sequence[str]) -> dict[str, object]:
    """prometheus.yml as JSON (a subset of YAML): one job, scraped every second."""
    job = {
        "job_name": "grayproxy",
        "scrape_interval": SCRAPE_INTERVAL,
        "scrape_timeout": SCRAPE_INTERVAL,
        "static_configs": [{"targets": list(targets)}],
    }
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [job],
    }
