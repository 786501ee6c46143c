"""TLS: the SSLContexts of the listeners and of the upstream versions, built from the config.

Contexts are built at connection *setup* time only, never per request: a
listener is created with one, and an upstream connection is opened with its
version's. Nothing here runs while a request is relayed.

Listeners (``tls:`` beside ``listen``, ``control.tls``) speak TLS 1.2 or 1.3
with ALPN ``http/1.1``. TLS 1.2 ciphers are set explicitly (SERVER_CIPHERS):
Python's default list is the build's choice, and Debian's Python uses
OpenSSL's DEFAULT, with static RSA key exchange and CBC-SHA1 suites. TLS 1.3
uses OpenSSL's suites; compression is off. An asyncio server keeps the
SSLContext it was created with, so rotation goes through that context's
SNI callback: it runs at every ClientHello (with or without SNI) and moves
the new connection to the context holding the newest certificate
(``ssl_object.context = ...``, OpenSSL's SSL_set_SSL_CTX). Connections made
before keep theirs.

Upstream contexts verify by default, against the system's CA certificates
or the version's ``ca``; ``server_name`` is sent as SNI and verified. One
context per distinct UpstreamTls value: the value carries a digest of its
files' bytes, so a reload that finds the same bytes keeps the context (the
system's store takes ~30 ms to load) and one that finds new bytes builds a
new one.

The loader (proxy/loader.py) builds every context once while it checks a
config, so a certificate that does not load is refused with its line before
anything runs; TlsProblem says which key of the ``tls`` block is at fault.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .config import ListenerTls, UpstreamTls

log = logging.getLogger(__name__)

ALPN = ["http/1.1"]
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# TLS 1.2 on the listeners: forward secrecy and AEAD only, as Mozilla's "intermediate"
# profile (without its DHE suites: no DH parameters are loaded).
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# A CA bundle of every public root is about 200 KiB; a file larger than this is a mistake.
MAX_PEM_BYTES = 4 * 1024 * 1024


class TlsProblem(Exception):
    """A file of a ``tls`` block that cannot be used; ``field`` is its key (cert, key, ca)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class _EncryptedKey(Exception):
    """Raised from the password callback: grayproxy never prompts for a passphrase."""


def read_file(path: str, field: str) -> bytes:
    """A file's bytes; TlsProblem ``field`` if it cannot be read or is too large for PEM."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PEM_BYTES + 1)
    except OSError as err:
        raise TlsProblem(field, f"cannot read {path}: {err.strerror or err}") from None
    if len(data) > MAX_PEM_BYTES:
        raise TlsProblem(field, f"{path}: over {MAX_PEM_BYTES} bytes, not a PEM file")
    return data


def digest(*contents: bytes) -> str:
    """What identifies the bytes of a ``tls`` block's files (see ListenerTls.digest)."""
    hashed = hashlib.sha256()
    for content in contents:
        hashed.update(len(content).to_bytes(8, "big"))
        hashed.update(content)
    return hashed.hexdigest()


class DirectSSLObject(ssl.SSLObject):
    """An SSLObject whose read, write and pending are the C methods of the
    OpenSSL connection it wraps (_ssl._SSLSocket's): ssl.SSLObject's own
    only pass their arguments on, in a Python frame, and uvloop calls them
    three to five times per request (1.5k instructions of 53k with TLS).
    SSLContext.wrap_bio makes its objects with ``sslobject_class._create``
    (a Python that did not would leave this class the same as its parent)."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self: ssl.SSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        attributes = vars(self)
        connection = attributes.get("_sslobj")
        if connection is not None:  # else another Python's SSLObject: its methods stay
            attributes.update(
                read=connection.read, write=connection.write, pending=connection.pending
            )
        return self


def server_context(tls: ListenerTls) -> ssl.SSLContext:
    """A listener's context: TLS 1.2+, ALPN http/1.1, the certificate chain and its key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.sslobject_class = DirectSSLObject
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(SERVER_CIPHERS)
    context.set_alpn_protocols(ALPN)
    _load_pair(context, tls.cert, tls.key)
    return context


def client_context(tls: UpstreamTls) -> ssl.SSLContext:
    """A context for HTTPS to a version's endpoints (see UpstreamTls)."""
    if not tls.verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif tls.ca is not None:
        context = ssl.create_default_context(cadata=_certificates(tls.ca, "ca"))
    else:
        context = ssl.create_default_context()  # the system's CA certificates
    context.minimum_version = MINIMUM_VERSION
    context.set_alpn_protocols(ALPN)
    if tls.cert is not None and tls.key is not None:
        _load_pair(context, tls.cert, tls.key)
    return context


