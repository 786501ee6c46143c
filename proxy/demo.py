"""`grayproxy demo`: two built-in versions of a small service, and the proxy in front of them.

The versions ("stable" and "canary") are aiohttp apps on loopback sockets bound before the
config is built, so their ports are known; they start inside the proxy's event loop.
"""

from __future__ import annotations

import html
import os
import shutil
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from contextlib import ExitStack
from pathlib import Path

from aiohttp import web

from proxy import server
from proxy.config import (
    Address,
    Config,
    Control,
    FieldMatch,
    HashSource,
    Rule,
    Service,
    Split,
    StickyCookie,
    Version,
)
from proxy.ctl import DEFAULT_CONTROL_URL

SERVICE = "demo"
VERSION_COLOURS = {"stable": "#2e7d32", "canary": "#ef6c00"}
WEIGHTS = {"stable": 90.0, "canary": 10.0}
# A browser sends no x-user-id: without a cookie of its own it would be drawn
# again on every reload.
STICKY_COOKIE = StickyCookie("gp_sticky", max_age=86400)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>grayproxy demo: {version}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 0; background: {colour}; color: #fff; }}
main {{ max-width: 40rem; margin: 4rem auto; padding: 0 1rem; }}
h1 {{ font-size: 3rem; margin: 0 0 1rem; }}
code {{ background: rgba(0, 0, 0, .25); padding: .1rem .3rem; border-radius: .2rem; }}
a {{ color: #fff; }}
</style></head>
<body><main>
<h1>{version}</h1>
<p>This answer came from the <strong>{version}</strong> version of service
<code>{service}</code>. Path: <code>{path}</code></p>
<p>This browser keeps its version (cookie <code>gp_sticky</code>); delete the cookie
to be drawn again by weight. Send <code>x-canary: always</code>
or <code>never</code> to pin a version, or <code>x-user-id</code> to stay on one.
JSON: <a href="/api/info">/api/info</a></p>
</main></body></html>
"""


def version_app(version: str) -> web.Application:
    """A tiny app that says which version it is: an HTML page, and JSON at /api/info."""

    async def info(request: web.Request) -> web.Response:
        return web.json_response(
            {"version": version, "path": request.raw_path, "headers": dict(request.headers)}
        )

    async def page(request: web.Request) -> web.Response:
        body = PAGE.format(
            version=version,
            colour=VERSION_COLOURS.get(version, "#455a64"),
            service=SERVICE,
            path=html.escape(request.raw_path),
        )
        return web.Response(text=body, content_type="text/html")

    app = web.Application()
    app.router.add_get("/api/info", info)
    app.router.add_route("*", "/{tail:.*}", page)
    return app


def bind_loopback() -> socket.socket:
    """A listening-ready TCP socket on 127.0.0.1 and a port the kernel picks."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def demo_config(
    host: str, port: int, control_port: int, version_ports: Mapping[str, int]
) -> Config:
    """Service "demo": stable/canary 90/10, keyed by x-user-id then cookie session, else a
    sticky cookie."""
    versions = tuple(
        Version(name, (Address("127.0.0.1", version_port),))
        for name, version_port in version_ports.items()
    )
    rules = (
        Rule("canary", headers=(FieldMatch("x-canary", value="always"),)),
        Rule("stable", headers=(FieldMatch("x-canary", value="never"),)),
    )
    split = Split(
        weights=dict(WEIGHTS),
        hash_on=(HashSource("header", "x-user-id"), HashSource("cookie", "session")),
        sticky_cookie=STICKY_COOKIE,
    )
    service = Service(SERVICE, versions, split, baseline="stable", rules=rules)
    return Config(
        services=(service,),
        listen=Address(host, port),
        control=Control(listen=Address("127.0.0.1", control_port)),
        source="<demo>",
    )


def start_versions(sockets: Mapping[str, socket.socket]) -> Callable[[], Awaitable[None]]:
    """The setup coroutine function that serves each version's app on its pre-bound socket."""

    async def setup() -> None:
        for version, sock in sockets.items():
            runner = web.AppRunner(version_app(version), access_log=None)
            await runner.setup()
            await web.SockSite(runner, sock).start()

    return setup


def grayproxy_command() -> str:
    """How the user can call grayproxy from here (the venv's script when not on PATH)."""
    if shutil.which("grayproxy"):
        return "grayproxy"
    script = Path(sys.executable).parent / "grayproxy"
    if not script.exists():
        return f"{sys.executable} -m proxy"
    relative = os.path.relpath(script)
    return relative if not relative.startswith("..") else str(script)


def instructions(config: Config, version_ports: Mapping[str, int]) -> str:
    """What to try, as lines to copy."""
    host = config.listen.host if config.listen.host not in ("0.0.0.0", "::") else "127.0.0.1"
    data = f"http://{Address(host, config.listen.port)}"
    control = f"http://{config.control.listen}"
    ctl = grayproxy_command() + " ctl"
    lines = [f'grayproxy demo: service "{SERVICE}", two versions behind the proxy']
    lines += [f"  {name:<7} http://127.0.0.1:{port}" for name, port in version_ports.items()]
    lines += [
        "",
        f"Open {data}/ in a browser, or try:",
        f"  curl -si {data}/api/info                       # by weight: 90 % stable",
        f"  curl -s {data}/api/info -H 'x-canary: always'  # pinned to the canary",
        f"  curl -s {data}/api/info -H 'x-canary: never'   # pinned to stable",
        f"  curl -s {data}/api/info -H 'x-user-id: alice'  # alice keeps her version",
        "",
        "Change the split at runtime:",
    ]
    if control != DEFAULT_CONTROL_URL:
        lines.append(f"  export GRAYPROXY_CONTROL={control}")
    lines += [
        f"  {ctl} status",
        f"  {ctl} weights {SERVICE} stable=50 canary=50",
        f"  {ctl} promote {SERVICE} canary",
        f"  {ctl} rollback {SERVICE}",
        f"  curl -s {control}/api/v1/services/{SERVICE}",
        f"  curl -s {control}/metrics",
        "",
        f"Watch and change it in the dashboard: {control}/",
        "",
        "Ctrl-C to stop.",
    ]
    return "\n".join(lines)


def run_demo(port: int = 8080, control_port: int = 9901, host: str = "127.0.0.1") -> int:
    """Serve the demo until SIGTERM/SIGINT; the exit code of the proxy."""
    with ExitStack() as stack:
        sockets = {name: stack.enter_context(bind_loopback()) for name in WEIGHTS}
        version_ports = {name: port_of(sock) for name, sock in sockets.items()}
        config = demo_config(host, port, control_port, version_ports)
        print(instructions(config, version_ports), flush=True)
        return server.run(config, None, setup=start_versions(sockets))
