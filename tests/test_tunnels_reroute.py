"""Tunnels that follow the split (SPEC §12), with real processes: WebSocket
clients keyed across two versions, each version a WebSocket echo upstream,
then a routing change through the control API or a reload.

Times are compared only in the direction no machine's speed can break: a
close scheduled at i/n x `within` never happens before it, and every close
comes within `within` plus a generous margin.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest

from proxy.config import ConfigError
from proxy.loader import parse_config
from proxy.routing import STICKY, RequestView, Router, ServiceRouter, hash_version
from proxy.tunnels import TunnelRoute, close_delays, with_sticky_cookie

from procs import DIRECT, ProxyProcess
from servers import LoopThread, WebSocketUpstream

WITHIN = 2.0
MARGIN = 5.0  # on top of WITHIN: when every due close must have happened
HALF = {"stable": 50.0, "canary": 50.0}

CONFIG = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
workers: %(workers)d
services:
  - name: chat
    match: {path_prefix: /chat}
    versions:
      stable: {endpoints: ["127.0.0.1:%(stable)d"]}
      canary: {endpoints: ["127.0.0.1:%(canary)d"]}
    split: {weights: {stable: 50, canary: 50}, hash_on: [{header: x-user-id}]}
%(rules)s    reroute_tunnels: {within: %(within)gs}
  - name: still
    match: {path_prefix: /still}
    versions:
      stable: {endpoints: ["127.0.0.1:%(stable)d"]}
      canary: {endpoints: ["127.0.0.1:%(canary)d"]}
    split: {weights: {stable: 50, canary: 50}, hash_on: [{header: x-user-id}]}
"""


# --------------------------------------------------------------------------- upstreams


@pytest.fixture(scope="module")
def echoes(loops: LoopThread) -> Iterator[dict[str, WebSocketUpstream]]:
    servers = {name: WebSocketUpstream(loops, name).start() for name in ("stable", "canary")}
    yield servers
    for server in servers.values():
        server.stop()


def config_for(
    echoes: dict[str, WebSocketUpstream], workers: int = 1, within: float = WITHIN, rules: str = ""
) -> str:
    return CONFIG % {
        "workers": workers,
        "stable": echoes["stable"].port,
        "canary": echoes["canary"].port,
        "within": within,
        "rules": rules,
    }


# --------------------------------------------------------------------------- clients


@dataclass
class Tunnel:
    """One WebSocket client: what it receives goes to `inbox`; None when closed."""

    key: str
    ws: aiohttp.ClientWebSocketResponse
    version: str = ""
    closed_at: float | None = None
    inbox: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    pump: asyncio.Task[None] | None = None

    async def receive(self) -> str | None:
        while True:
            message = await self.ws.receive()
            if message.type == aiohttp.WSMsgType.TEXT:
                return str(message.data)
            if message.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                return None

    async def pumping(self) -> None:
        while True:
            text = await self.receive()
            if text is None:
                self.closed_at = time.monotonic()
                self.inbox.put_nowait(None)
                return
            self.inbox.put_nowait(text)

    async def echoes(self) -> bool:
        """Whether the tunnel still carries a message both ways."""
        if self.closed_at is not None:
            return False
        await self.ws.send_str("ping")
        reply = await asyncio.wait_for(self.inbox.get(), 10)
        return reply == f"{self.version}:ping"


async def open_tunnels(
    session: aiohttp.ClientSession, url: str, keys: list[str]
) -> dict[str, Tunnel]:
    tunnels: dict[str, Tunnel] = {}
    for key in keys:
        ws = await session.ws_connect(url, headers={"x-user-id": key})
        tunnel = Tunnel(key, ws)
        tunnel.pump = asyncio.create_task(tunnel.pumping())
        greeting = await asyncio.wait_for(tunnel.inbox.get(), 10)
        assert greeting is not None and greeting.startswith("hello from ")
        tunnel.version = greeting.removeprefix("hello from ")
        tunnels[key] = tunnel
    return tunnels


