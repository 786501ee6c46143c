"""TLS both ways, black-box: real grayproxy processes, real TLS upstreams, real clients.

Certificates are made by the test with trustme (a test CA and leaf certificates,
through the `cryptography` package); the self-signed one with `cryptography`
directly. The client side is Python's ssl module and curl; the upstreams are
aiohttp servers with an SSLContext on 127.0.0.1, recording each request's
connection (its peer port) and the client certificate they were shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import http.server
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import types
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import ConfigError, ListenerTls, UpstreamTls
from proxy.endpoints import Upstreams
from proxy.loader import load_config, parse_config
from proxy.state import LiveState
from proxy.tls import ClientTls, digest, server_context

from procs import ProxyProcess, free_port, http_get, is_listening, run_cli
from servers import LoopThread, Upstream

TOKEN = "tls-test-token"


# ---------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Leaf:
    cert: Path
    key: Path
    serial: int


def issue(ca: trustme.CA, directory: Path, name: str, *hosts: str) -> Leaf:
    """A certificate of ``ca`` for ``hosts`` (the first is its common name too),
    written to NAME.crt and NAME.key."""
    leaf = ca.issue_cert(*hosts, common_name=hosts[0])
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
    return Leaf(cert, key, serial)


def self_signed(directory: Path, name: str) -> Leaf:
    """A self-signed certificate for 127.0.0.1 and localhost, as `openssl req -x509` makes."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Leaf(cert, key_path, certificate.serial_number)


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: trustme.CA
    ca_file: Path
    proxy: Leaf  # the listeners' first certificate (127.0.0.1, localhost)
    rotated: Leaf  # the one that replaces it
    upstream: Leaf  # the upstreams' (127.0.0.1, upstream.test)
    client: Leaf  # grayproxy's client certificate for mTLS
    self_signed: Leaf

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.set_alpn_protocols(["http/1.1"])
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(
        directory=directory,
        ca=ca,
        ca_file=ca_file,
        proxy=issue(ca, directory, "proxy", "127.0.0.1", "localhost"),
        rotated=issue(ca, directory, "rotated", "127.0.0.1", "localhost"),
        upstream=issue(ca, directory, "upstream", "127.0.0.1", "upstream.test"),
        client=issue(ca, directory, "client", "grayproxy.client.test"),
        self_signed=self_signed(directory, "self-signed"),
    )


# ---------------------------------------------------------------------------- TLS upstreams


