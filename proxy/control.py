"""The control API: reads and atomic changes of the live state, health and metrics.

Errors are mapped to status in one place (``_errors``): ControlRefused knows its
own status, ConfigError is 400 with every problem in ``details``, aiohttp's
HTTP errors (404 unknown route, 405 wrong method, 413 body too large) keep
theirs, anything else is a logged 500. Every error body is
``{"error": "...", "details": [...]}``.

Change safety (docs/change-safety.md) is two middlewares, so that routes other
modules add get it too. ``_bearer_auth`` finds the caller's token among all of
them (each compared in constant time, none skipped), refuses a change to a
``read`` token (403), and sets ``request[ACTOR]`` to the token's name (handlers
read it with ``actor_of(request)``) and ``request[ROLE]`` to its role.
``_versioned`` handles If-Match and ETag: a stale If-Match is refused at once
(412); otherwise the request's If-Match is put where LiveState checks it
(``state.IF_MATCH``) when the change applies, in the same synchronous step as the
swap: a change that lands while the handler awaits (its body, a reload's parse)
makes this one 412, never a lost update. Every successful ``/api/`` answer
carries ``ETag: "GENERATION"``, the generation it shows, and is sent only once
the state file (if any) holds that generation: a generation a client has seen
survives ``kill -9``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.audit import parse_limit
from proxy.config import ConfigError, Control, FieldMatch, Rule, Service, Split, Token
from proxy.dashboard import add_dashboard
from proxy.errors import ControlRefused, InvalidRequest, UnknownService
from proxy.explain import explain, read_facts
from proxy.metrics import EndpointHealth, Metrics
from proxy.release_api import add_release_api
from proxy.releases import Releases
from proxy.state import (
    DEFAULT_ACTOR,
    IF_MATCH,
    LiveState,
    Precondition,
    PreconditionFailed,
)

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_KEPT_ERROR_HEADERS = ("Allow", "WWW-Authenticate")
READ_METHODS = frozenset({"GET", "HEAD"})  # what a "read" token may call
# ... and these, which change nothing (explain answers without sending anything).
READ_POSTS = frozenset({"/api/v1/services/{name}/explain"})
ACTOR = web.RequestKey("actor", str)  # who makes the request's changes (a token's name)
ROLE = web.RequestKey("role", str)  # what the request's token may do: "admin" or "read"
_MAX_GENERATION_DIGITS = 18


def create_app(
    state: LiveState,
    metrics: Metrics,
    *,
    endpoint_health: EndpointHealth,
    is_ready: Callable[[], bool],
    refresh: Callable[[], Awaitable[None]] | None = None,
    releases: Releases | None = None,
) -> web.Application:
    """The control application; the caller runs it on ``control.listen``.

    ``refresh``, if given, is awaited before stats, health or metrics are read
    (a supervisor gathers them from its workers then). ``releases`` drives the
    releases (proxy/releases.py; by default one on this state and metrics).
    """
    api = _ControlAPI(state, metrics, endpoint_health, is_ready, refresh)
    app = web.Application(middlewares=[_errors, _bearer_auth(state), _versioned(state)])
    app.add_routes(
        [
            web.get("/api/v1/services", api.list_services),
            web.get("/api/v1/services/{name}", api.get_service),
            web.put("/api/v1/services/{name}/weights", api.set_weights),
            web.post("/api/v1/services/{name}/promote", api.promote),
            web.post("/api/v1/services/{name}/rollback", api.rollback),
            web.post("/api/v1/services/{name}/explain", api.explain),
            web.post("/api/v1/reload", api.reload),
            web.get("/api/v1/audit", api.audit),
            web.get("/api/v1/whoami", whoami),
            web.get("/healthz", api.healthz),
            web.get("/readyz", api.readyz),
            web.get("/metrics", api.metrics),
        ]
    )
    add_dashboard(app)
    releases = releases or Releases(state, metrics, refresh=refresh)
    add_release_api(app, releases, actor_of)
    state.add_persisted("releases", releases.dump)
    saved = state.restored("releases")
    if isinstance(saved, dict):
        releases.restore(saved)  # before the app starts: a restored release is not restarted
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
        if not request.path.startswith("/api/"):
            return await handler(request)
        tokens = _tokens(state.snapshot.config.control)
        if not tokens:
            request[ACTOR], request[ROLE] = DEFAULT_ACTOR, "admin"
            return await handler(request)
        token = _token_of(request, tokens)
        if token is None:
            return error_response(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        if token.role != "admin" and not _reads_only(request):
            why = f"token {token.name!r} has the role {token.role!r}: it may only read (GET)"
            return error_response(403, "forbidden: a change needs an admin token", [why])
        request[ACTOR], request[ROLE] = token.name, token.role
        return await handler(request)

    return bearer_auth


def _reads_only(request: web.Request) -> bool:
    if request.method in READ_METHODS:
        return True
    resource = request.match_info.route.resource
    return request.method == "POST" and resource is not None and resource.canonical in READ_POSTS


def _tokens(control: Control) -> tuple[Token, ...]:
    if control.tokens or control.token is None:
        return control.tokens
    return (Token("admin", control.token, "admin"),)  # a Control made without the loader


def _token_of(request: web.Request, tokens: tuple[Token, ...]) -> Token | None:
    """The token the request presents, compared with every token in constant time: the
    time taken tells nothing of which token, or how much of one, matched."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    presented = credentials.strip().encode("utf-8", "surrogatepass")
    found = None
    for token in tokens:
        if hmac.compare_digest(presented, token.secret.encode("utf-8", "surrogatepass")):
            found = token
    return found if scheme.lower() == "bearer" else None


