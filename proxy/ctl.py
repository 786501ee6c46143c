"""`grayproxy ctl`: a client for the control API (docs/control-api.md), standard library only.

The API's address comes from ``GRAYPROXY_CONTROL`` (default ``http://127.0.0.1:9901``,
where a config without ``control.listen`` puts it), the token from ``GRAYPROXY_TOKEN``.
Proxy environment variables are ignored: the control API is reached directly.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from proxy.config import Control

DEFAULT_CONTROL_URL = f"http://{Control().listen}"
REQUEST_TIMEOUT_SECONDS = 10.0
# A reload answers once the whole file is parsed and validated: for a config near the 8 MiB
# cap that can be tens of seconds of pure-Python YAML (the proxy serves on meanwhile).
RELOAD_TIMEOUT_SECONDS = 120.0

Json = Any
Handler = Callable[["ControlClient", argparse.Namespace], Json]


class ControlCallFailed(Exception):
    """A failed control-API call: the message and details to show, one line each."""

    def __init__(
        self, message: str, details: Sequence[str] = (), status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = list(details)
        self.status = status  # the API's HTTP status; None when there was no answer


class ControlClient:
    """JSON over HTTP to one control listener."""

    def __init__(self, base_url: str, token: str | None = None) -> None:
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.etag: str | None = None  # the ETag of the last answer (its generation)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"<ControlClient {self.base_url} token={'set' if self.token else 'unset'}>"

    def call(
        self,
        method: str,
        path: str,
        body: Json = None,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Json:
        """The answer's JSON; ``timeout`` (seconds without a byte) defaults to
        REQUEST_TIMEOUT_SECONDS."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            timeout = REQUEST_TIMEOUT_SECONDS if timeout is None else timeout
            with self._opener.open(request, timeout=timeout) as response:
                self.etag = response.headers.get("ETag")
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                self.etag = exc.headers.get("ETag")
                raise _api_error(exc.code, exc.read()) from None
        except urllib.error.URLError as exc:
            raise self._connection_error(exc.reason) from None
        except (TimeoutError, ConnectionError) as exc:
            raise self._connection_error(exc) from None
        except http.client.HTTPException as exc:
            raise self._connection_error(f"not an HTTP answer ({type(exc).__name__})") from None
        except json.JSONDecodeError as exc:
            raise ControlCallFailed(
                f"{self.base_url}{path}: the answer is not JSON ({exc})"
            ) from None

    def _connection_error(self, reason: object) -> ControlCallFailed:
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(reason, TimeoutError):
            why = "timed out"
        else:
            why = str(reason)
        return ControlCallFailed(
            f"cannot reach the control API at {self.base_url}: {why}",
            ["is grayproxy running? set GRAYPROXY_CONTROL to its control address"],
        )


def _api_error(status: int, raw: bytes) -> ControlCallFailed:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        details = body.get("details") or []
        if not isinstance(details, list):
            details = [details]
        message = f"HTTP {status}: {body['error']}"
        return ControlCallFailed(message, [str(d) for d in details], status)
    text = raw.decode("utf-8", "replace").strip()
    return ControlCallFailed(f"HTTP {status}: {text or 'no body'}", status=status)


# ---- the commands: each returns the API's JSON answer -------------------------------------


def _status(client: ControlClient, args: argparse.Namespace) -> Json:
    if args.service:
        return client.call("GET", f"/api/v1/services/{_quote(args.service)}")
    return client.call("GET", "/api/v1/services")


def put_weights(client: ControlClient, args: argparse.Namespace) -> Json:
    path = f"/api/v1/services/{_quote(args.service)}/weights"
    return client.call("PUT", path, args.weights, headers=if_match(args))


def _promote(client: ControlClient, args: argparse.Namespace) -> Json:
    body = {"version": args.version}
    path = f"/api/v1/services/{_quote(args.service)}/promote"
    return client.call("POST", path, body, headers=if_match(args))


def _rollback(client: ControlClient, args: argparse.Namespace) -> Json:
    path = f"/api/v1/services/{_quote(args.service)}/rollback"
    return client.call("POST", path, {}, headers=if_match(args))


