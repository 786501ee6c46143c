"""Fuzzing the request parser from the outside: hypothesis builds request bytes
(mutations of valid requests: odd header names and values with CR, LF, NUL
and high bytes, framing headers in every spelling, chunked bodies with bad
sizes, pipelined requests) and sends them raw to one running grayproxy.

For every input: the proxy stays alive, answers only well-formed HTTP/1.1
responses with a 3-digit status and never a traceback, and what reaches the
upstream is exactly the requests a strict reading of the input allows: a
request that must be refused (llhttp refuses its syntax, or it is ambiguous
per docs/data-path.md) is never forwarded, not even in part, and nothing after it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httptools
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from procs import ProxyProcess
from recording import Forwarded, RecordingUpstream, Response, exchange, parse_responses

CONFIG = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
limits: {max_header_bytes: 4096, header_read_timeout: 2s}
services:
  - name: web
    versions: {stable: {endpoints: ["%s"]}}
"""
HOST = b"fuzz.test"


@pytest.fixture(scope="module")
def proxy(upstream: RecordingUpstream) -> Iterator[ProxyProcess]:
    with ProxyProcess(CONFIG % upstream.address) as proc:
        yield proc


# --------------------------------------------------------------------------- strategies
#
# A request is drawn valid (method, origin-form target, headers, a body framed by
# Content-Length, by chunked or not at all), then 0 to 3 mutations are applied to
# its parts or to its bytes: a quarter of the inputs stay valid, the rest are
# malformed in one to three places, which keeps most inputs close to a request
# the proxy would serve (where smuggling bugs live).

CRLF = b"\r\n"

FRAMING_NAMES = [
    b"Host",
    b"host",
    b"HOST",
    b"Content-Length",
    b"content-length",
    b"Transfer-Encoding",
    b"transfer-encoding",
    b"TRANSFER-ENCODING",
    b"Connection",
    b"Expect",
    b"Upgrade",
    b"Te",
    b"Trailer",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"X-Forwarded-For",
    b"Cookie",
]
FRAMING_VALUES = [
    b"chunked",
    b"Chunked",
    b"chunked ",
    b"xchunked",
    b",chunked",
    b"chunked,",
    b"gzip, chunked",
    b"chunked, gzip",
    b"chunked, chunked",
    b"identity",
    b"chunked\x0b",
    b'"chunked"',
    b"0",
    b"5",
    b"+5",
    b"-1",
    b"5, 5",
    b"05",
    b"0x5",
    b"99999999999999999999",
    HOST,
    b"a, b",
    b"evil.test",
    b"fuzz.test:80",
    b"fuzz test",
    b"close",
    b"keep-alive",
    b"upgrade",
    b"100-continue",
    b"websocket",
    b"trailers",
]
SEPARATORS = [b"\n", b"\r", b"\r\n ", b"\r\n\t", b"\n\r", b"", b"\r\r\n", b"\x00\r\n"]
COLONS = [b":", b" :", b" : ", b":\t", b"::", b""]
CHUNK_SIZES = [b"zz", b"-1", b" 1", b"1 ", b"0x1", b"1" + b"0" * 20, b"F" * 17, b"", b"1;a=b"]
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]
TARGETS = [b"/", b"/a/b?c=d", b"/%7E/x?y=%2F&z", b"/p;q?=&&"]
VERSIONS = [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 ", b""]
TOKEN = rb"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}\Z"

tokens = st.from_regex(TOKEN)
printable = st.from_regex(rb"\A[!-~]([ -~]{0,20}[!-~])?\Z")
any_bytes = st.binary(min_size=1, max_size=12)


@dataclass
class Draft:
    """A request as parts, so that mutations can hit each part."""

    line: list[bytes]  # method, target, version
    line_end: bytes
    headers: list[list[bytes]]  # name, colon, value, line end
    head_end: bytes
    chunks: list[list[bytes]]  # size, line end, data, data end  (chunked only)
    body: bytes  # the body as sent when not chunked
    chunked: bool
    tail: bytes = b"0\r\n\r\n"

    def render(self) -> bytes:
        head = b" ".join(self.line) + self.line_end
        head += b"".join(b"".join(header) for header in self.headers) + self.head_end
        if not self.chunked:
            return head + self.body
        return head + b"".join(b"".join(chunk) for chunk in self.chunks) + self.tail


@st.composite
def drafts(draw: st.DrawFn, last: bool) -> Draft:
    """A valid request; `last` says Connection: close, so that the proxy ends
    the connection after answering instead of waiting for more."""
    method = draw(st.sampled_from(METHODS))
    target = draw(st.one_of(st.sampled_from(TARGETS), st.from_regex(rb"\A/[!-~]{0,16}\Z")))
    headers = [[b"Host", b": ", HOST, CRLF]]
    for name, value in draw(st.lists(st.tuples(tokens, printable), max_size=3)):
        headers.append([name, b": ", value, CRLF])
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = draw(st.binary(max_size=16)) if framing != "none" else b""
    chunks = []
    if framing == "length":
        headers.append([b"Content-Length", b": ", b"%d" % len(body), CRLF])
    elif framing == "chunked":
        headers.append([b"Transfer-Encoding", b": ", b"chunked", CRLF])
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=2)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        chunks = [[b"%x" % len(p), CRLF, p, CRLF] for p in pieces if p]
    if last:
        headers.append([b"Connection", b": ", b"close", CRLF])
    headers = draw(st.permutations(headers))
    return Draft(
        [method, target, b"HTTP/1.1"],
        CRLF,
        list(headers),
        CRLF,
        chunks,
        body,
        framing == "chunked",
    )


