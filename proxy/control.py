"""The control API: reads and atomic changes of the live state, health and metrics.

Errors are mapped to status in one place (``_errors``): ControlRefused knows its
own status, ConfigError is 400 with every problem in ``details``, aiohttp's
HTTP errors (404 unknown route, 405 wrong method, 413 body too large) keep
theirs, anything else is a logged 500. Every error body is
``{"error": "...", "details": [...]}``.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.config import ConfigError, FieldMatch, Rule, Service, Split
from proxy.errors import ControlRefused, InvalidRequest, UnknownService
from proxy.explain import explain, read_facts
from proxy.metrics import EndpointHealth, Metrics
from proxy.state import LiveState

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_KEPT_ERROR_HEADERS = ("Allow", "WWW-Authenticate")


def create_app(
    state: LiveState,
    metrics: Metrics,
    *,
    endpoint_health: EndpointHealth,
    is_ready: Callable[[], bool],
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> web.Application:
    """The control application; the caller runs it on ``control.listen``.

    ``refresh``, if given, is awaited before stats, health or metrics are read
    (a supervisor gathers them from its workers then).
    """
    api = _ControlAPI(state, metrics, endpoint_health, is_ready, refresh)
    app = web.Application(middlewares=[_errors, _bearer_auth(state)])
    app.add_routes(
        [
            web.get("/api/v1/services", api.list_services),
            web.get("/api/v1/services/{name}", api.get_service),
            web.put("/api/v1/services/{name}/weights", api.set_weights),
            web.post("/api/v1/services/{name}/promote", api.promote),
            web.post("/api/v1/services/{name}/rollback", api.rollback),
            web.post("/api/v1/services/{name}/explain", api.explain),
            web.post("/api/v1/reload", api.reload),
            web.get("/healthz", api.healthz),
            web.get("/readyz", api.readyz),
            web.get("/metrics", api.metrics),
        ]
    )
    return app


def error_response(
    status: int,
    message: str,
    details: list[str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.json_response(
        {"error": message, "details": details or []}, status=status, headers=headers
    )


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kept = {name: exc.headers[name] for name in _KEPT_ERROR_HEADERS if name in exc.headers}
        message = f"{exc.reason.lower()}: {request.method} {request.path}"
        return error_response(exc.status, message, headers=kept)
    except ControlRefused as exc:
        return error_response(exc.status, exc.message, exc.details)
    except ConfigError as exc:
        return error_response(400, "refused; nothing changed", exc.errors)
    except Exception:
        log.exception("control API: %s %s failed", request.method, request.path)
        return error_response(500, "internal error; see the grayproxy log")


def _bearer_auth(state: LiveState) -> Middleware:
    @web.middleware
    async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = state.snapshot.config.control.token
        if token and request.path.startswith("/api/") and not _authorized(request, token):
            return error_response(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        return await handler(request)

    return bearer_auth


def _authorized(request: web.Request, token: str) -> bool:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode("utf-8", "surrogatepass"),
        token.encode("utf-8", "surrogatepass"),
    )


async def _json_body(request: web.Request) -> object:
    try:
        return json.loads(await request.read())
    except ValueError as exc:  # also covers UnicodeDecodeError
        raise InvalidRequest("request body is not valid JSON", [str(exc)]) from None


class _ControlAPI:
    """The handlers, bound to one worker's live state and metrics."""

    def __init__(
        self,
        state: LiveState,
        metrics: Metrics,
        endpoint_health: EndpointHealth,
        is_ready: Callable[[], bool],
        refresh: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._endpoint_health = endpoint_health
        self._is_ready = is_ready
        self._refresh = refresh

    async def _fresh(self) -> None:
        if self._refresh is not None:
            await self._refresh()

    async def list_services(self, request: web.Request) -> web.Response:
        await self._fresh()
        snapshot = self._state.snapshot
        services = [self._service_json(s, snapshot.generation) for s in snapshot.config.services]
        return web.json_response({"generation": snapshot.generation, "services": services})

    async def get_service(self, request: web.Request) -> web.Response:
        await self._fresh()
        return self._service_response(request.match_info["name"])

    async def set_weights(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._state.service(name)  # an unknown service is a 404 whatever the body
        self._state.set_weights(name, await _json_body(request))
        return self._service_response(name)

    async def promote(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._state.service(name)
        body = await _json_body(request)
        if not isinstance(body, dict) or "version" not in body:
            raise InvalidRequest('body must be a JSON object like {"version": "canary"}')
        self._state.promote(name, body["version"])
        return self._service_response(name)

    async def rollback(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._state.rollback(name)
        return self._service_response(name)

    async def explain(self, request: web.Request) -> web.Response:
        """Which version the data path would choose for a request, and why (explain.py)."""
        name = request.match_info["name"]
        self._state.service(name)  # an unknown service is a 404 whatever the body
        facts = read_facts(await _json_body(request))
        await self._fresh()  # endpoint health, from every worker
        snapshot = self._state.snapshot  # once: the router and the health of one config
        try:
            router = snapshot.router.service(name)
        except KeyError:  # a reload removed it meanwhile
            raise UnknownService(name) from None
        versions = {version.name: version for version in router.service.versions}

        def has_endpoint(version: str) -> bool:
            addresses = versions[version].endpoints
            return any(self._endpoint_health(name, version, a) for a in addresses)

        underscores = snapshot.config.headers_with_underscores
        return web.json_response(explain(router, facts, underscores, has_endpoint))

    async def reload(self, request: web.Request) -> web.Response:
        snapshot = await self._state.reload()  # parsed in a thread: the loop keeps serving
        return web.json_response(
            {"generation": snapshot.generation, "warnings": list(snapshot.warnings)}
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(self, request: web.Request) -> web.Response:
        if self._is_ready():
            return web.Response(text="ready")
        return web.Response(status=503, text="not ready")

    async def metrics(self, request: web.Request) -> web.Response:
        await self._fresh()
        body = self._metrics.render(self._state.snapshot, self._endpoint_health)
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    def _service_response(self, name: str) -> web.Response:
        service = self._state.service(name)
        return web.json_response(self._service_json(service, self._state.snapshot.generation))

    def _service_json(self, service: Service, generation: int) -> dict[str, object]:
        return {
            "name": service.name,
            "generation": generation,
            "baseline": service.baseline,
            "fallback": service.fallback,
            "match": {"host": service.match.host, "path_prefix": service.match.path_prefix},
            "versions": {
                version.name: {
                    "weight": _number(service.split.weights[version.name]),
                    "endpoints": [
                        {
                            "address": str(address),
                            "healthy": self._endpoint_health(service.name, version.name, address),
                        }
                        for address in version.endpoints
                    ],
                    "stats": self._metrics.version(service.name, version.name).window(),
                }
                for version in service.versions
            },
            "rules": [_rule_json(rule) for rule in service.rules],
            "split": _split_json(service.split),
        }


def _rule_json(rule: Rule) -> dict[str, object]:
    match: dict[str, object] = {}
    if rule.headers:
        match["header"] = [_field_json(field) for field in rule.headers]
    if rule.cookies:
        match["cookie"] = [_field_json(field) for field in rule.cookies]
    if rule.query:
        match["query"] = [_field_json(field) for field in rule.query]
    if rule.path_prefix is not None:
        match["path_prefix"] = rule.path_prefix
    if rule.methods:
        match["method"] = sorted(rule.methods)
    if rule.sources:
        match["source"] = [str(network) for network in rule.sources]
    rule_json: dict[str, object] = {"match": match, "version": rule.version}
    if rule.name is not None:
        rule_json["name"] = rule.name
    return rule_json


def _field_json(field: FieldMatch) -> dict[str, object]:
    if field.regex is not None:
        return {"name": field.name, "regex": field.regex.pattern}
    if field.value is not None:
        return {"name": field.name, "value": field.value}
    return {"name": field.name, "present": field.present}


def _split_json(split: Split) -> dict[str, object]:
    sticky = split.sticky_cookie
    return {
        "hash_on": [
            {"client_ip": True} if source.kind == "client_ip" else {source.kind: source.name}
            for source in split.hash_on
        ],
        "sticky_cookie": None
        if sticky is None
        else {"name": sticky.name, "max_age": sticky.max_age},
        "salt": split.salt,
    }


def _number(weight: float) -> float | int:
    """90.0 reads as 90, 12.5 stays 12.5."""
    return int(weight) if float(weight).is_integer() else weight
