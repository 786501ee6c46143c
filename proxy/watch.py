"""`grayproxy run --watch`: reload when the config file changes.

The file is polled with os.stat, which follows symlinks: what is compared is the file the
path resolves to now (device, inode, mtime, size). That sees an edit in place, an editor's
rename over the file, and a Kubernetes ConfigMap update, where the path is a symlink through
`..data`, itself a symlink that the kubelet replaces atomically by one to a new timestamped
directory, so the file is never modified in place.

A change is acted on once the file has stayed the same for SETTLE seconds (a burst of writes
is one reload), and only if its content differs from the content last acted on: a `touch`
or an identical rewrite does not reload, which would put back the file's weights over the
runtime ones. A refused file is not retried until it changes again; a file that cannot be
found is reported once it stays gone, and the running config is kept meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable

log = logging.getLogger("grayproxy")

POLL_INTERVAL = 1.0  # seconds between two looks at the file
SETTLE = 0.5  # seconds a changed file must stay unchanged before it is reloaded

Stamp = tuple[int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_size of the resolved file


def file_stamp(path: str) -> Stamp | None:
    """The identity of the file `path` resolves to now; None while it cannot be found."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


def file_digest(path: str) -> bytes | None:
    """The SHA-256 of the file's content; None if it cannot be read (the reload says why)."""
    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha256").digest()
    except OSError:
        return None


class ConfigWatch:
    """Calls `reload()` each time the file at `path` settles on a new content.

    Made before the server starts, so that a change made while it starts is seen."""

    def __init__(
        self, path: str, *, interval: float = POLL_INTERVAL, settle: float = SETTLE
    ) -> None:
        self.path = path
        self.interval = interval
        self.settle = settle
        self._stamp = file_stamp(path)
        self._digest = file_digest(path)

    def __repr__(self) -> str:
        return f"<ConfigWatch {self.path} every {self.interval:g}s, settle {self.settle:g}s>"

    async def run(self, reload: Callable[[], Awaitable[None]]) -> None:
        log.info("watching %s for changes", self.path)
        while True:
            await asyncio.sleep(self.interval)
            if file_stamp(self.path) != self._stamp:
                await self._settled()
                if await self._content_changed():
                    log.info("%s changed: reloading", self.path)
                    await reload()

    async def _settled(self) -> None:
        """Wait until the file stays the same for `settle` seconds; keep its stamp."""
        stamp = file_stamp(self.path)
        while True:
            await asyncio.sleep(self.settle)
            now = file_stamp(self.path)
            if now == stamp:
                break
            stamp = now
        if stamp is None and self._stamp is not None:
            log.warning("%s cannot be found; the running config is kept", self.path)
        self._stamp = stamp

    async def _content_changed(self) -> bool:
        """Whether the settled file is there with a content other than the last one."""
        if self._stamp is None:
            return False
        digest = await asyncio.to_thread(file_digest, self.path)
        changed = digest is None or digest != self._digest
        self._digest = digest
        return changed
