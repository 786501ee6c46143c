"""Config text for every process of a bench run: pure functions, no I/O.

The reference proxies do the same work as grayproxy's benchmark config: the x-canary /
cookie / user-agent rules first, then a 90/10 split hashed on x-user-id, X-Forwarded-*
headers added, the chosen version named in a response header, keep-alive upstream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

STATUS_PATH = "/__bench_status"
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) grayproxy-bench"
# The realistic heads: a browser's request (11 header lines, a query string, a
# varying x-user-id and X-Request-Id) to REALISTIC_PATH, where the upstreams
# answer with a page's response head and a 2 KB body. The same text for every
# proxy: formatted with (Host, the request id's number, the user's number) by
# Python's % and by wrk's Lua string.format alike.
REALISTIC_PATH = "/app/"
REALISTIC_REQUEST_LINE = "GET /app/items?page=2&sort=price&q=blue+shoes HTTP/1.1\r\n"
REALISTIC_HEADER_LINES = (
    "Host: %s",
    "User-Agent: Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
    "Accept-Language: en-US,en;q=0.9,de;q=0.8",
    "Accept-Encoding: gzip, deflate, br",
    "Cookie: _ga=GA1.1.1234567890.1700000000; theme=dark; session=8f14e45fceea167a5a36dedd4bea2543",
    "Referer: https://shop.example.com/app/items?page=1&sort=price",
    "X-Request-Id: 0d7a3c1e-5b2f-4e8a-9c6d-%012d",
    "Sec-Fetch-Mode: navigate",
    "Cache-Control: max-age=0",
    "x-user-id: user-%d",
)
# What the upstreams add to their own Server, Date, Content-Type, Content-Length
# and Connection lines on REALISTIC_PATH.
REALISTIC_RESPONSE_HEADERS = (
    ("Cache-Control", "private, max-age=0, must-revalidate"),
    ("ETag", 'W/"800-5f3a1b2c"'),
    ("Vary", "Accept-Encoding, Cookie"),
    ("Set-Cookie", "last_seen=1700000000; Path=/; Max-Age=86400; HttpOnly; SameSite=Lax"),
)
REALISTIC_CONTENT_TYPE = "text/html; charset=utf-8"
# 2 KB of page: no quote, backslash or $ (it sits in a quoted nginx string).
REALISTIC_BODY = (
    "<!doctype html><html><body><ul>"
    + "".join(f"<li>item {n:04d}</li>" for n in range(100))
    + "</ul></body></html>"
).ljust(2047, " ") + "\n"
CANARY_WEIGHT = 10  # percent; stable gets the rest
HUGE = 1_000_000  # keepalive_requests: never close a benchmark connection on a count


@dataclass(frozen=True, slots=True)
class Certificate:
    """The certificate both https targets serve (made at bench time by openssl_command)."""

    cert: Path
    key: Path


def openssl_command(certificate: Certificate) -> list[str]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1, valid one day."""
    return [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        str(certificate.key),
        "-out",
        str(certificate.cert),
    ]


@dataclass(frozen=True, slots=True)
class Upstreams:
    """The ports of the two upstream nginx servers (every port serves the same body)."""

    stable: tuple[int, ...]
    canary: tuple[int, ...]


def realistic_template(header_lines: int = len(REALISTIC_HEADER_LINES)) -> str:
    """The realistic request head to format with (Host, request id, user); with fewer
    `header_lines` (at least 2): Host, the first ones after it, and x-user-id last (so
    that the split is hashed alike)."""
    lines = (*REALISTIC_HEADER_LINES[: header_lines - 1], REALISTIC_HEADER_LINES[-1])
    return REALISTIC_REQUEST_LINE + "".join(line + "\r\n" for line in lines) + "\r\n"


def realistic_request(
    host: str, request_id: int, user: int, header_lines: int = len(REALISTIC_HEADER_LINES)
) -> bytes:
    template = realistic_template(header_lines)
    values = (host, request_id, user) if "X-Request-Id" in template else (host, user)
    return (template % values).encode()


def realistic_response() -> bytes:
    """What the upstream nginx answers on REALISTIC_PATH (its own lines, then add_header's)."""
    lines = [
        ("Server", "nginx/1.22.1"),
        ("Date", "Mon, 30 Nov 2026 23:30:00 GMT"),
        ("Content-Type", REALISTIC_CONTENT_TYPE),
        ("Content-Length", str(len(REALISTIC_BODY))),
        ("Connection", "keep-alive"),
        *REALISTIC_RESPONSE_HEADERS,
    ]
    head = "HTTP/1.1 200 OK\r\n" + "".join(f"{name}: {value}\r\n" for name, value in lines)
    return (head + "\r\n" + REALISTIC_BODY).encode()


