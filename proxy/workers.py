"""Several worker processes sharing the data port (SO_REUSEPORT).

The supervisor (the process the user started) owns the live state and the
control API; it does not serve data. Each worker serves data with its own
event loop and follows the supervisor over a socketpair carrying pickled
messages (both ends are this program, so pickle is safe here):

  supervisor -> worker   ("config", generation, pickled Config)   adopt a new snapshot
                         ("report", request_id)                   send counters and health
  worker -> supervisor   ("ready",)
                         ("report", request_id, metrics dump, {endpoint key: healthy})

A config is pickled on its own, in a thread, once for all workers, and each
worker unpickles it and builds its Router in a thread: for a config of
megabytes either takes long enough to stall an event loop (the supervisor's
control API, a worker's requests). Only the newest snapshot is sent when
several land while one is pickled, and a worker ignores a generation that is
not newer than its own, so the order of arrival cannot take it back.

A worker that dies is started again with the current config; its last
reported counters are kept so that aggregated counters never go backwards.
A worker logs from the level its supervisor logs from (``--log-level``),
given on its command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import uvloop

from .cli import setup_logging
from .config import Address, Config
from .dataplane import DataPlane
from .metrics import Metrics, StatsDump
from .routing import Router
from .state import LiveState, Snapshot, loop_first
from .tls import ServerCertificate

log = logging.getLogger("grayproxy")

HEADER = struct.Struct("!I")
EndpointKey = tuple[str, str, str]  # service, version, address
BACKLOG = 1024  # the data listener's accept queue
REPORT_TIMEOUT = 1.0
RESTART_DELAY = 0.5
ConfigMessage = tuple[str, int, bytes]  # ("config", generation, pickled Config)


async def send(writer: asyncio.StreamWriter, message: tuple[Any, ...]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(HEADER.pack(len(data)) + data)
    await writer.drain()


async def receive(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    message: tuple[Any, ...] = pickle.loads(await reader.readexactly(size))
    return message


def pack_config(config: Config) -> bytes:
    """The config for a worker (in a thread: a config of megabytes takes a while)."""
    return pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_config(payload: bytes) -> tuple[Config, Router]:
    """A worker's side of pack_config, with the config's Router (in a thread, likewise)."""
    config: Config = pickle.loads(payload)
    return config, Router(config.services)


class Worker:
    """The supervisor's handle on one worker process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready = asyncio.Event()
        self.last_dump: dict[tuple[str, str], StatsDump] = {}
        self.health: dict[EndpointKey, bool] = {}
        self.replies: dict[int, asyncio.Future[None]] = {}

    def __repr__(self) -> str:
        pid = self.process.pid if self.process else None
        return f"<Worker {self.index} pid={pid} ready={self.ready.is_set()}>"

    async def start(self, config_message: Callable[[], Awaitable[ConfigMessage]]) -> None:
        """Start the process and send it ``config_message()``, the newest config."""
        ours, theirs = socket.socketpair()
        # The worker logs from the level this process logs from (grayproxy run --log-level).
        log_level = logging.getLogger().getEffectiveLevel()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy.workers",
            str(theirs.fileno()),
            str(log_level),
            pass_fds=[theirs.fileno()],
            stdin=asyncio.subprocess.DEVNULL,
        )
        theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        message = await config_message()
        # No await from here to the write: the config is the first message, and no newer
        # snapshot can be broadcast to the old connection meanwhile and miss this worker.
        self.reader, self.writer = reader, writer
        self.ready.clear()
        await self.send(message)

    async def send(self, message: tuple[Any, ...]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            with contextlib.suppress(ConnectionError):  # it died; the supervisor restarts it
                await send(self.writer, message)

    async def read_messages(self) -> None:
        assert self.reader is not None
        try:
            while True:
                message = await receive(self.reader)
                if message[0] == "ready":
                    self.ready.set()
                elif message[0] == "report":
                    _, request_id, self.last_dump, self.health = message
                    reply = self.replies.pop(request_id, None)
                    if reply is not None and not reply.done():
                        reply.set_result(None)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass


class Supervisor:
    """Starts the workers, keeps them running and in step with the live state."""

    def __init__(self, state: LiveState, metrics: Metrics, count: int) -> None:
        self.state = state
        self.metrics = metrics  # the aggregate the control API reads
        self.retired = Metrics()  # counters of workers that died
        self.workers = [Worker(i) for i in range(count)]
        self.stopping = False
        self._request_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._packed: tuple[int, bytes] = (0, b"")  # the newest pickled config, by generation
        self._changed = asyncio.Event()
        state.subscribe(self._broadcast)

    async def start(self) -> None:
        """Start every worker; raises if one fails before it serves."""
        for worker in self.workers:
            await worker.start(self._config_message)
            self._spawn(self._watch(worker))
        self._spawn(self._follow_state())
        for worker in self.workers:
            await self._wait_ready(worker)

    async def _wait_ready(self, worker: Worker) -> None:
        assert worker.process is not None
        ready = asyncio.ensure_future(worker.ready.wait())
        exited = asyncio.ensure_future(worker.process.wait())
        await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        exited.cancel()
        if not worker.ready.is_set():
            raise RuntimeError(f"worker {worker.index} exited before serving")

    async def _watch(self, worker: Worker) -> None:
        """Restart the worker whenever it exits, backing off while it keeps crashing."""
        delay = RESTART_DELAY
        while True:
            assert worker.process is not None
            started = time.monotonic()
            await worker.read_messages()
            code = await worker.process.wait()
            self.retired.absorb(worker.last_dump)
            worker.last_dump = {}
            if self.stopping:
                return
            log.error("worker %d exited with %s; starting it again", worker.index, code)
            delay = RESTART_DELAY if time.monotonic() - started > 10 else min(delay * 2, 10.0)
            await asyncio.sleep(delay)
            await worker.start(self._config_message)

    def _broadcast(self, snapshot: Snapshot) -> None:
        self._changed.set()  # _follow_state sends it; pickling it here would block the loop

    async def _follow_state(self) -> None:
        """Send each new snapshot to every worker, the newest only if several landed."""
        sent = 0
        while True:
            await self._changed.wait()
            self._changed.clear()
            message = await self._config_message()
            if message[1] > sent:
                sent = message[1]
                for worker in self.workers:
                    self._spawn(worker.send(message))  # in order: tasks start in FIFO order

    async def _config_message(self) -> ConfigMessage:
        """The current snapshot's config message, pickled in a thread once per generation."""
        while True:
            snapshot = self.state.snapshot
            generation, payload = self._packed
            if generation != snapshot.generation:
                payload = await asyncio.to_thread(pack_config, snapshot.config)
                if snapshot.generation > self._packed[0]:
                    self._packed = (snapshot.generation, payload)
            if self.state.snapshot is snapshot:  # else a change landed meanwhile: pack that
                return ("config", snapshot.generation, payload)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def refresh(self) -> None:
        """Gather every worker's counters and health into `metrics` (bounded wait)."""
        request_id = next(self._request_ids)
        loop = asyncio.get_running_loop()
        waits = []
        for worker in self.workers:
            reply: asyncio.Future[None] = loop.create_future()
            worker.replies[request_id] = reply
            waits.append(reply)
            await worker.send(("report", request_id))
        await asyncio.wait(waits, timeout=REPORT_TIMEOUT)
        for worker in self.workers:
            worker.replies.pop(request_id, None)
        self.metrics.clear()
        self.metrics.absorb(self.retired.dump())
        for worker in self.workers:
            self.metrics.absorb(worker.last_dump)

    def forward(self, sig: int) -> None:
        """Send `sig` to every worker that serves (one still starting opens its
        files anew anyway, and might not handle the signal yet)."""
        for worker in self.workers:
            process = worker.process
            if worker.ready.is_set() and process is not None and process.returncode is None:
                process.send_signal(sig)

    def endpoint_healthy(self, service: str, version: str, address: Address) -> bool:
        """Healthy unless a worker has it ejected."""
        key = (service, version, str(address))
        return all(worker.health.get(key, True) for worker in self.workers)

    async def stop(self, timeout: float) -> None:
        """SIGTERM every worker (they drain), then wait for them, killing stragglers."""
        self.stopping = True
        processes = [w.process for w in self.workers if w.process is not None]
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(p.wait()) for p in processes]
        _, pending = await asyncio.wait(waits, timeout=timeout + 1) if waits else ((), ())
        for process in processes:
            if process.returncode is None:
                process.kill()
        for waiting in pending:
            await waiting
        for task in list(self._tasks):
            task.cancel()


