"""The access log: one JSON object per line per request, written off the event loop.

The data path builds a line (`format_line`) only when the log is on, when an
exchange ends, and hands it to its process's `LogWriter`. On the event loop a
line is only appended to a list. The data plane's ticker (every 100 ms, see
dataplane.TICK) hands the list over to a writer thread through a queue, and
the thread writes each batch with one write() call: the event loop never
waits for the disk, no timer is armed per line or per batch, and the disk
sees ten writes a second at most, not one per request. A line reaches the
file within about 100 ms (nginx's buffered log waits up to its `flush` time).

Bounded: lines not yet written (gathered, queued or being written) may hold
at most MAX_PENDING_CHARS characters (8 MiB, some 30,000 lines). A line that
would go past that is dropped and counted, not kept: a stalled disk costs
lines, never the proxy's memory. Drops are reported in the proxy's log, at
most every DROP_REPORT_EVERY seconds.

Each worker process has its own writer and its own file descriptor, opened
with O_APPEND. A write() to a regular file opened so appends atomically: the
file's end is found and written to under the inode's lock, so the batches of
two workers never interleave, whatever their size (POSIX requires the
positioning to be atomic; Linux's local filesystems hold the lock for the
whole write. NFS does not give O_APPEND this guarantee). Every batch is whole
lines, so lines never tear. PIPE_BUF is about pipes: when the log goes to
stdout and stdout is a pipe (or a socket or a terminal), a batch is cut into
writes of at most PIPE_BUF bytes at line ends, which a pipe keeps whole; only a
single line longer than PIPE_BUF (4 KiB: a very long URL) may then interleave
with another worker's.

`reopen` (SIGUSR1) has the thread open the path again, for log rotation: the
lines handed over before it go to the old file, those after to the new one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import stat
import threading
import time
from json.encoder import encode_basestring_ascii
from typing import Final

log = logging.getLogger("grayproxy")

STDOUT: Final = "-"
MAX_PENDING_CHARS: Final = 8 * 1024 * 1024
DROP_REPORT_EVERY: Final = 10.0  # seconds
OPEN_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC

# What the writer thread is asked to do: write these lines, (re)open this path, stop.
Job = list[str] | str | None


class LogWriter:
    """One process's access log. `write` and the rest are called on the event
    loop, `flush` by its ticker; the file is opened, written and closed by the
    writer thread."""

    __slots__ = (
        "_buffered",
        "_fd",
        "_handed",
        "_lines",
        "_lost",
        "_max_pending",
        "_pipe",
        "_queue",
        "_reported",
        "_reported_at",
        "_writer_thread",
        "_written",
        "dropped",
        "path",
        "wall_offset",
    )

    def __init__(self, path: str, max_pending: int = MAX_PENDING_CHARS) -> None:
        self.path = path
        self._max_pending = max_pending
        self.dropped = 0  # lines not taken: the buffer was full
        self._lines: list[str] = []  # gathered since the last hand-over
        self._buffered = 0  # characters in _lines
        self._handed = 0  # characters handed to the thread (counted on the loop)
        self._written = 0  # characters the thread is done with (counted by the thread)
        self._lost = 0  # lines the thread could not write (counted by the thread)
        self._reported = 0  # dropped + lost, as last reported in the proxy's log
        self._reported_at = 0.0
        # time.time() - time.monotonic(), as of the last flush: the lines' times
        # come from the exchanges' monotonic start, without a clock call each.
        self.wall_offset = time.time() - time.monotonic()
        self._fd = -1  # the thread's: -1 while no file is open
        self._pipe = False
        self._queue: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._queue.put(path)
        self._writer_thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._writer_thread.start()

    def __repr__(self) -> str:
        pending = self._handed - self._written + self._buffered
        return f"<LogWriter {self.path} [{pending} chars pending | {self.dropped} dropped]>"

    # -- on the event loop -------------------------------------------------
    def write(self, line: str) -> None:
        """Take one line (ending in a newline), or count it dropped when the
        lines not yet written already hold MAX_PENDING_CHARS characters."""
        size = len(line)
        if self._handed - self._written + self._buffered + size > self._max_pending:
            self.dropped += 1
            return
        self._lines.append(line)
        self._buffered += size

    def flush(self) -> None:
        """Hand the lines gathered so far to the writer thread (the ticker calls it)."""
        self.wall_offset = time.time() - time.monotonic()
        if self._lines:
            self._queue.put(self._lines)
            self._lines = []
            self._handed += self._buffered
            self._buffered = 0
        if self.dropped + self._lost > self._reported:
            self._report_drops()

    def reopen(self) -> None:
        """Open the file again (after log rotation moved it): SIGUSR1."""
        self.flush()
        self._queue.put(self.path)

    def move_to(self, path: str) -> None:
        """Write to another path from now on (a reload changed it)."""
        self.flush()
        self.path = path
        self._queue.put(path)

    def close(self) -> None:
        """Write what is left, then close the file and end the thread."""
        self.flush()
        self._queue.put(None)

    def join(self, timeout: float) -> None:
        """Wait for the thread to end after `close` (blocks: call it in a thread)."""
        self._writer_thread.join(timeout)

    def _report_drops(self) -> None:
        now = time.monotonic()
        if now - self._reported_at < DROP_REPORT_EVERY:
            return
        total = self.dropped + self._lost
        log.warning(
            "access log %s: %d lines dropped so far (writes fell %d KiB behind, or failed)",
            self.path,
            total,
            self._max_pending // 1024,
        )
        self._reported = total
        self._reported_at = now

    # -- in the writer thread ------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                self._close_fd()
                return
            if isinstance(job, str):
                self._open(job)
            else:
                self._write_lines(job)

    def _open(self, path: str) -> None:
        try:
            fd = 1 if path == STDOUT else os.open(path, OPEN_FLAGS, 0o644)
            pipe = not stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError as exc:
            kept = "keeps writing to the file it had" if self._fd >= 0 else "drops its lines"
            log.error(
                "access log: cannot open %s: %s; it %s until a reopen (SIGUSR1) or a reload",
                path,
                exc.strerror or exc,
                kept,
            )
            return
        self._close_fd()
        self._fd = fd
        self._pipe = pipe

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd > 2:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _write_lines(self, lines: list[str]) -> None:
        text = "".join(lines)
        try:
            if self._fd < 0:
                self._lost += len(lines)
            elif self._pipe:
                for piece in pipe_pieces(text.encode(), select.PIPE_BUF):
                    write_all(self._fd, piece)
            else:
                write_all(self._fd, text.encode())
        except OSError as exc:
            self._lost += len(lines)
            log.error("access log %s: write failed: %s", self.path, exc.strerror or exc)
        self._written += len(text)


def write_all(fd: int, data: bytes) -> None:
    """write() until all of `data` is written: one call unless the kernel
    takes less (a full disk, a signal, a pipe's limit)."""
    view = memoryview(data)
    while len(view):
        # Not view[os.write(...):]: compiled, mypyc evaluates a slice's bound twice.
        written = os.write(fd, view)
        view = view[written:]


def pipe_pieces(data: bytes, limit: int) -> list[bytes]:
    """`data` (whole lines) cut at line ends into pieces of at most `limit`
    bytes, but for a single line longer than that, which is a piece alone."""
    pieces = []
    start = 0
    while len(data) - start > limit:
        cut = data.rfind(b"\n", start, start + limit)
        if cut < 0:  # one line longer than limit
            cut = data.find(b"\n", start + limit)
            if cut < 0:
                break
        pieces.append(data[start : cut + 1])
        start = cut + 1
    if start < len(data):
        pieces.append(data[start:])
    return pieces


# -- the line -------------------------------------------------------------------------------
# Built with one f-string, from pieces that mostly exist already: what repeats
# (names, decisions, addresses, methods) is escaped once and remembered, the
# timestamp's date and time of day are formatted once per second, and numbers
# with three decimals are an integer and a piece from a table. Only the request
# id and the path are new text to escape on every line.

_escape: Final = encode_basestring_ascii  # a C function: str -> quoted JSON, ASCII only
_DOT_DIGITS: Final = tuple(f".{n:03d}" for n in range(1000))
_NUMBERS: Final = tuple(str(n) for n in range(1000))  # statuses, among others
NO_NAMES: Final = '"service":null,"version":null'
_QUOTED: Final[dict[str, str]] = {}
_METHODS: Final[dict[bytes, str]] = {}
MAX_QUOTED: Final = 4096


def quoted(text: str | None) -> str:
    """`text` as a JSON string of ASCII characters only, or null; remembered."""
    if text is None:
        return "null"
    json = _QUOTED.get(text)
    if json is None:
        if len(_QUOTED) >= MAX_QUOTED:  # many distinct values (client addresses): start over
            _QUOTED.clear()
        json = _QUOTED[text] = _escape(text)
    return json


def quoted_method(method: bytes) -> str:
    """A request method (b"" when none was read) as a JSON string, or null; remembered."""
    if method == b"GET":  # most of them: saves hashing the bytes
        return '"GET"'
    if not method:
        return "null"
    json = _METHODS.get(method)
    if json is None:
        if len(_METHODS) >= MAX_QUOTED:
            _METHODS.clear()
        json = _METHODS[method] = _escape(method.decode("latin-1"))
    return json


def names_json(service: str, version: str) -> str:
    """The service and version fields of a line, for plan.VersionTarget to keep."""
    return f'"service":{_escape(service)},"version":{_escape(version)}'


class _Stamps:
    """The date and time of day of RFC 3339 UTC timestamps, formatted once per second."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def seconds(self, second: int) -> str:
        """`2026-11-30T23:30:00` for a whole time.time() second."""
        if second != self.second:
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self.second = second
        return self.prefix


_STAMPS: Final = _Stamps()


def timestamp(when: float) -> str:
    """`2026-11-30T23:30:00.123Z` for a time.time() value (as in format_line)."""
    second = int(when)
    return f"{_STAMPS.seconds(second)}{_DOT_DIGITS[int((when - second) * 1000)]}Z"


def format_line(
    started: float,
    request_id: str,
    client_json: str,
    method_json: str,
    path: str | None,
    status: int,
    bytes_sent: int,
    duration: float,
    upstream: float,
    names: str,
    endpoint_json: str,
    decision_json: str,
) -> str:
    """One access log line, newline included. `started` is the request's start
    (time.time()); `duration` and `upstream` are seconds, `upstream` negative
    when no upstream was tried; `request_id` is visible ASCII (requestid.py
    keeps no other); `*_json` are JSON already (`quoted`,
    `quoted_method`), and `names` the service and version fields (`names_json`,
    or NO_NAMES). Fields in a fixed order."""
    second = int(started)
    millis = _DOT_DIGITS[int((started - second) * 1000)]
    micros = int(duration * 1_000_000) if duration > 0 else 0
    if '"' in request_id or "\\" in request_id:  # a client's: visible ASCII, else unchecked
        request_id = _escape(request_id)[1:-1]
    upstream_ms = "null"
    upstream_decimals = ""
    if upstream >= 0:
        upstream_micros = int(upstream * 1_000_000)
        upstream_ms = str(upstream_micros // 1000)
        upstream_decimals = _DOT_DIGITS[upstream_micros % 1000]
    path_json = "null" if path is None else _escape(path)
    return (
        f'{{"time":"{_STAMPS.seconds(second)}{millis}Z","request_id":"{request_id}",'
        f'"client":{client_json},"method":{method_json},"path":{path_json},'
        f'"status":{_NUMBERS[status] if 0 <= status < 1000 else str(status)},'
        f'"bytes_sent":{bytes_sent},'
        f'"duration_ms":{micros // 1000}{_DOT_DIGITS[micros % 1000]},'
        f'"upstream_ms":{upstream_ms}{upstream_decimals},'
        f'{names},"endpoint":{endpoint_json},"decision":{decision_json}}}\n'
    )