def upstream_nginx_conf(workdir: Path, ports: Sequence[int], body: str) -> str:
    """A fast upstream: one nginx worker answering every request with a small fixed body,
    and those to REALISTIC_PATH with a page's head and REALISTIC_BODY.

    `stub_status` on STATUS_PATH counts the requests it served, which gives the split share.
    """
    listens = "\n".join(f"        listen 127.0.0.1:{port} reuseport;" for port in ports)
    added = "\n".join(
        f"            add_header {name} '{value}';" for name, value in REALISTIC_RESPONSE_HEADERS
    )
    return f"""{_nginx_main(workdir)}
http {{
{_nginx_http_common(workdir)}
    server {{
{listens}
        location = {STATUS_PATH} {{ stub_status; }}
        location / {{
            default_type text/plain;
            return 200 "{body}\\n";
        }}
        location {REALISTIC_PATH} {{
            default_type "{REALISTIC_CONTENT_TYPE}";
{added}
            return 200 "{REALISTIC_BODY[:-1]}\\n";
        }}
    }}
}}
"""


def proxy_nginx_conf(
    workdir: Path, port: int, upstreams: Upstreams, workers: int, tls: Certificate | None = None
) -> str:
    """nginx as the reference proxy: the same rules and hashed 90/10 split as grayproxy;
    with `tls`, terminating TLS 1.2+ with that certificate (OpenSSL's default ciphers)."""
    listen = f"listen 127.0.0.1:{port} reuseport;"
    if tls is not None:
        listen = (
            f"listen 127.0.0.1:{port} ssl reuseport;\n"
            f"        ssl_certificate {tls.cert};\n"
            f"        ssl_certificate_key {tls.key};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;"
        )
    return f"""{_nginx_main(workdir, workers)}
http {{
{_nginx_http_common(workdir)}
    upstream stable {{
        server 127.0.0.1:{upstreams.stable[0]};
        keepalive 256;
        keepalive_requests {HUGE};
    }}
    upstream canary {{
        server 127.0.0.1:{upstreams.canary[0]};
        keepalive 256;
        keepalive_requests {HUGE};
    }}
    split_clients "${{http_x_user_id}}" $split_version {{
        {CANARY_WEIGHT}% canary;
        * stable;
    }}
    map $http_user_agent $ua_version {{
        "~(iPhone|Android)" canary;
        default $split_version;
    }}
    map $cookie_canary $cookie_version {{
        always canary;
        default $ua_version;
    }}
    map $http_x_canary $version {{
        always canary;
        never stable;
        default $cookie_version;
    }}
    server {{
        {listen}
        location / {{
            proxy_pass http://$version;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            add_header x-grayproxy-version $version;
        }}
    }}
}}
"""


def _nginx_main(workdir: Path, workers: int = 1) -> str:
    return f"""worker_processes {workers};
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{
    worker_connections 4096;
}}"""


def _nginx_http_common(workdir: Path) -> str:
    return f"""    access_log off;
    keepalive_requests {HUGE};
    keepalive_timeout 300s;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;"""


def haproxy_cfg(port: int, upstreams: Upstreams, threads: int) -> str:
    """HAProxy as the reference proxy: weighted servers hashed on x-user-id, `http-reuse always`."""
    stable, canary = upstreams.stable[0], upstreams.canary[0]
    return f"""global
    nbthread {threads}
    maxconn 4096

defaults
    mode http
    http-reuse always
    option forwardfor
    timeout connect 2s
    timeout client 60s
    timeout server 30s
    timeout http-keep-alive 60s

frontend bench
    bind 127.0.0.1:{port}
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    use_backend canary if {{ req.hdr(x-canary) -m str always }}
    use_backend stable if {{ req.hdr(x-canary) -m str never }}
    use_backend canary if {{ req.cook(canary) -m str always }}
    use_backend canary if {{ req.hdr(user-agent) -m reg (iPhone|Android) }}
    default_backend split

backend split
    balance hdr(x-user-id)
    hash-type consistent
    http-response set-header x-grayproxy-version %[srv_name]
    server stable 127.0.0.1:{stable} weight {100 - CANARY_WEIGHT}
    server canary 127.0.0.1:{canary} weight {CANARY_WEIGHT}

backend stable
    http-response set-header x-grayproxy-version stable
    server stable 127.0.0.1:{stable}

backend canary
    http-response set-header x-grayproxy-version canary
    server canary 127.0.0.1:{canary}
"""


@dataclass(frozen=True, slots=True)
class Shape:
    """The size of a grayproxy config: how many services, endpoints per version, rules."""

    services: int = 1
    endpoints: int = 1
    rules: int = 0  # 0: the four realistic x-canary / cookie / user-agent rules
    gateway: bool = False  # services matched by Host (svcN.bench.test) instead of "*"

    @property
    def host(self) -> str:
        """The Host header that reaches the last service; "" (any) without gateway mode."""
        return f"svc{self.services}.bench.test" if self.gateway else ""