def _versioned(state: LiveState) -> Middleware:
    """If-Match on every /api/ call, ETag on every successful answer (module docstring)."""

    @web.middleware
    async def versioned(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        precondition = _if_match(request)
        if precondition is not None and not precondition.holds(state.snapshot.generation):
            failed = PreconditionFailed(precondition.condition, state.snapshot.generation)
            return await _shown(state, _precondition_failed(failed), failed.generation)
        context = IF_MATCH.set(precondition)
        try:
            response = await handler(request)
        except PreconditionFailed as failed:
            return await _shown(state, _precondition_failed(failed), failed.generation)
        finally:
            if precondition is not None:
                precondition.settled = True  # tasks the handler started cannot be refused by it
            IF_MATCH.reset(context)
        # No await since the handler's last read of the state: this is the generation it shows.
        generation = state.snapshot.generation
        if response.status >= 300 or response.prepared:
            return response
        return await _shown(state, response, generation)

    return versioned


async def _shown(
    state: LiveState, response: web.StreamResponse, generation: int
) -> web.StreamResponse:
    """``response`` with the ETag of ``generation``, once the state file holds it."""
    response.headers["ETag"] = f'"{generation}"'
    await state.written(generation)
    return response


def _if_match(request: web.Request) -> Precondition | None:
    """The request's If-Match: ``*``, or entity tags ``"7"`` (a bare 7 is taken too); weak
    tags (``W/"7"``) never match, as RFC 9110 compares strongly. 400 if malformed."""
    header = request.headers.get("If-Match")
    if header is None:
        return None
    condition = header.strip()
    task = asyncio.current_task()
    if condition == "*":
        return Precondition(condition, None, task=task)
    generations: set[int] = set()
    for part in condition.split(","):
        tag = part.strip()
        if not tag or tag.startswith("W/"):
            continue
        if len(tag) >= 2 and tag[0] == tag[-1] == '"':
            tag = tag[1:-1]
        elif not tag.isdigit():
            expected = 'expected If-Match: "GENERATION" (the ETag of a read) or *'
            raise InvalidRequest(f"malformed If-Match {header!r}", [expected])
        if tag.isascii() and tag.isdigit() and len(tag) <= _MAX_GENERATION_DIGITS:
            generations.add(int(tag))
    return Precondition(condition, frozenset(generations), task=task)


def _precondition_failed(failed: PreconditionFailed) -> web.Response:
    generation = failed.generation
    return web.json_response(
        {
            "error": (
                f"precondition failed: If-Match {failed.condition} does not match the current "
                f"generation {generation}; nothing changed"
            ),
            "details": [f'read the current state (ETag "{generation}") and decide again'],
            "generation": generation,
        },
        status=412,
    )


def actor_of(request: web.Request) -> str:
    """Who makes the request's changes: its token's name (set by the auth middleware)."""
    actor: str = request.get(ACTOR, DEFAULT_ACTOR)
    return actor


async def whoami(request: web.Request) -> web.Response:
    """The caller's token: its name and role (the dashboard disables its controls for "read")."""
    return web.json_response({"name": actor_of(request), "role": request[ROLE]})


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
        self._state.set_weights(name, await _json_body(request), actor=actor_of(request))
        return self._service_response(name)

    async def promote(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._state.service(name)
        body = await _json_body(request)
        if not isinstance(body, dict) or "version" not in body:
            raise InvalidRequest('body must be a JSON object like {"version": "canary"}')
        self._state.promote(name, body["version"], actor=actor_of(request))
        return self._service_response(name)

    async def rollback(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._state.rollback(name, actor=actor_of(request))
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
        # Parsed in a thread: the loop keeps serving.
        snapshot = await self._state.reload(actor=actor_of(request))
        return web.json_response(
            {"generation": snapshot.generation, "warnings": list(snapshot.warnings)}
        )

    async def audit(self, request: web.Request) -> web.Response:
        try:
            limit = parse_limit(request.query.get("limit"))
        except ValueError as exc:
            raise InvalidRequest("invalid query", [str(exc)]) from None
        service = request.query.get("service") or None
        records = self._state.audit.newest(limit, service)
        return web.json_response(
            {
                "generation": self._state.snapshot.generation,
                "records": [record.to_json() for record in records],
            }
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
            "mirror": self._mirror_json(service),
        }

    def _mirror_json(self, service: Service) -> dict[str, object] | None:
        """The service's mirror and how its shadow requests went; null without one."""
        mirror = service.mirror
        if mirror is None:
            return None
        stats = self._metrics.mirror(service.name, mirror.to)
        return {
            "to": mirror.to,
            "percent": _number(mirror.percent),
            "stats": stats.summary(),
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
