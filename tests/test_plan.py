"""plan_request, the decision before any I/O: plain data in, a plan out."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import errors
from proxy.endpoints import Upstreams
from proxy.http1 import forwarded_for_lines, request_line_end, seen_headers, verbatim_head
from proxy.loader import parse_config
from proxy.metrics import Metrics
from proxy.plan import PathLimits, Plan, RoutingTable, plan_request
from proxy.state import LiveState

CONFIG = """
limits: {max_body_bytes: 1000}
services:
  - name: web
    match: {host: "web.test"}
    versions:
      stable: {endpoints: ["127.0.0.1:9001"]}
      canary: {endpoints: ["127.0.0.1:9002"]}
    split:
      weights: {stable: 50, canary: 50}
      hash_on: [{header: x-user-id}]
    rules:
      - match: {header: {name: x-canary, value: always}}
        version: canary
"""

Headers = list[tuple[bytes, bytes]]


@pytest.fixture(scope="module")
def table() -> Iterator[tuple[RoutingTable, PathLimits]]:
    loop = asyncio.new_event_loop()  # endpoints are made in a running loop
    config = parse_config(CONFIG)
    upstreams = Upstreams()

    async def build() -> RoutingTable:
        return RoutingTable(LiveState(config, None).snapshot, upstreams, Metrics())

    yield loop.run_until_complete(build()), PathLimits(config)
    upstreams.close()
    loop.close()


def plan(
    table: tuple[RoutingTable, PathLimits],
    headers: Headers,
    method: bytes = b"GET",
    url: bytes = b"/a?b",
    version: str = "1.1",
    raw: bytes = b"",
    upgrade: bool = False,
) -> Plan:
    routing, limits = table
    verbatim = verbatim_head(raw, request_line_end(raw, method, url)) if raw else b""
    forwarded_for = forwarded_for_lines("10.0.0.1")
    asks = Asks(upgrade)
    client = "10.0.0.1"
    return plan_request(
        method, url, seen_headers(headers), version, True, asks, routing, limits, forwarded_for,
        client, verbatim,
    )  # fmt: skip


class Asks:
    """What the parser says of an upgrade: Connection: upgrade and an Upgrade header."""

    def __init__(self, upgrade: bool) -> None:
        self.upgrade = upgrade

    def should_upgrade(self) -> bool:
        return self.upgrade


HOST: Headers = [(b"Host", b"web.test")]


def test_a_rule_pins_the_version_and_says_which(table: tuple[RoutingTable, PathLimits]) -> None:
    planned = plan(table, [*HOST, (b"x-canary", b"always")])
    assert planned.error is None
    assert planned.target is not None and planned.target.name == "canary"
    assert planned.reason == "rule=0"
    assert planned.head.startswith(b"GET /a?b HTTP/1.1\r\nHost: web.test\r\nx-canary: always\r\n")
    assert b"x-forwarded-for: 10.0.0.1\r\n" in planned.head


@given(user=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30))
def test_a_key_routes_by_hash_and_says_so(
    table: tuple[RoutingTable, PathLimits], user: str
) -> None:
    planned = plan(table, [*HOST, (b"x-user-id", user.encode())])
    again = plan(table, [*HOST, (b"X-User-Id", user.encode())])
    assert planned.reason == again.reason == "split;key=header:x-user-id"
    assert planned.target is again.target is not None


def test_without_a_key_the_split_draws(table: tuple[RoutingTable, PathLimits]) -> None:
    names = {plan(table, HOST).target.name for _ in range(100)}  # type: ignore[union-attr]
    assert names == {"stable", "canary"}
    assert plan(table, HOST).reason == "split;random"


def test_a_head_with_nothing_to_change_goes_on_as_received(
    table: tuple[RoutingTable, PathLimits],
) -> None:
    raw = b"GET /a?b HTTP/1.1\r\nHost:   web.test\r\n\r\n"
    planned = plan(table, [(b"Host", b"web.test")], raw=raw)
    assert planned.head.startswith(b"GET /a?b HTTP/1.1\r\nHost:   web.test\r\nx-forwarded-for")
    rebuilt = plan(table, [(b"Host", b"web.test")])
    assert rebuilt.head.startswith(b"GET /a?b HTTP/1.1\r\nHost: web.test\r\nx-forwarded-for")


@pytest.mark.parametrize(
    ("headers", "method", "version", "error", "routed"),
    [
        ([(b"Host", b"other.test")], b"GET", "1.1", errors.NoService, False),
        (HOST, b"GET", "2.0", errors.VersionNotSupported, False),
        (HOST, b"CONNECT", "1.1", errors.BadRequest, False),
        ([*HOST, (b"Content-Length", b"1001")], b"POST", "1.1", errors.PayloadTooLarge, True),
        ([*HOST, (b"X_Forwarded_Host", b"evil")], b"GET", "1.1", None, True),
        ([*HOST, (b"Transfer-Encoding", b"xchunked")], b"POST", "1.1", errors.BadRequest, False),
    ],
)
def test_refusals_are_plans_with_their_error(
    table: tuple[RoutingTable, PathLimits],
    headers: Headers,
    method: bytes,
    version: str,
    error: type[errors.ProxyError] | None,
    routed: bool,
) -> None:
    planned = plan(table, headers, method=method, version=version)
    if error is None:
        assert planned.error is None
        assert b"X_Forwarded_Host" not in planned.head  # dropped, not refused
    else:
        assert isinstance(planned.error, error)
    # What was decided before the refusal stays: a 413 still names its version.
    assert (planned.target is not None) == routed


def test_an_upgrade_plan_closes_unless_switched(table: tuple[RoutingTable, PathLimits]) -> None:
    headers = [*HOST, (b"Connection", b"upgrade"), (b"Upgrade", b"websocket")]
    planned = plan(table, headers, url=b"/ws", upgrade=True)
    assert planned.upgrade == b"websocket" and planned.close
    assert planned.head.endswith(b"connection: upgrade\r\nupgrade: websocket\r\n\r\n")
    h2c = [*HOST, (b"Connection", b"upgrade"), (b"Upgrade", b"h2c")]
    planned = plan(table, h2c, url=b"/", upgrade=True)
    assert planned.upgrade is None and not planned.close
    assert b"pgrade" not in planned.head
    # An Upgrade header without Connection: upgrade asks for nothing.
    planned = plan(table, [*HOST, (b"Upgrade", b"websocket")], url=b"/")
    assert planned.upgrade is None and not planned.close
