"""The state file: runtime state that survives a restart, written atomically after every change.

What it holds (JSON, one object): the generation, every service's runtime weights
with a digest of that service's part of the config file as it was loaded
(``Service.source_digest``), the last audit records, and named sections that
other modules provide (``LiveState.add_persisted``: a release's progress).

Writing: the bytes go to a temporary file in the same directory, which is
fsynced, renamed over the state file, and the directory fsynced. A reader (or a
restart after ``kill -9``) sees the old file or the new one, never a mix. The
encoding and the write run in a thread (an fsync can take milliseconds; the event
loop serves requests meanwhile). One StateFileWriter does one write at a time,
and each write takes the newest state when it starts, so a later change's write
is never overtaken by an earlier one's, and a burst of changes costs one or two
writes, not one each.

Reading (at start): a missing file is a first start; a file that cannot be read,
is not JSON, or is not shaped as this module writes it is refused as a whole with
the reason (StateFileError), and the proxy starts from the config file. The
decision of what to restore is ``restore_weights``: a pure function of the
config's services and the saved ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from proxy.audit import MAX_RECORDS, AuditRecord, now_text
from proxy.config import ConfigError, Service, check_weights

log = logging.getLogger("grayproxy.statefile")

FORMAT = 1  # bumped if the layout changes incompatibly; a file of another format is refused


class StateFileError(Exception):
    """A state file that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class SavedService:
    digest: str  # Service.source_digest when the state was written
    weights: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class SavedState:
    generation: int
    services: Mapping[str, SavedService]
    audit: tuple[AuditRecord, ...]  # oldest first
    sections: Mapping[str, object]  # JSON values, by section name


# ------------------------------------------------------------------ encoding


def encode(state: SavedState) -> bytes:
    """One JSON object; the audit records' own lines are joined in, not encoded again."""
    document = {
        "format": FORMAT,
        "written": now_text(),
        "generation": state.generation,
        "services": {
            name: {"digest": saved.digest, "weights": dict(saved.weights)}
            for name, saved in state.services.items()
        },
        "sections": dict(state.sections),
    }
    head = json.dumps(document, separators=(",", ":"))[:-1]  # without its closing brace
    audit = ",".join(record.line for record in state.audit[-MAX_RECORDS:])
    return f'{head},"audit":[{audit}]}}\n'.encode()


def decode(data: bytes) -> SavedState:
    """What ``encode`` wrote; StateFileError naming the problem for anything else."""
    if not data.strip():
        raise StateFileError("empty")
    try:
        document = json.loads(data)
    except UnicodeDecodeError:
        raise StateFileError("not UTF-8 text") from None
    except ValueError as exc:
        raise StateFileError(f"not valid JSON, truncated or corrupt ({exc})") from None
    if not isinstance(document, dict):
        raise StateFileError("not a JSON object")
    if document.get("format") != FORMAT:
        raise StateFileError(f"format {document.get('format')!r}; expected {FORMAT}")
    generation = document.get("generation")
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
        raise StateFileError(f"generation {generation!r}; expected a whole number of at least 1")
    sections = document.get("sections", {})
    if not isinstance(sections, dict):
        raise StateFileError("sections: not a JSON object")
    return SavedState(generation, _services(document.get("services")), _audit(document), sections)


def _services(raw: object) -> dict[str, SavedService]:
    if not isinstance(raw, dict):
        raise StateFileError("services: not a JSON object")
    services: dict[str, SavedService] = {}
    for name, saved in raw.items():
        if not isinstance(saved, dict) or not isinstance(saved.get("digest"), str):
            raise StateFileError(f"services.{name}: expected {{digest, weights}}")
        weights = saved.get("weights")
        if not isinstance(weights, dict) or not all(
            isinstance(w, int | float) and not isinstance(w, bool) for w in weights.values()
        ):
            raise StateFileError(f"services.{name}.weights: expected version names to numbers")
        services[name] = SavedService(saved["digest"], {v: float(w) for v, w in weights.items()})
    return services


def _audit(document: dict[str, object]) -> tuple[AuditRecord, ...]:
    raw = document.get("audit", [])
    if not isinstance(raw, list):
        raise StateFileError("audit: not a JSON list")
    try:
        return tuple(AuditRecord.from_json(record) for record in raw[-MAX_RECORDS:])
    except ValueError as exc:
        raise StateFileError(f"audit: {exc}") from None