async def wait_closed(tunnels: list[Tunnel], deadline: float) -> None:
    while any(t.closed_at is None for t in tunnels) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def keys_across(count: int, weights: dict[str, float]) -> list[str]:
    """`count` keys, half of them routed to each version under `weights`."""
    chosen: dict[str, list[str]] = {"stable": [], "canary": []}
    index = 0
    while min(len(keys) for keys in chosen.values()) < count // 2:
        key = f"user-{index}"
        keys = chosen[hash_version(key, weights)]
        if len(keys) < count // 2:
            keys.append(key)
        index += 1
    return chosen["stable"] + chosen["canary"]


async def control(proxy: ProxyProcess, method: str, path: str, body: object = None) -> int:
    """A control API call, off the event loop (urllib blocks)."""

    def call() -> int:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            proxy.control_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with DIRECT.open(request, timeout=30) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code

    return await asyncio.to_thread(call)


async def close_all(tunnels: dict[str, Tunnel]) -> None:
    for tunnel in tunnels.values():
        await tunnel.ws.close()
        if tunnel.pump is not None:
            tunnel.pump.cancel()


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("workers", [1, 2])
def test_a_rollback_closes_exactly_the_canary_tunnels_spread_over_within(
    echoes: dict[str, WebSocketUpstream], workers: int
) -> None:
    keys = keys_across(20, HALF)

    async def scenario(proxy: ProxyProcess) -> None:
        async with aiohttp.ClientSession() as session:
            tunnels = await open_tunnels(session, f"{proxy.data_url}/chat/room", keys)
            canary = [t for t in tunnels.values() if t.version == "canary"]
            stable = [t for t in tunnels.values() if t.version == "stable"]
            assert (len(canary), len(stable)) == (10, 10)
            # One canary tunnel ends by itself first: it leaves the schedule quietly.
            await canary[0].ws.close()
            canary = canary[1:]
            before = time.monotonic()
            assert await control(proxy, "POST", "/api/v1/services/chat/rollback") == 200
            await wait_closed(canary, time.monotonic() + WITHIN + MARGIN)
            assert all(t.closed_at is not None for t in canary), "a canary tunnel stayed open"
            closes = sorted(t.closed_at for t in canary if t.closed_at is not None)
            if workers == 1:  # the 9th close is due at 8/9 x within, and never comes early
                assert closes[-1] - before >= close_delays(9, WITHIN)[-1] * 0.99
            await asyncio.sleep(0.5)
            for tunnel in stable:
                assert await tunnel.echoes(), f"{tunnel.key} on stable lost its tunnel"
            assert echoes["canary"].open == 0  # closed on the upstream's side too
            # where the closed clients reconnect: the baseline now
            again = await open_tunnels(session, f"{proxy.data_url}/chat/room", [canary[0].key])
            assert again[canary[0].key].version == "stable"
            await close_all({**tunnels, **again})

    with ProxyProcess(config_for(echoes, workers=workers)) as proxy:
        asyncio.run(scenario(proxy))


def test_a_weights_change_closes_only_the_tunnels_it_moves(
    echoes: dict[str, WebSocketUpstream],
) -> None:
    keys = keys_across(20, HALF)
    more_canary = {"stable": 20.0, "canary": 80.0}
    moving = {key for key in keys if hash_version(key, HALF) != hash_version(key, more_canary)}
    assert 0 < len(moving) < 10  # monotone: only stable users move, and not all of them

    async def scenario(proxy: ProxyProcess) -> None:
        async with aiohttp.ClientSession() as session:
            tunnels = await open_tunnels(session, f"{proxy.data_url}/chat/x", keys)
            # The same ratio: a new snapshot, and no request routes elsewhere.
            weights = {"stable": 1, "canary": 1}
            assert await control(proxy, "PUT", "/api/v1/services/chat/weights", weights) == 200
            await asyncio.sleep(WITHIN + 1)
            assert all(t.closed_at is None for t in tunnels.values())
            assert await control(proxy, "PUT", "/api/v1/services/chat/weights", more_canary) == 200
            moved = [tunnels[key] for key in moving]
            await wait_closed(moved, time.monotonic() + WITHIN + MARGIN)
            await asyncio.sleep(0.5)
            closed = {key for key, t in tunnels.items() if t.closed_at is not None}
            assert closed == moving
            for key, tunnel in tunnels.items():
                if key not in moving:
                    assert await tunnel.echoes(), key
            await close_all(tunnels)

    with ProxyProcess(config_for(echoes)) as proxy:
        asyncio.run(scenario(proxy))