@st.composite
def mutated(draw: st.DrawFn, draft: Draft) -> bytes:
    for _ in range(draw(st.integers(0, 3))):
        draw(st.sampled_from(MUTATIONS))(draw, draft)
    data = draft.render()
    if draw(st.integers(0, 7)) == 0:  # a byte-level edit on top
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(any_bytes) + data[at + draw(st.integers(0, 2)) :]
    return data


def pick(draw: st.DrawFn, items: list[list[bytes]]) -> list[bytes] | None:
    return draw(st.sampled_from(items)) if items else None


def _method(draw: st.DrawFn, d: Draft) -> None:
    d.line[0] = draw(st.one_of(st.sampled_from([b"CONNECT", b"G ET", b"get"]), any_bytes))


def _target(draw: st.DrawFn, d: Draft) -> None:
    d.line[1] = draw(
        st.one_of(
            st.sampled_from(
                [
                    b"http://fuzz.test/p",
                    b"http://evil.test/p",
                    b"HTTP://FUZZ.TEST",
                    b"*",
                    b"http://fuzz.test:81/",
                    b"http://x@fuzz.test/",
                    b"fuzz.test:443",
                ]
            ),
            any_bytes.map(lambda tail: b"/" + tail),
        )
    )


def _version(draw: st.DrawFn, d: Draft) -> None:
    d.line[2] = draw(st.sampled_from(VERSIONS))


def _line_end(draw: st.DrawFn, d: Draft) -> None:
    separator = draw(st.sampled_from(SEPARATORS))
    target = pick(draw, d.headers)
    if target is None or draw(st.booleans()):
        d.line_end = separator
    else:
        target[3] = separator


def _colon(draw: st.DrawFn, d: Draft) -> None:
    if header := pick(draw, d.headers):
        header[1] = draw(st.sampled_from(COLONS))


def _add_header(draw: st.DrawFn, d: Draft) -> None:
    name = draw(st.one_of(st.sampled_from(FRAMING_NAMES), tokens))
    value = draw(st.one_of(st.sampled_from(FRAMING_VALUES), printable))
    d.headers.insert(draw(st.integers(0, len(d.headers))), [name, b": ", value, CRLF])


def _duplicate_header(draw: st.DrawFn, d: Draft) -> None:
    if header := pick(draw, d.headers):
        d.headers.insert(draw(st.integers(0, len(d.headers))), list(header))


def _drop_header(draw: st.DrawFn, d: Draft) -> None:
    if header := pick(draw, d.headers):
        d.headers.remove(header)


def _header_name(draw: st.DrawFn, d: Draft) -> None:
    if header := pick(draw, d.headers):
        header[0] = draw(st.one_of(any_bytes, st.just(b" " + header[0]), st.just(header[0] + b" ")))


def _header_value(draw: st.DrawFn, d: Draft) -> None:
    if header := pick(draw, d.headers):
        header[2] = draw(st.one_of(any_bytes, st.sampled_from(FRAMING_VALUES)))


def _chunk(draw: st.DrawFn, d: Draft) -> None:
    chunk = pick(draw, d.chunks)
    if chunk is None:
        d.tail = draw(st.sampled_from([b"0\r\n", b"0\n\n", b"0\r\nX-T: t\r\n\r\n", b"", b"zz"]))
        return
    part = draw(st.integers(0, 3))
    if part == 2:
        chunk[2] = draw(st.binary(max_size=20))
    else:
        chunk[part] = draw(st.sampled_from(SEPARATORS if part else CHUNK_SIZES))


def _body(draw: st.DrawFn, d: Draft) -> None:
    d.body = draw(st.binary(max_size=24))