def _load_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    """Load a certificate chain and its key, saying which of the two is wrong.

    OpenSSL reports both a bad certificate and a bad key as "PEM lib": the
    certificates are parsed on their own first, so what fails after is the key."""
    _certificates(cert, "cert")
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        raise TlsProblem(
            "key", f"{key} is encrypted; give the key unencrypted (openssl pkey -in KEY)"
        ) from None
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            raise TlsProblem("key", f"{key} does not match the certificate in {cert}") from None
        raise TlsProblem("key", f"{key}: no PEM private key found{_reason(err)}") from None
    except OSError as err:  # the file went away since it was checked
        raise TlsProblem("key", f"cannot read {key}: {err.strerror or err}") from None


def _certificates(path: str, field: str) -> str:
    """The PEM text of a file that must hold one or more certificates."""
    pem = read_file(path, field).decode("latin-1")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
    except ssl.SSLError as err:
        raise TlsProblem(field, f"{path}: no PEM certificate found{_reason(err)}") from None
    return pem


def _no_password() -> bytes:
    raise _EncryptedKey


def _reason(err: ssl.SSLError) -> str:
    """OpenSSL's reason, readable (" (bad base64 decode)"), or nothing."""
    return f" ({str(err.reason).lower().replace('_', ' ')})" if err.reason else ""


# -- listeners ---------------------------------------------------------------
class ServerCertificate:
    """A listener's SSLContext and the certificate it serves now.

    ``context`` is what the listener is created with, once. ``update`` builds
    a context for new files and makes it current: the next handshakes are
    moved to it by ``context``'s SNI callback (see the module docstring)."""

    __slots__ = ("context", "current", "name", "tls")

    def __init__(self, tls: ListenerTls, name: str) -> None:
        self.name = name  # "data" or "control", for the log
        self.tls = tls
        self.context = server_context(tls)
        self.current = self.context
        self.context.sni_callback = self._choose

    def __repr__(self) -> str:
        return f"<ServerCertificate {self.name} {self.tls.cert}>"

    def _choose(
        self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        current = self.current
        if current is not context:
            ssl_object.context = current

    def update(self, tls: ListenerTls | None) -> None:
        """Serve ``tls`` from the next handshake on, if its files changed and
        load; else log why and keep serving the certificate loaded before."""
        if tls is None or tls == self.tls:
            return
        try:
            current = server_context(tls)
        except (TlsProblem, ssl.SSLError) as problem:
            log.error(
                "%s listener: new certificate not loaded, the old one stays: %s", self.name, problem
            )
            return
        self.tls, self.current = tls, current
        log.info("%s listener: serving the certificate of %s", self.name, tls.cert)


# -- upstreams ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClientTls:
    """How an endpoint's connections are opened: its version's context and the
    name sent as SNI and verified. ``context`` is None if it could not be built
    (``problem`` says why): its connections then fail as TLS errors."""

    context: ssl.SSLContext | None
    server_name: str | None
    problem: str = ""


class ClientContexts:
    """The upstream contexts of a process, one per distinct UpstreamTls value,
    kept while a config still uses them (see the module docstring)."""

    __slots__ = ("_built",)

    def __init__(self) -> None:
        self._built: dict[UpstreamTls, ClientTls] = {}

    def __repr__(self) -> str:
        return f"<ClientContexts [{len(self._built)} contexts]>"

    def follow(self, wanted: Iterable[UpstreamTls]) -> None:
        """Build the contexts of ``wanted`` not built yet, forget the others."""
        built: dict[UpstreamTls, ClientTls] = {}
        for tls in wanted:
            if tls not in built:
                built[tls] = self._built.get(tls) or _client_tls(tls)
        self._built = built

    def get(self, tls: UpstreamTls | None, host: str) -> ClientTls | None:
        """What an endpoint at ``host`` of a version with ``tls`` connects with."""
        if tls is None:
            return None
        built = self._built.get(tls) or _client_tls(tls)
        server_name = tls.server_name or host
        if built.server_name == server_name:
            return built
        return ClientTls(built.context, server_name, built.problem)


def tls_failure(exc: ssl.SSLError) -> str:
    """Why a handshake failed, in words: "certificate verify failed: self-signed certificate"."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__


def _client_tls(tls: UpstreamTls) -> ClientTls:
    try:
        return ClientTls(client_context(tls), tls.server_name)
    except (TlsProblem, ssl.SSLError) as problem:
        # The loader built this same context; its files changed since.
        log.error("upstream TLS settings not loaded: %s", problem)
        return ClientTls(None, tls.server_name, f"TLS settings not loaded: {problem}")
