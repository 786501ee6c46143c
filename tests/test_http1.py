"""The HTTP/1.1 head rules, directly: no sockets."""

from __future__ import annotations

from collections.abc import Sequence

import httptools
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from proxy import errors, http1
from proxy.http1 import (
    MAX_CHUNK_LINE,
    PROTECTED,
    UNDERSCORES_ALLOW,
    UNDERSCORES_DROP,
    UNDERSCORES_REJECT,
    RequestHead,
    check_transfer_encoding,
    error_response,
    forwarded_for_lines,
    forwarded_host_line,
    head_lines,
    header_field,
    learn_runs,
    open_chunk_size,
    origin_form,
    plain_request_line_end,
    request_head,
    request_line_end,
    response_framing,
    response_head,
    response_lines,
    run_lines,
    seen_lines,
    status_line,
    tunnelled_upgrade,
    upstream_head,
    verbatim_head,
    whole_response,
)


@pytest.fixture(autouse=True)
def no_remembered_names() -> None:
    """http1 remembers what it worked out per header name, Host and Connection
    value: each test starts without, so that the working out is what it tests."""
    for cache in (http1._NAMES, http1._HOST_LINES, http1._CONNECTION_OPTIONS):
        cache.clear()


def head(*lines: tuple[bytes, bytes], http10: bool = False) -> RequestHead:
    return request_head(list(lines), http10)


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
        ([(b"Host", b"a"), (b"Transfer-Encoding", b"xchunked")], errors.BadRequest),
        ([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked, identity")], errors.BadRequest),
        ([(b"Host", b"a"), (b"Transfer-Encoding", b"gzip")], errors.BadRequest),
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
        request_head(lines, http10=False)


def test_a_plain_head_asks_for_nothing_special() -> None:
    request = head((b"Host", b"x"), (b"Expect", b"something-else"))
    assert (request.chunked, request.want_continue) == (False, False)


def test_absolute_form_keeps_a_path_that_holds_a_scheme() -> None:
    assert origin_form(b"http://x/a?u=http://y/b", "x", b"GET") == b"/a?u=http://y/b"


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
        (b"https://x/a", "x", b"GET", b"/a"),
        (b"HTTPS://X", "x", b"GET", b"/"),
        (b"*", "x", b"OPTIONS", b"*"),
    ],
)
def test_origin_form(url: bytes, host: str, method: bytes, target: bytes) -> None:
    assert origin_form(url, host, method) == target


@pytest.mark.parametrize(
    ("url", "method", "why"),
    [
        (b"http://evil/a", b"GET", "absolute-form target names another host"),
        (b"https://evil/a", b"GET", "absolute-form target names another host"),
        (b"*", b"GET", "invalid request target"),
        (b"a", b"GET", "invalid request target"),
    ],
)
def test_origin_form_refusals(url: bytes, method: bytes, why: str) -> None:
    with pytest.raises(errors.BadRequest, match=f"^{why}$"):
        origin_form(url, "x", method)


@pytest.mark.parametrize(
    ("lines", "error", "why"),
    [
        ([(b"Host", b"a"), (b"Host", b"b")], errors.BadRequest, "more than one Host"),
        ([(b"Host", b"a,b")], errors.BadRequest, "more than one Host"),
        ([(b"Host", b"a b")], errors.BadRequest, "invalid Host"),
        ([(b"X-A", b"1")], errors.BadRequest, "missing Host header"),
        (
            [(b"Host", b"a"), (b"Transfer-Encoding", b"gzip")],
            errors.BadRequest,
            "malformed Transfer-Encoding: the final coding must be chunked",
        ),
        (
            [(b"Host", b"a"), (b"Transfer-Encoding", b"gzip,chunked")],
            errors.UnsupportedTransferCoding,
            "only the chunked transfer coding is supported",
        ),
    ],
)
def test_each_refusal_says_why(
    lines: list[tuple[bytes, bytes]], error: type[Exception], why: str
) -> None:
    """The reason is in the error answer and in `explain`: each refusal names its own."""
    with pytest.raises(error, match=f"^{why}$"):
        request_head(lines, http10=False)


@given(
    st.lists(
        st.sampled_from(
            [
                (b"Host", b"x"),
                (b"Host", b""),
                (b"X-Forwarded-For", b"10.0.0.1"),
                (b"Content-Length", b"5"),
                (b"Transfer-Encoding", b"chunked"),
                (b"User-Agent", b"a"),
                (b"Accept", b"*/*"),
                (b"Upgrade", b"websocket"),
            ]
        ),
        unique=True,
    ),
    st.sampled_from([b"", b"x-request-id: r\r\n"]),
)
def test_a_head_sent_as_received_is_the_head_rebuilt(
    lines: list[tuple[bytes, bytes]], request_id: bytes
) -> None:
    """A head is sent as received only when it passes on unchanged: then
    nothing the proxy reframes or extends is in it (X-Forwarded-For,
    Content-Length, Transfer-Encoding, Upgrade), and what it adds after its
    lines makes the head it would rebuild."""
    try:
        request = head(*lines)
    except errors.ProxyError:
        return  # refused (Content-Length beside Transfer-Encoding)
    names = {name.lower() for name, _ in lines}
    reframed = {b"x-forwarded-for", b"content-length", b"transfer-encoding", b"upgrade"}
    assert request.unchanged == (not names & reframed)
    if not request.unchanged:
        return
    verbatim = b"GET / HTTP/1.1\r\n" + b"".join(b"%s: %s\r\n" % line for line in lines)
    forwarded_for = forwarded_for_lines("127.0.0.1")
    rebuilt = upstream_head(b"GET", b"/", request, forwarded_for, None, b"", request_id)
    sent = upstream_head(b"GET", b"/", request, forwarded_for, None, verbatim, request_id)
    assert sent == rebuilt


