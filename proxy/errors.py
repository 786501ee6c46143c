"""Our errors, each knowing the status it becomes: the data plane's (ProxyError:
for upstream failures also the `kind` label it is counted under in
``grayproxy_upstream_errors_total``) and the control API's refusals
(ControlRefused)."""

from __future__ import annotations

from typing import ClassVar


# Class attributes are ClassVars: compiled (mypyc), a plain attribute set in a
# subclass body is not seen through the base class (AttributeError).
class ProxyError(Exception):
    status: ClassVar[int] = 502
    kind: ClassVar[str | None] = None  # upstream error kind, None for client-side errors

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail


# Client side: the request is refused before anything goes upstream.
class BadRequest(ProxyError):
    status = 400


class NoService(ProxyError):
    status = 404


class RequestTimeout(ProxyError):
    status = 408


class PayloadTooLarge(ProxyError):
    status = 413


class HeadersTooLarge(ProxyError):
    status = 431


class UnsupportedTransferCoding(ProxyError):
    status = 501


class VersionNotSupported(ProxyError):
    status = 505


class NoHealthyEndpoint(ProxyError):
    status = 503


# Upstream side.
class UpstreamConnectError(ProxyError):
    status = 502
    kind = "connect"


class UpstreamConnectTimeout(ProxyError):
    status = 504
    kind = "connect"


class UpstreamTimeout(ProxyError):
    status = 504
    kind = "timeout"


class UpstreamReset(ProxyError):
    status = 502
    kind = "reset"


class BadUpstreamResponse(ProxyError):
    """Counted as a reset: the proxy drops the connection (docs/metrics.md: few kinds)."""

    status = 502
    kind = "reset"


class UpstreamTlsError(ProxyError):
    """A TLS handshake with the upstream failed (its certificate not verified, no
    common protocol, a client certificate it refused), or its TLS stream broke."""

    status = 502
    kind = "tls"


class UpstreamOverflow(ProxyError):
    """Every endpoint left to try is at max_connections_per_endpoint."""

    status = 503
    kind = "overflow"


REASONS = {
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


# The control API: a request refused before anything changes. A refused configuration is
# config.ConfigError (400, every problem listed).
class ControlRefused(Exception):
    """A refused control request; ``status`` is the HTTP status it becomes."""

    status: ClassVar[int] = 400

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class InvalidRequest(ControlRefused):
    status = 400


class UnknownService(ControlRefused):
    status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown service {name!r}")