def _explain(client: ControlClient, args: argparse.Namespace) -> Json:
    headers: dict[str, list[str]] = {}
    for name, value in args.headers:
        headers.setdefault(name, []).append(value)
    body: dict[str, Json] = {"method": args.method, "path": args.path, "headers": headers}
    if args.client_ip is not None:
        body["client_ip"] = args.client_ip
    return client.call("POST", f"/api/v1/services/{_quote(args.service)}/explain", body)


def _reload(client: ControlClient, args: argparse.Namespace) -> Json:
    return client.call(
        "POST", "/api/v1/reload", {}, timeout=RELOAD_TIMEOUT_SECONDS, headers=if_match(args)
    )


def _audit(client: ControlClient, args: argparse.Namespace) -> Json:
    query = {"limit": str(args.limit)}
    if args.service:
        query["service"] = args.service
    return client.call("GET", f"/api/v1/audit?{urllib.parse.urlencode(query)}")


def if_match(args: argparse.Namespace) -> dict[str, str]:
    """The If-Match header of ``--if-match GENERATION`` (none without it)."""
    generation: str | None = getattr(args, "if_match", None)
    if generation is None:
        return {}
    return {"If-Match": generation if generation == "*" else f'"{generation}"'}


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


# ---- rendering for people ------------------------------------------------------------------


def services_of(answer: Json) -> list[Mapping[str, Any]]:
    """The service objects in an answer: one service, or {"services": [...]} for all."""
    if isinstance(answer, dict) and isinstance(answer.get("services"), list):
        return list(answer["services"])
    if isinstance(answer, dict) and isinstance(answer.get("versions"), dict):
        return [answer]
    return []


STATUS_COLUMNS = ("VERSION", "WEIGHT", "SHARE", "HEALTHY", "REQUESTS", "ERRORS", "P50", "P99")


def format_status(answer: Json) -> str:
    """A readable table per service: each version's weight, health, traffic and latency."""
    blocks = [_format_service(service) for service in services_of(answer)]
    return "\n\n".join(blocks) if blocks else "no services"


