"""WebSocket (RFC 6455) for ASGI applications, over one upgraded connection.

How this works
--------------
``HttpProtocol`` recognises an opening handshake (``is_websocket_request``):
a GET over HTTP/1.1 with ``Upgrade: websocket``, ``Connection: upgrade``,
``Sec-WebSocket-Version: 13`` and a ``Sec-WebSocket-Key``. When its route is
an ASGI application, it makes a :class:`WebSocketSession` and runs the
application with the ``websocket`` scope (ASGI WebSocket spec 2.3); from the
parser's upgrade point on, every byte the client sends goes to ``feed``.

- The application's first ``receive`` is ``websocket.connect``. It answers
  ``websocket.accept`` (then the session writes ``101 Switching Protocols``
  with the ``Sec-WebSocket-Accept`` token, the chosen subprotocol and the
  application's headers) or ``websocket.close`` (then ``403 Forbidden``,
  as the spec says, and the connection closes).
- After the accept, frames are parsed by ``wsproto`` (a sans-IO
  implementation): text and binary messages are gathered whole (at most
  ``MAX_MESSAGE_BYTES``) and handed to ``receive`` in order; pings are
  answered with pongs; the client's close frame is answered and becomes
  ``websocket.disconnect`` with its code.
- ``websocket.send`` writes one message; ``websocket.close`` sends a close
  frame and closes the connection behind it (RFC 6455 7.1.1 lets the
  server close first).

What always holds
-----------------
- Reading pauses while more than ``QUEUE_HIGH_WATER`` messages wait for the
  application, so a client cannot fill memory faster than the application
  reads; a message over ``MAX_MESSAGE_BYTES`` closes the connection with
  1009 (message too big), a malformed frame with wsproto's close code (1002
  protocol error, 1007 for text that is not UTF-8).
- The connection ending in any way (the client leaving, a protocol error,
  the application returning) gives a pending ``receive`` a
  ``websocket.disconnect``; a ``send`` after that raises
  :class:`WebSocketClosed` (an ``OSError``, as ASGI servers do).
- An application that fails or returns before accepting gets ``500`` (the
  handshake is refused); after accepting, a failure closes with 1011 and a
  return without closing closes with 1000.

LIMITATION: no extensions are negotiated (no permessage-deflate), so
messages travel uncompressed; clients that offer compression proceed
without it, as RFC 6455 9.1 allows.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from loguru import logger
from wsproto.connection import Connection as FrameConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    TextMessage,
)
from wsproto.utilities import generate_accept_token

from arc.http.asgi import release
from arc.http.errors import error_body, status_line

if TYPE_CHECKING:
    from arc.http.asgi import ASGIApp, Scope

# The largest message gathered for the application (RFC 6455 sets none).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Messages waiting for the application before reading pauses.
QUEUE_HIGH_WATER = 64
# Close codes (RFC 6455 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_ABNORMAL = 1006
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

log = logger.bind(actor="hyperion")


class WebSocketClosed(ConnectionError):
    """The WebSocket is closed: nothing more can be sent."""


class Upgraded(Protocol):
    """What a session needs from the connection it took over."""

    loop: asyncio.AbstractEventLoop
    closed: bool

    def write(self, data: bytes) -> None:
        """Write bytes to the client."""

    async def drain(self) -> None:
        """Wait until the transport's buffer is low again."""

    def pause_reading(self) -> None:
        """Stop reading from the client for now."""

    def resume_reading(self) -> None:
        """Read from the client again."""

    def abort(self) -> None:
        """Close the connection after what was written."""


def is_websocket_request(
    method: str, version: str, headers: Iterable[tuple[bytes, bytes]]
) -> bool:
    """Whether a request head is a WebSocket opening handshake (RFC 6455 4.2.1)."""
    if method != "GET" or version != "1.1":
        return False
    upgrade = connection = key = version_ok = False
    for name, value in headers:
        if name == b"upgrade":
            upgrade = value.strip().lower() == b"websocket"
        elif name == b"connection":
            connection = b"upgrade" in (t.strip().lower() for t in value.split(b","))
        elif name == b"sec-websocket-key":
            key = bool(value.strip())
        elif name == b"sec-websocket-version":
            version_ok = value.strip() == b"13"
    return upgrade and connection and key and version_ok


