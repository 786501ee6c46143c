"""The HTTP/1.1 head rules, directly: no sockets."""

from __future__ import annotations

import pytest

from proxy import errors
from proxy.http1 import (
    RequestHead,
    check_transfer_encoding,
    forwarded_for_lines,
    origin_form,
    response_lines,
    status_line,
    upstream_head,
)


def head(*lines: tuple[bytes, bytes], http10: bool = False) -> RequestHead:
    return RequestHead(list(lines), http10)


def test_request_head_joins_repeats_and_drops_hop_by_hop_and_listed_headers() -> None:
    request = head(
        (b"Host", b"shop.test"),
        (b"Cookie", b"a=1"),
        (b"cookie", b"b=2"),
        (b"Accept", b"x"),
        (b"accept", b"y"),
        (b"Connection", b"keep-alive, X-Private"),
        (b"X-Private", b"secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Forwarded-Proto", b"https"),
        (b"Expect", b"100-continue"),
    )
    assert request.host == "shop.test"
    assert request.headers["cookie"] == "a=1; b=2"
    assert request.headers["accept"] == "x, y"
    assert request.want_continue
    names = [name.lower() for name, _ in request.forwarded]
    assert names == [b"host", b"cookie", b"cookie", b"accept", b"accept", b"expect"]


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ([(b"Host", b"a"), (b"Host", b"a")], errors.BadRequest),
        ([(b"Host", b"a, b")], errors.BadRequest),
        ([(b"Host", b"a b")], errors.BadRequest),
        ([(b"Host", b"a/b")], errors.BadRequest),
        ([], errors.BadRequest),
        (
            [(b"Host", b"a"), (b"Transfer-Encoding", b"gzip, chunked")],
            errors.UnsupportedTransferCoding,
        ),
        ([(b"Host", b"a"), (b"Transfer-Encoding", b",chunked")], errors.BadRequest),
        (
            [
                (b"Host", b"a"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Transfer-Encoding", b"chunked"),
            ],
            errors.BadRequest,
        ),
    ],
)
def test_request_head_refusals(lines: list[tuple[bytes, bytes]], error: type[Exception]) -> None:
    with pytest.raises(error):
        RequestHead(lines, http10=False)


def test_http10_may_omit_host_and_ipv6_hosts_are_valid() -> None:
    assert head(http10=True).host == ""
    assert head((b"Host", b"[::1]:8080")).host == "[::1]:8080"


def test_transfer_encoding_is_exactly_chunked_in_any_case() -> None:
    assert check_transfer_encoding(b"Chunked", repeated=False)
    assert check_transfer_encoding(b" chunked ", repeated=False)


@pytest.mark.parametrize(
    ("url", "host", "method", "target"),
    [
        (b"/a?b", "x", b"GET", b"/a?b"),
        (b"http://x/a?b", "x", b"GET", b"/a?b"),
        (b"HTTP://X:80", "x:80", b"GET", b"/"),
        (b"*", "x", b"OPTIONS", b"*"),
    ],
)
def test_origin_form(url: bytes, host: str, method: bytes, target: bytes) -> None:
    assert origin_form(url, host, method) == target


@pytest.mark.parametrize(
    ("url", "method"), [(b"http://evil/a", b"GET"), (b"*", b"GET"), (b"a", b"GET")]
)
def test_origin_form_refusals(url: bytes, method: bytes) -> None:
    with pytest.raises(errors.BadRequest):
        origin_form(url, "x", method)


def test_upstream_head_is_reframed_with_forwarding_headers() -> None:
    request = head(
        (b"Host", b"x"),
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"Content-Length", b"5"),
    )
    sent = upstream_head(b"POST", b"/p?", request, forwarded_for_lines("127.0.0.1"), None)
    assert sent == (
        b"POST /p? HTTP/1.1\r\nHost: x\r\n"
        b"x-forwarded-for: 10.0.0.1, 127.0.0.1\r\nx-forwarded-proto: http\r\n"
        b"x-forwarded-host: x\r\ncontent-length: 5\r\n\r\n"
    )
    chunked = head((b"Host", b"x"), (b"Transfer-Encoding", b"chunked"))
    sent = upstream_head(b"POST", b"/", chunked, forwarded_for_lines("::1"), None)
    assert b"transfer-encoding: chunked\r\n" in sent
    assert b"x-forwarded-for: ::1\r\nx-forwarded-proto: http\r\n" in sent


def test_response_lines_keep_end_to_end_headers_only() -> None:
    lines, length, upgrade = response_lines(
        200,
        [
            (b"Content-Length", b"12"),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"X-Hop", b"1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Set-Cookie", b"a=1"),
        ],
    )
    assert b"".join(lines) == b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\n"
    assert length == b"12" and upgrade == b""


def test_every_connection_header_names_what_is_dropped_each_time() -> None:
    headers = [
        (b"Connection", b"X-A"),
        (b"connection", b"keep-alive, x-b"),
        (b"X-A", b"1"),
        (b"X-B", b"2"),
        (b"X-C", b"3"),
    ]
    for _ in range(2):  # the second time, the Connection values are known ones
        lines, _, _ = response_lines(200, headers)
        assert b"".join(lines) == b"HTTP/1.1 200 OK\r\nX-C: 3\r\n"
        request = head((b"Host", b"x"), *headers)
        assert [name for name, _ in request.forwarded] == [b"Host", b"X-C"]
    assert status_line(599) == b"HTTP/1.1 599 Unknown\r\n"
