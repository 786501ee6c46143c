"""Request smuggling and strict framing, black-box: raw bytes from a socket to a
real grayproxy process, in front of an upstream that keeps every byte it gets.

Every ambiguous or malformed request must be answered with its status (400,
501 for an unknown transfer coding, 505 for a foreign HTTP version, 431 for an
oversize header block), the connection closed, and not one byte of it may
reach the upstream. Invalid upstream responses become 502; an upstream that
dies mid-body leaves the client with a visibly truncated response.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from procs import ProxyProcess
from recording import Forwarded, RecordingUpstream, exchange, parse_responses
from servers import LoopThread, raw_server

MAX_HEADER_BYTES = 8192

CONFIG = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
limits: {max_header_bytes: %(max_header)d}
services:
  - name: web
    versions: {stable: {endpoints: ["%(upstream)s"]}}
"""


@pytest.fixture(scope="module")
def proxy(upstream: RecordingUpstream) -> Iterator[ProxyProcess]:
    config = CONFIG % {"max_header": MAX_HEADER_BYTES, "upstream": upstream.address}
    with ProxyProcess(config) as proc:
        yield proc


def assert_refused(
    proxy: ProxyProcess, upstream: RecordingUpstream, raw: bytes | list[bytes], *statuses: int
) -> bytes:
    """`raw` gets one of `statuses`, the connection is closed, the upstream got nothing."""
    before = len(upstream.raw)
    reply, closed = exchange(proxy.data_port, raw)
    assert reply.startswith(b"HTTP/1.1 "), f"no HTTP/1.1 answer to {raw!r}: {reply!r}"
    responses = parse_responses(reply)
    assert [r.status for r in responses] in [[s] for s in statuses], f"{raw!r} -> {reply[:300]!r}"
    assert b"Traceback" not in reply
    assert closed, f"connection left open after refusing {raw!r}"
    assert proxy.returncode is None
    time.sleep(0.05)  # anything forwarded would have arrived by now
    assert bytes(upstream.raw[before:]) == b"", f"{raw!r} leaked upstream"
    return reply


def assert_served(
    proxy: ProxyProcess, upstream: RecordingUpstream, raw: bytes, requests: int = 1
) -> list[Forwarded]:
    """`raw` is answered by the upstream (`requests` requests); returns what it got."""
    before = len(upstream.requests)
    reply, _ = exchange(proxy.data_port, raw)
    responses = parse_responses(reply)
    assert [r.status for r in responses] == [200] * requests, f"{raw!r} -> {reply[:300]!r}"
    assert all(b"x-recorded" in r.headers for r in responses)
    assert not upstream.errors, upstream.errors
    return upstream.requests[before:]


def post(
    headers: bytes, body: bytes = b"", head: bytes = b"POST / HTTP/1.1\r\nHost: x\r\n"
) -> bytes:
    return head + headers + b"\r\n" + body


# --------------------------------------------------------------------------- positive controls


def test_valid_requests_are_served_and_reframed(
    proxy: ProxyProcess, upstream: RecordingUpstream
) -> None:
    [fixed] = assert_served(
        proxy, upstream, post(b"Content-Length: 5\r\nConnection: close\r\n", b"hello")
    )
    assert fixed.body == b"hello" and fixed.header(b"content-length") == [b"5"]
    [chunked] = assert_served(
        proxy,
        upstream,
        post(
            b"Transfer-Encoding: Chunked\r\nConnection: close\r\n",
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
        ),
    )
    assert chunked.body == b"hello world"
    assert chunked.header(b"transfer-encoding") == [b"chunked"]
    assert chunked.header(b"content-length") == []
    [old] = assert_served(proxy, upstream, b"GET /old HTTP/1.0\r\n\r\n")
    assert old.url == b"/old" and old.version == "1.1"


