"""ASGI 3: HTTP requests and lifespan for applications on the data plane.

How this works: the connection (``arc.http.server.HttpProtocol``) makes one
``Exchange`` per request when its headers are complete. The exchange holds
what the parser delivered (method, target, headers, body chunks as they
arrive) and offers the two ASGI callables: ``receive`` hands out the body as
``http.request`` messages (``more_body`` until the last chunk) and then
``http.disconnect``; ``send`` takes ``http.response.start`` and
``http.response.body`` and writes them through the connection.

What always holds:

- The status line and headers are held back until the first body message,
  so a response whose whole body comes in one message leaves in one write
  (one TLS record) and gets a ``Content-Length`` when the application gave
  none. A response streamed with ``more_body`` and no ``Content-Length``
  is sent chunked (HTTP/1.1) or delimited by closing (HTTP/1.0).
- A HEAD request never carries body bytes; its headers are those of GET.
- ``send`` after the client went away is ignored (spec version 2.3), so an
  application finishing late does not crash on a closed socket.
- An exception from the application answers 500 if nothing was sent yet and
  closes the connection otherwise; it is logged with its traceback.

``Lifespan`` runs an application's ``lifespan`` scope on the data plane loop:
startup before the first request, shutdown when Hyperion stops. An
application that raises on the lifespan scope does not support it and is
run without it; one that answers ``lifespan.startup.failed`` stops Hyperion's
start with the application's message.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from loguru import logger

from arc.errors import ConfigError
from arc.http.errors import error_body, status_line
from arc.http.static import CHUNK_BYTES, INLINE_MAX_BYTES, read_chunk

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
# Response headers the server owns: it frames the body itself.
_FRAMING = frozenset((b"content-length", b"connection", b"transfer-encoding"))
# http.response.pathsend: the application names a file, the server sends it
# (small files read inline, large ones in a worker thread).
EXTENSIONS: dict[str, dict[str, Any]] = {"http.response.pathsend": {}}
LIFESPAN_TIMEOUT_S = 30.0

log = logger.bind(actor="hyperion")

_DATE: list[Any] = [0, b""]


def date_header() -> bytes:
    """``date: <IMF-fixdate>\\r\\n``, recomputed once a second."""
    now = int(time.time())
    if now != _DATE[0]:
        _DATE[0] = now
        _DATE[1] = (
            b"date: "
            + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
            + b"\r\n"
        )
    value: bytes = _DATE[1]
    return value


def release(waiter: asyncio.Future[None] | None) -> None:
    """Let whoever awaits ``waiter`` go on, unless it is gone or done."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def decode_path(raw_path: bytes) -> str:
    """The ASGI ``path``: percent-decoded once, UTF-8 (invalid bytes replaced)."""
    if b"%" not in raw_path and raw_path.isascii():
        return raw_path.decode("ascii")
    return unquote_to_bytes(raw_path).decode("utf-8", "replace")


class Connection(Protocol):
    """What an exchange needs from its connection."""

    loop: asyncio.AbstractEventLoop
    closed: bool

    def write(self, data: bytes) -> None:
        """Write bytes to the client."""

    async def drain(self) -> None:
        """Wait until the transport's buffer is low again."""

    def finish(self, exchange: Exchange) -> None:
        """The response is complete (or abandoned): move to the next request."""

    def body_consumed(self) -> None:
        """The application took buffered body bytes: reading may resume."""

    def abort(self) -> None:
        """Close the connection now."""


