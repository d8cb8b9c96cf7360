"""HTTP/1.1 on one connection: framing, limits, routing, and the response.

How this works: Esper makes one ``HttpProtocol`` per accepted connection
(after the TLS handshake on TLS ports) on the data plane loop. Bytes go to an
httptools (llhttp) parser whose callbacks build an ``Exchange`` per request
when its headers are complete; body pieces are fed to that exchange as they
arrive, so an application reads a chunked or large body as a stream.

Order: requests may be pipelined, and answers leave in the order the requests
came. One exchange is *active* (being answered); the ones whose headers came
in behind it wait in ``_queue`` and reading pauses until the active one is
done. An exchange is answered either inline (static files, redirects, errors:
one write and done, no task) or by an ASGI application in a task; either way
``finish`` moves on to the next.

Routing, per request and in this order: a plugin port (``port_apps``) hands
every request to its application; otherwise the Host header is looked up in
the routing table in force (``dataplane.routes``, read per request):

- no service has the host: 404;
- over TLS, a host the certificate's domain (``tls_domain``) does not cover:
  421 (RFC 9110 15.5.20), and a host whose services are all ``tls = "none"``:
  421 too;
- over plain HTTP, a ``tls = "required"`` service: 301 (GET, HEAD) or 308 to
  ``https://HOST:tlsPort/PATH?QUERY``;
- HTTPS answers carry ``Strict-Transport-Security`` from the settings.

Limits (the peer broke HTTP: answer, then close; a client that may still be
sending is read from and ignored for up to ``LINGER_S`` first, so that it
reads the answer rather than a reset):
16 KiB of request line and headers (431), a body over ``max_body_bytes``
(413, seen from Content-Length before any byte of it, or while a chunked body
streams), malformed framing (400), no complete headers within
``header_timeout_s`` of the request's first byte or of the connection's start
(408), and a request body whose next bytes take longer than
``body_timeout_s`` to come (408 if nothing was answered yet; the application
hears that the client is gone). A keep-alive connection idle for
``KEEP_ALIVE_IDLE_S`` between requests is closed without an answer.

Timers: one timer per connection at most, re-armed lazily. Each request only
moves ``_deadline``; when the timer fires it compares the clock with the
deadline in force and either acts or re-arms itself. A busy keep-alive
connection therefore costs no timer operation per request. The first
deadline (set at ``connection_made``) waits on a ``_HeaderClock`` shared by
the loop's connections instead of a timer of its own, so a short connection
makes no loop timer at all.

Stopping: ``DataPlane.drain_connections`` calls ``shut_down`` on every open
connection: an idle one closes at once, a busy one after its answer.

Flow control: reading pauses while requests wait behind the active one,
while more than ``BODY_HIGH_WATER_BYTES`` of body waits for the application,
and while the transport's write buffer is above its high mark: a client that
does not read its answers gets no more of its requests read, and the ones
already read wait, unanswered, until it takes some (so its buffer stays near
the mark whatever it pipelines). A streaming response waits for the
transport to drain.

WebSocket: an opening handshake routed to an ASGI application turns the
connection into a ``WebSocketSession`` (``arc.http.websocket``), which then
gets every byte; other upgrades are answered as HTTP/1.1 and closed.

What it does not do yet: no HTTP/2 (see the LIMITATION marks).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import httptools
from loguru import logger

from arc.http.asgi import ASGIApp, Exchange, Scope, date_header, release
from arc.http.errors import error_body, status_line
from arc.http.redirect import hsts_header, redirect_location, redirect_status
from arc.http.routing import Route, covers
from arc.http.static import CHUNK_BYTES, FileBody, StaticFiles, read_chunk
from arc.http.websocket import WebSocketSession, is_websocket_request, websocket_scope

if TYPE_CHECKING:
    from arc.config import Settings
    from arc.tls.accept import ConnectionStats

# RFC 9110 gives no number; 16 KiB holds any sane request line and headers.
MAX_HEADER_BYTES = 16 * 1024
# Raw bytes seen before headers complete: the header limit plus one read
# (a single header line the parser is still buffering also counts).
RAW_HEAD_GUARD_BYTES = MAX_HEADER_BYTES + 64 * 1024
# How long a keep-alive connection may sit idle between requests.
KEEP_ALIVE_IDLE_S = 5.0
# Request body waiting for the application before reading pauses.
BODY_HIGH_WATER_BYTES = 256 * 1024
# How long a plain connection closed while its client may still be sending
# goes on reading (and dropping) what comes: closing with bytes unread would
# make the kernel reset the connection under the answer.
LINGER_S = 5.0

# What the connection waits for, for the one timer: nothing the client owes
# (an answer is being made), the next request, the rest of a request head,
# the rest of a request body.
_BUSY, _IDLE, _HEADERS, _BODY = 0, 1, 2, 3

log = logger.bind(actor="hyperion")


class _HeadersTooLarge(Exception):
    """Raised from a parser callback when the head passes the limit."""


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 for one connection; see the module docstring."""

    # Per-connection state starts as these class defaults and becomes an
    # instance attribute when first written: a new connection (one per TLS
    # handshake) then sets only what differs.
    transport: asyncio.Transport | None = None
    closed = False
    # The request whose head is being parsed.
    _url = b""
    _head_bytes = 0
    _raw_head = 0
    # The exchange whose body is being parsed and the one being answered.
    _parsing: Exchange | None = None
    _active: Exchange | None = None
    _advancing = False
    _stop_parsing = False
    _reading_paused = False
    _write_paused = False
    _drain_waiter: asyncio.Future[None] | None = None
    # The one timer: what the connection waits for, and until when.
    _waiting = _HEADERS
    _deadline = 0.0
    _timer: asyncio.TimerHandle | None = None
    _timer_at = 0.0
    # The shared clock that holds the first deadline (see _HeaderClock).
    _clock: _HeaderClock | None = None
    # The open-connection counter of the listener, which sets it (see
    # ConnectionStats.counted); None when nobody counts.
    connection_stats: ConnectionStats | None = None
    # The addresses, read from the transport when first needed (see below).
    _addresses: tuple[tuple[str, int] | None, tuple[str, int] | None] | None = None
    # The WebSocket this connection was upgraded to, if any.
    _websocket: WebSocketSession | None = None
    # Set while a closed plain connection lingers (see _linger).
    _linger_timer: asyncio.TimerHandle | None = None

    def __init__(
        self,
        dataplane: Any,
        *,
        port: int,
        scheme: str,
        tls_domain: str | None,
        settings: Settings,
    ) -> None:
        self.dataplane = dataplane
        self.loop: asyncio.AbstractEventLoop = dataplane.loop
        self.port = port
        self.scheme = scheme
        self.is_tls = scheme == "https"
        self.tls_domain = tls_domain.lower() if tls_domain else None
        self.max_body = settings.max_body_bytes
        self.header_timeout = settings.header_timeout_s
        self.body_timeout = settings.body_timeout_s
        self.hsts = _hsts_line(settings.hsts) if self.is_tls else b""
        self.access_log = settings.access_log
        # The parser holds this protocol (its callbacks): a cycle, broken in
        # connection_lost so the connection is freed at once, not by the GC.
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(
            self
        )
        self._headers: list[tuple[bytes, bytes]] = []
        # The exchanges waiting behind the active one.
        self._queue: deque[Exchange] = deque()

    @property
    def server(self) -> tuple[str, int] | None:
        """The local address of the connection (ASGI ``server``)."""
        return self._transport_addresses()[0]

    @property
    def client(self) -> tuple[str, int] | None:
        """The peer's address (ASGI ``client``)."""
        return self._transport_addresses()[1]

    def _transport_addresses(
        self,
    ) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
        # Read once, when first needed: most connections (static files)
        # never need them, and each read is a system call.
        addresses = self._addresses
        if addresses is None:
            transport = self.transport
            if transport is None:
                return (None, None)
            addresses = (
                _address(transport.get_extra_info("sockname")),
                _address(transport.get_extra_info("peername")),
            )
            self._addresses = addresses
        return addresses

    # -- transport callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the header clock: a client that sends nothing gets 408."""
        # uvloop's transports are not asyncio.Transport subclasses; same API.
        self.transport = transport  # type: ignore[assignment]
        self.dataplane.connections.add(self)
        stats = self.connection_stats
        if stats is not None:
            stats.connections_open += 1
        self._deadline = self.loop.time() + self.header_timeout
        # The first deadline joins the connections' shared clock: two
        # dictionary operations instead of a loop timer made and cancelled
        # per connection (most connections end long before it).
        clock = _HeaderClock.current
        if (
            clock is None
            or clock.loop is not self.loop
            or (clock.timeout_s != self.header_timeout)
        ):
            clock = _HeaderClock(self.loop, self.header_timeout)
            _HeaderClock.current = clock
        self._clock = clock
        self._timer = _ON_CLOCK
        clock.add(self, self._deadline)

    def data_received(self, data: bytes) -> None:
        """Feed the parser; its callbacks do the work."""
        if self._websocket is not None:
            self._websocket.feed(data)
            return
        parser = self.parser
        if self._stop_parsing or parser is None:
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            websocket = self._websocket
            if websocket is not None:
                # From here on the bytes are WebSocket frames.
                self._stop_parsing = True
                rest = data[upgrade.args[0] :] if upgrade.args else b""
                if rest:
                    websocket.feed(rest)
                return
            # The parser stops at any other Upgrade head (see
            # on_headers_complete): answer what came, then close.
            self._stop_reading()
            ex = self._parsing
            if ex is not None:
                ex.keep_alive = False
                ex.end_body()
                self._parsing = None
            if self._active is None and not self._queue:
                self._close()
        except httptools.HttpParserError as exc:
            too_large = isinstance(exc.__context__, _HeadersTooLarge)
            self._peer_error(431 if too_large else 400)
            return
        if self._waiting == _HEADERS and not self._stop_parsing:
            self._raw_head += len(data)
            if self._raw_head > RAW_HEAD_GUARD_BYTES:
                self._peer_error(431)

    def eof_received(self) -> bool | None:
        """The client finished sending: answer what came, then close."""
        if self._websocket is not None:
            # A WebSocket ends with a close frame; EOF without one is 1006.
            self._websocket.lost()
            return None
        if self.is_tls or (self._active is None and not self._queue):
            # A TLS transport cannot stay half-open; it closes now.
            return None
        for ex in (self._active, *self._queue):
            if ex is not None:
                ex.keep_alive = False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """Tell every exchange the client is gone; stop the timer."""
        self.dataplane.connections.discard(self)
        stats = self.connection_stats
        if stats is not None:
            stats.connections_open -= 1
        self.closed = True
        self._stop_parsing = True
        self.parser = None
        timer = self._timer
        if timer is not None:
            if timer is _ON_CLOCK:
                if self._clock is not None:
                    self._clock.discard(self)
            else:
                timer.cancel()
            self._timer = None
        # Usually nothing is in flight here (the answer went out first).
        if self._active is not None or self._parsing is not None or self._queue:
            for ex in (self._active, self._parsing, *self._queue):
                if ex is not None:
                    ex.lost()
            self._queue.clear()
        if self._drain_waiter is not None:
            self._wake_drain()
        if self._websocket is not None:
            self._websocket.lost()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None

    def pause_writing(self) -> None:
        """The transport buffer is high: stop reading, streaming responses wait."""
        self._write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        """The transport buffer drained: answers wait no more."""
        self._write_paused = False
        self._wake_drain()
        if self._active is None and self._queue and not self._advancing:
            self._advance()
        else:
            self._maybe_resume()

    # -- parser callbacks (httptools) ---------------------------------------

    def on_message_begin(self) -> None:
        """A request starts: its head must be complete within the timeout."""
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._raw_head = 0
        self._waiting = _HEADERS
        self._deadline = self.loop.time() + self.header_timeout
        if self._timer is None:
            self._arm_timer()

    def on_url(self, url: bytes) -> None:
        """A piece of the request target."""
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEADER_BYTES:
            raise _HeadersTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header line, complete."""
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEADER_BYTES:
            raise _HeadersTooLarge
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        """Make the exchange; answer it now or queue it behind the active one."""
        # Until on_message_complete, the client owes the body (if any): its
        # next bytes must come within the body timeout.
        self._waiting = _BODY
        self._deadline = self.loop.time() + self.body_timeout
        if self._timer is None:
            self._arm_timer()
        if self._stop_parsing:
            return
        parser = self.parser
        assert parser is not None  # called by the parser itself
        url = self._url
        host = b""
        hosts = 0
        length = -1
        expect = False
        upgrade = False
        for name, value in self._headers:
            if name == b"host":
                host = value
                hosts += 1
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = self.max_body + 1
            elif name == b"expect":
                expect = value.lower() == b"100-continue"
            elif name == b"upgrade":
                upgrade = True

        # The target: origin-form is the common case; absolute-form names
        # the host itself and wins over the Host header (RFC 9112 3.2.2).
        if url[:1] == b"/":
            q = url.find(b"?")
            raw_path, query = (url, b"") if q < 0 else (url[:q], url[q + 1 :])
        elif url == b"*":
            raw_path, query = url, b""
        else:
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raw_path, query = b"", b""
            else:
                raw_path = parsed.path or b"/"
                query = parsed.query or b""
                if parsed.host:
                    host = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
        version = parser.get_http_version()
        ex = Exchange(
            self,
            parser.get_method().decode("ascii"),
            raw_path,
            query,
            self._headers,
            host.decode("latin-1"),
            version,
            parser.should_keep_alive(),
        )

        ex.expect_continue = expect and version == "1.1"
        if upgrade:
            # The parser stops at an Upgrade head, so the connection ends
            # with this request: a WebSocket handshake for an application
            # carries on as a WebSocket (see _start); anything else (h2c, a
            # handshake for static files) is answered as HTTP/1.1.
            # LIMITATION: no h2c upgrade.
            ex.keep_alive = False
            ex.websocket = is_websocket_request(ex.method, version, self._headers)

        # Requests that are refused before any byte of their body.
        if not raw_path or hosts > 1:
            ex.error = 400  # RFC 9112 3.2: more than one Host is refused
        elif not host and version == "1.1":
            ex.error = 400  # RFC 9112 3.2: a 1.1 request without Host
        elif length > self.max_body:
            ex.error = 413
        if ex.error:
            ex.keep_alive = False
            self._stop_reading()
        self._parsing = ex
        if self._active is None and not self._queue and not self._write_paused:
            self._start(ex)
        else:
            # Behind another, or the client is not taking its answers:
            # answering now would only grow the transport's buffer.
            self._queue.append(ex)
            self._pause()

    def on_body(self, body: bytes) -> None:
        """A piece of the body: count it against the limit, hand it over."""
        ex = self._parsing
        if ex is None:
            return
        self._deadline = self.loop.time() + self.body_timeout
        ex.body_size += len(body)
        if ex.body_size > self.max_body:
            self._body_error(ex, 413)
            return
        if ex.finished or ex.error:
            return
        ex.feed_body(body)
        if ex.body_buffered > BODY_HIGH_WATER_BYTES:
            self._pause()

    def on_message_complete(self) -> None:
        """The body ended; between requests, the idle clock runs."""
        ex = self._parsing
        self._parsing = None
        self._waiting = _BUSY
        if ex is not None:
            ex.end_body()
            if self.closed:
                # Answered already and closing (the usual end of a
                # Connection: close request): nothing to pause or time.
                self._stop_parsing = True
                return
            if not ex.keep_alive and self._websocket is None:
                self._stop_reading()
        if self._active is None and not self._queue:
            self._enter_idle()

    # -- answering -----------------------------------------------------------

    def _start(self, ex: Exchange) -> None:
        # Decide who answers: plugin port, then the routing table.
        self._active = ex
        if self.access_log:
            ex.started_at = time.perf_counter()  # read only by the access log
        if ex.error:
            self._error(ex, ex.error)
            return
        port_apps = self.dataplane.port_apps
        if port_apps:
            app = port_apps.get(self.port)
            if app is not None:
                self._run_app(ex, app, None)
                return

        # Host routing: exact, then the wildcard one label up.
        host, routes = self.dataplane.routes.routes_for_header(ex.host)
        if not routes:
            self._error(ex, 404)
            return
        port = self.port
        route: Route | None = None
        if self.is_tls:
            tls_domain = self.tls_domain
            if (
                tls_domain is not None
                and tls_domain != host
                and not covers(tls_domain, host)
            ):
                self._error(ex, 421)
                return
            for candidate in routes:
                if port in candidate.tls_ports:
                    route = candidate
                    break
            if route is None:
                none_only = all(r.service.tls == "none" for r in routes)
                self._error(ex, 421 if none_only else 404)
                return
            ex.extra_headers = self.hsts
        else:
            for candidate in routes:
                if port in candidate.plain_ports:
                    route = candidate
                    break
            if route is None:
                self._error(ex, 404)
                return
            if route.service.tls == "required":
                target = ex.raw_path + (b"?" + ex.query if ex.query else b"")
                location = redirect_location(host, route.service.tls_port, target)
                self._simple(
                    ex,
                    redirect_status(ex.method),
                    b"location: " + location + b"\r\n",
                    b"",
                )
                return

        # The service answers: static files inline, applications in a task.
        if route.app is not None:
            self._run_app(ex, route.app, route.state)
        elif route.static is not None:
            self._serve_static(ex, route.static)
        else:
            self._error(ex, 404)

    def _run_app(
        self, ex: Exchange, app: ASGIApp, state: dict[str, Any] | None
    ) -> None:
        scope = ex.scope(self.server, self.client, self.scheme, state)
        if ex.websocket:
            self._run_websocket(ex, app, scope)
            return
        ex.task = self.loop.create_task(ex.run(app, scope))

    def _run_websocket(self, ex: Exchange, app: ASGIApp, scope: Scope) -> None:
        # The connection becomes the session's: no HTTP timers from now on.
        where = f"{ex.host}{ex.raw_path.decode('latin-1')}"
        session = WebSocketSession(self, ex.headers, where)
        self._websocket = session
        self._waiting = _BUSY
        scope = websocket_scope(scope, self.is_tls, session.subprotocols)
        ex.task = self.loop.create_task(self._websocket_ended(ex, session, app, scope))

    async def _websocket_ended(
        self, ex: Exchange, session: WebSocketSession, app: ASGIApp, scope: Scope
    ) -> None:
        try:
            await session.run(app, scope)
        finally:
            ex.status = session.status
            ex.response_started = ex.response_done = True
            self.finish(ex)

    def shut_down(self) -> None:
        """Arcology is stopping: close now if idle, else after the answer.

        An exchange being answered (or whose body is still arriving) goes on;
        ``finish`` closes the connection after it, since the data plane is
        draining. A WebSocket is closed with ``1001 going away``.
        """
        if self._websocket is not None:
            self._websocket.going_away()
        elif self._active is None and not self._queue and self._parsing is None:
            self._close()

    # -- what a WebSocket session needs beyond the Connection interface ------

    def pause_reading(self) -> None:
        """The session has enough messages waiting: stop reading for now."""
        self._pause()

    def resume_reading(self) -> None:
        """The session took its messages: read again (unless writes wait)."""
        if self._reading_paused and not self._write_paused and not self.closed:
            self._reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def _serve_static(self, ex: Exchange, static: StaticFiles) -> None:
        headers = ex.headers
        answer = static.respond(
            ex.method, ex.raw_path, ex.query, dict(headers) if len(headers) > 1 else {}
        )
        body = answer.body
        ex.status = answer.status
        ex.response_started = True
        head = self._head(ex, answer.head)
        if ex.method == "HEAD":
            self.write(head)
        elif isinstance(body, FileBody):
            ex.task = self.loop.create_task(self._stream_file(ex, head, body))
            return
        else:
            self.write(head + body)
            ex.sent_bytes = len(body)
        ex.response_done = True
        self.finish(ex)

    async def _stream_file(self, ex: Exchange, head: bytes, body: FileBody) -> None:
        # Large files: read in a worker thread, one chunk ahead of the socket.
        self.write(head)
        offset, remaining = body.offset, body.length
        try:
            while remaining > 0 and not self.closed:
                want = min(CHUNK_BYTES, remaining)
                chunk = await self.loop.run_in_executor(
                    None, read_chunk, body.path, offset, want
                )
                if not chunk:
                    break
                self.write(chunk)
                ex.sent_bytes += len(chunk)
                offset += len(chunk)
                remaining -= len(chunk)
                await self.drain()
        except OSError as exc:
            log.warning("static file read failed path={} error={!r}", body.path, exc)
        finally:
            if remaining > 0:
                ex.keep_alive = False
            ex.response_done = True
            self.finish(ex)

    def _head(self, ex: Exchange, start: bytes) -> bytes:
        # ``start``: the status line, the answer's headers and its length.
        if ex.expect_continue and not ex.body_done:
            # The client waits for 100 Continue that will not come; it may
            # send the body or not, so the framing is unknown: close after.
            ex.keep_alive = False
        if ex.keep_alive:
            conn = b"connection: keep-alive\r\n" if ex.http_version == "1.0" else b""
        else:
            conn = b"connection: close\r\n"
        return b"".join((start, ex.extra_headers, conn, date_header(), b"\r\n"))

    def _simple(self, ex: Exchange, status: int, extra: bytes, body: bytes) -> None:
        # One write and done: the common inline answer.
        ex.status = status
        ex.response_started = True
        ex.response_done = True
        head = self._head(ex, _answer_start(status, extra, len(body)))
        if ex.method == "HEAD" or not body:
            self.write(head)
        else:
            self.write(head + body)
            ex.sent_bytes = len(body)
        self.finish(ex)

    def _error(self, ex: Exchange, status: int) -> None:
        # Errors of the peer close the connection; routing misses keep it.
        if ex.error:
            ex.keep_alive = False
        self._simple(
            ex,
            status,
            b"content-type: text/plain; charset=utf-8\r\n",
            error_body(status),
        )

    # -- the Connection interface of an exchange -----------------------------

    def write(self, data: bytes) -> None:
        """Write to the client unless the connection is gone."""
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's buffer is above its high mark."""
        if not self._write_paused or self.closed:
            return
        waiter = self.loop.create_future()
        self._drain_waiter = waiter
        await waiter

    def _wake_drain(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        release(waiter)

    def finish(self, ex: Exchange) -> None:
        """The exchange is answered: log it, then close or take the next."""
        if ex.finished:
            return
        ex.finished = True
        ex.ended()
        if self._active is ex:
            self._active = None
        if 100 <= ex.status < 600:
            self.dataplane.answers_by_class[ex.status // 100] += 1
        if self.access_log:
            self._log_access(ex)
        if (
            not ex.keep_alive
            or not ex.complete_length
            or self.closed
            or self.dataplane.draining
        ):
            self._close()
            return
        if not self._advancing:
            self._advance()

    def body_consumed(self) -> None:
        """The application took the buffered body: reading may go on."""
        if self._reading_paused:
            self._maybe_resume()

    def abort(self) -> None:
        """Close after what was written so far."""
        self._close()

    # -- sequencing ---------------------------------------------------------

    def _advance(self) -> None:
        # Answer the queued requests in order; inline answers finish at once.
        self._advancing = True
        try:
            while (
                self._active is None
                and self._queue
                and not self.closed
                and not self._write_paused
            ):
                self._start(self._queue.popleft())
        finally:
            self._advancing = False
        if self._active is None and not self._queue and not self.closed:
            if self._parsing is None and self._waiting == _BUSY:
                self._enter_idle()
            self._maybe_resume()

    def _enter_idle(self) -> None:
        self._waiting = _IDLE
        self._deadline = self.loop.time() + KEEP_ALIVE_IDLE_S
        if self._timer is None:
            self._arm_timer()

    def _pause(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume(self) -> None:
        websocket = self._websocket
        if websocket is not None:
            if not websocket.reading_paused:
                self.resume_reading()
            return
        if not self._reading_paused or self.closed or self._stop_parsing:
            return
        if self._queue or self._write_paused:
            return
        parsing = self._parsing
        if parsing is not None and parsing.body_buffered > BODY_HIGH_WATER_BYTES:
            return
        self._reading_paused = False
        if self._waiting == _BODY:
            # The body clock starts afresh: the pause was Arcology's doing.
            self._deadline = self.loop.time() + self.body_timeout
        if self.transport is not None:
            self.transport.resume_reading()

    def _stop_reading(self) -> None:
        self._stop_parsing = True
        self._pause()

    def _close(self) -> None:
        self._stop_parsing = True
        if not self.closed:
            self.closed = True
            transport = self.transport
            if transport is None:
                return
            if (
                self._reading_paused
                and not self._write_paused
                and not self.is_tls
                and transport.can_write_eof()
            ):
                self._linger(transport)
            else:
                transport.close()

    def _linger(self, transport: asyncio.Transport) -> None:
        # Arcology stopped reading a request it refused or left unanswered,
        # so the client may still be sending: the answer goes out with a FIN,
        # and what still comes is read and dropped until the client closes
        # or LINGER_S passes. (The TLS transport does this by itself.)
        transport.write_eof()
        transport.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_S, self._end_linger)

    def _end_linger(self) -> None:
        self._linger_timer = None
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            # The answer itself is still on its way: give it the time.
            self._linger_timer = self.loop.call_later(LINGER_S, self._end_linger)
            return
        transport.close()

    # -- errors of the peer --------------------------------------------------

    def _peer_error(self, status: int) -> None:
        # Framing is lost: answer after what is in flight, then close.
        ex = self._parsing
        if ex is not None:
            self._body_error(ex, status)
            return
        self._stop_reading()
        ex = Exchange(self, "GET", b"", b"", [], "", "1.1", False)
        ex.error = status
        if self._active is None and not self._queue:
            self._start(ex)
        else:
            self._queue.append(ex)

    def _body_error(self, ex: Exchange, status: int) -> None:
        # A body over the limit or malformed mid-way: refuse it, then close.
        self._stop_reading()
        self._parsing = None
        ex.keep_alive = False
        if self._active is not ex:
            ex.error = ex.error or status
            ex.end_body()
            return
        if not ex.response_started and not ex.response_done:
            body = error_body(status)
            ex.status = status
            ex.response_started = True
            ex.response_done = True
            ex.sent_bytes = len(body)
            self.write(self._head(ex, _answer_start(status, b"", len(body))) + body)
        ex.lost()
        if ex.task is None:
            self.finish(ex)

    # -- the timer -----------------------------------------------------------

    def _arm_timer(self) -> None:
        self._timer_at = self._deadline
        self._timer = self.loop.call_at(self._deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed or self._waiting == _BUSY:
            return
        now = self.loop.time()
        if now < self._deadline:
            self._arm_timer()
            return
        if self._waiting == _IDLE:
            log.debug("keep-alive connection idle, closing client={}", self.client)
            self._close()
            return
        if self._waiting == _BODY:
            if self._reading_paused:
                # Arcology stopped reading (flow control), not the client.
                self._deadline = now + self.body_timeout
                self._arm_timer()
                return
            log.debug("request body stalled client={}", self.client)
            ex = self._parsing
            if ex is None:
                self._close()
            else:
                self._body_error(ex, 408)
            return
        if self._active is not None or self._queue:
            # Headers of a pipelined request are late behind a slow answer.
            self._deadline = now + self.header_timeout
            self._arm_timer()
            return
        log.debug("request head too slow client={}", self.client)
        self._stop_reading()
        ex = Exchange(self, "GET", b"", b"", [], "", "1.1", False)
        ex.error = 408
        self._start(ex)

    # -- access log ----------------------------------------------------------

    def _log_access(self, ex: Exchange) -> None:
        ms = (time.perf_counter() - ex.started_at) * 1000.0
        log.info(
            "access method={} host={} path={} status={} bytes={} ms={:.2f} scheme={}",
            ex.method,
            ex.host or "-",
            ex.raw_path.decode("latin-1") or "-",
            ex.status,
            ex.sent_bytes,
            ms,
            self.scheme,
        )


@functools.cache
def _hsts_line(setting: str) -> bytes:
    """The ``Strict-Transport-Security`` line for a setting, built once."""
    hsts = hsts_header(setting)
    return hsts[0] + b": " + hsts[1] + b"\r\n" if hsts else b""


class _HeaderClock:
    """One loop timer for the first deadline of many connections.

    Every connection of one loop starts with the same timeout, so the
    deadlines arrive in order: the earliest is the oldest entry, and one
    timer armed for it serves them all. A due connection leaves the clock
    and runs its own ``_on_timer``, which re-arms a timer of its own if its
    deadline moved meanwhile; a connection that ends first simply leaves.
    """

    # The clock new connections join (one per loop and timeout; a new one is
    # made when either changes, and older clocks run until they empty).
    current: _HeaderClock | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self._waiting: dict[HttpProtocol, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, protocol: HttpProtocol, deadline: float) -> None:
        """Wake ``protocol`` at ``deadline`` (no earlier than any added before)."""
        self._waiting[protocol] = deadline
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._fire)

    def discard(self, protocol: HttpProtocol) -> None:
        """``protocol`` needs no wake-up any more."""
        self._waiting.pop(protocol, None)

    def _fire(self) -> None:
        # Take the due connections and re-arm for the next before running
        # any, so that one failing cannot stop the others' clock.
        self._timer = None
        now = self.loop.time()
        waiting = self._waiting
        due: list[HttpProtocol] = []
        while waiting:
            protocol, deadline = next(iter(waiting.items()))
            if deadline > now:
                self._timer = self.loop.call_at(deadline, self._fire)
                break
            del waiting[protocol]
            due.append(protocol)
        for protocol in due:
            protocol._timer = None
            try:
                protocol._on_timer()
            except Exception as exc:
                self.loop.call_exception_handler(
                    {"message": "HTTP connection timer failed", "exception": exc}
                )


# What HttpProtocol._timer holds while its deadline waits on a _HeaderClock.
_ON_CLOCK = cast(asyncio.TimerHandle, object())


def _answer_start(status: int, headers: bytes, length: int) -> bytes:
    """The status line, ``headers`` and the length: what ``_head`` completes."""
    return status_line(status) + headers + b"content-length: %d\r\n" % length


def _address(value: Any) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return None