def test_each_pipelined_request_is_answered_in_its_own_version(
    proxy: ProxyProcess, upstream: RecordingUpstream
) -> None:
    raw = (
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    reply, _ = exchange(proxy.data_port, raw)
    responses = parse_responses(reply)
    assert [r.status for r in responses] == [200, 200, 200], reply
    # Only the HTTP/1.0 client is told its connection stays open.
    keep_alive = [r.headers.get(b"connection") == b"keep-alive" for r in responses]
    assert keep_alive == [False, True, False], reply


MADE_ID = re.compile(rb"x-request-id: [0-9a-f]{32}\r\n")


def test_a_head_with_nothing_to_change_goes_upstream_as_received(
    proxy: ProxyProcess, upstream: RecordingUpstream
) -> None:
    """Nothing to drop or re-frame: the request line and header lines go upstream
    as the client wrote them, spacing included, then the forwarding headers.
    Whatever else is rebuilt from the parsed head: a head split over two reads
    (in its method too), after an empty line, with a doubled space, or pipelined
    after another."""
    head = b"GET /v?q=1 HTTP/1.1\r\nHost: x\r\nX-Spaced:   a  b \r\nx-user-id: u1\r\n"
    rebuilt = head.replace(b"X-Spaced:   ", b"X-Spaced: ")
    forwarding = (
        b"x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: x\r\n\r\n"
    )
    cases: list[tuple[bytes | list[bytes], bytes]] = [
        (head + b"\r\n", head),
        (head + b"\r\n\r\n\r\n", head),  # empty lines after a message are skipped
        ([head, b"\r\n"], rebuilt),
        # The method's first bytes in one read, the rest (spaced so that the line
        # would seem to end where a plain one does) in the next.
        ([b"GE", b"T   " + head[4:] + b"\r\n"], rebuilt),
        (b"\r\n" + head + b"\r\n", rebuilt),
        (head.replace(b"GET ", b"GET  ") + b"\r\n", rebuilt),
        (head + b"\r\n" + head + b"\r\n", head + forwarding + rebuilt),
    ]
    for sent, expected in cases:
        before = len(upstream.raw)
        reply, _ = exchange(proxy.data_port, sent, timeout=0.5)
        assert {r.status for r in parse_responses(reply)} == {200}, (sent, reply)
        received = bytes(upstream.raw[before:])
        # Each request gets a new x-request-id, after the forwarding headers.
        assert len(MADE_ID.findall(received)) == received.count(b"\r\n\r\n"), received
        assert MADE_ID.sub(b"", received) == expected + forwarding, sent
    assert not upstream.errors, upstream.errors


def test_absolute_form_to_the_same_host_is_forwarded_in_origin_form(
    proxy: ProxyProcess, upstream: RecordingUpstream
) -> None:
    raw = b"GET http://Shop.Test/a/b?q=1 HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n"
    [forwarded] = assert_served(proxy, upstream, raw)
    assert forwarded.url == b"/a/b?q=1"
    assert forwarded.header(b"host") == [b"shop.test"]


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \r\nX-Forwarded-For: 10.0.0.1\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost:\r\n\r\n",
    ],
)
def test_an_empty_or_missing_host_reaches_the_upstream_once(
    proxy: ProxyProcess, upstream: RecordingUpstream, raw: bytes
) -> None:
    """An empty Host (RFC 9112 §3.2 allows one) goes on as one empty line; an
    HTTP/1.0 head without one gets one: never two, which an upstream refuses."""
    [forwarded] = assert_served(proxy, upstream, raw)
    assert forwarded.header(b"host") == [b""]


def test_header_block_just_under_the_limit_is_served(
    proxy: ProxyProcess, upstream: RecordingUpstream
) -> None:
    filler = b"X-Fill: " + b"a" * (MAX_HEADER_BYTES - 200) + b"\r\n"
    head = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    assert_served(proxy, upstream, head + filler + b"\r\n")


# --------------------------------------------------------------------------- refused shapes

GET = b"GET / HTTP/1.1\r\nHost: x\r\n"

