"""The control API's release calls, and a release's hold on its service's weights.

  POST /api/v1/services/{name}/release            start one (body: the release mapping): 201
  GET  /api/v1/services/{name}/release            the active release, or the last one
  POST /api/v1/services/{name}/release/approve    (also pause, resume, abort): 200

``add_release_api(app, releases)`` adds them to the control app, with a
middleware that answers 409 to ``PUT .../weights``, ``POST .../promote`` and
``POST .../rollback`` while a release of that service is active, unless the
call says ``?force=true``: then the release is aborted first (its weights
left for the change) and the call goes on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.errors import InvalidRequest
from proxy.release import COMMANDS, Refused
from proxy.releases import NoRelease, Releases, describe

RELEASES_KEY: Final = web.AppKey("releases", Releases)
# The routes a release holds while it runs, and how a forced call is named in its reason.
HELD: Final = {
    ("PUT", "/api/v1/services/{name}/weights"): "PUT weights",
    ("POST", "/api/v1/services/{name}/promote"): "promote",
    ("POST", "/api/v1/services/{name}/rollback"): "rollback",
}
FORCE_VALUES: Final = ("true", "1")


def add_release_api(
    app: web.Application, releases: Releases, actor: Callable[[web.Request], str]
) -> None:
    """The release routes and the weights' hold on ``app``; releases from the config start
    with it, and their tasks stop with it. ``actor(request)`` names who makes a change."""
    api = _ReleaseAPI(releases, actor)
    app[RELEASES_KEY] = releases
    app.middlewares.append(_hold_weights(releases, actor))
    commands = "|".join(COMMANDS)
    app.add_routes(
        [
            web.post("/api/v1/services/{name}/release", api.start),
            web.get("/api/v1/services/{name}/release", api.get),
            web.get("/api/v1/releases", api.list_all),
            web.post(f"/api/v1/services/{{name}}/release/{{command:{commands}}}", api.command),
        ]
    )
    app.on_startup.append(api.on_startup)
    app.on_cleanup.append(api.on_cleanup)


def _refusal(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "details": []}, status=status)


def _hold_weights(releases: Releases, actor: Callable[[web.Request], str]) -> Middleware:
    @web.middleware
    async def hold_weights(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = getattr(request.match_info.route, "resource", None)
        held = HELD.get((request.method, resource.canonical)) if resource is not None else None
        if held is not None:
            name = request.match_info["name"]
            running = releases.active(name)
            if running is not None:
                if request.query.get("force", "").lower() not in FORCE_VALUES:
                    return _refusal(
                        409,
                        f"{describe(running)} holds the weights: abort it "
                        f"(POST /api/v1/services/{name}/release/abort) or add ?force=true",
                    )
                releases.abort_for_change(name, actor(request), f"{held} with force=true")
        return await handler(request)

    return hold_weights


class _ReleaseAPI:
    def __init__(self, releases: Releases, actor: Callable[[web.Request], str]) -> None:
        self._releases = releases
        self._actor = actor

    async def start(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            self._releases.startable(name)  # 404 or 409 whatever the body
            answer = self._releases.start(name, await _json_body(request), self._actor(request))
        except Refused as exc:
            return _refusal(409, str(exc))
        return web.json_response(answer, status=201)

    async def get(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self._releases.get(request.match_info["name"]))
        except NoRelease as exc:
            return _refusal(404, str(exc))

    async def list_all(self, request: web.Request) -> web.Response:
        return web.json_response({"releases": self._releases.all()})

    async def command(self, request: web.Request) -> web.Response:
        name, command = request.match_info["name"], request.match_info["command"]
        try:
            return web.json_response(self._releases.command(name, command, self._actor(request)))
        except NoRelease as exc:
            return _refusal(404, str(exc))
        except Refused as exc:
            return _refusal(409, str(exc))

    async def on_startup(self, app: web.Application) -> None:
        await self._releases.start_from_config()

    async def on_cleanup(self, app: web.Application) -> None:
        await self._releases.close()


async def _json_body(request: web.Request) -> object:
    try:
        return json.loads(await request.read())
    except ValueError as exc:  # also covers UnicodeDecodeError
        raise InvalidRequest("request body is not valid JSON", [str(exc)]) from None
