"""Real upstream servers for the tests, each on its own 127.0.0.1 port, run in
a background thread so that plain (synchronous) tests can drive the proxy.

`Upstream` is an aiohttp app that records what it received and answers by
the last segments of the path (any prefix before them):
  .../status/N      status N
  .../bytes/N       N bytes, streamed in 64 KiB chunks
  .../chunked       a chunked response of three parts
  .../sleep/S       JSON after S seconds
  .../reset         closes the socket mid-body
  anything else     JSON of method, raw path, headers, body length (any method)
`raw_server` starts a plain TCP server whose reply is a fixed byte string, for
responses no HTTP framework would produce.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, Self

import aiohttp
from aiohttp import web


class LoopThread:
    """An event loop in a daemon thread; `call` runs a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class AppServer:
    """An aiohttp app on 127.0.0.1, any port, answering every path with `_handle`."""

    def __init__(self, loops: LoopThread, name: str) -> None:
        self.loops = loops
        self.name = name
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        self.loops.call(self._start())
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self.loops.call(self._runner.cleanup())

    async def _start(self) -> None:
        app = web.Application(client_max_size=2**40)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError


class WebSocketUpstream(AppServer):
    """A WebSocket server: greets with its name, echoes text as NAME:TEXT and binary
    reversed; the text "close" makes it close the socket from its side. Records each
    handshake's headers and counts the sockets open on its side."""

    def __init__(self, loops: LoopThread, name: str) -> None:
        super().__init__(loops, name)
        self.handshakes: list[dict[str, str]] = []
        self.open = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append(dict(request.headers))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.open += 1
        try:
            await ws.send_str(f"hello from {self.name}")
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    if message.data == "close":
                        await ws.close()
                        break
                    await ws.send_str(f"{self.name}:{message.data}")
                elif message.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(message.data[::-1])
        finally:
            self.open -= 1
        return ws


class Upstream(AppServer):
    """An aiohttp server that names itself in every answer and records requests."""

    def __init__(self, loops: LoopThread, name: str) -> None:
        super().__init__(loops, name)
        self.received: list[dict[str, Any]] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        record = {
            "upstream": self.name,
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_length": size,
            "chunked": request.headers.get("Transfer-Encoding") == "chunked",
        }
        self.received.append(record)
        command, _, argument = _command(request.path)
        if command == "status":
            return web.Response(status=int(argument), text=self.name)
        if command == "bytes":
            return await self._stream_bytes(request, int(argument))
        if command == "chunked":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for part in (b"one,", b"two,", b"three"):
                await response.write(part)
            await response.write_eof()
            return response
        if command == "sleep":
            await asyncio.sleep(float(argument))
        if command == "reset":
            response = web.StreamResponse(headers={"Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b"x" * 100)
            assert request.transport is not None
            request.transport.abort()
            return response
        return web.json_response(record)

    @staticmethod
    async def _stream_bytes(request: web.Request, total: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(total)})
        await response.prepare(request)
        block = b"x" * 65536
        sent = 0 if request.method != "HEAD" else total  # aiohttp would write a HEAD's body
        while sent < total:
            part = block[: min(len(block), total - sent)]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response


def _command(path: str) -> tuple[str, str, str]:
    """The behaviour asked for by the path's last segments: /any/prefix/CMD[/ARG]."""
    parts = path.strip("/").split("/")
    if len(parts) >= 2 and parts[-2] in ("status", "bytes", "sleep"):
        return parts[-2], "/", parts[-1]
    return parts[-1], "", ""


def raw_server(
    loops: LoopThread, reply: bytes, hold: bool = False
) -> tuple[int, Callable[[], None]]:
    """A TCP server that reads a request head and writes `reply` verbatim,
    then closes, or with `hold` keeps the connection open until the peer closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
            while hold and await reader.read(65536):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def start() -> asyncio.Server:
        return await asyncio.start_server(handle, "127.0.0.1", 0)

    server: asyncio.Server = loops.call(start())

    def stop() -> None:
        async def close() -> None:
            server.close()
            with contextlib.suppress(AttributeError):  # 3.12+: drop held connections
                server.close_clients()  # type: ignore[attr-defined]

        loops.call(close())

    return server.sockets[0].getsockname()[1], stop


def decode_json(body: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(body)
    return result