class Exchange:
    """One request and its response on a connection."""

    __slots__ = (
        "_handed_out",
        "_head",
        "_length",
        "_waiter",
        "body",
        "body_buffered",
        "body_done",
        "body_size",
        "chunked",
        "conn",
        "disconnected",
        "error",
        "expect_continue",
        "extra_headers",
        "finished",
        "headers",
        "host",
        "http_version",
        "keep_alive",
        "method",
        "query",
        "raw_path",
        "response_done",
        "response_started",
        "sent_bytes",
        "started_at",
        "status",
        "task",
        "websocket",
    )

    def __init__(
        self,
        conn: Connection,
        method: str,
        raw_path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        host: str,
        http_version: str,
        keep_alive: bool,
    ) -> None:
        self.conn = conn
        self.method = method
        self.raw_path = raw_path
        self.query = query
        self.headers = headers
        self.host = host
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.body: deque[bytes] = deque()
        self.body_buffered = 0
        self.body_size = 0
        self.body_done = False
        self.error = 0
        self.expect_continue = False
        self.disconnected = False
        self.response_started = False
        self.response_done = False
        self.finished = False
        self.chunked = False
        self.status = 0
        self.sent_bytes = 0
        self.started_at = 0.0
        self.extra_headers = b""
        self.task: asyncio.Task[None] | None = None
        # A WebSocket opening handshake (see arc.http.websocket).
        self.websocket = False
        self._handed_out = False
        self._head: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self._length: int | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- delivered by the connection --------------------------------------

    def feed_body(self, data: bytes) -> None:
        """A piece of the request body arrived."""
        self.body.append(data)
        self.body_buffered += len(data)
        self._wake()

    def end_body(self) -> None:
        """The request body is complete."""
        self.body_done = True
        if self._waiter is not None:
            self._wake()

    def lost(self) -> None:
        """The client went away."""
        self.disconnected = True
        self._wake()

    def ended(self) -> None:
        """The response is complete: a pending ``receive`` answers disconnect."""
        self.response_done = True
        if self._waiter is not None:
            self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        release(waiter)

    # -- ASGI --------------------------------------------------------------

    async def receive(self) -> Message:
        """The next ``http.request`` piece, or ``http.disconnect``."""
        if self.expect_continue:
            # RFC 9110 10.1.1: the application wants the body, ask for it.
            self.expect_continue = False
            if not self.body_done and not self.response_started:
                self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not self.body and not self.body_done and not self.disconnected:
            self._waiter = self.conn.loop.create_future()
            await self._waiter
        if self.disconnected or self.response_done:
            return {"type": "http.disconnect"}
        if self._handed_out:
            # The whole body was handed out already: wait for the end.
            while not self.disconnected and not self.response_done:
                self._waiter = self.conn.loop.create_future()
                await self._waiter
            return {"type": "http.disconnect"}
        if len(self.body) == 1:
            chunk = self.body.popleft()
        else:
            chunk = b"".join(self.body)
            self.body.clear()
        had = self.body_buffered
        self.body_buffered = 0
        if had:
            self.conn.body_consumed()
        more = not self.body_done
        self._handed_out = not more
        return {"type": "http.request", "body": chunk, "more_body": more}

    async def send(self, message: Message) -> None:
        """Write ``http.response.start`` and ``http.response.body`` messages."""
        kind = message["type"]
        if kind == "http.response.body":
            if self._head is None and not self.response_started:
                raise RuntimeError("http.response.body sent before http.response.start")
            if self.response_done:
                raise RuntimeError("http.response.body sent after the response ended")
            body: bytes = message.get("body", b"")
            more = bool(message.get("more_body", False))
            if self.disconnected or self.conn.closed:
                if not more:
                    self.response_done = True
                return
            out = self._start_bytes(len(body), more) if self._head is not None else b""
            if body and self.method != "HEAD":
                if self.chunked:
                    out += b"%x\r\n" % len(body) + body + b"\r\n"
                else:
                    out += body
                self.sent_bytes += len(body)
            if not more:
                self.response_done = True
                if self.chunked and self.method != "HEAD":
                    out += b"0\r\n\r\n"
            if out:
                self.conn.write(out)
            if more:
                await self.conn.drain()
            return
        if kind == "http.response.start":
            if self.response_started or self._head is not None:
                raise RuntimeError("http.response.start sent twice")
            self._head = (int(message["status"]), list(message.get("headers", ())))
            self.status = self._head[0]
            return
        if kind == "http.response.pathsend":
            await self._pathsend(str(message["path"]))
            return
        if kind in ("http.response.trailers", "http.response.debug"):
            return
        raise RuntimeError(f"ASGI send: unknown message type {kind!r}")

    async def _pathsend(self, path: str) -> None:
        # The file goes out as ordinary body messages, so framing is shared.
        if self._head is None:
            raise RuntimeError("http.response.pathsend sent before http.response.start")
        size = os.stat(path).st_size
        if size <= INLINE_MAX_BYTES:
            with open(path, "rb") as f:
                data = f.read()
            await self.send({"type": "http.response.body", "body": data})
            return
        loop = self.conn.loop
        offset = 0
        while True:
            chunk = await loop.run_in_executor(
                None, read_chunk, path, offset, CHUNK_BYTES
            )
            offset += len(chunk)
            more = bool(chunk) and offset < size
            await self.send(
                {"type": "http.response.body", "body": chunk, "more_body": more}
            )
            if not more:
                return

    def _start_bytes(self, first_len: int, more: bool) -> bytes:
        # Build the head now that the first body piece says how to frame it.
        assert self._head is not None
        status, headers = self._head
        lines = []
        length: int | None = None
        for name, value in headers:
            lname = name.lower()
            if lname in _FRAMING:
                # Framing is the server's: length kept, the rest dropped.
                if lname == b"content-length":
                    length = int(value)
                elif lname == b"connection" and value.lower() == b"close":
                    self.keep_alive = False
                continue
            lines.append(lname + b": " + value)
        block = b"\r\n".join(lines)
        # A line break inside a name or value would split the response.
        breaks = len(lines) - 1 if lines else 0
        if block.count(b"\n") != breaks or block.count(b"\r") != breaks:
            raise RuntimeError("a response header name or value holds a line break")
        parts = [status_line(status), block, b"\r\n" if lines else b""]
        self._head = None
        self.response_started = True
        bodyless = status < 200 or status in (204, 304)
        if length is None and not bodyless:
            if not more:
                length = first_len
                parts.append(b"content-length: %d\r\n" % length)
            elif self.http_version == "1.1":
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False
        elif length is not None:
            parts.append(b"content-length: %d\r\n" % length)
        self._length = length
        if self.expect_continue and not self.body_done:
            self.keep_alive = False  # the body may or may not follow: close
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.http_version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(self.extra_headers)
        parts.append(date_header())
        parts.append(b"\r\n")
        return b"".join(parts)

    @property
    def complete_length(self) -> bool:
        """Whether the body sent matches its Content-Length (or none was set)."""
        return (
            self._length is None
            or self.method == "HEAD"
            or (self._length == self.sent_bytes)
        )

    # -- running an application --------------------------------------------

    def scope(
        self,
        server: tuple[str, int] | None,
        client: tuple[str, int] | None,
        scheme: str,
        state: dict[str, Any] | None,
    ) -> Scope:
        """The ``http`` scope of this request (ASGI HTTP spec 2.3)."""
        scope: Scope = {
            "type": "http",
            "asgi": ASGI_VERSION,
            "http_version": self.http_version,
            "method": self.method,
            "scheme": scheme,
            "path": decode_path(self.raw_path),
            "raw_path": self.raw_path,
            "query_string": self.query,
            "root_path": "",
            "headers": self.headers,
            "server": server,
            "client": client,
            "extensions": EXTENSIONS,
        }
        if state is not None:
            scope["state"] = state.copy()
        return scope

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        """Run the application for this request, then tell the connection."""
        try:
            await app(scope, self.receive, self.send)
        except asyncio.CancelledError:
            # The data plane is stopping (the grace period is over): no
            # answer is coming, and the client is told the service stopped.
            self._fail(503)
            raise
        except Exception as exc:
            if not self.disconnected:
                log.opt(exception=exc).error(
                    "application failed host={} path={} error={!r}",
                    self.host,
                    self.raw_path.decode("latin-1"),
                    exc,
                )
            self._fail()
        else:
            if not self.response_done and not self.disconnected:
                log.error(
                    "application returned without completing its response "
                    "host={} path={}",
                    self.host,
                    self.raw_path.decode("latin-1"),
                )
                self._fail()
        finally:
            self.conn.finish(self)

    def _fail(self, status: int = 500) -> None:
        # Answer ``status`` while nothing was sent; else the framing is lost.
        if self.response_done:
            return
        if self.response_started or self.disconnected or self.conn.closed:
            self.keep_alive = False
            self.response_done = True
            self.conn.abort()
            return
        self._head = None
        self.status = status
        self.response_started = True
        self.response_done = True
        self.keep_alive = False
        body = error_body(status)
        self.sent_bytes = len(body)
        self.conn.write(
            status_line(status)
            + b"content-type: text/plain; charset=utf-8\r\n"
            + b"content-length: %d\r\nconnection: close\r\n" % len(body)
            + date_header()
            + b"\r\n"
            + (body if self.method != "HEAD" else b"")
        )