class DataServer:
    """A process's data plane and its listener, started together and drained together:
    each worker process's, or with `workers: 1` the one process's (server.serve_alone)."""

    __slots__ = ("certificate", "listener", "plane", "state")

    def __init__(
        self,
        state: LiveState,
        plane: DataPlane,
        listener: asyncio.Server,
        certificate: ServerCertificate | None = None,
    ) -> None:
        self.state = state
        self.plane = plane
        self.listener = listener
        self.certificate = certificate  # with `tls:`: what the listener serves, re-read on reload

    def __repr__(self) -> str:
        plane = self.plane
        mode = "draining" if plane.draining else "serving"
        return f"<DataServer {mode} [{len(plane.connections)} connections]>"

    @classmethod
    async def start(cls, state: LiveState, *, reuse_port: bool = False) -> DataServer:
        """A new DataPlane (counting from zero) serving the config's listen address,
        over TLS if the config has ``tls`` (its files re-read at each new snapshot)."""
        plane = DataPlane(state, Metrics())
        plane.start()
        config = state.snapshot.config
        listen = config.listen
        certificate = None
        tls_options: dict[str, Any] = {}
        if config.tls is not None:
            serving = certificate = ServerCertificate(config.tls, "data")
            # A client that never finishes its handshake is dropped like one that never
            # sends its request head.
            handshake_timeout = config.limits.header_read_timeout
            tls_options = {"ssl": certificate.context, "ssl_handshake_timeout": handshake_timeout}
            state.subscribe(lambda snapshot: serving.update(snapshot.config.tls))
        factory = plane.tls_protocol_factory if certificate is not None else plane.protocol_factory
        listener = await asyncio.get_running_loop().create_server(
            factory,
            listen.host,
            listen.port,
            backlog=BACKLOG,
            reuse_port=reuse_port,
            **tls_options,
        )
        return cls(state, plane, listener, certificate)

    async def drain(self) -> None:
        """Stop accepting; let open connections finish, up to the drain_timeout last
        reloaded; then close what is left."""
        self.listener.close()
        self.plane.start_draining()
        await self.plane.wait_drained(self.state.snapshot.config.drain_timeout)