@pytest.mark.parametrize(
    ("lines", "http10"),
    [
        ([(b"Host", b"")], False),  # an empty Host: allowed (RFC 9112 §3.2)
        ([(b"Host", b""), (b"X-Forwarded-For", b"10.0.0.1")], False),  # rebuilt
        ([(b"Host", b""), (b"Content-Length", b"0")], False),
        ([(b"Host", b"")], True),
        ([], True),  # HTTP/1.0 may omit it: an empty one is sent
        ([(b"Host", b"x"), (b"X-Forwarded-For", b"10.0.0.1")], False),
    ],
)
def test_the_head_sent_upstream_has_one_host_line(
    lines: list[tuple[bytes, bytes]], http10: bool
) -> None:
    """Two Host lines are a request to refuse (RFC 9112 §3.2): an empty Host
    goes on as its own line, and only a head without one (HTTP/1.0) gets an
    empty one."""
    request = head(*lines, http10=http10)
    sent = upstream_head(b"GET", b"/", request, forwarded_for_lines("::1"), None)
    hosts = [line for line in sent.split(b"\r\n") if line.lower().startswith(b"host:")]
    assert len(hosts) == 1, sent


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
            b"Content-Length: 12",
            b"Connection:keep-alive, X-Hop",
            b"X-Hop: 1",
            b"Transfer-Encoding: chunked",
            b"Set-Cookie: a=1",
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
        lines, _, _ = response_lines(200, as_lines(headers))
        assert b"".join(lines) == b"HTTP/1.1 200 OK\r\nX-C: 3\r\n"
        request = head((b"Host", b"x"), *headers)
        assert [name for name, _ in request.forwarded] == [b"Host", b"X-C"]
    assert status_line(599) == b"HTTP/1.1 599 Unknown\r\n"


UNDERSCORED = [(b"Host", b"x"), (b"X_Forwarded_Host", b"evil.test"), (b"Accept", b"*/*")]


def test_header_names_with_underscores_are_dropped_by_default() -> None:
    for request in (request_head(UNDERSCORED, False), request_head(UNDERSCORED, False, "drop")):
        assert "x_forwarded_host" not in request.headers
        assert request.forwarded == [(b"Host", b"x"), (b"Accept", b"*/*")]
        assert not request.unchanged
    assert UNDERSCORES_DROP == "drop"


def test_header_names_with_underscores_are_refused_or_allowed_when_configured() -> None:
    with pytest.raises(errors.BadRequest, match="underscore"):
        request_head(UNDERSCORED, False, UNDERSCORES_REJECT)
    allowed = request_head(UNDERSCORED, False, UNDERSCORES_ALLOW)
    assert allowed.headers["x_forwarded_host"] == "evil.test"
    assert allowed.forwarded == UNDERSCORED and allowed.unchanged
    # Without an underscore nothing is refused, whatever the setting.
    assert request_head([(b"Host", b"x")], False, UNDERSCORES_REJECT).host == "x"


@pytest.mark.parametrize("name", sorted(PROTECTED))
def test_connection_options_never_drop_protected_headers(name: bytes) -> None:
    request = head((b"Host", b"x"), (b"Connection", b"close, " + name), (b"X-Other", b"1"))
    assert request.host == "x"
    assert [n.lower() for n, _ in request.forwarded] == [b"host", b"x-other"]
    # (A response's X-Request-Id is replaced by the request's: see test_access_log.py.)
    response, _, _ = response_lines(200, [b"Connection: " + name, b"X-Forwarded-For: r"])
    assert b"X-Forwarded-For: r\r\n" in b"".join(response)


def test_a_response_loses_its_own_x_request_id() -> None:
    response, _, _ = response_lines(200, [b"X-Request-Id: theirs", b"X-Other: 1"])
    assert b"".join(response) == b"HTTP/1.1 200 OK\r\nX-Other: 1\r\n"


def test_connection_options_still_drop_what_they_name() -> None:
    request = head((b"Host", b"x"), (b"Connection", b"Host, X-Hop"), (b"X-Hop", b"1"))
    assert request.forwarded == [(b"Host", b"x")]


def upgrade_head(*lines: tuple[bytes, bytes]) -> RequestHead:
    return head((b"Host", b"x"), (b"Connection", b"upgrade"), *lines)


def test_only_a_websocket_get_without_a_body_is_tunnelled() -> None:
    websocket = upgrade_head((b"Upgrade", b" WebSocket "))
    assert tunnelled_upgrade(b"GET", websocket, http10=False) == b"WebSocket"
    assert tunnelled_upgrade(b"POST", websocket, http10=False) is None
    assert tunnelled_upgrade(b"GET", websocket, http10=True) is None
    empty_body = upgrade_head((b"Upgrade", b"websocket"), (b"Content-Length", b"0"))
    assert tunnelled_upgrade(b"GET", empty_body, http10=False) == b"websocket"
    for token in (b"h2c", b"websocket, h2c", b"TLS/1.2"):
        assert tunnelled_upgrade(b"GET", upgrade_head((b"Upgrade", token)), False) is None


def test_h2c_upgrade_headers_are_not_passed_on() -> None:
    request = head(
        (b"Host", b"x"),
        (b"Connection", b"Upgrade, HTTP2-Settings"),
        (b"Upgrade", b"h2c"),
        (b"HTTP2-Settings", b"AAMAAABkAAQAAP__"),
    )
    assert request.forwarded == [(b"Host", b"x")]
    sent = upstream_head(b"GET", b"/", request, forwarded_for_lines("::1"), None)
    assert b"pgrade" not in sent and b"ettings" not in sent.lower()


@pytest.mark.parametrize("body", [(b"Content-Length", b"40"), (b"Transfer-Encoding", b"chunked")])
@pytest.mark.parametrize("token", [b"websocket", b"h2c"])
def test_an_upgrade_request_with_a_body_is_refused(body: tuple[bytes, bytes], token: bytes) -> None:
    with pytest.raises(errors.BadRequest, match="body"):
        tunnelled_upgrade(b"POST", upgrade_head((b"Upgrade", token), body), http10=False)


chunk_extensions = st.sampled_from([b"", b";a=1", b";name", b';q="x;y"'])


@given(
    sizes=st.lists(st.integers(0, 40), max_size=4),
    open_size=st.integers(1, (1 << 64) - 1),
    extension=chunk_extensions,
    hex_case=st.sampled_from([bytes.lower, bytes.upper]),
    zeros=st.integers(0, 3),
    data=st.data(),
)
def test_open_chunk_size_reads_the_size_line_before_the_data(
    sizes: list[int],
    open_size: int,
    extension: bytes,
    hex_case: object,
    zeros: int,
    data: st.DataObject,
) -> None:
    """Whole chunks, then one whose data runs to the end of the read: its size
    is found however the bytes are cut into `earlier` and `read`."""
    body = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    body += b"".join(b"%x\r\n%s\r\n" % (n, b"d" * n) for n in sizes if n)
    line = b"0" * zeros + hex_case(b"%x" % open_size) + extension  # type: ignore[operator]
    received = data.draw(st.integers(0, min(open_size, 30)))
    stream = body + line + b"\r\n" + b"\n" * received  # data may hold LFs
    cut = data.draw(st.integers(0, len(stream) - received))  # the read starts here
    assert open_chunk_size(stream[:cut], stream[cut:], received) == open_size