MUTATIONS = [
    _method,
    _target,
    _version,
    _line_end,
    _colon,
    _add_header,
    _add_header,
    _duplicate_header,
    _drop_header,
    _header_name,
    _header_value,
    _header_value,
    _chunk,
    _chunk,
    _body,
]


@st.composite
def request_streams(draw: st.DrawFn) -> bytes:
    """One to three requests in one packet."""
    earlier = draw(st.lists(drafts(last=False), max_size=2))
    parts = [draw(mutated(draft)) for draft in [*earlier, draw(drafts(last=True))]]
    return b"".join(parts)


VALID = b"POST /ok HTTP/1.1\r\nHost: fuzz.test\r\nContent-Length: 3\r\n\r\nabc"
REFUSALS = {400, 408, 413, 414, 431, 501, 505}
CHUNKED_HEAD = (
    b"POST / HTTP/1.1\r\nHost: fuzz.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
)


# --------------------------------------------------------------------------- the oracle


@dataclass
class Message:
    method: bytes = b""
    url: bytes = b""
    version: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    keep_alive: bool = True
    upgrade: bool = False


class StrictReading:
    """How strict llhttp reads the stream: the complete messages, and how it
    ends — 'error' (refuse), 'upgrade' (protocol switch), or 'incomplete'."""

    def __init__(self, data: bytes) -> None:
        self.messages: list[Message] = []
        self.ending = "incomplete"
        self.parser = httptools.HttpRequestParser(self)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.ending = "upgrade"
        except httptools.HttpParserError:
            self.ending = "error"

    def on_message_begin(self) -> None:
        self.messages.append(Message())

    def on_url(self, url: bytes) -> None:
        self.messages[-1].url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.messages[-1].method = self.parser.get_method()
        self.messages[-1].version = self.parser.get_http_version()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        message = self.messages[-1]
        message.complete = True
        message.keep_alive = self.parser.should_keep_alive()
        message.upgrade = self.parser.should_upgrade()

    def allowed(self) -> tuple[list[Message], bool]:
        """The messages the proxy may forward, in order, and whether it owes a
        refusal after them (rather than stopping because the client said close
        or the input ended)."""
        allowed: list[Message] = []
        for message in self.messages:
            if not message.complete:
                break
            if must_refuse(message):
                return allowed, True
            allowed.append(message)
            if not message.keep_alive or message.upgrade:
                return allowed, False
        return allowed, self.ending == "error"


# RFC 3986 host (reg-name without the comma the proxy refuses, or IP-literal) and port.
HOST_VALUE = re.compile(rb"\A([A-Za-z0-9._~!$&'()*+;=%-]*|\[[0-9A-Fa-f:.]+\])(:[0-9]*)?\Z")


def must_refuse(message: Message) -> bool:
    """The shapes the proxy must refuse even though llhttp accepts them."""
    hosts = [value for name, value in message.headers if name == b"host"]
    codings = [value for name, value in message.headers if name == b"transfer-encoding"]
    if message.version not in ("1.0", "1.1") or message.method == b"CONNECT":
        return True
    if message.url == b"*" and message.method != b"OPTIONS":
        return True
    if len(hosts) > 1 or (message.version == "1.1" and not hosts):
        return True
    if hosts and (b"," in hosts[0] or not HOST_VALUE.match(hosts[0])):
        return True
    if codings and [c.strip().lower() for c in codings] != [b"chunked"]:
        return True
    return _foreign_absolute_form(message.url, hosts[0] if hosts else b"")


def _foreign_absolute_form(url: bytes, host: bytes) -> bool:
    if url.startswith(b"/") or url == b"*":
        return False
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return True
    return rest.split(b"/", 1)[0].lower() != host.lower()


def origin_form(url: bytes) -> bytes:
    if url.startswith(b"/") or url == b"*":
        return url
    path = url.partition(b"://")[2].partition(b"/")
    return path[1] + path[2] or b"/"


# --------------------------------------------------------------------------- one example