# -- the worker process ---------------------------------------------------
async def serve_worker(fd: int) -> int:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    kind, generation, payload = await receive(reader)
    assert kind == "config"
    config, router = await asyncio.to_thread(unpack_config, payload)
    state = LiveState(config, None, generation=generation, router=router)
    data = await DataServer.start(state, reuse_port=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, data.plane.reopen_access_log)  # from the supervisor
    follow = loop.create_task(follow_supervisor(reader, writer, state, data.plane))
    follow.add_done_callback(lambda _: stop.set())  # the supervisor is gone
    log.debug("worker pid %d: serving generation %d on %s", os.getpid(), generation, config.listen)
    await send(writer, ("ready",))
    await stop.wait()
    await data.drain()
    follow.cancel()
    return 0


async def follow_supervisor(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    state: LiveState,
    plane: DataPlane,
) -> None:
    try:
        while True:
            message = await receive(reader)
            if message[0] == "config":
                _, generation, payload = message
                if generation > state.snapshot.generation:
                    # Off the loop: requests keep flowing while a large config is unpacked.
                    with loop_first():
                        config, router = await asyncio.to_thread(unpack_config, payload)
                    state.install(config, generation, router)
                    log.debug("worker pid %d: generation %d installed", os.getpid(), generation)
            elif message[0] == "report":
                health = endpoint_health(state.snapshot.config, plane)
                await send(writer, ("report", message[1], plane.metrics.dump(), health))
    except (asyncio.IncompleteReadError, ConnectionError):
        return


def endpoint_health(config: Config, plane: DataPlane) -> dict[EndpointKey, bool]:
    return {
        (service.name, version.name, str(address)): plane.endpoint_healthy(
            service.name, version.name, address
        )
        for service in config.services
        for version in service.versions
        for address in version.endpoints
    }


def worker_main(fd: int, log_level: int) -> int:
    setup_logging(log_level)
    # Ctrl-C reaches the whole process group: the supervisor decides, the
    # worker waits for its SIGTERM. Reloads are the supervisor's too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until serve_worker handles it
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve_worker(fd))


def reserve_port(config: Config) -> tuple[Config, socket.socket | None]:
    """Port 0 with several workers: pick one port now, for all of them.

    The returned socket holds the port (bound with SO_REUSEPORT, never
    listening) for the supervisor's lifetime."""
    if config.listen.port != 0:
        return config, None
    family = socket.AF_INET6 if ":" in config.listen.host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((config.listen.host, 0))
    port = holder.getsockname()[1]
    return replace(config, listen=Address(config.listen.host, port)), holder


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(worker_main(int(sys.argv[1]), int(sys.argv[2])))