class Lifespan:
    """The ``lifespan`` scope of one application, on the data plane loop."""

    def __init__(self, app: ASGIApp, name: str = "") -> None:
        self.app = app
        self.name = name
        self.state: dict[str, Any] = {}
        self.supported = True
        self._to_app: asyncio.Queue[Message] | None = None
        self._from_app: asyncio.Queue[Message] | None = None
        self._task: asyncio.Task[None] | None = None
        self._answered = False

    async def _send(self, message: Message) -> None:
        assert self._from_app is not None
        self._answered = True
        await self._from_app.put(message)

    async def _run(self) -> None:
        assert self._to_app is not None and self._from_app is not None
        scope: Scope = {"type": "lifespan", "asgi": ASGI_VERSION, "state": self.state}
        try:
            await self.app(scope, self._to_app.get, self._send)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            self.supported = False
            log.debug("lifespan not supported service={} error={!r}", self.name, exc)
            await self._from_app.put({"type": "lifespan.unsupported"})
        else:
            if not self._answered:
                # Returning at once is how many applications say they have
                # no lifespan (ASGI lifespan spec).
                self.supported = False
                log.debug("lifespan not supported service={} (returned)", self.name)
                await self._from_app.put({"type": "lifespan.unsupported"})

    async def startup(self) -> None:
        """Run startup; raise ``ConfigError`` with the app's message if it fails."""
        self._to_app, self._from_app = asyncio.Queue(), asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._to_app.put({"type": "lifespan.startup"})
        answer = await asyncio.wait_for(self._from_app.get(), LIFESPAN_TIMEOUT_S)
        kind = answer.get("type")
        if kind == "lifespan.startup.failed":
            raise ConfigError(
                f"service {self.name!r}: application startup failed: "
                f"{answer.get('message', '')}"
            )
        if kind not in ("lifespan.startup.complete", "lifespan.unsupported"):
            raise ConfigError(
                f"service {self.name!r}: lifespan startup answered {kind!r}"
            )

    async def shutdown(self) -> None:
        """Run shutdown (a failure is logged, never raised)."""
        if not self.supported or self._to_app is None or self._from_app is None:
            return
        if self._task is not None and self._task.done():
            return  # it returned after its startup: nothing waits to shut down
        await self._to_app.put({"type": "lifespan.shutdown"})
        try:
            answer = await asyncio.wait_for(self._from_app.get(), LIFESPAN_TIMEOUT_S)
        except TimeoutError:
            log.warning("lifespan shutdown timed out service={}", self.name)
            answer = {}
        if answer.get("type") == "lifespan.shutdown.failed":
            log.warning(
                "lifespan shutdown failed service={} message={}",
                self.name,
                answer.get("message", ""),
            )
        if self._task is not None and not self._task.done():
            self._task.cancel()


def load_app(spec: str, base_dir: Path) -> ASGIApp:
    """Import ``"module:attr"`` with ``base_dir`` first on ``sys.path``."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise ConfigError(
            f"app: expected 'module:attribute' (like 'shop.main:app'), got {spec!r}"
        )
    folder = str(base_dir)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(
                f"app {spec!r}: no module named {module_name!r} "
                f"(looked in {folder} and the Python path)"
            ) from exc
        raise ConfigError(f"app {spec!r}: importing it failed: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"app {spec!r}: importing it failed: {exc!r}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise ConfigError(
                f"app {spec!r}: module {module_name!r} has no attribute {attr!r}"
            ) from exc
    if not callable(target):
        raise ConfigError(
            f"app {spec!r}: expected an ASGI application (a callable), "
            f"got {type(target).__name__}"
        )
    app: ASGIApp = target
    return app
