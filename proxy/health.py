"""Active health checks: each worker process GETs a path on every endpoint of
the services that ask for it, on a fresh connection each time, and reports
pass or fail to the endpoint, which keeps the thresholds (see
``endpoints.Endpoint.check_result``).

A 2xx or 3xx status line within the timeout is a pass; anything else (refused,
reset, timeout, 4xx, 5xx, not HTTP) is a failure.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Mapping
from typing import Protocol

from .config import Address, HealthCheck
from .tls import ClientTls

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})[ \r\n]")


class Checked(Protocol):
    """What the checker needs of an endpoint."""

    @property
    def address(self) -> Address: ...

    @property
    def tls(self) -> ClientTls | None: ...  # checks go over TLS to an HTTPS version

    def check_result(self, passed: bool, check: HealthCheck) -> None: ...


def check_request(address: Address, check: HealthCheck) -> bytes:
    host = check.host or str(address)
    return (
        f"GET {check.path} HTTP/1.1\r\nHost: {host}\r\n"
        "User-Agent: grayproxy-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


def status_passes(status_line: bytes) -> bool:
    found = _STATUS_LINE.match(status_line)
    return found is not None and 200 <= int(found.group(1)) < 400


async def probe(
    address: Address, request: bytes, timeout: float, tls: ClientTls | None = None
) -> bool:
    """One check over a new connection (TLS with ``tls``): True for a 2xx or 3xx answer in time."""
    if tls is not None and tls.context is None:
        return False  # its TLS settings could not be loaded
    try:
        async with asyncio.timeout(timeout):
            if tls is None:
                reader, writer = await asyncio.open_connection(address.host, address.port)
            else:
                reader, writer = await asyncio.open_connection(
                    address.host, address.port, ssl=tls.context, server_hostname=tls.server_name
                )
            try:
                writer.write(request)
                status_line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError):  # ValueError: an endless first line
        return False
    return status_passes(status_line)


async def check_forever(target: Checked, check: HealthCheck) -> None:
    request = check_request(target.address, check)
    # Spread the first checks so that endpoints (and workers) do not go in lockstep.
    await asyncio.sleep(random.uniform(0, check.interval))
    while True:
        passed = await probe(target.address, request, check.timeout, target.tls)
        target.check_result(passed, check)
        await asyncio.sleep(check.interval)


class HealthChecker:
    """One checking task per endpoint that has a health check, following reloads."""

    __slots__ = ("_running",)

    def __init__(self) -> None:
        self._running: dict[Checked, tuple[HealthCheck, asyncio.Task[None]]] = {}

    def __repr__(self) -> str:
        return f"<HealthChecker [{len(self._running)} endpoints]>"

    def follow(self, wanted: Mapping[Checked, HealthCheck]) -> None:
        """Check exactly the endpoints in ``wanted``, each with its settings."""
        for target, (check, task) in list(self._running.items()):
            if wanted.get(target) != check:
                task.cancel()
                del self._running[target]
        for target, check in wanted.items():
            if target not in self._running:
                # The loop is looked up only here: following no checks needs none.
                task = asyncio.get_running_loop().create_task(check_forever(target, check))
                self._running[target] = (check, task)

    def close(self) -> None:
        for _, task in self._running.values():
            task.cancel()
        self._running.clear()