def test_open_chunk_size_is_none_in_trailers_or_after_the_data() -> None:
    assert open_chunk_size(b"", b"0\r\nX-T: 1\r\n", 0) is None
    assert open_chunk_size(b"", b"5\r\nhello\r", 5) is None
    assert open_chunk_size(b"", b"\r\n", 0) is None


def test_a_size_line_longer_than_the_limit_is_refused() -> None:
    long_line = b"5;" + b"e" * MAX_CHUNK_LINE
    with pytest.raises(errors.BadRequest, match="too long"):
        open_chunk_size(long_line[-MAX_CHUNK_LINE:], b"\r\nab", 2)
    assert open_chunk_size(b"\n" + long_line[:100], b"\r\nab", 2) == 5


def test_http10_without_host_goes_upstream_with_an_empty_host() -> None:
    sent = upstream_head(b"GET", b"/", head(http10=True), forwarded_for_lines("::1"), None)
    assert sent.startswith(b"GET / HTTP/1.1\r\nhost: \r\n")
    assert b"x-forwarded-host" not in sent


@pytest.mark.parametrize(
    ("given", "sent"), [(b"0", b"0"), (b"00", b"0"), (b"007", b"7"), (b"0" * 30, b"0")]
)
def test_content_length_goes_upstream_without_leading_zeros(given: bytes, sent: bytes) -> None:
    request = head((b"Host", b"x"), (b"Content-Length", given))
    upstream = upstream_head(b"POST", b"/", request, forwarded_for_lines("::1"), None)
    assert b"content-length: " + sent + b"\r\n" in upstream


def test_an_upgrade_request_with_a_one_byte_body_is_refused_and_one_without_upgrade_is_not() -> (
    None
):
    with pytest.raises(errors.BadRequest, match=r"^an Upgrade request may not carry a body$"):
        tunnelled_upgrade(b"GET", upgrade_head((b"Content-Length", b"1")), http10=False)
    assert tunnelled_upgrade(b"GET", upgrade_head(), http10=False) is None


@pytest.mark.parametrize(
    ("length", "bodyless", "http10", "close", "expected", "chunked", "closes"),
    [
        (b"2", False, False, False, b"content-length: 2\r\nX\r\n\r\n", False, False),
        (None, False, False, False, b"transfer-encoding: chunked\r\nX\r\n\r\n", True, False),
        (None, False, True, False, b"X\r\nconnection: close\r\n\r\n", False, True),
        (None, True, True, False, b"X\r\nconnection: keep-alive\r\n\r\n", False, False),
        (None, True, False, True, b"X\r\nconnection: close\r\n\r\n", False, True),
        (b"0", True, False, False, b"content-length: 0\r\nX\r\n\r\n", False, False),
    ],
)
def test_a_response_head_is_framed_for_its_body_and_its_client(
    length: bytes | None,
    bodyless: bool,
    http10: bool,
    close: bool,
    expected: bytes,
    chunked: bool,
    closes: bool,
) -> None:
    """Known length: Content-Length; unknown: chunked for HTTP/1.1, the close
    for HTTP/1.0; the proxy's own lines (X) after them."""
    framing = response_framing(length, bodyless, http10, close, b"X\r\n")
    assert framing == (expected, chunked, closes)


