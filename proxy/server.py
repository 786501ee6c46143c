"""Lifecycle: open the listeners, serve, reload on SIGHUP (and with --watch when the
config file changes), drain on SIGTERM; SIGUSR1 reopens the access log (in every worker).

With `workers: 1` this process serves data itself. With more, it becomes the
supervisor (proxy/workers.py): it keeps the control API and the live state,
and N worker processes serve data on the shared port. The process that owns the
live state (the one process, or the supervisor) is the only one that restores
and writes the state file; workers follow the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
from collections.abc import Awaitable, Callable

import uvloop
from aiohttp import web

from . import control, dataplane
from .config import Config, ConfigError
from .metrics import EndpointHealth, Metrics
from .state import LiveState
from .tls import ServerCertificate
from .watch import ConfigWatch
from .workers import DataServer, Supervisor, reserve_port

log = logging.getLogger("grayproxy")


def run(
    config: Config,
    config_path: str | None = None,
    *,
    setup: Callable[[], Awaitable[None]] | None = None,
    as_in_file: Config | None = None,
    watch: bool = False,
) -> int:
    """Serve until SIGTERM or SIGINT; returns the process exit code. `as_in_file`
    is the config as its file gave it, when `config` differs (--workers); `watch`
    reloads the config file when it changes (proxy/watch.py)."""
    raise_file_limit()
    watcher = ConfigWatch(config_path) if watch and config_path is not None else None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config, config_path, setup, as_in_file, watcher))


def raise_file_limit() -> None:
    """Each client connection holds two descriptors (client and upstream):
    lift the soft limit to the hard one, as nginx's worker_rlimit_nofile does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(
    config: Config,
    config_path: str | None,
    setup: Callable[[], Awaitable[None]] | None = None,
    as_in_file: Config | None = None,
    watcher: ConfigWatch | None = None,
) -> int:
    if setup is not None:
        await setup()
    if config.workers > 1:
        return await serve_supervised(config, config_path, as_in_file or config, watcher)
    return await serve_alone(config, config_path, as_in_file or config, watcher)


async def serve_alone(
    config: Config, config_path: str | None, as_in_file: Config, watcher: ConfigWatch | None
) -> int:
    state = LiveState(config, config_path, as_in_file=as_in_file)
    if config.state_file is not None:
        state.attach_state_file(config.state_file)  # before the first request is routed
    data = await DataServer.start(state)
    plane = data.plane
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, plane.reopen_access_log)
    runner = await start_control(
        state, plane.metrics, plane.endpoint_healthy, lambda: not plane.draining
    )
    log.info(
        "data on %s://%s, control on %s, data path %s",
        "https" if data.certificate is not None else "http",
        listen_text(data.listener),
        control_url(runner, state.snapshot.config.control.tls is not None),
        data_path_build(),
    )
    await until_stopped(state, watcher)
    log.info("draining (up to %gs)", state.snapshot.config.drain_timeout)  # as last reloaded
    await data.drain()
    await runner.cleanup()
    await state.flush()
    log.info("stopped")
    return 0


async def serve_supervised(
    config: Config, config_path: str | None, as_in_file: Config, watcher: ConfigWatch | None
) -> int:
    config, port_holder = reserve_port(config)
    state = LiveState(config, config_path, as_in_file=as_in_file)
    if config.state_file is not None:
        state.attach_state_file(config.state_file)  # before the workers get their config
    metrics = Metrics()
    supervisor = Supervisor(state, metrics, config.workers)
    # Log rotation: each worker reopens its own access log file.
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGUSR1, supervisor.forward, signal.SIGUSR1
    )
    try:
        await supervisor.start()
    except RuntimeError as exc:
        log.error("%s", exc)
        await supervisor.stop(0)
        return 1
    runner = await start_control(
        state,
        metrics,
        supervisor.endpoint_healthy,
        lambda: not supervisor.stopping,
        refresh=supervisor.refresh,
    )
    log.info(
        "data on %s://%s (%d workers), control on %s, data path %s",
        "https" if config.tls is not None else "http",
        config.listen,
        config.workers,
        control_url(runner, state.snapshot.config.control.tls is not None),
        data_path_build(),
    )
    await until_stopped(state, watcher)
    drain_timeout = state.snapshot.config.drain_timeout  # as last reloaded
    log.info("draining (up to %gs)", drain_timeout)
    await supervisor.stop(drain_timeout)
    await runner.cleanup()
    await state.flush()
    if port_holder is not None:
        port_holder.close()
    log.info("stopped")
    return 0


async def start_control(
    state: LiveState,
    metrics: Metrics,
    endpoint_healthy: EndpointHealth,
    is_ready: Callable[[], bool],
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> web.AppRunner:
    app = control.create_app(
        state, metrics, endpoint_health=endpoint_healthy, is_ready=is_ready, refresh=refresh
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    settings = state.snapshot.config.control
    certificate = None
    if settings.tls is not None:
        serving = certificate = ServerCertificate(settings.tls, "control")
        state.subscribe(lambda snapshot: serving.update(snapshot.config.control.tls))
    ssl_context = certificate.context if certificate is not None else None
    listen = settings.listen
    await web.TCPSite(runner, listen.host, listen.port, ssl_context=ssl_context).start()
    return runner


async def until_stopped(state: LiveState, watcher: ConfigWatch | None = None) -> None:
    """Wait for SIGTERM or SIGINT; meanwhile SIGHUP reloads the config file, and so does
    `watcher`, if any, when the file changes."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        # One reload running and one waiting are enough: the waiting one reads the file
        # when its turn comes, so it sees every change a further SIGHUP could announce.
        if len(reloads) < 2:
            task = loop.create_task(reload_and_log(state, "signal"))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    watching = None
    if watcher is not None:
        watching = loop.create_task(watcher.run(lambda: reload_and_log(state, "file")))
    try:
        await stop.wait()
    finally:
        if watching is not None:
            watching.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def reload_and_log(state: LiveState, actor: str) -> None:
    """Reload like POST /api/v1/reload (parsed in a thread); the outcome goes to the log.
    `actor` is "signal" (SIGHUP) or "file" (--watch)."""
    try:
        snapshot = await state.reload(actor=actor)
    except ConfigError as exc:
        log.error("reload refused, running config kept:\n  %s", "\n  ".join(exc.errors))
    except Exception:
        log.exception("reload failed, running config kept")
    else:
        log.info("reloaded: generation %d", snapshot.generation)


def data_path_build() -> str:
    """ "compiled" when the data path runs as C extensions (mypyc, see setup.py)."""
    return "interpreted" if dataplane.__file__.endswith(".py") else "compiled"


def listen_text(server: asyncio.Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def control_url(runner: web.AppRunner, tls: bool = False) -> str:
    host, port = runner.addresses[0][:2]
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
