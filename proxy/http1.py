"""HTTP/1.1 head rules, without I/O: what is checked, dropped and rebuilt.

llhttp (strict) has already refused malformed syntax; these are the checks it
leaves to the application (RFC 9112 §6-7, the request-smuggling shapes), and
the rewriting of heads between client and upstream. Errors carry the status
they become.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Final

from . import errors

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"http2-settings",  # only ever sent with Upgrade: h2c, which is never passed on
    }
)
# Hop-by-hop, or set by the proxy (X-Forwarded-For is extended): a client's own lines are dropped.
NOT_FORWARDED: Final = HOP_BY_HOP | {
    b"content-length",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
}
# What a Connection header may not drop: the framing, Host, and what the proxy itself sets.
PROTECTED: Final = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
    }
)
CHECKED_REQUEST_HEADERS: Final = frozenset(
    {b"host", b"transfer-encoding", b"connection", b"expect"}
)
# The header names whose values llhttp reads, besides checking every line's
# syntax: they frame the body, keep the connection or ask for an upgrade.
PARSER_READS: Final = frozenset(
    {b"connection", b"content-length", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
# Bytes that llhttp (strict) accepts in a request target after its "/", and in
# a header value: fewer than it accepts, for the heads read without it (see
# plain_request_line_end, run_lines). As tables: byte n is 1 if n is one of them.
TARGET_BYTES: Final = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?%"
)
VALUE_BYTES: Final = bytes(range(0x20, 0x7F)) + b"\t"
TARGET_TABLE: Final = bytes(int(n in TARGET_BYTES) for n in range(256))
VALUE_TABLE: Final = bytes(int(n in VALUE_BYTES) for n in range(256))
# What the data path does with request header names that hold an underscore
# (config key headers_with_underscores): WSGI and CGI upstreams read
# X_Forwarded_Host and X-Forwarded-Host as one variable.
UNDERSCORES_DROP: Final = "drop"
UNDERSCORES_REJECT: Final = "reject"
UNDERSCORES_ALLOW: Final = "allow"
# Response headers the proxy reads or replaces rather than copies, and their lengths.
# The response's x-request-id is always the request's (an upstream's own is replaced).
CHECKED_RESPONSE_HEADERS: Final = HOP_BY_HOP | {b"content-length", b"x-request-id"}
# Bit n set: some checked name is n bytes long (all are shorter than 63).
CHECKED_RESPONSE_LENGTHS: Final = sum(1 << size for size in set(map(len, CHECKED_RESPONSE_HEADERS)))
REQUEST_ID_LENGTH: Final = len(b"x-request-id")  # also Content-Type's, in nearly every response
# RFC 3986 reg-name or IPv4, or an IPv6 literal, and an optional port.
VALID_HOST: Final = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+;=%-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")
IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
STATUS_LINES: Final = {
    int(s): f"HTTP/1.1 {int(s)} {s.phrase}\r\n".encode("latin-1") for s in HTTPStatus
}
CHUNKED_END: Final = b"0\r\n\r\n"
# A chunk may declare no more than a body may hold (limits.max_body_bytes, else
# this: what a signed 64-bit length holds); its size line, extensions included,
# is at most MAX_CHUNK_LINE bytes.
MAX_CHUNK_SIZE: Final = (1 << 63) - 1
MAX_CHUNK_LINE: Final = 4096
NOTHING: Final[frozenset[bytes]] = frozenset()


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


class HeaderName:
    """What the head rules need of a header name, computed once per name as received."""

    __slots__ = (
        "forwarded",
        "key",
        "lower",
        "parser_reads",
        "request_checked",
        "response_checked",
        "underscore",
    )

    def __init__(self, raw: bytes) -> None:
        self.lower = raw.lower()
        self.key = self.lower.decode("latin-1")  # the name routing and `headers` use
        self.underscore = b"_" in raw
        self.request_checked = self.lower in CHECKED_REQUEST_HEADERS or self.underscore
        self.forwarded = self.lower not in NOT_FORWARDED
        self.response_checked = self.lower in CHECKED_RESPONSE_HEADERS
        self.parser_reads = self.lower in PARSER_READS


# Clients and upstreams send the same few names on every message. Bounded: a
# peer sending ever-new names only makes it start over.
_NAMES: Final[dict[bytes, HeaderName]] = {}
MAX_CACHED_NAMES: Final = 1024


def header_name(raw: bytes) -> HeaderName:
    name = _NAMES.get(raw)
    if name is None:
        if len(_NAMES) >= MAX_CACHED_NAMES:
            _NAMES.clear()
        name = _NAMES[raw] = HeaderName(raw)
    return name


Header = tuple[bytes, bytes]


class SeenRequestLine:
    """A header line as last seen at one position of a request head, and what
    was worked out for it: its (name, value) as received, its HeaderName, its
    value as text, and the line itself when it was read from the bytes (else
    b""). Never changed once made: a head holds on to those of its lines."""

    __slots__ = ("header", "line", "name", "text")

    def __init__(self, header: Header, name: HeaderName, line: bytes) -> None:
        self.header = header
        self.name = name
        self.text = header[1].decode("latin-1")
        self.line = line


# Clients send the same names in the same order on every request, and mostly
# the same values: a line equal to the one last seen at its position takes
# what was worked out for it then, after a comparison of bytes, where a new
# one costs a hash and a lookup for its name and a decoding for its value.
# Only the first MAX_SEEN_LINES positions are remembered: a head of many
# lines leaves no more behind. Heads are read by the event loop's thread only.
# The lines read from the bytes (seen_lines) and those given as (name, value)
# pairs (seen_headers) are remembered apart.
_SEEN_REQUEST: Final[list[SeenRequestLine]] = []
_SEEN_REQUEST_LINES: Final[list[SeenRequestLine]] = []
MAX_SEEN_LINES: Final = 64


def seen_request_line(index: int, raw_name: bytes, raw_value: bytes) -> SeenRequestLine:
    """What is known of the header line (`raw_name`, `raw_value`) at `index` of a request head."""
    name: HeaderName | None = None
    if index < len(_SEEN_REQUEST):
        seen = _SEEN_REQUEST[index]
        header = seen.header
        if header[0] == raw_name:
            if header[1] == raw_value:
                return seen
            name = seen.name
    if name is None:
        name = header_name(raw_name)
    seen = SeenRequestLine((raw_name, raw_value), name, b"")
    _remember(_SEEN_REQUEST, index, seen)
    return seen


def seen_request_raw_line(index: int, line: bytes) -> SeenRequestLine:
    """What is known of the header line `line`, as received, at `index` of a request head."""
    if index < len(_SEEN_REQUEST_LINES):
        seen = _SEEN_REQUEST_LINES[index]
        if seen.line == line:
            return seen
        raw_name = seen.header[0]
        size = len(raw_name)
        if len(line) > size and line[size] == 58 and line[:size] == raw_name:  # 58: ":"
            # The same name with another value (a user's id, a request's):
            # neither its name nor its HeaderName is worked out again.
            value = line[value_start(line, size + 1) :]
            seen = SeenRequestLine((raw_name, value), seen.name, line)
            _SEEN_REQUEST_LINES[index] = seen
            return seen
    header = header_field(line)
    seen = SeenRequestLine(header, header_name(header[0]), line)
    _remember(_SEEN_REQUEST_LINES, index, seen)
    return seen


def _remember(seen_lines: list[SeenRequestLine], index: int, seen: SeenRequestLine) -> None:
    if index < len(seen_lines):
        seen_lines[index] = seen
    elif index < MAX_SEEN_LINES:
        seen_lines.append(seen)


def seen_headers(raw_headers: list[Header]) -> list[SeenRequestLine]:
    """A head's header lines given as (name, value) pairs, as llhttp's callbacks give them."""
    return [
        seen_request_line(index, name, value) for index, (name, value) in enumerate(raw_headers)
    ]


def seen_lines(head: bytes, line_end: int) -> list[SeenRequestLine]:
    """The header lines of a request head that llhttp accepted, read from its
    bytes: `head` holds it whole, from its first byte (empty lines before the
    request line aside) to its last, and `line_end` is where its request line's
    CRLF is if known (request_line_end), else 0. See head_lines."""
    if not line_end:
        line_end = head.find(b"\r\n", head_start(head, 0))
    start = line_end + 2  # where the first header line begins
    end = len(head) - 4  # where the last one's CRLF begins
    if start >= end:
        return []
    lines = head[start:end].split(b"\r\n")
    return [seen_request_raw_line(index, line) for index, line in enumerate(lines)]


class LineRun:
    """Request header lines at consecutive positions: those that were the same
    in every head learnt from (`raw` the lines joined, each with its CRLF;
    `seen` what they are), or one line that changed between two (raw b"")."""

    __slots__ = ("plain", "raw", "seen")

    def __init__(self, raw: bytes, seen: list[SeenRequestLine]) -> None:
        self.raw = raw
        self.seen = seen
        # No line llhttp reads more of than its syntax (see run_lines' unchecked).
        self.plain = all(_plain(line) for line in seen)


def _plain(line: SeenRequestLine) -> bool:
    """Whether llhttp reads nothing of `line` that changes how it reads an
    HTTP/1.1 request (its framing, its keep-alive, an upgrade): a name it does
    not read, or a Connection that only says keep-alive."""
    name = line.name
    if not name.parser_reads:
        return True
    keep_alive = name.lower == b"connection" or name.lower == b"proxy-connection"
    return keep_alive and line.header[1].lower() == b"keep-alive"


# The heads of one kind of client differ in a line or two (a user's id, a
# request's): the lines between are compared with one slice each, the others
# looked for. Learnt only from heads llhttp accepted (see learn_runs).
_RUNS: Final[list[LineRun]] = []
_LEARNT: Final[list[SeenRequestLine]] = []  # the lines of the head last learnt from
# The positions whose lines have changed, for heads of each number of lines:
# the lines of heads of another length (another kind of client) are not
# compared with them, nor are the positions where those differ taken as changing.
_CHANGING: Final[dict[int, set[int]]] = {}


def run_lines(head: bytes, line_end: int, unchecked: bool = False) -> list[SeenRequestLine] | None:
    """The header lines of `head`, a request head that llhttp accepted, that
    ends `head` and begins it (no empty line before its request line, whose
    CRLF is at `line_end`, see request_line_end, or 0 if not known), when they are
    the runs' lines in their places and any line in the places that change;
    else None. In an accepted head every CRLF ends a line and no line is
    empty: that a changing line ends where its CRLF is found is enough.

    `unchecked`: llhttp has not read `head` (its request line is one that
    plain_request_line_end accepts): its lines are read only if llhttp would
    accept them and read them as it read those learnt from, none of which
    frames a body or asks for an upgrade (see _plain, _read_alike); else None."""
    if not _RUNS or head[0] == 13 or head[0] == 10:  # empty lines first: not this way
        return None
    if not line_end:
        line_end = head.find(b"\r\n")
    start = line_end + 2
    end = len(head) - 2  # the empty line
    lines: list[SeenRequestLine] = []
    for run in _RUNS:
        raw = run.raw
        if raw:
            stop = start + len(raw)
            if head[start:stop] != raw or (unchecked and not run.plain):
                return None
            lines.extend(run.seen)
            start = stop
            continue
        index = len(lines)
        # As long as the line last seen here (a user's id, a request's: often),
        # and holding no CR: then its CRLF is the one after it.
        stop = start
        if index < len(_SEEN_REQUEST_LINES):
            stop += len(_SEEN_REQUEST_LINES[index].line)
        line = head[start:stop]
        if head[stop : stop + 2] != b"\r\n" or 13 in line:  # (an int: a bytes needle costs more)
            stop = head.find(b"\r\n", start)
            line = head[start:stop]
        if stop <= start or stop >= end:  # the empty line, or none: fewer lines than the runs
            return None
        if unchecked and not _read_alike(index, line):
            return None
        lines.append(seen_request_raw_line(index, line))
        start = stop + 2
    return lines if start == end else None


def _read_alike(index: int, line: bytes) -> bool:
    """Whether llhttp would accept the header line `line` at `index` of a head
    it has not read, and read nothing in it (see _plain): the name of the line
    last seen there (one it accepted) and not one it reads, and a value of
    VALUE_BYTES (with its spaces and tabs around it, which llhttp keeps at
    its end, as header_field does). The very line last seen there was read so
    or accepted by llhttp: a position where heads of several kinds of client
    differ changes for good (see learn_runs), though its line seldom does."""
    if index >= len(_SEEN_REQUEST_LINES):
        return False
    seen = _SEEN_REQUEST_LINES[index]
    if seen.name.parser_reads:
        return False
    if seen.line == line:
        return True
    raw_name = seen.header[0]
    size = len(raw_name)
    if len(line) <= size or line[size] != 58:  # 58: ":"
        return False
    return line[:size] == raw_name and _in_table_until(line, size + 1, VALUE_TABLE) == len(line)


def _in_table_until(data: bytes, start: int, table: bytes) -> int:
    """Where the first byte of `data` from `start` on that `table` leaves out
    is (len(data) if none): a loop compiled to C, cheaper on a few dozen bytes
    than a call of bytes.translate."""
    end = len(data)
    while start < end and table[data[start]]:
        start += 1
    return start


def plain_request_line_end(read: bytes) -> int:
    """Where the request line that starts `read` ends (its CRLF) when it asks
    for a GET or a HEAD of a path of TARGET_BYTES over HTTP/1.1: llhttp would
    accept it, and nothing in it announces a body or an upgrade (only header
    lines could). 0 otherwise."""
    last = _PLAIN_LINE[0]
    if read.startswith(last):  # as it was: the same page, asked for again
        return len(last) - 2
    if read.startswith(b"GET /"):
        start = 5
    elif read.startswith(b"HEAD /"):
        start = 6
    else:
        return 0
    end = _in_table_until(read, start, TARGET_TABLE)
    if read[end : end + 11] != b" HTTP/1.1\r\n":
        return 0
    _PLAIN_LINE[0] = read[: end + 11]
    return end + 9


# The request line plain_request_line_end last accepted, with its CRLF.
_PLAIN_LINE: Final = [b"GET / HTTP/1.1\r\n"]


def learn_runs(lines: list[SeenRequestLine]) -> None:
    """Learn the runs from the lines of a head llhttp accepted (read by
    seen_lines): a position whose line differs from the last head's changes
    from then on."""
    if len(lines) > MAX_SEEN_LINES:
        return
    changing = _CHANGING.setdefault(len(lines), set())
    if len(lines) == len(_LEARNT):
        for index, line in enumerate(lines):
            if line is not _LEARNT[index]:  # seen_request_raw_line made it anew
                changing.add(index)
    _LEARNT[:] = lines
    _RUNS.clear()
    same: list[SeenRequestLine] = []
    for index, line in enumerate(lines):
        if index in changing:
            if same:
                _RUNS.append(_joined_run(same))
                same = []
            _RUNS.append(LineRun(b"", []))
        else:
            same.append(line)
    if same:
        _RUNS.append(_joined_run(same))


def _joined_run(seen: list[SeenRequestLine]) -> LineRun:
    return LineRun(b"".join([line.line + b"\r\n" for line in seen]), seen)


class RequestHead:
    """A checked request head: what routing reads and what is forwarded."""

    __slots__ = (
        "_forwarded",
        "_http10",
        "_lines",
        "_underscores",
        "chunked",
        "content_length",
        "headers",
        "host",
        "unchanged",
        "want_continue",
    )

    def __init__(
        self, lines: list[SeenRequestLine], http10: bool, underscores: str = UNDERSCORES_DROP
    ) -> None:
        self._lines = lines
        self._http10 = http10
        self._underscores = underscores
        if _LAST_HEAD and self._read_as(_LAST_HEAD[0]):
            return
        self.headers: dict[str, str] = {}  # lower-case name -> value, repeats joined
        self.chunked = False
        self.want_continue = False
        host: str | None = None
        dropped = NOTHING  # what Connection names beyond HOP_BY_HOP
        forwarded: list[Header] | None = None  # None while every line so far is passed on
        headers = self.headers
        for index, line in enumerate(lines):
            name = line.name
            text = line.text
            key = name.key
            if name.request_checked:
                raw_value = line.header[1]
                if name.underscore:
                    if underscores == UNDERSCORES_DROP:
                        if forwarded is None:
                            forwarded = [kept.header for kept in lines[:index]]
                        continue  # neither routed on nor passed on
                    if underscores == UNDERSCORES_REJECT:
                        raise errors.BadRequest(f"header name with an underscore: {key}")
                elif key == "host":
                    host = check_host(text, host)
                elif key == "transfer-encoding":
                    self.chunked = check_transfer_encoding(raw_value, key in headers)
                elif key == "connection":
                    dropped = add_connection_options(dropped, raw_value)
                elif raw_value.lower() == b"100-continue":
                    self.want_continue = True
            if key in headers:
                headers[key] += ("; " if key == "cookie" else ", ") + text
            else:
                headers[key] = text
            if not name.forwarded:
                if forwarded is None:
                    forwarded = [kept.header for kept in lines[:index]]
            elif forwarded is not None:
                forwarded.append(line.header)
        self._forwarded = forwarded
        self.unchanged = forwarded is None and not dropped
        if dropped:
            self._forwarded = without_listed(self.forwarded, dropped)
        if host is None and not http10:
            raise errors.BadRequest("missing Host header")
        self.host = host or ""
        length = headers.get("content-length")
        if length is not None and length[0] == "0" and len(length) > 1:
            length = str(int(length))  # leading zeros: some parsers count digits
        self.content_length = length
        if self.unchanged and len(headers) == len(lines):  # no line dropped, no name repeated
            if _LAST_HEAD:
                _LAST_HEAD[0] = self
            else:
                _LAST_HEAD.append(self)

    def _read_as(self, last: RequestHead) -> bool:
        """Read the head as `last` was read, and say so, when their lines
        differ only in the values of lines that are passed on as they are and
        that no check reads (a user's id, a request's): then so do their
        headers, and nothing else."""
        lines = self._lines
        before = last._lines
        count = len(lines)
        if count != len(before) or self._http10 != last._http10:
            return False
        if self._underscores != last._underscores:
            return False
        for index in range(count):
            line = lines[index]
            if line is not before[index]:
                name = line.name
                if name is not before[index].name or name.request_checked or not name.forwarded:
                    return False
        headers = self.headers = last.headers.copy()
        for index in range(count):
            line = lines[index]
            if line is not before[index]:
                headers[line.name.key] = line.text
        self._forwarded = None
        self.unchanged = True
        self.host = last.host
        self.chunked = last.chunked
        self.want_continue = last.want_continue
        self.content_length = last.content_length
        return True

    @property
    def forwarded(self) -> list[Header]:
        """The header lines to pass on, as received (all of them, unchanged, is
        the common case, and then this list is made only when asked for)."""
        if self._forwarded is None:
            return [line.header for line in self._lines]
        return self._forwarded

    def drop(self, key: str) -> None:
        """Pass on no line named `key` (lower-case)."""
        self._forwarded = [h for h in self.forwarded if header_name(h[0]).key != key]
        self.unchanged = False


# The last head read in full whose lines all pass on unchanged, none twice.
_LAST_HEAD: Final[list[RequestHead]] = []


def request_head(
    raw_headers: list[Header], http10: bool, underscores: str = UNDERSCORES_DROP
) -> RequestHead:
    """The checked head whose header lines are these (name, value) pairs."""
    return RequestHead(seen_headers(raw_headers), http10, underscores)


# Hosts already found valid, with the X-Forwarded-Host line each is sent
# upstream with: the same few arrive on every request. Bounded like _NAMES.
_HOST_LINES: Final[dict[str, bytes]] = {}


def check_host(value: str, seen: str | None) -> str:
    if seen is not None or "," in value:
        raise errors.BadRequest("more than one Host")
    if value in _HOST_LINES:
        return value
    if VALID_HOST.fullmatch(value) is None:
        raise errors.BadRequest("invalid Host")
    if len(_HOST_LINES) >= MAX_CACHED_NAMES:
        _HOST_LINES.clear()
    _HOST_LINES[value] = _forwarded_host(value)
    return value


def forwarded_host_line(host: str) -> bytes:
    line = _HOST_LINES.get(host)
    return line if line is not None else _forwarded_host(host)


def _forwarded_host(host: str) -> bytes:
    return b"x-forwarded-host: " + host.encode("latin-1") + b"\r\n"


def check_transfer_encoding(value: bytes, repeated: bool) -> bool:
    """Only exactly `chunked` is accepted; True when it is. A final coding other
    than chunked leaves the body's end unknown (RFC 9112 §6.3): 400; chunked
    after a coding the proxy does not decode: 501."""
    codings = [c.strip().lower() for c in value.split(b",")]
    if repeated or b"" in codings or codings[-1] != b"chunked":
        raise errors.BadRequest("malformed Transfer-Encoding: the final coding must be chunked")
    if len(codings) > 1:
        raise errors.UnsupportedTransferCoding("only the chunked transfer coding is supported")
    return True


# Connection values already split, and what each names beyond HOP_BY_HOP (and
# "close"): nearly always "keep-alive" or "close", so nothing. Bounded like _NAMES.
_CONNECTION_OPTIONS: Final[dict[bytes, frozenset[bytes]]] = {}
NOT_HEADER_NAMES: Final = HOP_BY_HOP | PROTECTED | {b"close"}


def add_connection_options(dropped: frozenset[bytes], value: bytes) -> frozenset[bytes]:
    """`dropped` plus the header names a Connection value lists as hop-by-hop,
    lower-case, besides those always dropped and those it may not drop
    (PROTECTED); `dropped` itself when none."""
    options = _CONNECTION_OPTIONS.get(value)
    if options is None:
        options = frozenset(t.strip().lower() for t in value.split(b",")) - NOT_HEADER_NAMES
        if len(_CONNECTION_OPTIONS) >= MAX_CACHED_NAMES:
            _CONNECTION_OPTIONS.clear()
        _CONNECTION_OPTIONS[value] = options
    return dropped | options if options else dropped


def without_listed(headers: list[Header], dropped: frozenset[bytes]) -> list[Header]:
    """Drop the headers that `Connection` names as hop-by-hop."""
    return [h for h in headers if header_name(h[0]).lower not in dropped]


def tunnelled_upgrade(method: bytes, head: RequestHead, http10: bool) -> bytes | None:
    """For a request whose head asks for an upgrade (Connection: upgrade and an
    Upgrade header): the Upgrade to pass on and tunnel after a 101, or None to
    serve it as plain HTTP/1.1 without one. Only a WebSocket handshake, a GET
    without a body, is tunnelled. An upgrade request with a body is refused:
    the parser stops at an upgrade head, so its body would be bytes the proxy
    never framed."""
    if head.chunked or (head.content_length is not None and int(head.content_length) > 0):
        raise errors.BadRequest("an Upgrade request may not carry a body")
    upgrade = head.headers.get("upgrade", "").strip()
    if method == b"GET" and not http10 and upgrade.lower() == "websocket":
        return upgrade.encode("latin-1")
    return None


def open_chunk_size(earlier: bytes, read: bytes, data_after: int) -> int | None:
    """The size declared by the chunk whose size line the parser accepted in
    `read` and whose data, `data_after` bytes of it so far, runs to the end of
    `read`; `earlier` holds the bytes before `read` (the size line may begin
    there). None when the bytes there are no size line: `read` ends in the last
    chunk's trailers or in the CR after a chunk's whole data, so the size is 0
    or `data_after`. llhttp only refuses sizes past 64 bits and hands out none."""
    end = len(read) - data_after - 2  # where the size line's CRLF begins
    start = read.rfind(b"\n", 0, max(end, 0)) + 1
    if start == 0:  # the line began in an earlier read
        read = earlier + read
        end += len(earlier)
        start = read.rfind(b"\n", 0, max(end, 0)) + 1
        if start == 0 and end >= MAX_CHUNK_LINE:
            raise errors.BadRequest("chunk-size line too long")
    if end < start or read[end : end + 2] != b"\r\n":
        return None
    try:
        return int(read[start:end].partition(b";")[0], 16)
    except ValueError:  # a trailer line
        return None


def origin_form(url: bytes, host: str, method: bytes) -> bytes:
    """The request target to forward; absolute-form only for the same host."""
    if url.startswith(b"/"):
        return url
    if url[:8].lower().startswith((b"http://", b"https://")):
        authority, slash, path = url.split(b"://", 1)[1].partition(b"/")
        if authority.decode("latin-1").lower() != host.lower():
            raise errors.BadRequest("absolute-form target names another host")
        return slash + path if slash else b"/"
    if url == b"*" and method == b"OPTIONS":
        return url
    raise errors.BadRequest("invalid request target")


def request_line_end(read: bytes, method: bytes, url: bytes) -> int:
    """Where the request line ends when `read`, the read a message began with,
    starts with exactly `method SP url SP "HTTP/1.1" CRLF`; 0 otherwise.

    That read came on an idle connection, but an earlier read may have left
    the first bytes of the method in the parser: the read must start with the
    whole method. A request line holds no CR or LF, so the CRLF found where
    such a line would end is the line's own: with more spaces, leading empty
    lines, a URL split across reads or another version, the bytes there differ
    and the answer is 0."""
    end = len(method) + len(url) + 10
    if read[end - 9 : end + 2] == b" HTTP/1.1\r\n" and read.startswith(method):
        return end
    return 0


def verbatim_head(read: bytes, line_end: int) -> bytes:
    """The request line and header lines of a message whose request line ends
    at `line_end` of `read` (see request_line_end), as received, each ending in
    CRLF, when the whole head is in `read`; b"" otherwise. Sending them on as
    they are saves rebuilding the head from a piece per name, separator and
    value when nothing changes."""
    if not line_end:
        return b""
    end = read.find(b"\r\n\r\n", line_end)  # the head's first empty line
    return read[: end + 2] if end > 0 else b""


def forwarded_for_lines(client_ip: str, proto: bytes = b"http") -> bytes:
    """X-Forwarded-For and -Proto for a client that sent no X-Forwarded-For:
    the same for every request of a connection, so built once per connection.
    `proto` is the scheme the client used: b"https" on a TLS listener."""
    return (
        b"x-forwarded-for: "
        + client_ip.encode("latin-1")
        + b"\r\nx-forwarded-proto: "
        + proto
        + b"\r\n"
    )


def upstream_head(
    method: bytes,
    target: bytes,
    head: RequestHead,
    forwarded_for: bytes,
    upgrade: bytes | None,
    verbatim: bytes = b"",
    request_id: bytes = b"",
) -> bytes:
    """The request head sent upstream, framed for the body as received;
    `forwarded_for` is forwarded_for_lines(the client's address). `verbatim`,
    if given, is the request line and header lines as received, to be sent as
    they are: only when `head.unchanged`, the target is in origin form and the
    request line says HTTP/1.1. `request_id`, if given, is an x-request-id
    line to add (one the proxy made)."""
    if verbatim:
        # The head passes on unchanged: it has no X-Forwarded-For to extend, no
        # Content-Length or Transfer-Encoding to frame, no Upgrade to pass on.
        host = forwarded_host_line(head.host) if head.host else b""
        return b"".join((verbatim, forwarded_for, host, request_id, b"\r\n"))
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    if "host" not in head.headers:  # HTTP/1.0 may omit it, HTTP/1.1 may not (RFC 9112 §3.2)
        parts.append(b"host: \r\n")
    append_lines(parts, head.forwarded)
    xff = head.headers.get("x-forwarded-for")
    if xff:  # extend the client's list
        parts.append(b"x-forwarded-for: " + xff.encode("latin-1") + b", ")
        parts.append(forwarded_for[len(b"x-forwarded-for: ") :])
    else:
        parts.append(forwarded_for)
    if head.host:
        parts.append(forwarded_host_line(head.host))
    if request_id:
        parts.append(request_id)
    if upgrade:
        parts.append(b"connection: upgrade\r\nupgrade: " + upgrade + b"\r\n")
    if head.chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif head.content_length is not None:
        parts.append(b"content-length: " + head.content_length.encode() + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def append_lines(parts: list[bytes], headers: list[Header]) -> None:
    """Header lines as pieces of one b"".join: no bytes built per line."""
    for name, value in headers:
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")


def head_lines(raw: bytes, start: int) -> tuple[list[bytes], int]:
    """The lines of the head that llhttp accepted at `start` of `raw`, each
    without its CRLF, the start line first, and the offset just past the head.
    Empty lines before the start line, which llhttp skips, are skipped. A head
    llhttp accepted ends at its first empty line, and no line of it holds a CR
    or an LF: splitting on CRLF gives back the lines llhttp read."""
    start = head_start(raw, start)
    end = raw.find(b"\r\n\r\n", start)
    return raw[start:end].split(b"\r\n"), end + 4


def head_start(raw: bytes, start: int) -> int:
    """Where the head at `start` of `raw` begins: past the empty lines that
    llhttp skips before a start line."""
    while raw[start] == 13 or raw[start] == 10:  # CR, LF
        start += 1
    return start


def header_field(line: bytes) -> Header:
    """(name, value) of a header line llhttp accepted, as its callbacks give
    them: the value without the spaces and tabs after the colon, with any at
    its end."""
    colon = line.find(b":")
    return line[:colon], line[value_start(line, colon + 1) :]


def value_start(line: bytes, start: int) -> int:
    """Where the value of a header line begins, its colon ending at `start`."""
    end = len(line)
    while start < end and (line[start] == 32 or line[start] == 9):  # SP, HT
        start += 1
    return start


def response_lines(status: int, lines: list[bytes]) -> tuple[list[bytes], bytes | None, bytes]:
    """The status line and the end-to-end header lines of an upstream response
    whose header `lines` (head_lines' after the status line) are given, as
    pieces to join, its Content-Length (None if absent) and its Upgrade."""
    parts = [status_line(status)]
    length: bytes | None = None
    upgrade = b""
    dropped = NOTHING
    for index, line in enumerate(lines):
        seen = seen_response_line(index, line)
        key = seen.key
        if not key:
            parts.append(seen.line)
        elif key == "content-length":
            length = seen.value
        elif key == "upgrade":
            upgrade = seen.value
        elif key == "connection":
            dropped = add_connection_options(dropped, seen.value)
    if dropped:  # rare: Connection lists end-to-end names; build the lines again without them
        fields = [header_field(line) for line in lines]
        kept = [h for h in fields if not header_name(h[0]).response_checked]
        parts = [parts[0]]
        append_lines(parts, without_listed(kept, dropped))
    return parts, length, upgrade


class ResponseHead:
    """An upstream response head as received (`raw`, from its status line to
    its empty line), and what the proxy makes of it (response_lines'): the
    status line and end-to-end lines joined (`start`), Content-Length and
    Upgrade."""

    __slots__ = (
        "_extra",
        "_framed_as",
        "_framing",
        "close",
        "length",
        "raw",
        "start",
        "status",
        "upgrade",
        "whole",
    )

    def __init__(self, raw: bytes, status: int) -> None:
        self.raw = raw
        self.status = status
        parts, self.length, self.upgrade = response_lines(status, self.header_lines())
        self.start = b"".join(parts)
        self.close = False  # llhttp's word: the connection ends with the response
        # The framing last made for a client (see framed): the same head is
        # framed alike response after response.
        self._framed_as = -1
        self._extra = b""
        self._framing: tuple[bytes, bool, bool] = (b"", False, False)
        # The size of a response that is this head and the body its Content-Length
        # frames (llhttp refuses a Transfer-Encoding beside it); -1 if it has no
        # such body: 1xx, 204, 304, or no Content-Length. See whole_response.
        self.whole = -1
        if self.length is not None and status >= 200 and status != 204 and status != 304:
            self.whole = len(raw) + int(self.length)

    def header_lines(self) -> list[bytes]:
        return self.raw[:-4].split(b"\r\n")[1:]  # (no empty line before the status line)

    def framed(
        self, own: bytes, bodyless: bool, http10: bool, close: bool, extra: bytes
    ) -> tuple[bytes, bool, bool]:
        """The head for the client, with the proxy's `own` lines after the
        upstream's (its request id, its decision), framed by response_framing:
        (the head, whether the body is re-chunked, whether the connection
        closes after it)."""
        framed_as = bodyless + 2 * http10 + 4 * close
        if framed_as != self._framed_as or extra != self._extra:
            self._framing = response_framing(self.length, bodyless, http10, close, extra)
            self._framed_as, self._extra = framed_as, extra
        end, chunked, closes = self._framing
        return self.start + own + end, chunked, closes


# The head last read: an upstream answers the same request with the same head
# again and again but for its Date, which changes once a second. A head equal
# to it costs one comparison, where another is split into lines.
_LAST_RESPONSE: Final[list[ResponseHead]] = []


def response_head(raw: bytes, start: int, status: int) -> tuple[ResponseHead, int]:
    """The response head that llhttp accepted, with `status`, at `start` of
    `raw`, and the offset just past it."""
    if _LAST_RESPONSE:
        last = _LAST_RESPONSE[0]
        end = start + len(last.raw)
        if raw[start:end] == last.raw:
            return last, end
    start = head_start(raw, start)
    end = raw.find(b"\r\n\r\n", start) + 4
    head = ResponseHead(raw[start:end], status)
    if _LAST_RESPONSE:
        _LAST_RESPONSE[0] = head
    else:
        _LAST_RESPONSE.append(head)
    return head, end


def whole_response(read: bytes) -> ResponseHead | None:
    """The response head last read (see response_head), read again, when
    `read` is exactly that head and the body its Content-Length frames: llhttp
    would read it as it read the head then, and then the body, whatever its
    bytes. None otherwise."""
    if _LAST_RESPONSE:
        last = _LAST_RESPONSE[0]
        if len(read) == last.whole and read.startswith(last.raw):
            return last
    return None


class SeenResponseLine:
    """A response header line as last seen at one position of a response head,
    and what it becomes: the lower-case name and the value when the proxy reads
    or drops it (CHECKED_RESPONSE_HEADERS), else "" and the line to pass on."""

    __slots__ = ("key", "line", "raw", "value")

    def __init__(self) -> None:
        self.raw = self.line = self.value = b""
        self.key = ""


# As _SEEN_REQUEST, for the upstreams' responses: the same lines, mostly, in
# the same order (a changing Date or ETag is built again).
_SEEN_RESPONSE: Final[list[SeenResponseLine]] = []


def seen_response_line(index: int, raw: bytes) -> SeenResponseLine:
    """What is known of the header line `raw` at `index` of a response head."""
    if index < len(_SEEN_RESPONSE):
        seen = _SEEN_RESPONSE[index]
        if seen.raw == raw:
            return seen
    else:
        seen = SeenResponseLine()
        if index < MAX_SEEN_LINES:
            _SEEN_RESPONSE.append(seen)
    seen.raw = raw
    raw_name, raw_value = header_field(raw)
    checked = _may_be_checked(raw_name) and header_name(raw_name).response_checked
    seen.key = header_name(raw_name).key if checked else ""
    seen.value = raw_value if checked else b""
    seen.line = b"" if checked else b"".join((raw_name, b": ", raw_value, b"\r\n"))
    return seen


def _may_be_checked(raw_name: bytes) -> bool:
    """Whether a response header name is as long as one the proxy checks (most
    are not); of those as long as X-Request-Id, only those starting with an x."""
    size = len(raw_name)
    if size >= 63 or not (CHECKED_RESPONSE_LENGTHS >> size) & 1:
        return False
    return size != REQUEST_ID_LENGTH or raw_name[0] | 0x20 == 0x78


def response_framing(
    length: bytes | None, bodyless: bool, http10: bool, close: bool, extra: bytes
) -> tuple[bytes, bool, bool]:
    """The end of a response head for the client, after the upstream's lines
    and the proxy's own: the framing for `length` (response_lines'), the
    `extra` header lines, Connection and the empty line; (those bytes, whether
    the body is re-chunked, whether the connection closes after it). A body of
    unknown length is chunked for HTTP/1.1 and ends with the connection for
    HTTP/1.0."""
    lines = []
    chunked = False
    if length is not None:
        lines.append(b"content-length: " + length + b"\r\n")
    elif not bodyless:
        if http10:
            close = True
        else:
            chunked = True
            lines.append(b"transfer-encoding: chunked\r\n")
    lines.append(extra)
    if close:
        lines.append(b"connection: close\r\n")
    elif http10:
        lines.append(b"connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), chunked, close


def error_response(
    status: int, detail: str, extra: bytes, close: bool, head_request: bool
) -> bytes:
    """A response of the proxy's own: the status and a line of plain text saying why."""
    body = f"{status} {errors.REASONS.get(status, 'Error')}: {detail}\n".encode()
    lines = [
        status_line(status),
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(body),
        extra,
    ]
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    if not head_request:
        lines.append(body)
    return b"".join(lines)