def _format_service(service: Mapping[str, Any]) -> str:
    versions: Mapping[str, Mapping[str, Any]] = service.get("versions") or {}
    total_weight = sum(float(v.get("weight") or 0) for v in versions.values())
    rows: list[tuple[str, ...]] = [STATUS_COLUMNS]
    rows += [_version_row(name, version, total_weight) for name, version in versions.items()]
    title = f"{service.get('name', '?')}  generation {service.get('generation', '?')}"
    if service.get("baseline"):
        title += f"  baseline {service['baseline']}"
    return "\n".join([title, *_aligned(rows)])


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart, indented by two."""
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    return ["  " + "  ".join(map(str.ljust, row, widths)).rstrip() for row in rows]


def _version_row(name: str, version: Mapping[str, Any], total_weight: float) -> tuple[str, ...]:
    weight = float(version.get("weight") or 0)
    share = weight / total_weight * 100 if total_weight else 0.0
    endpoints = version.get("endpoints") or []
    healthy = sum(1 for e in endpoints if isinstance(e, dict) and e.get("healthy"))
    stats: Mapping[str, Any] = version.get("stats") or {}
    return (
        name,
        _number(weight),
        f"{share:.2f}%",
        f"{healthy}/{len(endpoints)}",
        str(stats.get("requests", 0)),
        _percent(stats.get("error_rate")),
        _millis(stats.get("p50_ms")),
        _millis(stats.get("p99_ms")),
    )


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


def _percent(rate: object) -> str:
    return f"{float(rate) * 100:.2f}%" if isinstance(rate, int | float) else "-"


def _millis(value: object) -> str:
    return f"{float(value):.1f}ms" if isinstance(value, int | float) else "-"


def format_reload(answer: Json) -> str:
    """`reloaded: generation 8`, then any warnings."""
    if not isinstance(answer, dict):
        return json.dumps(answer)
    lines = [f"reloaded: generation {answer.get('generation', '?')}"]
    lines += [f"warning: {warning}" for warning in answer.get("warnings") or []]
    return "\n".join(lines)


def format_audit(answer: Json) -> str:
    """One line per audit record, newest first: generation, time, actor, action, service,
    then what changed."""
    records = answer.get("records") if isinstance(answer, dict) else None
    if not isinstance(records, list):
        return json.dumps(answer)
    if not records:
        return "no changes recorded"
    rows: list[tuple[str, ...]] = [("GENERATION", "TIME", "ACTOR", "ACTION", "SERVICE", "CHANGE")]
    for record in records:
        rows.append(
            (
                str(record.get("generation", "?")),
                str(record.get("time", "?")),
                str(record.get("actor", "?")),
                str(record.get("action", "?")),
                str(record.get("service") or "-"),
                f"{_compact(record.get('before'))} -> {_compact(record.get('after'))}",
            )
        )
    return "\n".join(line[2:] for line in _aligned(rows))


def _compact(value: object) -> str:
    if isinstance(value, dict) and all(isinstance(v, int | float) for v in value.values()):
        return " ".join(f"{name}={_number(float(v))}" for name, v in value.items())
    return json.dumps(value, separators=(",", ":"))


def format_change(answer: Json) -> str:
    """One line per service after a change: its weights and generation."""
    services = services_of(answer)
    if not services:
        return json.dumps(answer)
    lines = []
    for service in services:
        versions: Mapping[str, Mapping[str, Any]] = service.get("versions") or {}
        weights = " ".join(
            f"{n}={_number(float(v.get('weight') or 0))}" for n, v in versions.items()
        )
        lines.append(
            f"{service.get('name', '?')}: {weights} (generation {service.get('generation', '?')})"
        )
    return "\n".join(lines)


def format_explain(answer: Json) -> str:
    """`version: canary`, `decision: split;key=header:x-user-id`, and the rest of the answer."""
    if not isinstance(answer, dict):
        return json.dumps(answer)
    if answer.get("random"):
        chances: Mapping[str, Any] = answer.get("chances") or {}
        shares = ", ".join(f"{name} {_number(float(share))}%" for name, share in chances.items())
        lines = [f"version: drawn at random ({shares})"]
    else:
        lines = [f"version: {answer.get('version')}"]
    lines.append(f"decision: {answer.get('decision')}")
    if answer.get("note"):
        lines.append(f"note: {answer['note']}")
    if answer.get("healthy") is False:
        lines.append("healthy: no endpoint in rotation; the data path answers 503")
    return "\n".join(lines)


# ---- argument parsing ------------------------------------------------------------------------


def parse_weight(text: str) -> tuple[str, float]:
    """`canary=20` -> ("canary", 20)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected VERSION=WEIGHT, e.g. canary=20")
    try:
        weight = float(value)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise argparse.ArgumentTypeError(f"{text!r}: the weight must be a number")
    return name, weight