def test_a_rule_added_by_a_reload_closes_the_tunnels_it_pins_elsewhere(
    echoes: dict[str, WebSocketUpstream],
) -> None:
    keys = keys_across(20, HALF)
    pinned = [key for key in keys[10:] if key.endswith(("1", "3", "5", "7", "9"))]  # canary ones
    assert pinned
    rule = "    rules:\n      - match: {header: {name: x-user-id, regex: '[13579]$'}}\n"
    rule += "        version: stable\n"

    async def scenario(proxy: ProxyProcess) -> None:
        async with aiohttp.ClientSession() as session:
            tunnels = await open_tunnels(session, f"{proxy.data_url}/chat/x", keys)
            proxy.write_config(config_for(echoes, rules=rule))
            assert await control(proxy, "POST", "/api/v1/reload") == 200
            await wait_closed([tunnels[key] for key in pinned], time.monotonic() + WITHIN + MARGIN)
            await asyncio.sleep(0.5)
            closed = {key for key, t in tunnels.items() if t.closed_at is not None}
            assert closed == set(pinned)  # stable ones the rule pins stay: same version
            await close_all(tunnels)

    with ProxyProcess(config_for(echoes)) as proxy:
        asyncio.run(scenario(proxy))


def test_a_change_back_while_closes_are_pending_keeps_the_rest_open(
    echoes: dict[str, WebSocketUpstream],
) -> None:
    within = 8.0
    keys = keys_across(20, HALF)

    async def scenario(proxy: ProxyProcess) -> None:
        async with aiohttp.ClientSession() as session:
            tunnels = await open_tunnels(session, f"{proxy.data_url}/chat/x", keys)
            canary = [t for t in tunnels.values() if t.version == "canary"]
            before = time.monotonic()
            assert await control(proxy, "POST", "/api/v1/services/chat/rollback") == 200
            assert await control(proxy, "PUT", "/api/v1/services/chat/weights", HALF) == 200
            back = time.monotonic() - before
            await asyncio.sleep(within + 1)
            closed = [t for t in canary if t.closed_at is not None]
            # Only closes due before the change back can have happened.
            due = sum(delay <= back for delay in close_delays(len(canary), within))
            assert len(closed) <= due, (len(closed), due, back)
            for tunnel in tunnels.values():
                if tunnel.closed_at is None:
                    assert await tunnel.echoes()
            await close_all(tunnels)

    with ProxyProcess(config_for(echoes, within=within)) as proxy:
        asyncio.run(scenario(proxy))


def test_without_reroute_tunnels_a_rollback_closes_nothing(
    echoes: dict[str, WebSocketUpstream],
) -> None:
    keys = keys_across(20, HALF)

    async def scenario(proxy: ProxyProcess) -> None:
        async with aiohttp.ClientSession() as session:
            tunnels = await open_tunnels(session, f"{proxy.data_url}/still/x", keys)
            assert await control(proxy, "POST", "/api/v1/services/still/rollback") == 200
            await asyncio.sleep(WITHIN + 1)
            for tunnel in tunnels.values():
                assert await tunnel.echoes(), tunnel.key  # the canary's too
            await close_all(tunnels)

    with ProxyProcess(config_for(echoes)) as proxy:
        asyncio.run(scenario(proxy))


def test_close_delays_are_spread_evenly_over_within() -> None:
    assert close_delays(4, 2.0) == [0.0, 0.5, 1.0, 1.5]
    assert close_delays(1, 30.0) == [0.0]
    assert close_delays(0, 30.0) == []
    assert close_delays(3, 0.0) == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- deciding again


