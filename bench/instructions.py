"""Instructions per request: a measure of the data path that noise cannot move.

Wall-clock and CPU-time figures swing by 2x on shared machines; the number of
instructions the proxy executes does not. This runs grayproxy (the compiled
build `make` puts in build/compiled, or a tree built in place, so two commits can
be compared) under `valgrind --tool=callgrind`
twice, once with a few requests and once with many more, and reports the
difference divided by the extra requests: the startup cost cancels out.

    python -m bench.instructions                       # build/compiled (make run builds it)
    python -m bench.instructions --source /tmp/base    # another checkout built in place:
        # (cd /tmp/base && /path/to/.venv/bin/python setup.py -q build_ext --inplace)
    python -m bench.instructions --functions 20        # and where they go, per compiled function
    python -m bench.instructions --services 100        # a bigger config (also --endpoints, --rules)
    python -m bench.instructions --tls                 # HTTPS at the listener (openssl's cert)
    python -m bench.instructions --access-log --decision-header   # with both on
    python -m bench.instructions --realistic           # the realistic heads (browser, page)
    python -m bench.instructions --header-lines 6      # ... with 6 request header lines of 11

It sends what `make bench` sends (wrk's request head, the realistic config,
nginx's response head; with --realistic, what its -realistic targets send and
get). Counts are user-space instructions of the proxy process
(the kernel's share of the socket calls is not in them). The proxy runs with
PYTHONHASHSEED=0: same binary, same inputs, the same count on every run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.configs import (
    REALISTIC_HEADER_LINES,
    USER_AGENT,
    Certificate,
    Shape,
    Upstreams,
    grayproxy_yaml,
    openssl_command,
    realistic_request,
    realistic_response,
)
from bench.procs import free_ports, is_listening

ROOT = Path(__file__).resolve().parent.parent
COMPILED = ROOT / "build" / "compiled"  # the Makefile's compiled build
# What the bench's upstream nginx (`return 200`) answers, and what wrk asks with the
# bench's script: the same heads as `make bench`, with its realistic config.
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 30 Nov 2026 23:30:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 6\r\nConnection: keep-alive\r\n\r\nhello\n"
)
REQUEST = "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {agent}\r\nx-user-id: user-{user}\r\n\r\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument(
        "--source",
        type=Path,
        default=COMPILED,
        help="the directory holding the proxy package to run (build/compiled)",
    )
    parser.add_argument("--requests", type=int, default=2000, help="extra requests (2000)")
    parser.add_argument(
        "--functions",
        type=int,
        default=0,
        metavar="N",
        help="also the N costliest compiled functions, inclusive, per request",
    )
    parser.add_argument(
        "--services", type=int, default=1, help="services, the last one requested by Host (1)"
    )
    parser.add_argument("--endpoints", type=int, default=1, help="endpoints per version (1)")
    parser.add_argument(
        "--rules", type=int, default=0, help="unmatched rules (0: the four realistic ones)"
    )
    parser.add_argument(
        "--tls", action="store_true", help="the listener speaks TLS (a certificate by openssl)"
    )
    parser.add_argument(
        "--access-log", action="store_true", help="with the JSON access log on, to a file"
    )
    parser.add_argument("--decision-header", action="store_true", help="with decision_header: true")
    parser.add_argument(
        "--realistic",
        action="store_true",
        help="the realistic heads: a browser's request, a page's response head and 2 KB body",
    )
    parser.add_argument(
        "--header-lines",
        type=int,
        choices=range(2, len(REALISTIC_HEADER_LINES) + 1),
        metavar="N",
        help="with --realistic: only N request header lines (Host, the next ones, x-user-id)",
    )
    args = parser.parse_args(argv)
    if args.header_lines and not args.realistic:
        parser.error("--header-lines goes with --realistic")
    if shutil.which("valgrind") is None:
        print("valgrind is missing: apt-get install -y valgrind", file=sys.stderr)
        return 1
    shape = Shape(args.services, args.endpoints, args.rules, gateway=args.services > 1)
    exchange = Exchange.realistic(args.header_lines) if args.realistic else Exchange()
    ports = start_upstreams(args.endpoints, exchange.response)
    options = Options(args.access_log, args.decision_header, exchange)
    with tempfile.TemporaryDirectory(prefix="grayproxy-instr-tls-") as tmp:
        tls = None
        if args.tls:
            tls = Certificate(Path(tmp) / "bench.crt", Path(tmp) / "bench.key")
            subprocess.run(openssl_command(tls), capture_output=True, check=True)
        few, few_functions = instructions(args.source, ports, shape, 200, tls, options)
        many, many_functions = instructions(
            args.source, ports, shape, 200 + args.requests, tls, options
        )
    per_request = (many - few) / args.requests
    print(f"{args.source}: {per_request:,.0f} instructions per request")
    costs = {
        name: (total - few_functions.get(name, 0)) / args.requests
        for name, total in many_functions.items()
    }
    for name, cost in sorted(costs.items(), key=lambda item: -item[1])[: args.functions]:
        print(f"{cost:10,.0f}  {name}")
    if args.functions and not costs:
        print("no compiled function seen: is it built? (see docs/development.md)")
    return 0


@dataclass(frozen=True, slots=True)
class Exchange:
    """The heads of a request and its response: by default those of `make bench`."""

    header_lines: int = 0  # 0: the minimal request; else the realistic one with this many
    response: bytes = RESPONSE

    @staticmethod
    def realistic(header_lines: int | None) -> Exchange:
        return Exchange(header_lines or len(REALISTIC_HEADER_LINES), realistic_response())

    def request(self, host: str, user: int) -> bytes:
        if self.header_lines:
            return realistic_request(host, user, user, self.header_lines)
        return REQUEST.format(host=host, agent=USER_AGENT, user=user).encode()


@dataclass(frozen=True, slots=True)
class Options:
    """Features to switch on in the config (all off: what `make bench` runs)."""

    access_log: bool = False
    decision_header: bool = False
    exchange: Exchange = Exchange()

    def apply(self, yaml: str) -> str:
        if self.decision_header:
            yaml = yaml.replace(
                "    baseline: stable\n", "    baseline: stable\n    decision_header: true\n"
            )
        return yaml


def start_upstreams(count: int, response: bytes = RESPONSE) -> tuple[int, ...]:
    """Minimal keep-alive HTTP/1.1 servers in a thread: `response` to every request."""
    ports = tuple(free_ports(count))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(response)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def serve() -> None:
        for port in ports:
            await asyncio.start_server(handle, "127.0.0.1", port)
        await asyncio.Event().wait()

    threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
    while not all(is_listening(port) for port in ports):
        time.sleep(0.05)
    return ports


def instructions(
    source: Path,
    ports: tuple[int, ...],
    shape: Shape,
    requests: int,
    tls: Certificate | None = None,
    options: Options = Options(),
) -> tuple[int, dict[str, int]]:
    """Total instructions of one proxy run that served `requests` requests (over TLS
    with `tls`), and those of each compiled function, callees included."""
    data, control = free_ports(2)
    with tempfile.TemporaryDirectory(prefix="grayproxy-instr-") as tmp:
        config = Path(tmp) / "grayproxy.yaml"
        upstreams = Upstreams(stable=ports, canary=ports)
        log = Path(tmp) / "access.log" if options.access_log else None
        yaml = grayproxy_yaml(data, control, upstreams, shape, tls, log)
        config.write_text(options.apply(yaml))
        out = Path(tmp) / "callgrind.out"
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "proxy",
            "run",
            "-c",
            str(config),
            "--log-level",
            "warning",
        ]
        # A fixed hash seed: dict probes, and so the count, are then the same every run.
        # The package from `source` and nowhere else (not the directory it runs in).
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(source)}
        env["PYTHONSAFEPATH"] = "1"
        proxy = subprocess.Popen(
            command, cwd=source, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 180
            while not is_listening(data):
                if time.monotonic() > deadline or proxy.poll() is not None:
                    raise RuntimeError("grayproxy did not start under valgrind")
                time.sleep(0.2)
            host = shape.host or "127.0.0.1"
            send_requests(data, host, requests, tls is not None, options.exchange)
        finally:
            proxy.terminate()
            proxy.wait(120)
        return read_total(out.read_text(errors="replace")), compiled_functions(out)


def send_requests(
    port: int, host: str, count: int, tls: bool = False, exchange: Exchange = Exchange()
) -> None:
    with socket.create_connection(("127.0.0.1", port)) as raw:
        sock = raw
        if tls:  # the run's own certificate: nothing to verify
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            sock = context.wrap_socket(raw)
        body_end = exchange.response.partition(b"\r\n\r\n")[2][-16:]
        for user in range(count):
            sock.sendall(exchange.request(host, user))
            received = b""
            while not received.endswith(body_end):
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("the proxy closed the connection")
                received += chunk


def compiled_functions(callgrind_out: Path) -> dict[str, int]:
    """Inclusive instructions of each mypyc-compiled function (C name
    CPyDef_<module>___<Class>___<method>), as module.Class.method."""
    if shutil.which("callgrind_annotate") is None:
        return {}
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(callgrind_out)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    functions: dict[str, int] = {}
    for count, c_name in re.findall(r"^\s*([\d,]+) .*?:CPyDef_(\w+)", annotated, re.MULTILINE):
        name = ".".join(c_name.split("___"))
        functions.setdefault(name, int(count.replace(",", "")))  # listed biggest first
    return functions


def read_total(callgrind_out: str) -> int:
    """The `summary:` (or `totals:`) line of a callgrind output file."""
    found = re.search(r"^(?:summary|totals):\s+(\d+)", callgrind_out, re.MULTILINE)
    if found is None:
        raise ValueError("no summary line in the callgrind output")
    return int(found.group(1))


if __name__ == "__main__":
    raise SystemExit(main())