def parse_generation(text: str) -> str:
    """`--if-match 7` (or `*`): a generation as a read shows it (its ETag)."""
    generation = text.strip().strip('"')
    if generation != "*" and not (generation.isascii() and generation.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a generation (a number) or *")
    return generation


def _limit(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number from 1 to 1000")
    return int(text)


def parse_header(text: str) -> tuple[str, str]:
    """`x-user-id: alice` -> ("x-user-id", "alice")."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'NAME: VALUE', e.g. 'x-user-id: 42'")
    return name.strip(), value.strip()


class _WeightsAction(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        pairs: Sequence[tuple[str, float]] = values or []  # type: ignore[assignment]
        weights: dict[str, int | float] = {}
        for name, weight in pairs:
            if name in weights:
                parser.error(f"version {name!r} given twice")
            weights[name] = int(weight) if weight == int(weight) else weight
        setattr(namespace, self.dest, weights)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `ctl` and its sub-commands on the main parser."""
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the raw JSON answer"
    )
    ctl = commands.add_parser(
        "ctl",
        help="control-API client",
        description=(
            "Talk to a running grayproxy's control API. "
            f"GRAYPROXY_CONTROL: its URL (default {DEFAULT_CONTROL_URL}); "
            "GRAYPROXY_TOKEN: the bearer token, if one is configured."
        ),
    )
    ctl.add_argument(
        "--url",
        help="control API URL (overrides GRAYPROXY_CONTROL); a fleet: URL1,URL2,... or "
        "dns+http://NAME:PORT (every address of NAME), see docs/fleets.md",
    )
    ctl.add_argument("--json", action="store_true", help="print the raw JSON answer")
    ctl.set_defaults(handler=run_ctl)
    actions = ctl.add_subparsers(dest="action", metavar="ACTION", required=True)
    guarded = argparse.ArgumentParser(add_help=False)
    guarded.add_argument(
        "--if-match",
        type=parse_generation,
        metavar="GENERATION",
        help="apply only if the generation is still this one (else HTTP 412, nothing changed)",
    )

    status = actions.add_parser("status", parents=[json_flag], help="services, versions, stats")
    status.add_argument("service", nargs="?", help="one service (default: all)")
    status.set_defaults(call=_status)

    weights = actions.add_parser(
        "weights", parents=[json_flag, guarded], help="set a service's weights"
    )
    weights.add_argument("service")
    weights.add_argument(
        "weights", nargs="+", type=parse_weight, action=_WeightsAction, metavar="VERSION=WEIGHT"
    )
    weights.set_defaults(call=put_weights)

    promote = actions.add_parser("promote", parents=[json_flag, guarded], help="one version to 100")
    promote.add_argument("service")
    promote.add_argument("version")
    promote.set_defaults(call=_promote)

    rollback = actions.add_parser(
        "rollback", parents=[json_flag, guarded], help="the baseline to 100"
    )
    rollback.add_argument("service")
    rollback.set_defaults(call=_rollback)

    reload = actions.add_parser(
        "reload", parents=[json_flag, guarded], help="re-read the config file"
    )
    reload.set_defaults(call=_reload)

    audit = actions.add_parser(
        "audit", parents=[json_flag], help="the latest changes, newest first"
    )
    audit.add_argument("service", nargs="?", help="only this service's changes")
    audit.add_argument(
        "--limit", type=_limit, default=20, help="how many (default 20, at most 1000)"
    )
    audit.set_defaults(call=_audit)
    from proxy import release_ctl  # it imports this module's client

    release_ctl.add_parser(actions, json_flag)
    explain = actions.add_parser(
        "explain",
        parents=[json_flag],
        help="the version a request would get, and why (nothing is sent)",
    )
    explain.add_argument("service")
    explain.add_argument(
        "-H",
        "--header",
        dest="headers",
        action="append",
        default=[],
        type=parse_header,
        metavar="'NAME: VALUE'",
        help="a request header (repeat for more)",
    )
    explain.add_argument("--method", default="GET", help="the request method (GET)")
    explain.add_argument("--path", default="/", help="the request path, query included (/)")
    explain.add_argument("--client-ip", help="the client address (127.0.0.1)")
    explain.set_defaults(call=_explain)


CHANGES = ("weights", "promote", "rollback", "reload")
RENDERERS: Mapping[str, Callable[[Json], str]] = {
    "status": format_status,
    "reload": format_reload,
    "audit": format_audit,
    "explain": format_explain,
}


def control_url(args: argparse.Namespace) -> str:
    """``--url``, else GRAYPROXY_CONTROL, else the default: one URL or a fleet's list."""
    return args.url or os.environ.get("GRAYPROXY_CONTROL") or DEFAULT_CONTROL_URL


def fail(exc: ControlCallFailed) -> int:
    """The error and its details on stderr; exit code 1."""
    print(f"grayproxy ctl: {exc.message}", file=sys.stderr)
    for detail in exc.details:
        print(f"  {detail}", file=sys.stderr)
    return 1


def run_ctl(args: argparse.Namespace) -> int:
    """Run one ctl action (on every replica of a fleet); 0 on success, 1 with the error on
    stderr."""
    from proxy import fleet  # it imports this module

    token = os.environ.get("GRAYPROXY_TOKEN") or None
    call: Handler = args.call
    render = RENDERERS.get(args.action, format_change)
    try:
        targets = fleet.resolve(control_url(args))
        if targets.fleet:
            change = args.action in CHANGES
            return fleet.run(args, targets, token, call, change=change, render=render)
        answer = call(ControlClient(targets.urls[0], token), args)
    except ControlCallFailed as exc:
        return fail(exc)
    print(json.dumps(answer, indent=2) if args.json else render(answer))
    return 0
