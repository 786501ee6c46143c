"""The audit trail: one record per applied change, newest last, the last MAX_RECORDS kept.

A record says which change made which generation, when, by whom, to what, and what
it was before and after (docs/change-safety.md lists the actions and the shape of
``before`` and ``after`` for each). Records are immutable once made, so a list of
them can be handed to another thread (the state file's writer) without a copy of
their contents. Each new record also goes to the log as one JSON line (logger
``grayproxy.audit``); records restored from a state file are not logged again.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

log = logging.getLogger("grayproxy.audit")

MAX_RECORDS = 1000  # kept in memory and in the state file
DEFAULT_LIMIT = 100  # records a GET /api/v1/audit answers without ?limit=
FIELDS = ("generation", "time", "actor", "action", "service", "before", "after")


@dataclass(frozen=True, slots=True)
class AuditRecord:
    generation: int  # the generation this change made
    time: str  # RFC 3339, UTC, milliseconds: 2026-11-02T14:03:07.512Z
    actor: str  # a token's name, "release", "file" or "signal"
    action: str  # "weights", "promote", "rollback", "reload", "restart", release transitions
    service: str | None  # None for a change of the whole config (a reload)
    before: object  # JSON values, never mutated after the record is made
    after: object
    # The record as one JSON line, made once: the log line, and the state file's entry (a
    # state file of 1000 records is then joined, not encoded again, at every write).
    line: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        line = json.dumps(self.to_json(), separators=(",", ":"))
        object.__setattr__(self, "line", line)

    def to_json(self) -> dict[str, object]:
        return {
            "generation": self.generation,
            "time": self.time,
            "actor": self.actor,
            "action": self.action,
            "service": self.service,
            "before": self.before,
            "after": self.after,
        }

    @classmethod
    def from_json(cls, raw: object) -> AuditRecord:
        """A record as to_json wrote it; ValueError naming what is wrong otherwise."""
        if not isinstance(raw, Mapping):
            raise ValueError("an audit record is not an object")
        missing = [name for name in FIELDS if name not in raw]
        if missing:
            raise ValueError(f"an audit record lacks {', '.join(missing)}")
        generation, time, actor, action, service = (
            raw["generation"],
            raw["time"],
            raw["actor"],
            raw["action"],
            raw["service"],
        )
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
            raise ValueError(f"an audit record's generation is {generation!r}")
        if not all(isinstance(text, str) for text in (time, actor, action)):
            raise ValueError("an audit record's time, actor and action must be strings")
        if service is not None and not isinstance(service, str):
            raise ValueError("an audit record's service must be a string or null")
        return cls(generation, time, actor, action, service, raw["before"], raw["after"])


def now_text() -> str:
    """The current time as an audit record writes it: 2026-11-02T14:03:07.512Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """The last MAX_RECORDS records, oldest first."""

    def __init__(self, records: Iterable[AuditRecord] = ()) -> None:
        self._records: deque[AuditRecord] = deque(records, maxlen=MAX_RECORDS)

    def __repr__(self) -> str:
        newest = self._records[-1].generation if self._records else None
        return f"<AuditLog [{len(self._records)} records | newest generation {newest}]>"

    def __len__(self) -> int:
        return len(self._records)

    def add(self, record: AuditRecord) -> None:
        """Keep ``record`` and log it as one JSON line."""
        self._records.append(record)
        log.info("%s", record.line)

    def restore(self, records: Iterable[AuditRecord]) -> None:
        """Put ``records`` (oldest first) before the ones kept; not logged again."""
        self._records = deque([*records, *self._records], maxlen=MAX_RECORDS)

    def records(self) -> list[AuditRecord]:
        """Every kept record, oldest first (a copy: the caller may hand it to a thread)."""
        return list(self._records)

    def newest(self, limit: int, service: str | None = None) -> list[AuditRecord]:
        """At most ``limit`` records, newest first; only ``service``'s if given."""
        found: list[AuditRecord] = []
        for record in reversed(self._records):
            if len(found) >= limit:
                break
            if service is None or record.service == service:
                found.append(record)
        return found


def parse_limit(text: str | None) -> int:
    """``?limit=`` of GET /api/v1/audit: 1..MAX_RECORDS, DEFAULT_LIMIT when absent;
    ValueError with the reason otherwise."""
    if text is None:
        return DEFAULT_LIMIT
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"limit: {text!r} is not a whole number")
    limit = int(text) if len(text) <= 9 else MAX_RECORDS + 1
    if not 1 <= limit <= MAX_RECORDS:
        raise ValueError(f"limit: {text} is out of range: 1 to {MAX_RECORDS}")
    return limit