def send(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send `data` in one packet; read until the proxy closes or is quiet for 300 ms."""
    return exchange(port, data, timeout=0.3, total=3.0)


def upstream_cut_off(upstream: RecordingUpstream) -> bool:
    """Once its client has gone, every request the proxy started upstream is cut off."""
    deadline = time.monotonic() + 1.0
    while upstream.open_partials and time.monotonic() < deadline:
        time.sleep(0.01)
    return upstream.open_partials == 0


def check_forwarded(sent: Message, got: Forwarded) -> None:
    """What the upstream got is the request that was sent, re-framed cleanly."""
    assert got.method == sent.method and got.url == origin_form(sent.url), (sent, got)
    assert got.body == sent.body
    assert got.version == "1.1"
    names = [name.lower() for name, _ in got.headers]
    assert names.count(b"host") <= 1
    assert not (b"content-length" in names and b"transfer-encoding" in names)
    assert got.header(b"transfer-encoding") in ([], [b"chunked"])
    if not sent.upgrade:
        assert not {b"connection", b"keep-alive", b"te", b"trailer", b"proxy-connection"} & set(
            names
        )


def check_responses(reply: bytes) -> list[Response]:
    responses = [r for r in parse_responses(reply) if not 100 <= r.status < 200]
    for response in responses:
        assert 200 <= response.status <= 599
        assert b"Traceback" not in response.body and b"Traceback" not in reply
    assert re.fullmatch(rb"HTTP/1\.1 [1-5][0-9][0-9] [^\r\n]*", reply.split(CRLF, 1)[0] or b"")
    return responses


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=request_streams())
@example(data=CHUNKED_HEAD + b"zz\r\nabc\r\n0\r\n\r\n")
@example(data=CHUNKED_HEAD + b"1\r\nabc\r\n0\r\n\r\n")
@example(
    data=VALID + CHUNKED_HEAD.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\n") + b"0\r\n\r\n"
)
@example(data=VALID + b"GET / HTTP/2.0\r\nHost: fuzz.test\r\n\r\n")
@example(data=VALID + b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n")
@example(data=b"GET http://evil.test/ HTTP/1.1\r\nHost: fuzz.test\r\n\r\n" + VALID)
@example(data=b"OPTIONS * HTTP/1.1\r\nHost: fuzz.test\r\n!: !\r\n\r\n" + VALID)
def test_fuzzed_requests_never_crash_leak_or_smuggle(
    proxy: ProxyProcess, upstream: RecordingUpstream, data: bytes
) -> None:
    try:
        check_example(proxy, upstream, data)
    finally:
        cut_off = upstream_cut_off(upstream)
        if not cut_off:  # keep the next examples independent of this failure
            upstream.cut_open_requests()
    assert cut_off, f"an upstream request stayed open after its client left: {data!r}"


def check_example(proxy: ProxyProcess, upstream: RecordingUpstream, data: bytes) -> None:
    before_requests, before_aborted = len(upstream.requests), upstream.aborted
    before_errors = len(upstream.errors)
    reading = StrictReading(data)

    reply, _ = send(proxy.data_port, data)
    assert proxy.returncode is None, f"the proxy died on {data!r}:\n{proxy.output[-3000:]}"
    responses = check_responses(reply) if reply else []
    served = [r for r in responses if b"x-recorded" in r.headers]
    own = [r for r in responses if b"x-recorded" not in r.headers]
    # The upstream always answers: the proxy's own answers can only be refusals
    # (or 404 for `OPTIONS *`, which names no path a service could match).
    asterisk = any(is_asterisk(m) for m in reading.messages)
    assert {r.status for r in own} <= REFUSALS | ({404} if asterisk else set()), (
        f"{data!r} -> {reply!r}"
    )
    # A 404 leaves the connection open; a refusal does not.
    refusals = [i for i, r in enumerate(responses) if r in own and r.status in REFUSALS]
    after = responses[refusals[0] :] if refusals else []
    assert all(r in own for r in after), "served after a refusal on one connection"

    allowed, refusal_due = reading.allowed()
    allowed = [m for m in allowed if not is_asterisk(m)]  # answered 404, never forwarded
    event(f"strict reading: {reading.ending}, {len(allowed)} allowed, refusal due: {refusal_due}")
    event(f"statuses: {sorted({r.status for r in responses})}")
    if own:
        time.sleep(0.03)  # let anything the proxy forwarded arrive
    forwarded = upstream.requests[before_requests:]
    assert len(forwarded) == len(served), (data, reply, forwarded)
    assert len(forwarded) <= len(allowed), f"forwarded a request to refuse: {data!r} -> {reply!r}"
    for sent, got in zip(allowed, forwarded, strict=False):
        check_forwarded(sent, got)
    assert len(upstream.errors) == before_errors, upstream.errors[before_errors:]
    if own or refusal_due:
        assert upstream.aborted == before_aborted and upstream.open_partials == 0, (
            f"part of a refused request reached the upstream: {data!r} -> {reply!r}"
        )
    if refusal_due and len(served) == len(allowed):
        assert own, f"no refusal for {data!r}: {reply!r}"


def is_asterisk(message: Message) -> bool:
    return message.method == b"OPTIONS" and message.url == b"*"


def test_proxy_still_serves_after_fuzzing(proxy: ProxyProcess) -> None:
    reply, _ = send(proxy.data_port, VALID.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert [r.status for r in parse_responses(reply)] == [200], reply
    assert "Traceback" not in proxy.output
