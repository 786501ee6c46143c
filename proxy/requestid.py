"""Request ids: the client's `x-request-id` when it is fit to pass on, else a new one.

A made id is 32 hex digits: a random 64-bit prefix drawn once per process
(each worker is a process of its own) and a 64-bit counter that starts at a
random value below 2**48 (so that it stays a machine-word integer: compiled, a
count past 2**62 would be a heap-allocated int on every request). Two ids can
only be equal if two processes drew the same prefix: with P processes started
over the proxy's whole life, that chance is below P**2 / 2**65 (for a million
process starts, 3 in 100 million). No system call per request (not
os.urandom, not uuid4): an id costs an increment, a mask, a tuple index and
one bytes concatenation, because the counter's low 12 bits come from a table
of 4,096 precomputed endings and the rest of the line is rebuilt once per
4,096 ids.

The id travels as a whole header line, `x-request-id: ID\\r\\n`, since that is
what the upstream head and the response heads need; the access log slices the
id out of it (see `id_of`).
"""

from __future__ import annotations

import os
from typing import Final

HEADER: Final = b"x-request-id: "
HEADER_KEY: Final = "x-request-id"
MAX_CLIENT_ID: Final = 200  # bytes; a longer client id is replaced by a made one
_LOW_BITS: Final = 12
_LOW_MASK: Final = (1 << _LOW_BITS) - 1
# The last three hex digits of an id and the line's end, for each value of its low 12 bits.
_ENDINGS: Final = tuple(b"%03x\r\n" % low for low in range(1 << _LOW_BITS))


class RequestIds:
    """Makes request id lines: unique per process by the counter, across
    processes by the random prefix."""

    __slots__ = ("_block", "_next", "prefix")

    def __init__(self, prefix: int | None = None, start: int | None = None) -> None:
        self.prefix = int.from_bytes(os.urandom(8), "big") if prefix is None else prefix
        self._next = int.from_bytes(os.urandom(6), "big") if start is None else start
        self._block = b""
        if self._next & _LOW_MASK:
            self._block = self._block_line(self._next)

    def __repr__(self) -> str:
        return f"<RequestIds prefix={self.prefix:016x} next={self._next:016x}>"

    def next_line(self) -> bytes:
        """The next id as a header line: `x-request-id: <32 hex digits>\\r\\n`."""
        count = self._next
        self._next = count + 1
        low = count & _LOW_MASK
        if not low:
            self._block = self._block_line(count)
        return self._block + _ENDINGS[low]

    def _block_line(self, count: int) -> bytes:
        """The line up to the id's last three hex digits, for this block of 4,096."""
        high = (count >> _LOW_BITS) & ((1 << (64 - _LOW_BITS)) - 1)
        return HEADER + b"%016x%013x" % (self.prefix, high)


def client_id_line(value: str | None) -> bytes:
    """The header line for a client's x-request-id value (as the request head
    joined it: several lines arrive as one value with ", "), or b"" when there
    is none or it must be replaced: empty, over MAX_CLIENT_ID bytes, or holding
    anything but visible ASCII (so also a repeated header). Envoy likewise
    replaces an id it cannot use."""
    if value is None or not value or len(value) > MAX_CLIENT_ID:
        return b""
    if not (value.isascii() and value.isprintable()) or " " in value:
        return b""
    return HEADER + value.encode("ascii") + b"\r\n"


def id_of(line: bytes) -> str:
    """The id in a line made by RequestIds.next_line or client_id_line."""
    return line[len(HEADER) : -2].decode("ascii")


# This process's ids. Workers are started with exec, never forked, so each
# draws its own prefix.
IDS: Final = RequestIds()