BAD_400 = {
    # Content-Length and Transfer-Encoding together, both orders
    "cl-te": post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    "te-cl": post(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
    "cl-te-smuggle": post(
        b"Content-Length: 13\r\nTransfer-Encoding: chunked\r\n",
        b"0\r\n\r\nSMUGGLED",
    ),
    # Content-Length values
    "cl-duplicate-same": post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
    "cl-duplicate-differing": post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
    "cl-plus": post(b"Content-Length: +5\r\n", b"hello"),
    "cl-minus": post(b"Content-Length: -5\r\n", b"hello"),
    "cl-list-same": post(b"Content-Length: 5, 5\r\n", b"hello"),
    "cl-list-comma": post(b"Content-Length: 5,5\r\n", b"hello"),
    "cl-inner-space": post(b"Content-Length: 5 5\r\n", b"hello"),
    "cl-hex": post(b"Content-Length: 0x5\r\n", b"hello"),
    "cl-overflow": post(b"Content-Length: 99999999999999999999999\r\n", b"hello"),
    # field syntax
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "space-before-colon-cl": post(b"Content-Length : 5\r\n", b"hello"),
    "space-before-colon-te": post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"),
    "leading-space-te-name": post(b" Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    "obs-fold": GET + b"X-A: a\r\n b\r\n\r\n",
    "obs-fold-tab": GET + b"X-A: a\r\n\tb\r\n\r\n",
    "obs-fold-te": post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n"),
    "bare-cr-in-value": GET + b"X-A: a\rb\r\n\r\n",
    "bare-cr-line-end": GET + b"X-A: a\rX-B: b\r\n\r\n",
    "bare-cr-request-line": b"GET / HTTP/1.1\rHost: x\r\n\r\n",
    "bare-lf-everywhere": b"GET / HTTP/1.1\nHost: x\n\n",
    "bare-lf-one-header": b"GET / HTTP/1.1\r\nHost: x\nX-A: a\r\n\r\n",
    "bare-lf-request-line": b"GET / HTTP/1.1\nHost: x\r\n\r\n",
    "bare-lf-end-of-head": b"GET / HTTP/1.1\r\nHost: x\r\n\n",
    "nul-in-value": GET + b"X-A: a\x00b\r\n\r\n",
    "nul-in-path": b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n",
    "nul-in-name": GET + b"X-\x00A: a\r\n\r\n",
    "no-colon": GET + b"X-A\r\n\r\n",
    "empty-name": GET + b": a\r\n\r\n",
    "separator-in-name": GET + b"X(A): a\r\n\r\n",
    "space-in-path": b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
    # chunk sizes and chunk framing
    "chunk-size-not-hex": post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-negative": post(b"Transfer-Encoding: chunked\r\n", b"-1\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-0x": post(b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-leading-space": post(
        b"Transfer-Encoding: chunked\r\n", b" 5\r\nhello\r\n0\r\n\r\n"
    ),
    "chunk-size-trailing-space": post(
        b"Transfer-Encoding: chunked\r\n", b"5 \r\nhello\r\n0\r\n\r\n"
    ),
    "chunk-size-overflow": post(
        b"Transfer-Encoding: chunked\r\n", b"1" + b"0" * 20 + b"\r\nhello\r\n0\r\n\r\n"
    ),
    "chunk-size-overflow-f": post(
        b"Transfer-Encoding: chunked\r\n", b"F" * 20 + b"\r\nhello\r\n0\r\n\r\n"
    ),
    "chunk-size-16-hex": post(b"Transfer-Encoding: chunked\r\n", b"ffffffffffffffff\r\nabc"),
    "chunk-size-2-63": post(
        b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n8000000000000000;a=b\r\nabc"
    ),
    "chunk-data-no-crlf": post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX0\r\n\r\n"),
    "chunk-data-bare-lf": post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\n0\r\n\r\n"),
    "chunk-size-bare-lf": post(b"Transfer-Encoding: chunked\r\n", b"5\nhello\r\n0\r\n\r\n"),
    "chunk-too-long": post(b"Transfer-Encoding: chunked\r\n", b"3\r\nhello\r\n0\r\n\r\n"),
    # Host
    "host-duplicate": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "host-duplicate-same": b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    "host-list": b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n",
    "host-missing": b"GET / HTTP/1.1\r\nX-A: a\r\n\r\n",
    "host-with-space": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    "host-with-slash": b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    # absolute-form naming another host
    "absolute-foreign": b"GET http://evil.test/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute-foreign-port": b"GET http://x:81/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute-userinfo": b"GET http://x@evil.test/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute-foreign-https": b"GET https://evil.test/a HTTP/1.1\r\nHost: x\r\n\r\n",
    # request line
    "method-garbage": b"G(ET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "method-del": b"GE\x7fT / HTTP/1.1\r\nHost: x\r\n\r\n",
    "method-high-byte": b"G\xc9T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "method-leading-space": b" GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "version-lowercase": b"GET / http/1.1\r\nHost: x\r\n\r\n",
    "version-junk": b"GET / HTTP/1.1x\r\nHost: x\r\n\r\n",
    "connect": b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n",
    "asterisk-form-get": b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    # an Upgrade request with a body: the parser stops at its head, so the body
    # would be bytes nobody framed
    "upgrade-h2c-with-body": post(
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: 40\r\n",
        b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n\r\n\r\n",
    ),
    "upgrade-websocket-with-body": post(
        b"Connection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n",
        b"hello",
        head=b"GET /ws HTTP/1.1\r\nHost: x\r\n",
    ),
    "upgrade-chunked-body": post(
        b"Connection: upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
    ),
}
# The final coding is not chunked: the body's end is unknown (RFC 9112 §6.3).
FINAL_CODING_NOT_CHUNKED = {
    "te-xchunked": post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"),
    "te-chunked-identity": post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
    "te-chunked-gzip": post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n"),
    "te-identity": post(b"Transfer-Encoding: identity\r\n", b"hello"),
    "te-gzip": post(b"Transfer-Encoding: gzip\r\n", b"hello"),
}

BAD_TRANSFER_CODING = {
    "te-leading-comma": post(b"Transfer-Encoding: ,chunked\r\n", b"0\r\n\r\n"),
    "te-gzip-chunked": post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
    "te-chunked-chunked": post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"),
    "te-repeated-header": post(
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"
    ),
    "te-vertical-tab": post(b"Transfer-Encoding: chunked\x0b\r\n", b"0\r\n\r\n"),
    "te-quoted": post(b'Transfer-Encoding: "chunked"\r\n', b"0\r\n\r\n"),
}

BAD_VERSION = {
    "http-2.0": b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
    "http-3.0": b"GET / HTTP/3.0\r\nHost: x\r\n\r\n",
    "http-0.9": b"GET / HTTP/0.9\r\nHost: x\r\n\r\n",
    # The version is read off the request line when it ends in " HTTP/1.1": a
    # header ending so must not pass for it.
    "http-2.0-header-1.1": b"GET / HTTP/2.0\r\nX-Line: GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}
# No version at all reads as an HTTP/0.9 simple request: 505 or 400.
NO_VERSION = b"GET /\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("raw", BAD_400.values(), ids=BAD_400.keys())
def test_malformed_or_ambiguous_request_is_400_and_never_forwarded(
    proxy: ProxyProcess, upstream: RecordingUpstream, raw: bytes
) -> None:
    assert_refused(proxy, upstream, raw, 400)


@pytest.mark.parametrize("raw", BAD_TRANSFER_CODING.values(), ids=BAD_TRANSFER_CODING.keys())
def test_obfuscated_or_unknown_transfer_coding_is_refused(
    proxy: ProxyProcess, upstream: RecordingUpstream, raw: bytes
) -> None:
    assert_refused(proxy, upstream, raw, 400, 501)


@pytest.mark.parametrize(
    "raw", FINAL_CODING_NOT_CHUNKED.values(), ids=FINAL_CODING_NOT_CHUNKED.keys()
)
def test_a_final_coding_other_than_chunked_is_400(
    proxy: ProxyProcess, upstream: RecordingUpstream, raw: bytes
) -> None:
    assert_refused(proxy, upstream, raw, 400)


def test_chunked_after_an_unknown_coding_is_501(
    proxy: ProxyProcess, upstream: RecordingUpstream
) -> None:
    assert_refused(
        proxy, upstream, post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"), 501
    )


@pytest.mark.parametrize("raw", BAD_VERSION.values(), ids=BAD_VERSION.keys())
def test_foreign_http_version_is_505(
    proxy: ProxyProcess, upstream: RecordingUpstream, raw: bytes
) -> None:
    assert_refused(proxy, upstream, raw, 505)


def test_request_line_without_version_is_refused(
    proxy: ProxyProcess, upstream: RecordingUpstream
) -> None:
    assert_refused(proxy, upstream, NO_VERSION, 400, 505)


def test_http_1_2_is_refused_with_505_or_served_as_1_1(
    proxy: ProxyProcess, upstream: RecordingUpstream
) -> None:
    """505 for a major version other than 1, and for anything but
    1.0 and 1.1; RFC 9112 lets a server treat 1.2 as 1.1. Both are fine,
    a 400 is not."""
    raw = b"GET / HTTP/1.2\r\nHost: x\r\nConnection: close\r\n\r\n"
    before = len(upstream.requests)
    reply, _ = exchange(proxy.data_port, raw)
    [response] = parse_responses(reply)
    assert response.status in (200, 505), reply
    if response.status == 200:
        assert [r.version for r in upstream.requests[before:]] == ["1.1"]


def test_oversize_header_block_is_431(proxy: ProxyProcess, upstream: RecordingUpstream) -> None:
    one_big = b"X-Big: " + b"a" * (MAX_HEADER_BYTES + 100) + b"\r\n"
    assert_refused(proxy, upstream, GET + one_big + b"\r\n", 431)
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 100) for i in range(MAX_HEADER_BYTES // 100))
    assert_refused(proxy, upstream, GET + many + b"\r\n", 431)


def test_oversize_header_block_in_pieces_is_431(
    proxy: ProxyProcess, upstream: RecordingUpstream
) -> None:
    pieces = [GET] + [b"X-H%d: %s\r\n" % (i, b"c" * 1000) for i in range(12)] + [b"\r\n"]
    assert_refused(proxy, upstream, pieces, 431)


def test_oversize_request_line_is_refused(proxy: ProxyProcess, upstream: RecordingUpstream) -> None:
    raw = b"GET /" + b"a" * (MAX_HEADER_BYTES + 100) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert_refused(proxy, upstream, raw, 414, 431)


def test_oversize_trailers_are_refused(proxy: ProxyProcess, upstream: RecordingUpstream) -> None:
    """A chunked body's trailer section is a header block too: unbounded, it
    is a way around max_header_bytes."""
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 1000) for i in range(12))
    raw = post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n" + trailers + b"\r\n")
    assert_refused(proxy, upstream, raw, 400, 431)


# --------------------------------------------------------------------------- pipelining


PIPELINED_SECOND = {
    "cl-te": post(
        b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\nX-Smuggled: 1\r\n", b"0\r\n\r\nG"
    ),
    "obs-fold": b"GET /smuggled HTTP/1.1\r\nHost: x\r\nX-Smuggled: 1\r\n x\r\n\r\n",
    "bare-lf": b"GET /smuggled HTTP/1.1\nHost: x\nX-Smuggled: 1\n\n",
    "duplicate-cl": post(b"Content-Length: 3\r\nContent-Length: 0\r\nX-Smuggled: 1\r\n", b"abc"),
    "te-gzip-chunked": post(b"Transfer-Encoding: gzip, chunked\r\nX-Smuggled: 1\r\n", b"0\r\n\r\n"),
    "foreign-absolute": b"GET http://evil.test/smuggled HTTP/1.1\r\nHost: x\r\nX-Smuggled: 1\r\n"
    b"\r\n",
    "http-2.0": b"GET /smuggled HTTP/2.0\r\nHost: x\r\nX-Smuggled: 1\r\n\r\n",
}


@pytest.mark.parametrize("second", PIPELINED_SECOND.values(), ids=PIPELINED_SECOND.keys())
def test_pipelined_smuggling_attempt_serves_the_first_and_refuses_the_second(
    proxy: ProxyProcess, upstream: RecordingUpstream, second: bytes
) -> None:
    first = post(b"Content-Length: 5\r\nX-First: 1\r\n", b"hello")
    before_raw, before = len(upstream.raw), len(upstream.requests)
    reply, closed = exchange(proxy.data_port, first + second)
    responses = parse_responses(reply)
    statuses = [r.status for r in responses]
    assert len(statuses) == 2 and statuses[0] == 200, reply
    assert statuses[1] in (400, 501, 505), reply
    assert b"x-recorded" not in responses[1].headers
    assert closed
    time.sleep(0.05)
    got = bytes(upstream.raw[before_raw:])
    assert [r.header(b"x-first") for r in upstream.requests[before:]] == [[b"1"]]
    assert b"mug" not in got.lower() and b"X-Smuggled" not in got, got
    assert got.count(b" HTTP/1.1\r\n") == 1, got
    assert not upstream.errors, upstream.errors


REFUSED_FIRST = {
    "host-duplicate": b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    "absolute-foreign": b"GET http://evil.test/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "http-2.0": b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
    "te-gzip-chunked": post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
    "connect": b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n",
    "bad-chunk": post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n"),
    "cl-te": post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
}


@pytest.mark.parametrize("first", REFUSED_FIRST.values(), ids=REFUSED_FIRST.keys())
def test_nothing_after_a_refused_request_is_forwarded(
    proxy: ProxyProcess, upstream: RecordingUpstream, first: bytes
) -> None:
    """With an idle keep-alive connection to the upstream ready (the usual
    state of a busy proxy), a request pipelined behind a refused one must die
    with the connection, not be sent upstream."""
    assert_served(proxy, upstream, b"GET /warm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    second = b"GET /smuggled HTTP/1.1\r\nHost: x\r\nX-Smuggled: 1\r\n\r\n"
    reply = assert_refused(proxy, upstream, first + second, 400, 501, 505)
    assert b"x-recorded" not in reply


# --------------------------------------------------------------------------- upstream side

BAD_RESPONSES = {
    "dupcl": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "diffcl": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "clte": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    "tecl": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    "signedcl": b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc",
    "obsfold": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: a\r\n b\r\n\r\nabc",
    "barelf": b"HTTP/1.1 200 OK\nContent-Length: 3\n\nabc",
    "garbage": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    # 101 to a request that asked for no upgrade: no tunnel may open
    "unasked101": (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\nabc"
    ),
}
# Broken after the head was relayed: the client can only be cut off.
TRUNCATING_RESPONSES = {
    "badchunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "cl-short": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100,
    "chunked-cut": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    "chunked-cut-in-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\nhello",
}
CLOSE_DELIMITED = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"y" * 3000
# Valid, in one write each: (reply, status, a header the client must get as sent, body).
ODD_RESPONSES = {
    "continue-then-final": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A:  b\r\n\r\nok",
        200,
        (b"x-a", b"b"),
        b"ok",
    ),
    "no-header-at-all": (b"HTTP/1.1 204 No Content\r\n\r\n", 204, None, b""),
    "colons-in-value": (
        b"HTTP/1.1 200 OK\r\nX-Url: http://a:1/b\r\nContent-Length: 2\r\n\r\nok",
        200,
        (b"x-url", b"http://a:1/b"),
        b"ok",
    ),
}

UPSTREAM_CONFIG = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
services:
"""
UPSTREAM_SERVICE = """
  - name: %(name)s
    match: {path_prefix: /%(name)s}
    versions: {only: {endpoints: ["127.0.0.1:%(port)d"]}}
"""


@pytest.fixture(scope="module")
def bad_upstreams_proxy(loops: LoopThread) -> Iterator[ProxyProcess]:
    replies = {**BAD_RESPONSES, **TRUNCATING_RESPONSES, "closedelim": CLOSE_DELIMITED}
    replies.update((name, odd[0]) for name, odd in ODD_RESPONSES.items())
    servers = {name: raw_server(loops, reply) for name, reply in replies.items()}
    config = UPSTREAM_CONFIG + "".join(
        UPSTREAM_SERVICE % {"name": name, "port": port} for name, (port, _) in servers.items()
    )
    try:
        with ProxyProcess(config) as proc:
            yield proc
    finally:
        for _, stop in servers.values():
            stop()


@pytest.mark.parametrize("name", BAD_RESPONSES)
def test_invalid_upstream_response_is_502(bad_upstreams_proxy: ProxyProcess, name: str) -> None:
    raw = b"GET /%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % name.encode()
    reply, closed = exchange(bad_upstreams_proxy.data_port, raw)
    [response] = parse_responses(reply)
    assert response.status == 502, reply
    assert response.complete and closed
    assert b"Traceback" not in reply
    assert b"abc" not in response.body


@pytest.mark.parametrize("name", ODD_RESPONSES)
def test_odd_but_valid_upstream_response_is_relayed(
    bad_upstreams_proxy: ProxyProcess, name: str
) -> None:
    _, status, header, body = ODD_RESPONSES[name]
    raw = b"GET /%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % name.encode()
    reply, _ = exchange(bad_upstreams_proxy.data_port, raw)
    [response] = parse_responses(reply)
    assert response.status == status and response.body == body, reply
    if header is not None:
        assert response.headers.get(header[0]) == header[1], reply


@pytest.mark.parametrize("name", TRUNCATING_RESPONSES)
def test_upstream_dying_mid_body_leaves_the_client_truncated(
    bad_upstreams_proxy: ProxyProcess, name: str
) -> None:
    raw = b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % name.encode()
    reply, closed = exchange(bad_upstreams_proxy.data_port, raw)
    [response] = parse_responses(reply)
    assert response.status == 200, reply
    assert closed, "the client cannot tell the body was cut"
    assert not response.complete, f"a truncated body ended cleanly: {reply[-200:]!r}"


def test_close_delimited_upstream_body_reaches_the_client_complete(
    bad_upstreams_proxy: ProxyProcess,
) -> None:
    raw = b"GET /closedelim HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    reply, _ = exchange(bad_upstreams_proxy.data_port, raw)
    [response] = parse_responses(reply)
    assert response.status == 200 and response.complete, reply[:300]
    assert response.body == b"y" * 3000


# ------------------------------------------------------------------------ headers the proxy guards


def test_h2c_upgrade_is_served_as_plain_http_and_parsing_goes_on(
    proxy: ProxyProcess, upstream: RecordingUpstream
) -> None:
    """No HTTP/2 tunnel to the upstream: its Upgrade and HTTP2-Settings are
    removed, and what follows on the connection is parsed as HTTP/1.1."""
    h2c = (
        b"GET /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    )
    after = b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    first, second = assert_served(proxy, upstream, h2c + after, requests=2)
    assert (first.url, second.url) == (b"/h2c", b"/after")
    for name in (b"upgrade", b"http2-settings", b"connection"):
        assert first.header(name) == [], first.headers
    [split] = assert_served(
        proxy, upstream, h2c.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    )
    assert split.header(b"upgrade") == []


def test_header_names_with_underscores_are_dropped(
    proxy: ProxyProcess, upstream: RecordingUpstream
) -> None:
    raw = post(
        b"X_Forwarded_Proto: https\r\nX_Forwarded_Host: evil.test\r\n"
        b"Transfer_Encoding: chunked\r\nContent_Length: 99\r\nContent-Length: 5\r\n"
        b"Connection: close\r\n",
        b"hello",
    )
    [forwarded] = assert_served(proxy, upstream, raw)
    assert not [name for name, _ in forwarded.headers if b"_" in name], forwarded.headers
    assert forwarded.header(b"x-forwarded-host") == [b"x"]
    assert forwarded.header(b"x-forwarded-proto") == [b"http"]
    assert forwarded.body == b"hello"


@pytest.mark.parametrize(
    "option", [b"host", b"Content-Length", b"x-forwarded-for", b"X-Forwarded-Host", b"x-request-id"]
)
def test_connection_options_do_not_strip_protected_headers(
    proxy: ProxyProcess, upstream: RecordingUpstream, option: bytes
) -> None:
    raw = post(
        b"Connection: close, " + option + b"\r\nX-Request-Id: r1\r\nContent-Length: 2\r\n", b"ok"
    )
    [forwarded] = assert_served(proxy, upstream, raw)
    assert forwarded.header(b"host") == [b"x"]
    assert forwarded.header(b"x-request-id") == [b"r1"]
    assert forwarded.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert forwarded.header(b"x-forwarded-host") == [b"x"]
    assert forwarded.body == b"ok"


HUGE_CHUNK_HEAD = post(b"Transfer-Encoding: chunked\r\n")
HUGE_CHUNK_BODY = b"5\r\nhello\r\n0fffffffffffffff0;x=y\r\nabc"
GOOD_CHUNKED_BODY = b"5\r\nhello\r\n10;e=1\r\n" + b"\n" * 16 + b"\r\n0\r\nX-T: 1\r\n\r\n"


@pytest.mark.parametrize("cut", range(len(HUGE_CHUNK_BODY)))
def test_a_chunk_size_over_the_limit_is_refused_however_it_is_split(
    proxy: ProxyProcess, upstream: RecordingUpstream, cut: int
) -> None:
    before = len(upstream.requests)
    pieces = [HUGE_CHUNK_HEAD + HUGE_CHUNK_BODY[:cut], HUGE_CHUNK_BODY[cut:]]
    reply, closed = exchange(proxy.data_port, pieces)
    assert [r.status for r in parse_responses(reply)] == [400], reply
    assert closed
    assert len(upstream.requests) == before, "a refused request reached the upstream whole"


@pytest.mark.parametrize("cut", range(len(GOOD_CHUNKED_BODY)))
def test_a_chunked_body_is_served_however_it_is_split(
    proxy: ProxyProcess, upstream: RecordingUpstream, cut: int
) -> None:
    head = post(b"Transfer-Encoding: chunked\r\nConnection: close\r\n")
    pieces = [head + GOOD_CHUNKED_BODY[:cut], GOOD_CHUNKED_BODY[cut:]]
    before = len(upstream.requests)
    reply, _ = exchange(proxy.data_port, pieces)
    assert [r.status for r in parse_responses(reply)] == [200], reply
    [forwarded] = upstream.requests[before:]
    assert forwarded.body == b"hello" + b"\n" * 16


LIMITED_CONFIG = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
limits: {max_body_bytes: 100}
services:
  - name: web
    versions: {stable: {endpoints: ["%s"]}}
"""


def test_a_chunk_may_declare_no_more_than_max_body_bytes(upstream: RecordingUpstream) -> None:
    with ProxyProcess(LIMITED_CONFIG % upstream.address) as limited:
        assert_refused(limited, upstream, post(b"Transfer-Encoding: chunked\r\n", b"65\r\nab"), 400)
        body = b"64\r\n" + b"a" * 100 + b"\r\n0\r\n\r\n"
        [served] = assert_served(
            limited, upstream, post(b"Transfer-Encoding: chunked\r\nConnection: close\r\n", body)
        )
        assert served.body == b"a" * 100
