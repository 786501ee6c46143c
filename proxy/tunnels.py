"""Tunnels that follow the split: after a routing change, the WebSocket tunnels
whose request now routes to another version are closed, spread over time.

Only services with `reroute_tunnels` take part: when a tunnel of theirs opens,
`Tunnels.opened` keeps what the decision used (the request's routing facts,
`routing.RequestView`, and the version it was routed to). Each new snapshot
(`follow`: a weight change, promote, rollback or reload) decides every kept
tunnel again with the new router; those that now route elsewhere are closed,
both sides, the i-th of n at i/n x `within` from the change (`close_delays`),
so that their clients reconnect to where they belong without all arriving at
once. A tunnel already due to close keeps its time; one that routes back to
its version before its time stays open. A tunnel that ends by itself is
forgotten (`closed`).

Deciding again is the routing decision itself, with two adjustments:
- a tunnel keyed by a sticky cookie the proxy drew for it is decided with that
  cookie, as its client's next request will be;
- a keyless tunnel routed by a random draw has no route to recompute: it moves
  only when its version can no longer be drawn (its weight is 0 now), unless a
  rule now sends it elsewhere.

Per worker: each worker keeps its own tunnels and gets every snapshot.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .routing import RANDOM, RequestView, ServiceRouter
from .state import Snapshot

if TYPE_CHECKING:
    from .dataplane import Exchange


def close_delays(count: int, within: float) -> list[float]:
    """When each of `count` closes happens, in seconds from now: evenly over `within`."""
    return [index * within / count for index in range(count)]


def with_sticky_cookie(view: RequestView, set_cookie: str | None) -> RequestView:
    """The request as its client sends it next: with the sticky cookie the
    proxy set on its response, if it set one ("NAME=KEY; Path=/; ...")."""
    if not set_cookie:
        return view
    pair = set_cookie.partition(";")[0]
    headers = dict(view.headers)
    cookie = headers.get("cookie")
    headers["cookie"] = f"{cookie}; {pair}" if cookie else pair
    return RequestView(view.method, view.path, view.query_string, headers, view.client_ip)


class TunnelRoute:
    """One open tunnel: what routed it, and its close if one is due."""

    __slots__ = ("exchange", "service", "timer", "version", "view")

    def __init__(self, exchange: Exchange, service: str, version: str, view: RequestView) -> None:
        self.exchange = exchange
        self.service = service
        self.version = version  # the version the decision chose (not a fallback's)
        self.view = view
        self.timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        due = " closing" if self.timer is not None else ""
        return f"<TunnelRoute {self.service}/{self.version}{due}>"

    def routes_elsewhere(self, router: ServiceRouter) -> bool:
        """Whether the request would now go to another version."""
        version, _, reason = router.decide(self.view)
        if reason == RANDOM:
            return not router.service.split.weights.get(self.version, 0.0) > 0
        return version != self.version

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Tunnels:
    """The open tunnels of this worker whose service has `reroute_tunnels`."""

    __slots__ = ("_routes", "_snapshot", "_within")

    def __init__(self, snapshot: Snapshot) -> None:
        self._routes: dict[Exchange, TunnelRoute] = {}
        self._snapshot = snapshot
        self._within = _reroute_within(snapshot)

    def __repr__(self) -> str:
        closing = sum(route.timer is not None for route in self._routes.values())
        return f"<Tunnels [{len(self._routes)} open | {closing} closing]>"

    def __len__(self) -> int:
        return len(self._routes)

    def opened(self, exchange: Exchange) -> None:
        """A tunnel opened: keep its route if its service reroutes tunnels."""
        plan = exchange.plan
        service, target, view = plan.service, plan.target, plan.view
        if service is None or target is None or view is None:
            return
        within = self._within.get(service.name)
        if within is None:
            return
        view = with_sticky_cookie(view, plan.set_cookie)
        route = self._routes[exchange] = TunnelRoute(exchange, service.name, target.name, view)
        # Routed under an older snapshot than the one now live: check it at once.
        if route.routes_elsewhere(self._snapshot.router.service(service.name)):
            self._schedule([route], within)

    def closed(self, exchange: Exchange) -> None:
        """A tunnel ended (by itself, or closed here): forget it."""
        route = self._routes.pop(exchange, None)
        if route is not None:
            route.cancel()

    def follow(self, snapshot: Snapshot) -> None:
        """A new snapshot: close, over `within`, the tunnels that now route elsewhere."""
        self._snapshot = snapshot
        self._within = _reroute_within(snapshot)
        moving: dict[str, list[TunnelRoute]] = {}
        for route in self._routes.values():
            if route.service not in self._within:  # no longer rerouted (or gone): left as it is
                route.cancel()
            elif route.routes_elsewhere(snapshot.router.service(route.service)):
                moving.setdefault(route.service, []).append(route)
            else:
                route.cancel()  # routes back to its version: stays open
        for service, routes in moving.items():
            due = [route for route in routes if route.timer is None]
            self._schedule(due, self._within[service])

    def close(self) -> None:
        """The worker stops: no more closes are due."""
        for route in self._routes.values():
            route.cancel()
        self._routes.clear()

    def _schedule(self, routes: list[TunnelRoute], within: float) -> None:
        loop = asyncio.get_running_loop()
        for route, delay in zip(routes, close_delays(len(routes), within), strict=True):
            route.timer = loop.call_later(delay, self._close, route)

    def _close(self, route: TunnelRoute) -> None:
        """Close the tunnel on both sides: its client reconnects to its new version."""
        route.timer = None
        exchange = route.exchange
        self._routes.pop(exchange, None)
        upstream = exchange.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.close()
        exchange.client.close()


def _reroute_within(snapshot: Snapshot) -> dict[str, float]:
    """Service name -> `within` of its reroute_tunnels, for the services that have it."""
    return {
        service.name: service.reroute_tunnels.within
        for service in snapshot.config.services
        if service.reroute_tunnels is not None
    }
