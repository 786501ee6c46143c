"""Lifecycle: open the listeners, serve, reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import uvloop
from aiohttp import web

from . import control
from .config import Config, ConfigError
from .dataplane import DataPlane
from .metrics import Metrics
from .state import LiveState

log = logging.getLogger("grayproxy")


def run(
    config: Config,
    config_path: str | None = None,
    *,
    setup: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT; returns the process exit code."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config, config_path, setup))


async def serve(
    config: Config,
    config_path: str | None,
    setup: Callable[[], Awaitable[None]] | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    if setup is not None:
        await setup()
    state = LiveState(config, config_path)
    metrics = Metrics()
    plane = DataPlane(state, metrics)
    data_server = await loop.create_server(
        plane.protocol_factory,
        config.listen.host,
        config.listen.port,
        backlog=1024,
        reuse_address=True,
    )
    app = control.create_app(
        state, metrics, endpoint_health=plane.endpoint_healthy, is_ready=lambda: not plane.draining
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.control.listen.host, config.control.listen.port)
    await site.start()
    log.info("data on http://%s, control on %s", listen_text(data_server), site.name)

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_from_signal, state)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("draining (up to %gs)", config.drain_timeout)
    data_server.close()
    plane.start_draining()
    await plane.wait_drained(config.drain_timeout)
    await runner.cleanup()
    log.info("stopped")
    return 0


def reload_from_signal(state: LiveState) -> None:
    try:
        snapshot = state.reload()
    except ConfigError as exc:
        log.error("reload refused, running config kept:\n  %s", "\n  ".join(exc.errors))
    else:
        log.info("reloaded: generation %d", snapshot.generation)


def listen_text(server: asyncio.Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