class TlsUpstream:
    """An aiohttp HTTPS server on 127.0.0.1 recording each request: its path, headers
    and the client's port (one per connection).
    ``/ws`` is a WebSocket echo; ``/healthz`` answers 200."""

    def __init__(self, loops: LoopThread, leaf: Leaf) -> None:
        self.loops = loops
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(leaf.cert), str(leaf.key))
        self.received: list[dict[str, Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> TlsUpstream:
        self.loops.call(self._start())
        return self

    def __exit__(self, *_: object) -> None:
        if self._runner is not None:
            self.loops.call(self._runner.cleanup())

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self._websocket)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _handle(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        record = {
            "path": request.path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "peer_port": request.transport.get_extra_info("peername")[1],
        }
        self.received.append(record)
        return web.json_response(record)

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo: " + message.data)
        return ws


def subject_of(peercert: Any) -> dict[str, str]:
    """{"commonName": ..., ...} of a certificate as ssl's getpeercert() gives it."""
    return {name: value for ((name, value),) in (peercert or {}).get("subject", ())}


class ThreadedTlsUpstream:
    """HTTPS from http.server in threads, requiring a client certificate of ``client_ca``.

    Unlike an asyncio server, a blocking handshake sends its alert when it refuses a
    client (TLS 1.3's "certificate required"), as nginx or Go do: the proxy then sees a
    TLS error, not a bare close."""

    def __init__(self, leaf: Leaf, client_ca: Path) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(leaf.cert), str(leaf.key))
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca))
        self.subjects: list[dict[str, str]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                assert isinstance(self.connection, ssl.SSLSocket)
                subject = subject_of(self.connection.getpeercert())
                owner.subjects.append(subject)
                body = json.dumps({"client_subject": subject}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # The handshake runs in accept(); a refused one is an OSError the server skips.
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ThreadedTlsUpstream:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def loops_tls() -> Iterator[LoopThread]:
    loops = LoopThread()
    yield loops
    loops.stop()


# ---------------------------------------------------------------------------- helpers


def listener_config(pki: Pki, upstream: str, extra: str = "") -> str:
    return f"""\
listen: "127.0.0.1:${{data_port}}"
control: {{listen: "127.0.0.1:${{control_port}}"}}
tls: {{cert: "{pki.proxy.cert}", key: "{pki.proxy.key}"}}
{extra}services:
  - name: web
    versions:
      stable: {{endpoints: ["{upstream}"]}}
"""


def https_get(
    port: int, context: ssl.SSLContext, path: str = "/"
) -> tuple[int, bytes, dict[str, Any]]:
    """GET over a new TLS connection: status, body, the server's certificate."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        assert connection.sock is not None
        peercert = connection.sock.getpeercert()
        assert peercert is not None
        return response.status, response.read(), peercert
    finally:
        connection.close()


def serial_of(peercert: dict[str, Any]) -> int:
    return int(peercert["serialNumber"], 16)


def upstream_errors(proxy: ProxyProcess) -> dict[tuple[str, str], float]:
    """grayproxy_upstream_errors_total by (version, kind)."""
    text = http_get(proxy.control_url + "/metrics")[2].decode()
    return {
        (sample.labels["version"], sample.labels["kind"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "grayproxy_upstream_errors"
        for sample in family.samples
        if sample.name == "grayproxy_upstream_errors_total"
    }


def reload(proxy: ProxyProcess) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(proxy.control_url + "/api/v1/reload", method="POST")
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def wait_for(condition: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------- the data listener


@pytest.fixture(scope="module")
def plain_upstream(loops_tls: LoopThread) -> Iterator[Upstream]:
    server = Upstream(loops_tls, "stable").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def https_proxy(pki: Pki, plain_upstream: Upstream) -> Iterator[ProxyProcess]:
    with ProxyProcess(listener_config(pki, plain_upstream.address)) as proxy:
        yield proxy


def test_https_from_python_with_alpn_and_forwarded_proto(
    pki: Pki, https_proxy: ProxyProcess
) -> None:
    context = pki.client_context()
    with (
        socket.create_connection(("127.0.0.1", https_proxy.data_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.selected_alpn_protocol() == "http/1.1"
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert serial_of(tls.getpeercert() or {}) == pki.proxy.serial
        tls.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    headers = {name.lower(): value for name, value in json.loads(body)["headers"]}
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-for"] == "127.0.0.1"


def test_https_streams_both_framings_and_keeps_alive(pki: Pki, https_proxy: ProxyProcess) -> None:
    """Every piece an upstream read gives goes out in one TLS write (TlsClientConnection):
    a chunked response, a 5 MB one and a HEAD, one after another on one connection."""
    connection = http.client.HTTPSConnection(
        "127.0.0.1", https_proxy.data_port, context=pki.client_context(), timeout=10
    )
    try:
        connection.request("GET", "/chunked")
        response = connection.getresponse()
        assert response.getheader("transfer-encoding") == "chunked"
        assert response.read() == b"one,two,three"
        sock = connection.sock
        connection.request("GET", "/bytes/5000000")
        response = connection.getresponse()
        assert response.read() == b"x" * 5_000_000
        connection.request("HEAD", "/bytes/10")
        response = connection.getresponse()
        assert response.status == 200 and response.read() == b""
        assert connection.sock is sock  # one kept-alive TLS connection throughout
    finally:
        connection.close()


def test_https_from_curl_with_cacert(pki: Pki, https_proxy: ProxyProcess) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    result = subprocess.run(
        [
            curl,
            "--silent",
            "--show-error",
            "--noproxy",
            "*",
            "--cacert",
            str(pki.ca_file),
            "--write-out",
            "\n%{http_code} %{http_version}",
            f"https://localhost:{https_proxy.data_port}/from-curl",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    body, _, status_line = result.stdout.rpartition("\n")
    assert status_line == "200 1.1"
    assert json.loads(body)["raw_path"] == "/from-curl"


def test_tls_1_1_is_refused(pki: Pki, https_proxy: ProxyProcess) -> None:
    def handshake(maximum: ssl.TLSVersion) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1/TLSv1_1: on purpose
            context = pki.client_context()
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = maximum
            context.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that this client offers TLS 1.1
        with (
            socket.create_connection(("127.0.0.1", https_proxy.data_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            return str(tls.version())

    assert handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"  # the same client gets in with 1.2
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        handshake(ssl.TLSVersion.TLSv1_1)


def test_tls_1_2_takes_only_forward_secret_aead_ciphers(
    pki: Pki, https_proxy: ProxyProcess
) -> None:
    def handshake(ciphers: str) -> str:
        context = pki.client_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(ciphers)
        with (
            socket.create_connection(("127.0.0.1", https_proxy.data_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            cipher = tls.cipher()
            assert cipher is not None
            return cipher[0]

    assert handshake("ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert handshake("ECDHE-ECDSA-CHACHA20-POLY1305") == "ECDHE-ECDSA-CHACHA20-POLY1305"
    for legacy in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"):  # CBC
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            handshake(legacy)


def test_listener_connections_call_openssl_directly(pki: Pki) -> None:
    """A listener's SSLObjects read, write and answer pending with _ssl's C
    methods (see tls.DirectSSLObject), and these do what Python's SSLObject
    does: a handshake, more than a record's bytes each way, a read into a
    buffer, close_notify read as b"" (uvloop's end of stream)."""
    listener = server_context(ListenerTls(str(pki.proxy.cert), str(pki.proxy.key)))
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = listener.wrap_bio(to_server, to_client, server_side=True)
    client = pki.client_context().wrap_bio(to_client, to_server, server_hostname="localhost")
    assert isinstance(server, ssl.SSLObject)
    for method in (server.read, server.write, server.pending):
        assert isinstance(method, types.BuiltinMethodType), method  # no Python frame
    for _ in range(10):  # each side's turn until both are done
        finished = 0
        for side in (client, server):
            try:
                side.do_handshake()
                finished += 1
            except ssl.SSLWantReadError:
                pass
        if finished == 2:
            break
    assert server.selected_alpn_protocol() == "http/1.1"

    def received(reader: ssl.SSLObject, size: int) -> bytes:
        data = b""
        while len(data) < size:
            data += reader.read(65536)
        return data

    request = os.urandom(40_000)  # three records
    assert client.write(request) == len(request)
    buffer = bytearray(1000)
    count: object = server.read(1000, buffer)  # into the buffer: a count
    assert count == 1000 and bytes(buffer) == request[:1000]
    assert server.pending() > 0  # the rest of the first record, decrypted
    assert received(server, len(request) - 1000) == request[1000:]
    response = os.urandom(70_000)
    assert server.write(response) == len(response)
    assert received(client, len(response)) == response
    with pytest.raises(ssl.SSLWantReadError):
        client.unwrap()  # close_notify sent, the server's not yet read
    assert server.read(1024) == b""


def test_plain_http_on_the_tls_port_gets_no_http_response(
    pki: Pki, https_proxy: ProxyProcess, plain_upstream: Upstream
) -> None:
    before = len(plain_upstream.received)
    with socket.create_connection(("127.0.0.1", https_proxy.data_port), timeout=10) as sock:
        sock.sendall(b"GET /plain HTTP/1.1\r\nHost: localhost\r\n\r\n")
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):  # ends: the proxy closes the connection
                reply += chunk
    assert b"HTTP/" not in reply
    assert len(reply) < 64  # at most a TLS alert record, never a page
    assert len(plain_upstream.received) == before
    # and the listener goes on serving TLS
    assert https_get(https_proxy.data_port, pki.client_context())[0] == 200


def test_bad_certificates_at_start_exit_2_with_every_error_and_its_line(
    pki: Pki, tmp_path: Path
) -> None:
    other = issue(pki.ca, tmp_path, "other", "localhost")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    config = tmp_path / "bad.yaml"
    config.write_text(
        f"""\
listen: "127.0.0.1:{free_port()}"
tls: {{cert: "{pki.proxy.cert}", key: "{other.key}"}}
control:
  listen: "127.0.0.1:{free_port()}"
  tls:
    cert: "{tmp_path / "missing.crt"}"
    key: "{tmp_path}"
services:
  - name: web
    versions:
      stable:
        endpoints: ["127.0.0.1:9"]
        tls:
          ca: "{not_pem}"
          cert: "{pki.client.cert}"
          key: "{pki.proxy.key}"
"""
    )
    result = run_cli("run", "-c", str(config))
    assert result.returncode == 2, result.stderr
    errors = result.stderr.strip().splitlines()
    assert errors == [
        f"{config}: tls.key: line 2: {other.key} does not match "
        f"the certificate in {pki.proxy.cert}",
        f"{config}: control.tls.cert: line 6: cannot read {tmp_path / 'missing.crt'}: "
        "No such file or directory",
        f"{config}: control.tls.key: line 7: cannot read {tmp_path}: Is a directory",
        f"{config}: services[0].versions.stable.tls.ca: line 14: {not_pem}: "
        "no PEM certificate found",
    ]
    # The client key that does not match comes up once the CA is fixed.
    config.write_text(config.read_text().replace(str(not_pem), str(pki.ca_file)))
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 2
    assert (
        f"services[0].versions.stable.tls.key: line 16: {pki.proxy.key} does not match "
        f"the certificate in {pki.client.cert}" in result.stderr
    )


def test_unreadable_key_is_refused(pki: Pki, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file: a mode-000 key is readable here")
    key = tmp_path / "locked.key"
    key.write_bytes(pki.proxy.key.read_bytes())
    key.chmod(0)
    config = tmp_path / "locked.yaml"
    config.write_text(
        f'tls: {{cert: "{pki.proxy.cert}", key: "{key}"}}\n'
        'services: [{name: web, versions: {a: {endpoints: ["127.0.0.1:9"]}}}]\n'
    )
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 2
    assert f"tls.key: line 1: cannot read {key}: Permission denied" in result.stderr


# ---------------------------------------------------------------------------- rotation


def rotating_config(directory: Path, upstream: str, workers: int = 1) -> str:
    return f"""\
listen: "127.0.0.1:${{data_port}}"
workers: {workers}
control: {{listen: "127.0.0.1:${{control_port}}"}}
tls: {{cert: "{directory / "live.crt"}", key: "{directory / "live.key"}"}}
services:
  - name: web
    versions:
      stable: {{endpoints: ["{upstream}"]}}
"""


def install(leaf: Leaf, directory: Path) -> None:
    shutil.copyfile(leaf.cert, directory / "live.crt")
    shutil.copyfile(leaf.key, directory / "live.key")


def test_reload_rotates_the_certificate_and_kept_alive_connections_go_on(
    pki: Pki, plain_upstream: Upstream, tmp_path: Path
) -> None:
    install(pki.proxy, tmp_path)
    context = pki.client_context()
    with ProxyProcess(rotating_config(tmp_path, plain_upstream.address)) as proxy:
        kept = http.client.HTTPSConnection("127.0.0.1", proxy.data_port, context=context)
        kept.request("GET", "/before")
        assert kept.getresponse().read() and kept.sock is not None
        kept_socket = kept.sock
        assert serial_of(kept_socket.getpeercert() or {}) == pki.proxy.serial

        install(pki.rotated, tmp_path)
        status, body = reload(proxy)
        assert status == 200, body

        status, _, peercert = https_get(proxy.data_port, context)
        assert status == 200
        assert serial_of(peercert) == pki.rotated.serial
        # The connection made before the rotation still works, on the old certificate.
        kept.request("GET", "/after")
        response = kept.getresponse()
        assert response.status == 200 and response.read()
        assert kept.sock is kept_socket
        assert serial_of(kept_socket.getpeercert() or {}) == pki.proxy.serial
        kept.close()

        # A refused reload (a key that does not match) keeps the certificate served.
        shutil.copyfile(pki.proxy.key, tmp_path / "live.key")
        status, body = reload(proxy)
        assert status == 400
        assert body["details"] == [
            f"tls.key: line 4: {tmp_path / 'live.key'} does not match "
            f"the certificate in {tmp_path / 'live.crt'}"
        ]
        status, _, peercert = https_get(proxy.data_port, context)
        assert status == 200 and serial_of(peercert) == pki.rotated.serial


def test_sighup_rotates_the_certificate_of_every_worker(
    pki: Pki, plain_upstream: Upstream, tmp_path: Path
) -> None:
    install(pki.proxy, tmp_path)
    context = pki.client_context()
    with ProxyProcess(rotating_config(tmp_path, plain_upstream.address, workers=2)) as proxy:
        assert serial_of(https_get(proxy.data_port, context)[2]) == pki.proxy.serial
        install(pki.rotated, tmp_path)
        proxy.send_signal(signal.SIGHUP)

        def all_rotated() -> bool:
            # New connections land on either worker (SO_REUSEPORT): all must serve the new one.
            serials = [serial_of(https_get(proxy.data_port, context)[2]) for _ in range(12)]
            return set(serials) == {pki.rotated.serial}

        wait_for(all_rotated, what="every worker serving the rotated certificate")


# ---------------------------------------------------------------------------- control.tls


def test_control_api_over_https(pki: Pki, plain_upstream: Upstream) -> None:
    config = f"""\
listen: "127.0.0.1:${{data_port}}"
control:
  listen: "127.0.0.1:${{control_port}}"
  token_env: GRAYPROXY_TEST_TOKEN
  tls: {{cert: "{pki.proxy.cert}", key: "{pki.proxy.key}"}}
services:
  - name: web
    versions:
      stable: {{endpoints: ["{plain_upstream.address}"]}}
"""
    env = {"GRAYPROXY_TEST_TOKEN": TOKEN}
    with ProxyProcess(config, env=env, wait_ready=False) as proxy:
        context = pki.client_context()
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        url = f"https://127.0.0.1:{proxy.control_port}"

        def ready() -> bool:
            try:
                with opener.open(url + "/healthz", timeout=2) as reply:
                    return bool(reply.status == 200)
            except OSError:
                return False

        wait_for(ready, what="the control API over HTTPS")
        request = urllib.request.Request(
            url + "/api/v1/services/web", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with opener.open(request, timeout=5) as reply:
            assert reply.status == 200
            assert json.loads(reply.read())["name"] == "web"
        # plain HTTP on the control port gets no answer
        with pytest.raises((http.client.HTTPException, OSError)):
            http_get(proxy.control_url + "/healthz", timeout=3)
        # grayproxy ctl reaches it with the CA in SSL_CERT_FILE
        result = run_cli(
            "ctl",
            "status",
            "web",
            env={
                "GRAYPROXY_CONTROL": url,
                "GRAYPROXY_TOKEN": TOKEN,
                "SSL_CERT_FILE": str(pki.ca_file),
            },
        )
        assert result.returncode == 0, result.stderr
        assert "stable" in result.stdout
        assert "https://127.0.0.1:" in proxy.stderr


# ---------------------------------------------------------------------------- upstream TLS


def upstream_config(versions: str, extra: str = "") -> str:
    return f"""\
listen: "127.0.0.1:${{data_port}}"
control: {{listen: "127.0.0.1:${{control_port}}"}}
services:
  - name: web
{extra}    versions:
{versions}"""


def version_by_header(proxy: ProxyProcess, version: str, path: str = "/") -> tuple[int, bytes]:
    """A GET that a rule sends to ``version`` (x-version header)."""
    status, _, body = http_get(proxy.data_url + path, headers={"x-version": version}, timeout=10)
    return status, body


def rules_for(*versions: str) -> str:
    lines = "".join(
        f"      - {{match: {{header: {{name: x-version, value: {name}}}}}, version: {name}}}\n"
        for name in versions
    )
    return "    rules:\n" + lines


def test_upstream_verification_ca_and_server_name(pki: Pki, loops_tls: LoopThread) -> None:
    with (
        TlsUpstream(loops_tls, pki.self_signed) as lonely,
        TlsUpstream(loops_tls, pki.upstream) as signed,
    ):
        versions = f"""\
      untrusted: {{endpoints: ["{lonely.address}"], tls: {{}}}}
      pinned: {{endpoints: ["{lonely.address}"], tls: {{ca: "{pki.self_signed.cert}"}}}}
      named:
        endpoints: ["{signed.address}"]
        tls: {{ca: "{pki.ca_file}", server_name: upstream.test}}
      misnamed:
        endpoints: ["{signed.address}"]
        tls: {{ca: "{pki.ca_file}", server_name: other.test}}
      unverified: {{endpoints: ["{lonely.address}"], tls: {{verify: false}}}}
"""
        config = upstream_config(
            versions, rules_for("untrusted", "pinned", "named", "misnamed", "unverified")
        )
        with ProxyProcess(config) as proxy:
            status, body = version_by_header(proxy, "untrusted")
            assert status == 502
            assert b"certificate verify failed: self-signed certificate" in body
            assert upstream_errors(proxy)[("untrusted", "tls")] == 1

            status, body = version_by_header(proxy, "pinned", "/pinned")
            assert status == 200 and json.loads(body)["path"] == "/pinned"

            status, body = version_by_header(proxy, "named", "/named")
            assert status == 200
            assert json.loads(body)["headers"]["x-forwarded-proto"] == "http"

            status, body = version_by_header(proxy, "misnamed")
            assert status == 502
            assert b"Hostname mismatch" in body
            assert upstream_errors(proxy)[("misnamed", "tls")] == 1

            assert version_by_header(proxy, "unverified")[0] == 200
            assert ("pinned", "tls") not in upstream_errors(proxy)


def test_mtls_upstream_needs_the_client_certificate(pki: Pki) -> None:
    with ThreadedTlsUpstream(pki.upstream, client_ca=pki.ca_file) as strict:
        versions = f"""\
      with-cert:
        endpoints: ["{strict.address}"]
        tls:
          ca: "{pki.ca_file}"
          cert: "{pki.client.cert}"
          key: "{pki.client.key}"
      without-cert: {{endpoints: ["{strict.address}"], tls: {{ca: "{pki.ca_file}"}}}}
"""
        with ProxyProcess(upstream_config(versions, rules_for("with-cert", "without-cert"))) as p:
            status, body = version_by_header(p, "with-cert")
            assert status == 200
            assert json.loads(body)["client_subject"]["commonName"] == "grayproxy.client.test"
            status, body = version_by_header(p, "without-cert")
            assert status == 502
            assert b"certificate required" in body
            assert upstream_errors(p)[("without-cert", "tls")] == 1
            assert len(strict.subjects) == 1  # the request without a certificate never got in


def test_tls_upstream_connections_are_kept_alive_and_reused(
    pki: Pki, loops_tls: LoopThread
) -> None:
    with TlsUpstream(loops_tls, pki.upstream) as server:
        versions = f"""\
      stable: {{endpoints: ["{server.address}"], tls: {{ca: "{pki.ca_file}"}}}}
"""
        with ProxyProcess(upstream_config(versions)) as proxy:
            for index in range(5):
                status, _, _ = http_get(f"{proxy.data_url}/{index}", timeout=10)
                assert status == 200
            assert [record["path"] for record in server.received] == [f"/{i}" for i in range(5)]
            assert len({record["peer_port"] for record in server.received}) == 1


def test_websocket_tunnel_to_a_tls_upstream(pki: Pki, loops_tls: LoopThread) -> None:
    with TlsUpstream(loops_tls, pki.upstream) as server:
        versions = f"""\
      stable: {{endpoints: ["{server.address}"], tls: {{ca: "{pki.ca_file}"}}}}
"""
        with ProxyProcess(upstream_config(versions)) as proxy:

            async def talk() -> list[str]:
                async with (
                    aiohttp.ClientSession() as session,
                    session.ws_connect(proxy.data_url + "/ws") as ws,
                ):
                    replies = []
                    for word in ("one", "two"):
                        await ws.send_str(word)
                        replies.append(await ws.receive_str(timeout=10))
                    return replies

            assert loops_tls.call(talk()) == ["echo: one", "echo: two"]


def test_health_checks_go_over_tls(pki: Pki, loops_tls: LoopThread) -> None:
    with TlsUpstream(loops_tls, pki.upstream) as server:
        versions = f"""\
      good: {{endpoints: ["{server.address}"], tls: {{ca: "{pki.ca_file}"}}}}
      bad:
        endpoints: ["{server.address}"]
        tls: {{ca: "{pki.ca_file}", server_name: other.test}}
"""
        check = "    health_check: {interval: 100ms, timeout: 1s, unhealthy_threshold: 1}\n"
        with ProxyProcess(upstream_config(versions, check)) as proxy:

            def verdicts() -> dict[str, bool]:
                body = http_get(proxy.control_url + "/api/v1/services/web")[2]
                versions = json.loads(body)["versions"]
                return {name: v["endpoints"][0]["healthy"] for name, v in versions.items()}

            def checked() -> list[dict[str, Any]]:  # the server speaks only TLS
                return [r for r in server.received if r["path"] == "/healthz"]

            wait_for(lambda: verdicts() == {"good": True, "bad": False}, what="health verdicts")
            wait_for(lambda: len(checked()) >= 2, what="checks of the good endpoint")
            assert checked()[0]["headers"]["user-agent"] == "grayproxy-health-check"
            assert verdicts() == {"good": True, "bad": False}


def test_a_plain_listener_still_says_http(plain_upstream: Upstream) -> None:
    config = f"""\
listen: "127.0.0.1:${{data_port}}"
control: {{listen: "127.0.0.1:${{control_port}}"}}
services:
  - name: web
    versions:
      stable: {{endpoints: ["{plain_upstream.address}"]}}
"""
    with ProxyProcess(config) as proxy:
        assert is_listening(proxy.data_port)
        body = http_get(proxy.data_url + "/plain")[2]
        headers = {name.lower(): value for name, value in json.loads(body)["headers"]}
        assert headers["x-forwarded-proto"] == "http"


# ---------------------------------------------------------------------------- reload rules


def test_a_reload_rotates_certificates_but_cannot_turn_tls_on_or_off(
    pki: Pki, tmp_path: Path
) -> None:
    """Which files a TLS listener serves is reloaded; whether it speaks TLS is static."""
    install(pki.proxy, tmp_path)
    live = f'{{cert: "{tmp_path / "live.crt"}", key: "{tmp_path / "live.key"}"}}'
    services = 'services: [{name: web, versions: {a: {endpoints: ["127.0.0.1:9"]}}}]\n'
    path = tmp_path / "grayproxy.yaml"

    def write(data_tls: str | None, control_tls: str | None) -> None:
        lines = [f"tls: {data_tls}\n"] if data_tls else []
        if control_tls:
            lines.append(f"control: {{tls: {control_tls}}}\n")
        path.write_text("".join(lines) + services)

    write(live, live)
    state = LiveState(load_config(str(path)), str(path))
    started = state.snapshot.config
    assert started.tls is not None and started.control.tls is not None

    install(pki.rotated, tmp_path)
    snapshot = asyncio.run(state.reload())
    assert snapshot.warnings == ()
    assert snapshot.config.tls is not None and snapshot.config.tls != started.tls
    assert snapshot.config.control.tls == snapshot.config.tls  # the same files, re-read

    write(None, None)
    snapshot = asyncio.run(state.reload())
    assert snapshot.warnings == (
        "control: changed in the file; a restart applies it",
        "tls: changed in the file; a restart applies it",
    )
    assert snapshot.config.tls is not None and snapshot.config.control.tls is not None

    plain = tmp_path / "plain.yaml"
    plain.write_text(services)
    state = LiveState(load_config(str(plain)), str(plain))
    plain.write_text(f"tls: {live}\n" + services)
    snapshot = asyncio.run(state.reload())
    assert snapshot.warnings == ("tls: changed in the file; a restart applies it",)
    assert snapshot.config.tls is None


def test_upstream_contexts_are_built_once_per_setting_and_again_for_new_files(
    pki: Pki, tmp_path: Path
) -> None:
    ca_file = tmp_path / "upstream-ca.pem"
    shutil.copyfile(pki.ca_file, ca_file)
    path = tmp_path / "grayproxy.yaml"
    path.write_text(
        f"""\
services:
  - name: web
    versions:
      a: {{endpoints: ["127.0.0.1:9", "127.0.0.2:9"], tls: {{ca: "{ca_file}"}}}}
      b: {{endpoints: ["127.0.0.1:9"], tls: {{ca: "{ca_file}", server_name: b.test}}}}
"""
    )

    def contexts(config_path: Path) -> dict[tuple[str, str], ClientTls | None]:
        upstreams.update(load_config(str(config_path)))
        return {
            (version, str(endpoint.address)): endpoint.tls
            for version in ("a", "b")
            for endpoint in upstreams.balancer("web", version).endpoints
        }

    upstreams = Upstreams()
    first = contexts(path)
    tls = [value for value in first.values() if value is not None]
    assert len(tls) == 3 and len({id(value.context) for value in tls}) == 2
    assert [value.server_name for value in tls] == ["127.0.0.1", "127.0.0.2", "b.test"]
    # The same files again (a reload, a weight change): the same contexts.
    assert contexts(path) == first
    # A rotated CA file: new contexts.
    other = trustme.CA()
    other.cert_pem.write_to_path(str(ca_file))
    rotated = contexts(path)
    assert all(
        new is not None and old is not None and new.context is not old.context
        for new, old in zip(rotated.values(), first.values(), strict=True)
    )
    upstreams.close()


def test_a_reload_with_the_right_ca_file_turns_502_into_200(
    pki: Pki, loops_tls: LoopThread, tmp_path: Path
) -> None:
    ca_file = tmp_path / "upstream-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))  # not the CA of the upstream's certificate
    with TlsUpstream(loops_tls, pki.upstream) as server:
        versions = f"""\
      stable: {{endpoints: ["{server.address}"], tls: {{ca: "{ca_file}"}}}}
"""
        check = "    outlier_detection: {consecutive_connect_failures: 0}\n"
        with ProxyProcess(upstream_config(versions, check)) as proxy:
            assert http_get(proxy.data_url + "/", timeout=10)[0] == 502
            shutil.copyfile(pki.ca_file, ca_file)
            assert http_get(proxy.data_url + "/", timeout=10)[0] == 502  # not re-read yet
            assert reload(proxy)[0] == 200
            assert http_get(proxy.data_url + "/", timeout=10)[0] == 200


# ---------------------------------------------------------------------------- the example


def test_the_tls_gateway_example_checks_with_its_files_in_place(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """config/tls-gateway.yaml names files under tls/ beside it; with generated ones there
    (the repository ships no keys) `grayproxy check` passes on it."""
    monkeypatch.setenv("GRAYPROXY_TOKEN", TOKEN)
    example = Path(__file__).resolve().parent.parent / "config" / "tls-gateway.yaml"
    path = tmp_path / "tls-gateway.yaml"
    shutil.copyfile(example, path)
    files = tmp_path / "tls"
    files.mkdir()
    shutil.copyfile(pki.ca_file, files / "internal-ca.pem")
    for name, leaf in (("gateway", pki.proxy), ("client", pki.client)):
        shutil.copyfile(leaf.cert, files / f"{name}.crt")
        shutil.copyfile(leaf.key, files / f"{name}.key")
    result = run_cli("check", "-c", str(path), env={"GRAYPROXY_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    config = load_config(str(path))
    assert config.tls is not None and config.tls.cert == str(files / "gateway.crt")
    assert config.control.tls == config.tls
    tls = {(s.name, v.name): v.tls for s in config.services for v in s.versions}
    assert tls["shop", "canary"] == UpstreamTls(
        ca=str(files / "internal-ca.pem"),
        server_name="shop.internal",
        digest=digest(pki.ca_file.read_bytes()),
    )
    assert tls["payments", "v1"] is not None and tls["payments", "v1"].key is not None
    assert tls["www", "stable"] == UpstreamTls(digest=digest())  # the system's CAs
    # Without the files, each is named with its line.
    shutil.rmtree(files)
    result = run_cli("check", "-c", str(path), env={"GRAYPROXY_TOKEN": TOKEN})
    assert result.returncode == 2
    assert "tls.cert: line" in result.stderr and "No such file or directory" in result.stderr


def test_an_encrypted_or_broken_key_is_refused_without_a_prompt(pki: Pki, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.proxy.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    broken = tmp_path / "broken.key"
    broken.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    services = 'services: [{name: web, versions: {a: {endpoints: ["127.0.0.1:9"]}}}]\n'
    with pytest.raises(ConfigError) as refused:
        parse_config(
            f'tls: {{cert: "{pki.proxy.cert}", key: "{encrypted}"}}\n'
            f'control: {{tls: {{cert: "{pki.proxy.cert}", key: "{broken}"}}}}\n' + services
        )
    assert refused.value.errors == [
        f"tls.key: line 1: {encrypted} is encrypted; give the key unencrypted "
        "(openssl pkey -in KEY)",
        f"control.tls.key: line 2: {broken}: no PEM private key found",
    ]