@given(
    st.sampled_from(
        [
            b"HTTP/1.1 200 OK\r\nDate: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nDate: 1\r\n\r\n",
        ]
    ),
    st.lists(
        st.tuples(
            st.sampled_from([b"x-request-id: a\r\n", b"x-request-id: bb\r\nd: 1\r\n"]),
            st.booleans(),
            st.booleans(),
            st.booleans(),
            st.sampled_from([b"", b"X\r\n", b"X\r\nset-cookie: c=1\r\n"]),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_a_head_framed_again_is_framed_as_if_for_the_first_time(
    raw: bytes, framings: list[tuple[bytes, bool, bool, bool, bytes]]
) -> None:
    """ResponseHead.framed remembers its last framing: whatever came before,
    each is its lines, the proxy's own and response_framing's."""
    head = http1.ResponseHead(raw, 200)
    for own, bodyless, http10, close, extra in framings:
        end, chunked, closes = response_framing(head.length, bodyless, http10, close, extra)
        framed = head.framed(own, bodyless, http10, close, extra)
        assert framed == (head.start + own + end, chunked, closes)


def test_an_error_response_says_its_status_and_why() -> None:
    assert error_response(502, "upstream refused", b"x-v: a\r\n", True, False) == (
        b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: 34\r\nx-v: a\r\nconnection: close\r\n\r\n"
        b"502 Bad Gateway: upstream refused\n"
    )
    assert error_response(599, "odd", b"", False, True) == (
        b"HTTP/1.1 599 Unknown\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: 15\r\n\r\n"
    )
    assert error_response(599, "odd", b"", False, False).endswith(b"\r\n\r\n599 Error: odd\n")


def test_a_request_line_and_head_are_passed_on_only_when_whole_and_plain() -> None:
    read = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n\r\n"
    end = request_line_end(read, b"GET", b"/a")
    assert end == 15  # where its CRLF begins
    assert verbatim_head(read, end) == b"GET /a HTTP/1.1\r\nHost: x\r\n"
    assert verbatim_head(read[:25], end) == b""  # the head is not whole in the read
    assert verbatim_head(read, 0) == b""
    assert request_line_end(b"GET /a HTTP/1.0\r\n\r\n", b"GET", b"/a") == 0
    assert request_line_end(b"ET /a HTTP/1.1\r\n\r\n", b"GET", b"/a") == 0
    # The smallest head: a request line and its empty line.
    assert verbatim_head(b"GET / HTTP/1.1\r\n\r\n", 14) == b"GET / HTTP/1.1\r\n"


def test_open_chunk_size_at_the_first_byte_and_with_a_line_split_before_its_crlf() -> None:
    assert open_chunk_size(b"", b"a\r\n", 0) == 10
    assert open_chunk_size(b"x\r\n1", b"2\r", 0) is None  # its CRLF not here yet
    assert open_chunk_size(b"x\r\n12\r", b"\nab", 2) == 0x12
    assert open_chunk_size(b"", b"\r\n", 0) is None  # an empty line is no size


@pytest.fixture(autouse=True)
def no_seen_lines() -> None:
    """Nor the header lines last seen at each position (see http1.seen_request_line)."""
    forget_heads()


def forget_heads() -> None:
    http1._SEEN_REQUEST.clear()
    http1._SEEN_REQUEST_LINES.clear()
    http1._RUNS.clear()
    http1._LEARNT.clear()
    http1._CHANGING.clear()
    http1._SEEN_RESPONSE.clear()
    http1._LAST_RESPONSE.clear()
    http1._LAST_HEAD.clear()
    http1._PLAIN_LINE[0] = b"GET / HTTP/1.1\r\n"


def facts(request: RequestHead) -> tuple[object, ...]:
    return (
        request.headers,
        request.forwarded,
        request.host,
        request.chunked,
        request.want_continue,
        request.content_length,
        request.unchanged,
    )


def read_alone(lines: list[tuple[bytes, bytes]]) -> tuple[object, ...] | str:
    """What RequestHead makes of `lines` with nothing seen before, or its refusal."""
    http1._SEEN_REQUEST.clear()
    http1._LAST_HEAD.clear()
    try:
        return facts(request_head(lines, False))
    except errors.ProxyError as exc:
        return repr(exc)


HEADER_LINES = st.lists(
    st.tuples(
        st.sampled_from([b"Host", b"host", b"X-A", b"x-a", b"Cookie", b"Accept", b"X_B"]),
        st.sampled_from([b"", b"1", b"a", b"x.test", b"a=1", b"text/html, */*"]),
    ),
    max_size=6,
)


@given(HEADER_LINES, HEADER_LINES)
def test_a_head_reads_the_same_whatever_heads_came_before(
    earlier: list[tuple[bytes, bytes]], lines: list[tuple[bytes, bytes]]
) -> None:
    alone = read_alone(lines)
    read_alone(earlier)  # leaves its lines seen
    try:
        after = facts(request_head(lines, False))
    except errors.ProxyError as exc:
        assert repr(exc) == alone
    else:
        assert after == alone


def test_repeated_lines_with_the_same_short_value_are_joined_every_time() -> None:
    # One-character and empty values decode to one shared str: the join must
    # still see two lines.
    for _ in range(2):
        request = head(
            (b"Host", b"x"), (b"X-A", b"1"), (b"X-A", b"1"), (b"X-E", b""), (b"x-e", b"")
        )
        assert request.headers["x-a"] == "1, 1" and request.headers["x-e"] == ", "


def test_a_line_unlike_the_one_last_seen_at_its_place_is_read_afresh() -> None:
    assert head((b"Host", b"x"), (b"X-A", b"1")).headers == {"host": "x", "x-a": "1"}
    assert head((b"Host", b"x"), (b"X-B", b"1")).headers == {"host": "x", "x-b": "1"}
    assert head((b"Host", b"x"), (b"X-B", b"2")).headers == {"host": "x", "x-b": "2"}
    longer = head((b"Host", b"y"), (b"X-B", b"2"), (b"Connection", b"close, X-B"))
    assert longer.host == "y" and longer.forwarded == [(b"Host", b"y")]
    assert len(http1._SEEN_REQUEST) == 3


def test_x_forwarded_host_is_made_for_a_host_no_check_remembered() -> None:
    assert forwarded_host_line("shop.test:8080") == b"x-forwarded-host: shop.test:8080\r\n"
    head((b"Host", b"shop.test"))  # remembered by the check
    assert forwarded_host_line("shop.test") == b"x-forwarded-host: shop.test\r\n"


def test_connection_options_are_split_on_commas_without_spaces() -> None:
    request = head((b"Host", b"x"), (b"X-A", b"1"), (b"X-B", b"2"), (b"Connection", b"close,X-A"))
    assert request.forwarded == [(b"Host", b"x"), (b"X-B", b"2")]


def test_a_line_like_the_one_last_seen_at_its_place_is_not_read_again() -> None:
    """The memo's point: the same value at the same place is the text made for it before."""
    first = head((b"Host", b"x"), (b"X-A", b"a value"))
    again = head((b"Host", b"x"), (b"X-A", b"a value"))
    assert again.headers["x-a"] is first.headers["x-a"]
    assert http1._SEEN_REQUEST[1].header[0] == b"X-A"


def as_lines(headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """Header lines as received, from (name, value) pairs."""
    return [name + b": " + value for name, value in headers]


def response_alone(lines: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes | None, bytes]:
    """What response_lines makes of `lines` with nothing seen before, joined."""
    http1._SEEN_RESPONSE.clear()
    parts, length, upgrade = response_lines(200, as_lines(lines))
    return b"".join(parts), length, upgrade


RESPONSE_LINES = st.lists(
    st.tuples(
        st.sampled_from([b"Date", b"ETag", b"Content-Length", b"Connection", b"Upgrade", b"X-A"]),
        st.sampled_from([b"", b"1", b"x-a", b"close", b"Mon, 30 Nov 2026", b"websocket"]),
    ),
    max_size=6,
)


@given(RESPONSE_LINES, RESPONSE_LINES)
def test_a_response_head_reads_the_same_whatever_heads_came_before(
    earlier: list[tuple[bytes, bytes]], lines: list[tuple[bytes, bytes]]
) -> None:
    alone = response_alone(lines)
    response_alone(earlier)  # leaves its lines seen
    parts, length, upgrade = response_lines(200, as_lines(lines))
    assert (b"".join(parts), length, upgrade) == alone


def test_a_response_line_unlike_the_one_last_seen_at_its_place_is_built_afresh() -> None:
    def joined(*lines: tuple[bytes, bytes]) -> bytes:
        return b"".join(response_lines(200, as_lines(lines))[0])

    assert joined((b"Date", b"1"), (b"X-A", b"a")) == b"HTTP/1.1 200 OK\r\nDate: 1\r\nX-A: a\r\n"
    assert joined((b"Date", b"2"), (b"X-A", b"a")) == b"HTTP/1.1 200 OK\r\nDate: 2\r\nX-A: a\r\n"
    assert joined((b"Date", b"2"), (b"X-B", b"a")) == b"HTTP/1.1 200 OK\r\nDate: 2\r\nX-B: a\r\n"
    _, length, _ = response_lines(200, [b"Date: 2", b"Content-Length: a"])
    assert length == b"a" and http1._SEEN_RESPONSE[1].line == b""
    assert joined((b"Date", b"2"), (b"Content-Type", b"a")) == (
        b"HTTP/1.1 200 OK\r\nDate: 2\r\nContent-Type: a\r\n"
    )


def test_only_the_first_positions_are_remembered() -> None:
    many = [(b"Host", b"x")] + [(b"X-%d" % n, b"%d" % n) for n in range(2 * http1.MAX_SEEN_LINES)]
    for _ in range(2):
        request = request_head(many, False)
        assert request.headers["x-100"] == "100" and len(request.headers) == len(many)
        parts, _, _ = response_lines(200, as_lines(many[1:]))
        assert b"".join(parts).endswith(b"X-127: 127\r\n") and len(parts) == len(many)
    assert len(http1._SEEN_REQUEST) == len(http1._SEEN_RESPONSE) == http1.MAX_SEEN_LINES


class HeadRecorder:
    """httptools' own account of a head: the (name, value) pairs of its callbacks."""

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.heads = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.heads += 1


def mostly(valid: st.SearchStrategy[bytes], invalid: list[bytes]) -> st.SearchStrategy[bytes]:
    """`valid`, and one time in ten one of `invalid`."""
    return st.integers(0, 9).flatmap(lambda n: st.sampled_from(invalid) if n == 0 else valid)


# Mostly what llhttp accepts, with now and then what it must refuse.
TOKEN = st.text("abcxyzABCXYZ019!#$%&'*+-.^_`|~", min_size=1, max_size=8).map(str.encode)
NAMES = mostly(TOKEN, [b"A B", b"", b"X:Y", b"\xe9", b"a\tb", b" X"])
SEPARATORS = mostly(st.sampled_from([b":", b": ", b":\t ", b":  \t"]), [b" :", b"\t:"])
VALUE_BYTES = bytes(range(0x20, 0x7F)) + b"\t\x80\xe9\xff"
VALUES = mostly(
    st.binary(max_size=12).map(lambda v: bytes(VALUE_BYTES[b % len(VALUE_BYTES)] for b in v)),
    [b"a\x00", b"a\x7f", b"\x01"],
)
LINE_BREAKS = mostly(st.just(b"\r\n"), [b"\n", b"\r", b"\r\n ", b"\r\n\t", b"\r\r\n"])
RAW_HEADER_LINES = st.lists(st.tuples(NAMES, SEPARATORS, VALUES, LINE_BREAKS), max_size=6)


@pytest.mark.parametrize("start_line", [b"GET / HTTP/1.1", b"HTTP/1.1 200 OK"])
@settings(max_examples=400)
@given(leading=st.sampled_from([b"", b"\r\n", b"\r\n\r\n"]), lines=RAW_HEADER_LINES)
def test_a_head_llhttp_accepts_reads_as_its_callbacks_give_it(
    start_line: bytes, leading: bytes, lines: list[tuple[bytes, bytes, bytes, bytes]]
) -> None:
    """head_lines and header_field, on the bytes of any head llhttp accepts,
    give the very names and values its callbacks give (the data path reads
    heads so, without a callback per line), and the head's end."""
    raw = leading + start_line + b"\r\n" + b"".join(b"".join(line) for line in lines) + b"\r\n"
    recorder = HeadRecorder()
    parser = (
        httptools.HttpRequestParser
        if start_line.startswith(b"GET")
        else httptools.HttpResponseParser
    )(recorder)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserError:
        return  # refused: never read from the bytes
    event("accepted")
    assert recorder.heads == 1
    read, end = head_lines(b"before" + raw + b"\r\n\r\nafter", len(b"before"))
    assert read[0] == start_line and end == len(b"before" + raw)
    assert [header_field(line) for line in read[1:]] == recorder.fields


# Heads of a few kinds of client: the same lines mostly, a user's id and a
# request id that change (and change length), lines now and then added,
# dropped or changed, and now and then bytes after the head.
CLIENT_LINES = [b"Host: x", b"User-Agent: a b", b"Accept: */*", b"Cookie: s=1; t=2", b"X-A:1"]
HEAD_VARIANTS = st.tuples(
    st.sampled_from([b"GET / HTTP/1.1", b"GET /b?c HTTP/1.1", b"POST /x HTTP/1.0"]),
    st.sampled_from([[0, 4, 1, 2], [0, 4], [0, 1, 2, 3, 4], [4, 0]]),  # kinds of client
    # Ids whose lines differ in length by as much as a CRLF and "X-A:1": a
    # shorter one then ends where a longer one's CRLF was.
    st.sampled_from([b"u", b"u1234567", b"u123", b"u1234567890", b"u12"]),
    st.sampled_from([b"", b"", b"", b"X-Late: 1\r\n", b"x-user-id:\t u\r\n", b"Bad Line\r\n"]),
    st.sampled_from([b"", b"", b"", b"", b"GET / HTTP/1.1\r\nHost: y\r\n\r\n", b"junk\r\n\r\n"]),
)


def llhttp_fields(read: bytes) -> list[tuple[bytes, bytes]] | None:
    """The (name, value) pairs of the first head in `read` as llhttp's callbacks give them, or
    None if it refuses it."""
    recorder = HeadRecorder()
    try:
        httptools.HttpRequestParser(recorder).feed_data(read)
    except httptools.HttpParserError:
        if not recorder.heads:
            return None
    return recorder.fields if recorder.heads else None


@settings(max_examples=150)
@given(st.lists(HEAD_VARIANTS, min_size=1, max_size=12))
def test_heads_read_by_runs_are_read_as_llhttp_reads_them(
    heads: list[tuple[bytes, list[int], bytes, bytes, bytes]],
) -> None:
    """What the data path does with each read that ends with an empty line
    (see ClientConnection.on_headers_complete): the runs' lines if they fit,
    else seen_lines, from which the runs are learnt. Whenever llhttp accepts
    the head, the lines are its lines; a read holding more than the head is
    never read by the runs."""
    for request_line, picked, user, extra, after in heads:
        lines = [CLIENT_LINES[i] for i in picked]
        lines.insert(1, b"x-user-id: " + user)
        lines.append(b"X-Request-Id: " + user[::-1])
        read = request_line + b"\r\n" + b"".join(line + b"\r\n" for line in lines)
        read += extra + b"\r\n" + after
        expected = llhttp_fields(read)
        if expected is None:
            continue  # refused: never read from the bytes
        line_end = request_line_end(read, b"GET", request_line[4:].split(b" ")[0])
        by_runs = run_lines(read, line_end)
        if after:
            assert by_runs is None
            continue
        if by_runs is None:
            by_runs = seen_lines(read, line_end)
            learn_runs(by_runs)
        else:
            event("read by the runs")
        assert [line.header for line in by_runs] == expected


def test_a_head_like_the_last_but_for_values_passed_on_is_read_as_it_was() -> None:
    first = head((b"Host", b"x"), (b"x-user-id", b"u1"), (b"Accept", b"*/*"))
    second = head((b"Host", b"x"), (b"x-user-id", b"u22"), (b"Accept", b"*/*"))
    assert second.headers == {"host": "x", "x-user-id": "u22", "accept": "*/*"}
    assert first.headers["x-user-id"] == "u1"  # its own dict, untouched
    assert second.forwarded == [(b"Host", b"x"), (b"x-user-id", b"u22"), (b"Accept", b"*/*")]
    assert second.unchanged and second.host == "x"
    # Not when a line a check reads changes, nor the settings the checks read.
    with pytest.raises(errors.BadRequest, match="invalid Host"):
        head((b"Host", b"x y"), (b"x-user-id", b"u3"), (b"Accept", b"*/*"))
    lines = [(b"Host", b"x"), (b"X_B", b"1")]
    assert request_head(lines, False, UNDERSCORES_ALLOW).headers["x_b"] == "1"
    assert "x_b" not in request_head(lines, False).headers
    assert request_head([(b"X-A", b"1")], True).host == ""
    with pytest.raises(errors.BadRequest, match="missing Host"):
        request_head([(b"X-A", b"2")], False)
    # Nor when the last head had a name twice: its value was two lines joined.
    head((b"Host", b"x"), (b"X-A", b"1"), (b"X-A", b"2"))
    assert head((b"Host", b"x"), (b"X-A", b"1"), (b"X-A", b"3")).headers["x-a"] == "1, 3"


def test_heads_of_one_client_are_read_by_the_runs_once_learnt() -> None:
    """What the runs are for: after two heads, those of the same client are
    read with a comparison per run, whatever length their changing lines have
    (the last line too), and a line that got shorter is not taken with the
    start of the next one."""
    template = (
        b"GET /a HTTP/1.1\r\nHost: x\r\nx-user-id: %s\r\nX-A:1\r\nAccept: */*\r\nX-Id: %s\r\n\r\n"
    )
    users = [b"u1", b"u22", b"u1234567", b"u1", b"u333333", b"u", b"uuuuuuuuuu"]
    for number, user in enumerate(users):
        head = template % (user, user[::-1] * (number % 3 + 1))
        line_end = request_line_end(head, b"GET", b"/a")
        lines = run_lines(head, line_end)
        if number < 2:
            assert lines is None  # not learnt yet: the user's line has not changed once
            lines = seen_lines(head, line_end)
            learn_runs(lines)
        assert lines is not None, head
        assert [line.header for line in lines] == llhttp_fields(head)
    assert [run.raw for run in http1._RUNS] == [
        b"Host: x\r\n",
        b"",
        b"X-A:1\r\nAccept: */*\r\n",
        b"",
    ]
    # Fewer lines, more lines, or an empty line first: not by the runs.
    start = b"GET /a HTTP/1.1\r\nHost: x\r\nx-user-id: u\r\nX-A:1\r\nAccept: */*\r\n"
    for other in (
        start + b"\r\n",
        start + b"X-Id: 1\r\nX: 2\r\n\r\n",
        b"\r\n" + start + b"X-Id: 1\r\n\r\n",
    ):
        assert run_lines(other, 0) is None


def test_the_head_read_last_is_read_once() -> None:
    """A response head equal to the last is what was made of it then; a request
    head like the last is read from it (the last stays the one read in full)."""
    raw = b"HTTP/1.1 200 OK\r\nDate: 1\r\nContent-Length: 2\r\n\r\nok"
    first, end = http1.response_head(raw, 0, 200)
    assert http1.response_head(raw, 0, 200) == (first, end) and end == len(raw) - 2
    assert (first.status, first.whole) == (200, len(raw))  # its head and its 2-byte body
    assert first.start == b"HTTP/1.1 200 OK\r\nDate: 1\r\n" and first.length == b"2"
    other, _ = http1.response_head(raw.replace(b"Date: 1", b"Date: 2"), 0, 200)
    assert other is not first and other.start == b"HTTP/1.1 200 OK\r\nDate: 2\r\n"
    assert http1.response_head(b"\r\n" + raw, 0, 200)[1] == len(raw)
    read_in_full = head((b"Host", b"x"), (b"x-user-id", b"u1"))
    head((b"Host", b"x"), (b"x-user-id", b"u2"))
    assert http1._LAST_HEAD[0] is read_in_full


@pytest.mark.parametrize("leading", [b"", b"\r\n", b"\r\n\r\n", b"\n"])
def test_a_head_whose_request_line_end_is_not_known_is_read_past_empty_lines(
    leading: bytes,
) -> None:
    for request_line in (b"GET / HTTP/1.0", b"GET  /x HTTP/1.1", b"POST /y HTTP/1.1"):
        head = leading + request_line + b"\r\nHost: x\r\nX-A:  1 \r\n\r\n"
        expected = llhttp_fields(head)
        if expected is None:
            continue  # (a bare LF first: llhttp's to refuse)
        assert [line.header for line in seen_lines(head, 0)] == expected
        assert expected == [(b"Host", b"x"), (b"X-A", b"1 ")]


class MessageRecorder(HeadRecorder):
    """httptools' account of whole messages: their URLs, heads and ends."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[bytes] = []
        self.bodies = 0
        self.messages = 0

    def on_url(self, url: bytes) -> None:
        self.urls.append(url)

    def on_body(self, body: bytes) -> None:
        self.bodies += 1

    def on_message_complete(self) -> None:
        self.messages += 1


# Request lines and lines of a few kinds of client as in HEAD_VARIANTS, with
# what llhttp reads besides the syntax (framing, keep-alive, upgrade) and
# targets, names and values it must refuse, for the heads read without it.
TARGET_ALPHABET = http1.TARGET_BYTES + b' #\\"<>{}|^`\x00\x7f\x80\xff\t\r\n'


def targets(alphabet: bytes) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=10).map(
        lambda t: b"/" + bytes(alphabet[b % len(alphabet)] for b in t)
    )


TARGETS = st.integers(0, 3).flatmap(
    lambda n: [
        targets(TARGET_ALPHABET),
        st.sampled_from([b"*", b"http://x/", b"x", b"", b"/"]),
        targets(http1.TARGET_BYTES),
        targets(http1.TARGET_BYTES),
    ][n]
)
REQUEST_LINE_FORMS = st.sampled_from(
    [b"GET %s HTTP/1.1"] * 12
    + [b"HEAD %s HTTP/1.1", b"POST %s HTTP/1.1", b"GET %s HTTP/1.0", b"GET  %s HTTP/1.1"]
    + [b"CONNECT %s HTTP/1.1", b"get %s HTTP/1.1", b"GET %s HTTP/1.1 ", b"GET %s HTTP/2.0"]
)
PARSER_LINES = [
    b"Host: x",
    b"Accept: */*",
    b"Connection: keep-alive",
    b"Connection: close",
    b"Content-Length: 3",
    b"Transfer-Encoding: chunked",
    b"Connection: upgrade\r\nUpgrade: websocket",
    b"Proxy-Connection: keep-alive",
]
UNCHECKED_VARIANTS = st.tuples(
    st.tuples(REQUEST_LINE_FORMS, TARGETS),
    st.sampled_from(
        [[0, 1], [0, 1, 2], [7, 0], [0, 2, 1]] * 2  # plain for llhttp
        + [[0, 3], [0, 4], [0, 5], [6, 0]]
    ),  # not: a close, framing, an upgrade
    mostly(st.just(b"x-user-id"), [b"X-User-Id", b"Connection", b"Content-Length", b"x-user-id "]),
    SEPARATORS,
    VALUES,
    st.sampled_from([b"", b"", b"", b"X-Late: 1\r\n", b"Bad Line\r\n"]),
)
Variant = tuple[tuple[bytes, bytes], list[int], bytes, bytes, bytes, bytes]


def sometimes(strategy: st.SearchStrategy[Variant]) -> st.SearchStrategy[Variant | None]:
    """None (the same head as before but for its user's id) three times in four."""
    return st.integers(0, 3).flatmap(lambda n: strategy if n == 0 else st.none())


@settings(max_examples=400)
@given(UNCHECKED_VARIANTS, st.lists(st.tuples(sometimes(UNCHECKED_VARIANTS), VALUES), max_size=12))
def test_a_head_read_without_llhttp_is_one_llhttp_reads_alike(
    first: Variant, changes: list[tuple[Variant | None, bytes]]
) -> None:
    """The data path reads a GET or HEAD whose request line plain_request_line_end
    accepts and whose lines run_lines(..., unchecked=True) reads without llhttp
    (see ClientConnection._read_plain). Whenever it does, llhttp accepts the
    very same read as one whole message with that target and those lines, no
    body, kept alive and asking for no upgrade. Heads llhttp reads are learnt
    from as the data path learns from them; a client's heads differ in a
    user's id, and now and then in anything else."""
    variant = first
    for other, user in [(None, first[4]), *changes]:
        variant = other or variant
        (form, target), picked, name, separator, _, extra = variant
        lines = [PARSER_LINES[i] for i in picked]
        lines.insert(1, name + separator + user)
        read = form % target + b"\r\n" + b"".join(line + b"\r\n" for line in lines)
        read += extra + b"\r\n"
        line_end = plain_request_line_end(read)
        by_runs = run_lines(read, line_end, unchecked=True) if line_end else None
        recorder = MessageRecorder()
        parser = httptools.HttpRequestParser(recorder)
        try:
            parser.feed_data(read)
        except httptools.HttpParserUpgrade:
            assert by_runs is None
            continue
        except httptools.HttpParserError:
            assert by_runs is None, read
            continue
        if by_runs is not None:
            event("read without llhttp")

            method = read[: read.index(b" ")]
            assert method in (b"GET", b"HEAD") and parser.get_method() == method
            assert recorder.urls == [read[len(method) + 1 : line_end - 9]]
            assert [line.header for line in by_runs] == recorder.fields
            assert (recorder.messages, recorder.bodies) == (1, 0), read
            assert parser.should_keep_alive() and not parser.should_upgrade()
            assert parser.get_http_version() == "1.1"
            continue
        if recorder.heads != 1:
            continue
        line_end = request_line_end(read, parser.get_method(), recorder.urls[0])
        lines_read = run_lines(read, line_end)
        if lines_read is None:
            lines_read = seen_lines(read, line_end)
            learn_runs(lines_read)
        assert [line.header for line in lines_read] == recorder.fields


def test_only_heads_llhttp_would_read_alike_are_read_without_it() -> None:
    """Once a client's heads are learnt, one that differs in its user's id is
    read without llhttp; one that differs in what llhttp refuses, or in what
    it reads besides the syntax, or in bytes it accepts that the data path
    does not check itself, is left to llhttp."""
    template = b"%s\r\nHost: x\r\nx-user-id: %s\r\nAccept: */*\r\n\r\n"
    line = b"GET /a?b=1 HTTP/1.1"

    def unchecked(read: bytes) -> list[tuple[bytes, bytes]] | None:
        line_end = plain_request_line_end(read)
        lines = run_lines(read, line_end, unchecked=True) if line_end else None
        return None if lines is None else [seen.header for seen in lines]

    for user in (b"u1", b"u22"):
        read = template % (line, user)
        assert unchecked(read) is None  # not learnt yet
        learn_runs(seen_lines(read, plain_request_line_end(read)))
    for user in (b"u3", b"", b"a\tb c ", b"~!"):
        read = template % (line, user)
        assert (
            unchecked(read)
            == llhttp_fields(read)
            == [
                (b"Host", b"x"),
                (b"x-user-id", user),
                (b"Accept", b"*/*"),
            ]
        )
        assert unchecked(template % (b"HEAD /a HTTP/1.1", user)) is not None
    refused = [b"a\x7f", b"a\x00", b"\x01", b"a\rb", b"a\nb"]
    accepted = [b"a\x80", b"\xff"]  # obs-text: left to llhttp
    for user in refused + accepted:
        read = template % (line, user)
        assert unchecked(read) is None
        assert (llhttp_fields(read) is None) == (user in refused), user
    for other in (
        b"GET /a b HTTP/1.1",
        b"GET /a\x7f HTTP/1.1",
        b"GET /\x80 HTTP/1.1",
        b"GET /a#b HTTP/1.1",
        b"GET /a\\b HTTP/1.1",
        b"HEAD /\x7f HTTP/1.1",
        b"GET /a HTTP/1.0",
        b"GET /a HTTP/1.1 ",
        b"GET  /a HTTP/1.1",
        b"POST /a HTTP/1.1",
        b"get /a HTTP/1.1",
        b"GET * HTTP/1.1",
        b"GET http://x/a HTTP/1.1",
    ):
        assert plain_request_line_end(template % (other, b"u4")) == 0, other
    for changed in (
        b"Content-Length: 3",
        b"Connection: close",
        b"X-User-Id: u5",
        b"x-user-id : u",
        b"x-user-id",
    ):
        read = template.replace(b"x-user-id: %s", changed) % line
        assert unchecked(read) is None, changed
    # Runs holding a line llhttp reads are not read without it, but for a keep-alive.
    for other_line, read_without in (
        (b"Connection: close", False),
        (b"Connection: Keep-Alive", True),
        (b"Proxy-Connection: keep-alive", True),
        (b"Upgrade: keep-alive", False),
    ):
        forget_heads()
        client = template.replace(b"Accept: */*", other_line)
        for user in (b"u1", b"u22"):
            learn_runs(seen_lines(client % (line, user), len(line)))
        assert (unchecked(client % (line, b"u3")) is not None) == read_without


class ResponseRecorder(MessageRecorder):
    def __init__(self) -> None:
        super().__init__()
        self.body = b""
        self.begun = 0

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_body(self, body: bytes) -> None:
        self.body += body


# Response heads: mostly one Content-Length, now and then none, two, or a
# Transfer-Encoding beside it (which llhttp refuses).
FRAMED_RESPONSE_LINES = st.tuples(
    st.lists(
        st.sampled_from([b"Server: up", b"Connection: close", b'ETag: "1"', b"Content-Length: 5"]),
        max_size=3,
    ),
    st.sampled_from(
        [
            b"Content-Length: 5",
            b"Content-Length: 0",
            b"content-length:  007 ",
            b"",
            b"Transfer-Encoding: chunked",
        ]
    ),
).map(lambda pair: [*pair[0], pair[1]] if pair[1] else pair[0])


@settings(max_examples=500)
@given(
    st.sampled_from(
        [b"200 OK"] * 4 + [b"100 Continue", b"101 Switching", b"204 No", b"304 Not", b"404 N"]
    ),
    FRAMED_RESPONSE_LINES,
    st.binary(min_size=8, max_size=8),
    st.sampled_from([b"HTTP/1.1 ", b"HTTP/1.0 ", b"\r\nHTTP/1.1 "]),
)
def test_a_whole_response_read_without_llhttp_is_one_llhttp_reads_alike(
    status: bytes, lines: list[bytes], body: bytes, version: bytes
) -> None:
    """The data path reads a response whose head is the last llhttp read, and
    that is all of its read with the body its Content-Length gives, without
    llhttp (see UpstreamConnection._read_whole). Whenever it does, llhttp reads
    that read as one whole response with that status, head and body, and
    nothing after it."""
    head = version + status + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    recorder = ResponseRecorder()
    parser = httptools.HttpResponseParser(recorder)
    try:
        parser.feed_data(head)
    except httptools.HttpParserError:
        return  # refused: never remembered
    if not recorder.heads:
        return
    event("head accepted")
    remembered, _ = response_head(head, 0, parser.get_status_code())
    for size in range(len(body) + 1):
        read = head + body[:size]
        found = whole_response(read)
        if found is None:
            continue
        event("read without llhttp")
        assert found is remembered
        recorder = ResponseRecorder()
        parser = httptools.HttpResponseParser(recorder)
        parser.feed_data(read)
        assert (recorder.begun, recorder.messages) == (1, 1), read
        assert parser.get_status_code() == found.status
        assert recorder.body == read[len(found.raw) :]
        assert not head.startswith(b"\r\n")


def changing_positions() -> dict[int, list[int]]:
    """The positions learnt as changing, by the number of lines of the heads."""
    return {count: sorted(changing) for count, changing in http1._CHANGING.items()}


def test_heads_of_another_length_do_not_make_positions_change() -> None:
    """A kind of client whose heads have another number of lines is not
    compared line by line with the last: after a curl-like client, a
    browser's heads are one run but for their user id."""
    curl = b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: curl\r\n\r\n"
    browser = b"GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: b\r\nAccept: */*\r\nx-user-id: %s\r\n\r\n"
    for head in (curl, curl, browser % b"u1", browser % b"u22", curl, browser % b"u1"):
        if run_lines(head, plain_request_line_end(head)) is None:
            learn_runs(seen_lines(head, plain_request_line_end(head)))
    assert changing_positions() == {2: [], 4: [3]}
    assert [len(run.seen) for run in http1._RUNS] == [3, 0]
    head = browser % b"u333"
    lines = run_lines(head, plain_request_line_end(head), unchecked=True)
    assert lines is not None and [line.header for line in lines] == llhttp_fields(head)


def test_heads_of_clients_of_two_kinds_are_read_without_llhttp_in_turn() -> None:
    """Where the heads of two kinds of client differ, the positions change for
    good; a line that is the one last seen there is taken as it is (it was
    read before), unless llhttp reads it (a Connection: close stays llhttp's)."""
    browser = b"GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: b\r\nAccept: */*\r\nx-user-id: %s\r\n\r\n"
    closing = (
        b"GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: c\r\nConnection: close\r\nx-user-id: %s\r\n\r\n"
    )

    def read_by_llhttp(head: bytes) -> None:
        lines = run_lines(head, plain_request_line_end(head))
        if lines is None:
            learn_runs(seen_lines(head, plain_request_line_end(head)))

    for template in (browser, closing, browser, browser):
        for user in (b"u1", b"u22"):
            read_by_llhttp(template % user)
    assert changing_positions() == {4: [1, 2, 3]}
    head = browser % b"u3"
    lines = run_lines(head, plain_request_line_end(head), unchecked=True)
    assert lines is not None and [line.header for line in lines] == llhttp_fields(head)
    assert run_lines(browser % b"u\x7f", plain_request_line_end(head), unchecked=True) is None
    for user in (b"u1", b"u22"):
        read_by_llhttp(closing % user)
    assert run_lines(closing % b"u4", plain_request_line_end(head), unchecked=True) is None
