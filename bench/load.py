"""Load: wrk runs (throughput, latency percentiles, errors) and a paced one-connection probe
(latency at a low fixed rate), plus the upstreams' request counters.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.configs import (
    REALISTIC_BODY,
    REALISTIC_RESPONSE_HEADERS,
    STATUS_PATH,
    USER_AGENT,
    realistic_request,
)

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non_2xx: int  # wrk counts statuses above 399
    socket_errors: int  # connect + read + write + timeout

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


class LoadError(Exception):
    """wrk failed or printed no summary."""


def parse_wrk_json(output: str) -> WrkResult:
    """The summary our wrk script's done() prints as `BENCH_JSON {...}`."""
    match = re.search(r"^BENCH_JSON (\{.*\})$", output, re.MULTILINE)
    if match is None:
        raise LoadError(f"no summary in wrk output: {output.strip()[-300:]!r}")
    data = json.loads(match.group(1))
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        non_2xx=data["status"],
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
    )


def wrk_command(
    url: str, script: Path, *, connections: int, threads: int, seconds: float
) -> list[str]:
    return [
        "wrk",
        f"-t{threads}",
        f"-c{max(connections, threads)}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        url,
    ]


def run_wrk(command: Sequence[str], seconds: float) -> WrkResult:
    try:
        done = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"wrk did not finish in {seconds + 30:g}s") from exc
    if done.returncode != 0:
        raise LoadError(f"wrk exited with {done.returncode}: {(done.stderr or done.stdout)[-300:]}")
    return parse_wrk_json(done.stdout)


# --------------------------------------------------------------------------- the probe


class ResponseReader:
    """Reads HTTP/1.1 responses (Content-Length or chunked) off a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed mid-response")
        self.buffer += data

    def _take_until(self, marker: bytes) -> bytes:
        while (end := self.buffer.find(marker)) < 0:
            self._fill()
        taken, self.buffer = self.buffer[:end], self.buffer[end + len(marker) :]
        return taken

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        taken, self.buffer = self.buffer[:size], self.buffer[size:]
        return taken

    def read(self) -> tuple[int, dict[str, str], bytes]:
        """One response: status, headers (lower-case names), body."""
        head = self._take_until(b"\r\n\r\n").decode("latin-1")
        status_line, *header_lines = head.split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._read_chunks()
        else:
            body = self._take(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body

    def _read_chunks(self) -> bytes:
        chunks = []
        while size := int(self._take_until(b"\r\n").split(b";")[0], 16):
            chunks.append(self._take(size))
            self._take(2)
        self._take_until(b"\r\n")  # no trailers expected: the blank line
        return b"".join(chunks)


def probe_request(host: str, user: int) -> bytes:
    return (
        f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
        f"x-user-id: user-{user}\r\n\r\n"
    ).encode()


def probe_latencies(
    targets: Sequence[tuple[int, str]], count: int, rate: float, warmup: int = 50
) -> list[float | Exception]:
    """p50 in ms of `count` sequential keep-alive GETs to each target (port, Host header),
    on one connection each, paced at `rate`/s per target; or the error that ended its probe.

    At a low rate a proxy is idle between requests, so this is the latency it adds to one
    request, not a queueing figure. The targets take turns request by request (who goes
    first rotates): a slow spell of the machine, seconds long, then hits every target
    alike, and their differences, the figures compared, hold.
    """
    interval = 1.0 / rate
    probes = [_Probe(port, host) for port, host in targets]
    try:
        start = time.perf_counter()
        for index in range(warmup + count):
            time.sleep(max(0.0, start + index * interval - time.perf_counter()))
            for turn in range(len(probes)):
                probes[(index + turn) % len(probes)].send(index, keep=index >= warmup)
    finally:
        for probe in probes:
            probe.close()
    return [probe.result() for probe in probes]


class _Probe:
    """One target's probe connection and its samples; stops at its first error."""

    def __init__(self, port: int, host: str) -> None:
        self.host = host
        self.samples: list[int] = []
        self.error: Exception | None = None
        self.sock: socket.socket | None = None
        try:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            self.error = exc
            return
        self.reader = ResponseReader(self.sock)

    def send(self, index: int, keep: bool) -> None:
        if self.sock is None or self.error is not None:
            return
        try:
            sent = time.perf_counter_ns()
            self.sock.sendall(probe_request(self.host, index))
            status, _, _ = self.reader.read()
            if status != 200:
                raise ValueError(f"probe got status {status}")
        except (OSError, ValueError) as exc:
            self.error = exc
            return
        if keep:
            self.samples.append(time.perf_counter_ns() - sent)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def result(self) -> float | Exception:
        if self.error is not None:
            return self.error
        return statistics.median(self.samples) / 1e6


def check_answers(port: int, host: str, tls: bool = False, realistic: bool = False) -> str:
    """One GET through a target (over TLS with `tls`, the run's own certificate not
    verified; the realistic request with `realistic`); returns the body, raises if it is
    not a 200, or not the realistic page and its head's lines."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        sock = _unverified_tls().wrap_socket(raw) if tls else raw
        sock.sendall(realistic_request(host, 1, 1) if realistic else probe_request(host, 1))
        status, headers, body = ResponseReader(sock).read()
    if status != 200:
        raise ValueError(f"answers {status}: {body[:200]!r}")
    if realistic:
        missing = [name for name, _ in REALISTIC_RESPONSE_HEADERS if name.lower() not in headers]
        if body.decode() != REALISTIC_BODY or missing:
            raise ValueError(f"not the realistic page: {body[:100]!r}, missing {missing}")
    return body.decode(errors="replace").strip()


def _unverified_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --------------------------------------------------------------------------- upstream counters


def served_requests(port: int) -> int:
    """Requests an upstream nginx has served so far (its stub_status counter)."""
    url = f"http://127.0.0.1:{port}{STATUS_PATH}"
    with DIRECT.open(url, timeout=5) as response:
        return parse_stub_status(response.read().decode())


def parse_stub_status(text: str) -> int:
    """The `requests` total of nginx's stub_status page (third number of its third line)."""
    return int(text.splitlines()[2].split()[2])