def router_of(weights: dict[str, float], split: str = "", rules: str = "") -> ServiceRouter:
    config = parse_config(
        f"""
services:
  - name: web
    versions: {{stable: {{endpoints: ["h:1"]}}, canary: {{endpoints: ["h:2"]}}}}
    split: {{weights: {json.dumps(weights)}{split}}}
{rules}"""
    )
    return Router(config.services).service("web")


def view_of(headers: dict[str, str]) -> RequestView:
    return RequestView("GET", "/ws", "", headers, "10.0.0.1")


def route_to(version: str, view: RequestView) -> TunnelRoute:
    return TunnelRoute(None, "web", version, view)  # type: ignore[arg-type]  # never closed here


def test_a_keyless_tunnel_moves_only_when_its_version_can_no_longer_be_drawn() -> None:
    keyless = view_of({})
    for version in ("stable", "canary"):
        assert not route_to(version, keyless).routes_elsewhere(
            router_of({"stable": 9, "canary": 1})
        )
    rolled_back = router_of({"stable": 1, "canary": 0})
    assert route_to("canary", keyless).routes_elsewhere(rolled_back)
    assert not route_to("stable", keyless).routes_elsewhere(rolled_back)
    # a rule decides a keyless request as it decides any other
    pinned = router_of(
        {"stable": 1, "canary": 1},
        rules="    rules: [{match: {path_prefix: /ws}, version: canary}]",
    )
    assert route_to("stable", keyless).routes_elsewhere(pinned)
    assert not route_to("canary", keyless).routes_elsewhere(pinned)


def test_a_tunnel_given_a_sticky_cookie_is_decided_again_with_that_cookie() -> None:
    sticky = ", sticky_cookie: {name: gp}"
    router = router_of({"stable": 1, "canary": 1}, split=sticky)
    view = view_of({"cookie": "other=1"})
    version, cookie, reason = router.decide(view)
    assert reason == STICKY and cookie is not None
    again = with_sticky_cookie(view, cookie)
    assert again.headers["cookie"].startswith("other=1; gp=")
    assert not route_to(version, again).routes_elsewhere(router)
    key = cookie.partition(";")[0].partition("=")[2]
    moved = (
        {"stable": 1.0, "canary": 0.0} if version == "canary" else {"stable": 0.0, "canary": 1.0}
    )
    assert route_to(version, again).routes_elsewhere(router_of(moved, split=sticky))
    assert hash_version(key, {"stable": 1, "canary": 1}) == version
    assert with_sticky_cookie(view, None) is view


# --------------------------------------------------------------------------- config

SERVICE = """\
services:
  - name: chat
    versions: {stable: {endpoints: ["h:1"]}, canary: {endpoints: ["h:2"]}}
"""


def test_reroute_tunnels_is_off_unless_set_and_within_defaults_to_30s() -> None:
    (service,) = parse_config(SERVICE).services
    assert service.reroute_tunnels is None
    (service,) = parse_config(SERVICE + "    reroute_tunnels: {}\n").services
    assert service.reroute_tunnels is not None and service.reroute_tunnels.within == 30.0
    (service,) = parse_config(SERVICE + "    reroute_tunnels: {within: 0}\n").services
    assert service.reroute_tunnels is not None and service.reroute_tunnels.within == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{within: -1s}", "services[0].reroute_tunnels.within: line 4: invalid duration"),
        ("{within: soon}", "services[0].reroute_tunnels.within: line 4: invalid duration"),
        ("{spread: 5s}", "services[0].reroute_tunnels.spread: line 4: unknown key 'spread'"),
        ("true", "services[0].reroute_tunnels: line 4: expected a mapping, got a boolean"),
    ],
)
def test_bad_reroute_tunnels_are_refused_with_their_line(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(SERVICE + f"    reroute_tunnels: {text}\n")
    assert any(error.startswith(expected) for error in refused.value.errors), refused.value.errors