# ------------------------------------------------------------------ reading and restoring


def read(path: str) -> SavedState | None:
    """The saved state; None if there is no file yet; StateFileError if it cannot be used."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot read: {exc.strerror or exc}") from None
    return decode(data)


@dataclass(frozen=True, slots=True)
class Restored:
    """What restore_weights decided, service by service."""

    services: tuple[Service, ...]  # the config's services with their saved weights where kept
    kept: tuple[str, ...]  # services whose saved weights apply
    config_wins: tuple[str, ...]  # services whose config-file part changed since: its weights
    messages: tuple[str, ...]  # one line per service that did not get its saved weights


def restore_weights(services: tuple[Service, ...], saved: Mapping[str, SavedService]) -> Restored:
    """The config's services, each with its saved weights unless its part of the config
    file changed since they were saved (then the file's weights apply)."""
    restored: list[Service] = []
    kept: list[str] = []
    config_wins: list[str] = []
    messages: list[str] = []
    for service in services:
        entry = saved.get(service.name)
        if entry is None:
            restored.append(service)  # new in the file: nothing saved
            continue
        if entry.digest != service.source_digest:
            config_wins.append(service.name)
            messages.append(
                f"services.{service.name}: changed in the config file since the state was "
                "saved; the config file's weights apply"
            )
            restored.append(service)
            continue
        try:
            weights = check_weights(service, dict(entry.weights))
        except ConfigError as exc:
            config_wins.append(service.name)
            messages.append(
                f"services.{service.name}: saved weights refused ({'; '.join(exc.errors)}); "
                "the config file's weights apply"
            )
            restored.append(service)
            continue
        kept.append(service.name)
        restored.append(replace(service, split=replace(service.split, weights=weights)))
    return Restored(tuple(restored), tuple(kept), tuple(config_wins), tuple(messages))


# ------------------------------------------------------------------ writing


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data``: temporary file, fsync, rename, fsync of the directory."""
    directory = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=_temporary_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def remove_leftovers(path: str) -> None:
    """Temporary files a killed writer left next to ``path`` (one proxy per state file)."""
    pattern = os.path.join(glob.escape(os.path.dirname(path)), glob.escape(_temporary_prefix(path)))
    for leftover in glob.glob(pattern + "*.tmp"):
        with contextlib.suppress(OSError):
            os.unlink(leftover)


def _temporary_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


class StateFileWriter:
    """Writes the state after every change: one write at a time, each of the newest state.

    ``content()`` is called on the event loop when a write starts and returns the state
    to write, which must not change afterwards; encoding and writing run in a thread.
    """

    def __init__(self, path: str, content: Callable[[], SavedState]) -> None:
        self.path = path
        self._content = content
        self._wanted = 0  # the newest generation asked to be written
        self._written = 0  # the newest generation whose write was attempted
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def __repr__(self) -> str:
        busy = "writing" if self._task is not None and not self._task.done() else "idle"
        return f"<StateFileWriter {self.path} [{busy} | written {self._written}]>"

    def schedule(self, generation: int) -> None:
        """Write the state (of ``generation`` or newer) soon; at once without an event loop."""
        self._wanted = max(self._wanted, generation)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(self._content())
            return
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())

    async def written(self, generation: int) -> None:
        """Return once a write of ``generation`` or newer was attempted (or none is due)."""
        if self._written >= generation or self._wanted < generation:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((generation, waiter))
        await waiter

    async def flush(self) -> None:
        """Wait for the writes asked for so far."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        while self._written < self._wanted:
            attempted = self._wanted
            try:
                state = self._content()
                attempted = max(attempted, state.generation)
                await asyncio.to_thread(self._write, state)
            except Exception:
                log.exception("state file %s: cannot write generation %d", self.path, attempted)
            self._written = max(self._written, attempted)  # waiters go on, written or not
            self._wake()

    def _write(self, state: SavedState) -> None:
        try:
            write_atomically(self.path, encode(state))
        except Exception as exc:
            # The change has applied; only its survival across a restart is at risk.
            log.error(
                "state file %s: cannot write generation %d: %s", self.path, state.generation, exc
            )

    def _wake(self) -> None:
        waiting = []
        for generation, waiter in self._waiters:
            if generation <= self._written:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((generation, waiter))
        self._waiters = waiting
