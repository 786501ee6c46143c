"""The dashboard: the page at ``/`` of the control listener and its two files.

They are read once from the package (``proxy/static/``) and served as they are:
no template, no build step, nothing from another origin. The page holds no data;
its script reads and changes everything through the token-protected ``/api/v1``
calls, so the files themselves need no token. Every answer carries a strict
Content-Security-Policy (scripts and styles from these files only, no frames),
so data the page shows can never run as code, even if it were written as HTML.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

# path -> (file in proxy/static, content type)
FILES: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/dashboard/style.css": ("style.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_dashboard(app: web.Application) -> None:
    """The page and its files on ``app``, read from the package now."""
    static = files("proxy") / "static"
    for path, (name, content_type) in FILES.items():
        body = (static / name).read_bytes()
        app.router.add_get(path, _serve(body, content_type))


def _serve(body: bytes, content_type: str) -> Handler:
    headers = {"Content-Type": content_type, **SECURITY_HEADERS}

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    return serve