class WebSocketSession:
    """One WebSocket: ASGI ``receive`` and ``send`` over wsproto frames."""

    def __init__(
        self, conn: Upgraded, headers: list[tuple[bytes, bytes]], where: str
    ) -> None:
        self.conn = conn
        self.where = where
        self.key = b""
        self.subprotocols: list[str] = []
        for name, value in headers:
            if name == b"sec-websocket-key":
                self.key = value.strip()
            elif name == b"sec-websocket-protocol":
                self.subprotocols += [
                    p.strip() for p in value.decode("latin-1").split(",") if p.strip()
                ]
        self.frames = FrameConnection(ConnectionType.SERVER)
        self.accepted = False
        self.closed = False  # no more frames go out (close sent, or refused)
        self.disconnected = False  # the application has been (or will be) told
        self.close_code = CLOSE_ABNORMAL
        self.close_reason = ""
        self.status = 0  # 101 once accepted, or the refusal's status
        self._connected = False
        self._early = bytearray()  # bytes that came before the accept
        self._queue: deque[dict[str, Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._parts: list[str | bytes] = []
        self._part_bytes = 0
        self._paused = False

    @property
    def reading_paused(self) -> bool:
        """Whether the session itself wants reading paused (queue too long)."""
        return self._paused

    # -- bytes from the client ------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes the client sent after the handshake request."""
        if self.disconnected:
            return
        if not self.accepted:
            # Frames sent before the accept wait for it, within the same
            # bound as one message.
            self._early += data
            if len(self._early) > MAX_MESSAGE_BYTES:
                self._early.clear()
                self._disconnect(CLOSE_TOO_BIG)
                self.conn.abort()
            return
        self.frames.receive_data(data)
        self._handle_events()

    def lost(self) -> None:
        """The connection is gone."""
        self._disconnect(self.close_code)

    def _handle_events(self) -> None:
        for event in self.frames.events():
            if self.closed:
                return  # closed meanwhile (a message over the limit)
            if isinstance(event, Message):
                self._gather(event)
            elif isinstance(event, Ping):
                self._write(self.frames.send(event.response()))
            elif isinstance(event, CloseConnection):
                # The client closes (or its frames were malformed: wsproto
                # then reports the code it closes with): answer, then end.
                if self.frames.state is not ConnectionState.CLOSED:
                    self._write(self.frames.send(event.response()))
                self.closed = True
                self._disconnect(event.code, event.reason)
                self.conn.abort()
                return

    def _gather(self, event: Message[Any]) -> None:
        self._parts.append(event.data)
        self._part_bytes += len(event.data)
        if self._part_bytes > MAX_MESSAGE_BYTES:
            self._close_frames(CLOSE_TOO_BIG, "message too big")
            return
        if not event.message_finished:
            return
        parts, self._parts, self._part_bytes = self._parts, [], 0
        message: dict[str, Any] = {"type": "websocket.receive"}
        if isinstance(event, TextMessage):
            message["text"] = "".join(p for p in parts if isinstance(p, str))
        else:
            message["bytes"] = b"".join(p for p in parts if isinstance(p, bytes))
        self._queue.append(message)
        self._wake()
        if len(self._queue) > QUEUE_HIGH_WATER and not self._paused:
            self._paused = True
            self.conn.pause_reading()

    def going_away(self) -> None:
        """Arcology is stopping: close with 1001, or refuse a pending handshake."""
        if self.accepted:
            self._close_frames(CLOSE_GOING_AWAY, "server stopping")
        else:
            self._refuse(503)

    # -- the application's side -----------------------------------------------

    async def receive(self) -> dict[str, Any]:
        """The next ASGI event for the application."""
        if not self._connected:
            self._connected = True
            return {"type": "websocket.connect"}
        while not self._queue:
            if self.disconnected:
                return {
                    "type": "websocket.disconnect",
                    "code": self.close_code,
                    "reason": self.close_reason,
                }
            self._waiter = self.conn.loop.create_future()
            await self._waiter
        message = self._queue.popleft()
        if self._paused and len(self._queue) <= QUEUE_HIGH_WATER // 2:
            self._paused = False
            self.conn.resume_reading()
        return message

    async def send(self, message: dict[str, Any]) -> None:
        """An ASGI event from the application."""
        kind = message.get("type")
        if self.closed or self.conn.closed:
            raise WebSocketClosed(f"websocket {self.where}: the connection is closed")
        if kind == "websocket.accept" and not self.accepted:
            self._accept(message)
        elif kind == "websocket.send" and self.accepted:
            data = message.get("bytes")
            if data is not None:
                self._write(self.frames.send(BytesMessage(data=bytes(data))))
            else:
                text = message.get("text")
                if not isinstance(text, str):
                    raise TypeError("websocket.send needs 'bytes' or 'text'")
                self._write(self.frames.send(TextMessage(data=text)))
            await self.conn.drain()
        elif kind == "websocket.close":
            if self.accepted:
                code = message.get("code") or CLOSE_NORMAL
                self._close_frames(int(code), str(message.get("reason") or ""))
            else:
                self._refuse(403)
        else:
            raise RuntimeError(
                f"websocket {self.where}: unexpected {kind!r} "
                f"({'after' if self.accepted else 'before'} the accept)"
            )

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        """Run the application on this WebSocket, then end the connection."""
        try:
            await app(scope, self.receive, self.send)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            self._end(CLOSE_INTERNAL_ERROR, 500)
            raise
        except Exception as exc:
            if not self.disconnected or not isinstance(exc, WebSocketClosed):
                log.opt(exception=exc).error(
                    "websocket application failed where={} error={!r}", self.where, exc
                )
            self._end(CLOSE_INTERNAL_ERROR, 500)
        else:
            if not self.accepted and not self.closed:
                log.error(
                    "websocket application returned without accepting or closing "
                    "where={}",
                    self.where,
                )
            self._end(CLOSE_NORMAL, 500)
        finally:
            self._disconnect(self.close_code)

    # -- writing ----------------------------------------------------------------

    def _accept(self, message: dict[str, Any]) -> None:
        subprotocol = message.get("subprotocol")
        lines = [
            status_line(101),
            b"upgrade: websocket\r\nconnection: Upgrade\r\n",
            b"sec-websocket-accept: " + generate_accept_token(self.key) + b"\r\n",
        ]
        if subprotocol:
            lines.append(b"sec-websocket-protocol: %s\r\n" % subprotocol.encode())
        for name, value in message.get("headers") or ():
            lines.append(bytes(name) + b": " + bytes(value) + b"\r\n")
        lines.append(b"\r\n")
        self.conn.write(b"".join(lines))
        self.accepted = True
        self.status = 101
        # The frame parser started in the open state: the handshake was
        # answered here, not through it. Bytes that came early go first.
        early, self._early = bytes(self._early), bytearray()
        if early:
            self.feed(early)

    def _refuse(self, status: int) -> None:
        if self.closed:
            return
        self.closed = True
        self.status = status
        body = error_body(status)
        self.conn.write(
            status_line(status)
            + b"content-type: text/plain; charset=utf-8\r\n"
            + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            + body
        )
        self._disconnect(CLOSE_ABNORMAL)
        self.conn.abort()

    def _close_frames(self, code: int, reason: str) -> None:
        # The close frame goes out, then the connection closes behind it
        # (RFC 6455 7.1.1 lets the server close first).
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        if self.frames.state is ConnectionState.OPEN:
            self._write(self.frames.send(CloseConnection(code=code, reason=reason)))
        self._disconnect(code)
        self.conn.abort()

    def _end(self, code: int, status: int) -> None:
        # The application is done: close what it left open.
        if self.accepted:
            self._close_frames(code, "")
        else:
            self._refuse(status)

    def _write(self, data: bytes) -> None:
        if data and not self.conn.closed:
            self.conn.write(data)

    def _disconnect(self, code: int, reason: str | None = None) -> None:
        if not self.disconnected:
            self.disconnected = True
            self.close_code = code
            self.close_reason = reason or ""
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        release(waiter)


def websocket_scope(http_scope: Scope, tls: bool, subprotocols: list[str]) -> Scope:
    """The ``websocket`` scope (ASGI WebSocket spec 2.3) from a request's own."""
    scope = {k: v for k, v in http_scope.items() if k != "method"}
    scope["type"] = "websocket"
    scope["asgi"] = {"version": "3.0", "spec_version": "2.3"}
    scope["scheme"] = "wss" if tls else "ws"
    scope["subprotocols"] = subprotocols
    scope["extensions"] = {}
    return scope