REALISTIC = Shape()


def grayproxy_yaml(
    port: int,
    control_port: int,
    upstreams: Upstreams,
    shape: Shape,
    tls: Certificate | None = None,
    access_log: Path | None = None,
) -> str:
    """grayproxy's config: `shape.services` services, the last one being the one requested;
    with `tls`, the listener serves that certificate; with `access_log`, the JSON access
    log is written to that file."""
    services = "\n".join(
        _grayproxy_service(index, upstreams, shape) for index in range(1, shape.services + 1)
    )
    listener_tls = "" if tls is None else f'tls: {{cert: "{tls.cert}", key: "{tls.key}"}}\n'
    log = "" if access_log is None else f'access_log: {{path: "{access_log}"}}\n'
    return f"""listen: "127.0.0.1:{port}"
{listener_tls}{log}drain_timeout: 2s
control:
  listen: "127.0.0.1:{control_port}"
services:
{services}
"""


def _grayproxy_service(index: int, upstreams: Upstreams, shape: Shape) -> str:
    match_host = f"svc{index}.bench.test" if shape.gateway else "*"
    stable = _endpoint_list(upstreams.stable[: shape.endpoints])
    canary = _endpoint_list(upstreams.canary[: shape.endpoints])
    rules = realistic_rules() if shape.rules == 0 else unmatched_rules(shape.rules)
    return f"""  - name: svc{index}
    match: {{host: "{match_host}", path_prefix: "/"}}
    baseline: stable
    versions:
      stable: {{endpoints: {stable}}}
      canary: {{endpoints: {canary}}}
    split:
      weights: {{stable: {100 - CANARY_WEIGHT}, canary: {CANARY_WEIGHT}}}
      hash_on: [{{header: x-user-id}}, {{cookie: session}}]
      sticky_cookie: {{name: gp_sticky, max_age: 86400}}
      salt: "bench"
    rules:
{rules}"""


def _endpoint_list(ports: Sequence[int]) -> str:
    return "[" + ", ".join(f'"127.0.0.1:{port}"' for port in ports) + "]"


def realistic_rules() -> str:
    """The example config's rules; the benchmark's requests match none of them."""
    return """      - match: {header: {name: x-canary, value: always}}
        version: canary
      - match: {header: {name: x-canary, value: never}}
        version: stable
      - match: {cookie: {name: canary, value: always}}
        version: canary
      - match: {header: {name: user-agent, regex: "(iPhone|Android)"}}
        version: canary
"""


_RULE_KINDS = (
    '{{header: {{name: x-flag-{n}, value: "on"}}}}',
    '{{cookie: {{name: flag{n}, value: "on"}}}}',
    "{{query: {{name: flag{n}, present: true}}}}",
    '{{path_prefix: "/never-{n}/"}}',
    '{{header: {{name: user-agent, regex: "Bot-{n}"}}}}',
)


def unmatched_rules(count: int) -> str:
    """`count` rules of mixed kinds (header, cookie, query, path, regex) that match no request."""
    lines = []
    for n in range(1, count + 1):
        condition = _RULE_KINDS[(n - 1) % len(_RULE_KINDS)].format(n=n)
        lines.append(f"      - match: {condition}\n        version: canary\n")
    return "".join(lines)


def wrk_lua(users: int, host: str = "", realistic: bool = False) -> str:
    """A wrk script: keep-alive GETs cycling through `users` x-user-id values, JSON summary.

    The requests are formatted once in init(), so request() only picks the next string.
    `host`, when given, replaces the Host header (to reach one service of a gateway).
    `realistic`: the realistic request (see realistic_request) instead of the minimal one.
    """
    host_expr = f'"{host}"' if host else 'wrk.headers["Host"]'
    if realistic:
        template = realistic_template().replace("\r\n", "\\r\\n")  # no quote nor backslash
        request = f'string.format("{template}", host, i, i)'
    else:
        request = f"""wrk.format("GET", "/", {{
      ["Host"] = host,
      ["User-Agent"] = "{USER_AGENT}",
      ["x-user-id"] = "user-" .. i,
    }})"""
    return f"""local requests = {{}}
local count = {users}
local next_index = 0

function init(args)
  local host = {host_expr}
  for i = 1, count do
    requests[i] = {request}
  end
end

function request()
  next_index = next_index % count + 1
  return requests[next_index]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {{"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, ' ..
    '"p99_us": %d, "mean_us": %.1f, "max_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d}}\\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50),
    latency:percentile(99), latency.mean, latency.max, e.connect, e.read, e.write,
    e.status, e.timeout))
end
"""
