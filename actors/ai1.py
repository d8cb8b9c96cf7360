"""AI1: the admin channel, where the ``ai1`` tool talks to a running Arcology.

How this works
--------------
AI1 listens on ``config.arcology.admin`` (127.0.0.1:7399 by default). Its
server runs on its own asyncio loop in its own thread, ``arc-admin``, not on
the data plane: a data plane busy with thousands of handshakes must not lock
the operator out, and a flood on the admin port must not slow the data plane.

Each connection carries frames (``arc.wire``) both ways. The client sends
requests ``{"verb", "payload", "reply"}``; every answer carries the
request's ``reply`` number, so a client may pipeline many requests and
match the answers as they come, in any order.

1. The first frame must be ``AI1.authenticate {"token"}``. Nothing else is
   served before. A right token is answered at once. A wrong one is logged
   (WARNING, with the peer, never the token), answered after a delay that
   grows with each failure from the same peer host, and the connection is
   closed.
2. After that, a verb ``Actor.verb`` is forwarded with ``ask_async`` to the
   actor that owns it, except the verbs in ``DENIED_VERBS``: private keys
   never leave the process. As a second guard, an answer that holds a
   private key or a field named like one is replaced by an error.
3. AI1's own verbs (``AI1.status``) are answered here.

What always holds
-----------------
- A malformed, oversized or unexpected frame gets one error frame, then the
  connection is closed at once; the stream has lost its framing anyway.
- Nothing a client sends stops the channel: every callback catches what it
  raises; the number of connections, the requests in flight per connection,
  the bytes buffered per connection and the time a connection may stay
  idle are all bounded.
- A non-loopback address is served only over TLS, with the bundle named by
  ``admin_tls_cert``; without one AI1 refuses to start, naming the field.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import re
import ssl
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

from loguru import logger

from arc.actor import Actor, verb
from arc.config import Config, is_loopback
from arc.dataplane import new_event_loop
from arc.errors import ArcError, BadInput, Busy, ConfigError, Internal, Unauthorized
from arc.messages import Message
from arc.runtime import Runtime
from arc.token import ensure_token, tokens_match
from arc.wire import FrameDecoder, error_frame, ok_frame, request_decoder
from arc.workers import read_statuses, worker_count

# Verbs whose answer holds a private key: never served on the admin channel.
DENIED_VERBS = frozenset({"Cryptosaur.getCertificate"})
# Field names that would carry key material in an answer.
KEY_FIELD_RE = re.compile(r"(?i)(^|_)(key_pem|private_key|privkey|secret|master_key)$")
PRIVATE_KEY_MARKER = b"PRIVATE KEY-----"
# A verb is exactly ``Actor.verb``; plugin names follow the same pattern.
VERB_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*\.[A-Za-z][A-Za-z0-9_]*$")

# Enough for a few operators and scripts at once; one more is told "busy".
# LIMITATION: with TLS, a connection counts once its handshake is done; the
# handshakes in progress are bounded only by TLS_HANDSHAKE_TIMEOUT_S.
MAX_CONNECTIONS = 64
# Requests one connection may have in flight; `ai1 upload` keeps 32 going.
MAX_IN_FLIGHT = 64
# Unread answers a client may leave queued before AI1 stops reading from it.
WRITE_BUFFER_HIGH_BYTES = 8 * 1024 * 1024
# A client must authenticate promptly; an authenticated one may idle longer
# (an open REPL), then reconnects on its next command.
AUTH_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 600.0
# A wrong token costs the peer this much more waiting each time, up to the cap;
# a peer's record is forgotten after a quiet spell.
AUTH_DELAY_STEP_S = 0.5
AUTH_DELAY_MAX_S = 10.0
AUTH_FAILURE_MEMORY_S = 900.0
# Peers remembered at most; past this the oldest record is dropped.
MAX_AUTH_FAILURE_PEERS = 10_000
# Forwarded asks wait this long: a 4096-bit RSA bundle takes well under a second.
FORWARD_TIMEOUT_S = 60.0
ESPER_STATUS_TIMEOUT_S = 2.0
TLS_HANDSHAKE_TIMEOUT_S = 10.0
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
# Answers are searched this deep for key material; deeper is refused.
MAX_SCAN_DEPTH = 32

log = logger.bind(actor="ai1")
T = TypeVar("T")


def admin_tls_context(config: Config) -> ssl.SSLContext | None:
    """The TLS context of the admin channel, or None for plain loopback.

    Raises:
        ConfigError: a non-loopback admin address without ``admin_tls_cert``,
            or a bundle that cannot be loaded.
    """
    settings = config.arcology
    host, port = settings.admin
    cert = settings.admin_tls_cert
    if cert is None:
        if not is_loopback(host):
            raise ConfigError(
                f"[arcology] admin = {host}:{port} is not a loopback address: "
                "the admin channel needs TLS there; set admin_tls_cert to a "
                "bundle file (chain and key), or bind admin to 127.0.0.1"
            )
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(cert))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"[arcology] admin_tls_cert = {cert}: cannot load it as a bundle "
            f"of chain and key ({exc})"
        ) from exc
    return context


def holds_private_key(value: Any, depth: int = 0) -> bool:
    """Whether an answer holds key material (or is too deep to tell)."""
    if depth > MAX_SCAN_DEPTH:
        return True
    if isinstance(value, bytes | bytearray):
        return PRIVATE_KEY_MARKER in value
    if isinstance(value, str):
        return "PRIVATE KEY-----" in value
    if isinstance(value, dict):
        return any(
            (isinstance(k, str) and KEY_FIELD_RE.search(k) is not None)
            or holds_private_key(v, depth + 1)
            for k, v in value.items()
        )
    if isinstance(value, list | tuple):
        return any(holds_private_key(v, depth + 1) for v in value)
    return False


def _iso(timestamp: float) -> str:
    """A Unix time as ISO 8601 UTC, to the second."""
    moment = dt.datetime.fromtimestamp(timestamp, dt.UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


class AI1(Actor):
    """The admin channel: authenticates ``ai1`` clients and forwards verbs."""

    name = "AI1"

    def __init__(self, runtime: Runtime, config: Config) -> None:
        super().__init__(runtime, config)
        self.server: AdminServer | None = None

    def on_start(self) -> None:
        """Check TLS, load or create the token, open the admin port."""
        settings = self.config.arcology
        context = admin_tls_context(self.config)
        settings.token_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = ensure_token(settings.token_file)
        self.server = AdminServer(self.runtime, token, settings.admin, context)
        self.server.start()
        host, port = self.server.address
        self.log.info(
            "admin channel open address={h}:{p} tls={t}",
            h=host,
            p=port,
            t="yes" if context else "no",
        )

    def on_stop(self) -> None:
        """Close the admin port and every admin connection."""
        server, self.server = self.server, None
        if server is not None:
            server.stop()
            self.log.debug("admin channel closed")

    @verb("status")
    def status(self, payload: Any) -> dict[str, Any]:
        """The same status that ``ai1 status`` shows."""
        if self.server is None:
            raise Busy("AI1: the admin channel is not open")
        return self.server.run(self.server.status(), timeout=ESPER_STATUS_TIMEOUT_S * 2)


class AdminServer:
    """The admin port: an asyncio server on its own loop and thread."""

    def __init__(
        self,
        runtime: Runtime,
        token: str,
        address: tuple[str, int],
        context: ssl.SSLContext | None,
    ) -> None:
        self.runtime = runtime
        self.token = token
        self.requested = address
        self.address = address
        self.context = context
        self.connections: set[AdminConnection] = set()
        self.log = log
        self._failures: dict[str, tuple[int, float]] = {}
        self._loop = new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name="arc-admin", daemon=True)

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread and bind the port; raise if it cannot."""
        self._thread.start()
        try:
            self.run(self._open(), timeout=START_TIMEOUT_S)
        except BaseException:
            self._stop_loop()
            raise

    def stop(self) -> None:
        """Close the port and every connection, then end the loop thread."""
        if not self._thread.is_alive():
            return
        try:
            self.run(self._close(), timeout=STOP_TIMEOUT_S)
        except Exception:
            self.log.opt(exception=True).warning("admin channel did not close cleanly")
        self._stop_loop()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run a coroutine on the admin loop from another thread; wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            tasks = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                self._loop.run_until_complete(
                    asyncio.gather(*tasks, return_exceptions=True)
                )
            self._loop.close()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=STOP_TIMEOUT_S)

    async def _open(self) -> None:
        host, port = self.requested
        try:
            self._server = await self._loop.create_server(
                lambda: AdminConnection(self),
                host,
                port,
                ssl=self.context,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S if self.context else None,
                reuse_address=True,
            )
        except OSError as exc:
            raise ConfigError(
                f"[arcology] admin = {host}:{port}: cannot listen there "
                f"({exc.strerror or exc}); is another Arcology running?"
            ) from exc
        sockname = self._server.sockets[0].getsockname()
        self.address = (host, int(sockname[1]))

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.abort()
        if self._server is not None:
            await self._server.wait_closed()

    # -- authentication -------------------------------------------------------

    def check_token(self, given: Any, peer: str) -> float | None:
        """None when ``given`` is the token; else how long to make the peer wait."""
        if isinstance(given, str) and tokens_match(given, self.token):
            self._failures.pop(peer, None)
            return None
        now = time.monotonic()
        self._forget_old_failures(now)
        count = self._failures.pop(peer, (0, now))[0] + 1
        self._failures[peer] = (count, now)
        if len(self._failures) > MAX_AUTH_FAILURE_PEERS:
            del self._failures[next(iter(self._failures))]
        return min(AUTH_DELAY_MAX_S, AUTH_DELAY_STEP_S * count)

    def _forget_old_failures(self, now: float) -> None:
        stale = [
            peer
            for peer, (_, last) in self._failures.items()
            if now - last > AUTH_FAILURE_MEMORY_S
        ]
        for peer in stale:
            del self._failures[peer]

    # -- requests -------------------------------------------------------------

    async def dispatch(self, message: Message) -> Any:
        """Answer one authenticated request, or raise the error to answer."""
        name = message.verb
        if name == "AI1.status":
            return await self.status()
        if name == "AI1.authenticate":
            return {"authenticated": True}
        if not VERB_RE.match(name):
            raise BadInput(
                f'verb: expected "Actor.verb" such as "Cryptosaur.listCertificates", '
                f"got {name!r}"
            )
        if name in DENIED_VERBS:
            raise Unauthorized(
                f"{name} is not served on the admin channel: private keys never "
                "leave the server"
            )
        actor, _, action = name.partition(".")
        if actor == "AI1":
            raise BadInput(f"AI1: unknown verb {name!r} (known: authenticate, status)")
        answer = await self.runtime.ask_async(
            actor, action, message.payload, timeout=FORWARD_TIMEOUT_S
        )
        if holds_private_key(answer):
            self.log.error("answer withheld: it holds key material verb={v}", v=name)
            raise Internal(
                f"{name}: the answer was withheld because it holds key material"
            )
        return answer

    async def status(self) -> dict[str, Any]:
        """Uptime, actors and restarts, the admin channel, Esper's listeners."""
        runtime = self.runtime.status()
        esper: Any = None
        esper_error: str | None = None
        try:
            esper = await self.runtime.ask_async(
                "Esper", "status", {}, timeout=ESPER_STATUS_TIMEOUT_S
            )
        except ArcError as exc:
            esper_error = exc.message
        host, port = self.address
        count = worker_count()
        workers = (
            read_statuses(self.runtime.config.arcology.data_dir, count)
            if count > 1
            else None
        )
        return {
            "workers": workers,
            "started_at": _iso(float(runtime["started_at"])),
            "uptime_s": runtime["uptime_s"],
            "actors": runtime["actors"],
            "failed": runtime.get("failed"),
            "admin": {
                "address": f"{host}:{port}",
                "tls": self.context is not None,
                "connections": len(self.connections),
            },
            "esper": esper,
            "esper_error": esper_error,
        }


class AdminConnection(asyncio.Protocol):
    """One admin client: frames in, answers out, authentication first."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.log = server.log
        self.decoder: FrameDecoder[Message] = request_decoder()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peer_host = "?"
        self.authenticated = False
        self.closing = False
        self.pending: collections.deque[Message] = collections.deque()
        self.in_flight = 0
        self.reading_paused = False
        self.writing_paused = False
        self.eof = False
        self.last_active = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    # -- transport callbacks --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; same methods.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer_host = str(peer[0])
        self.peer = f"{peer[0]}:{peer[1]}"
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_BYTES)
        if len(self.server.connections) >= MAX_CONNECTIONS:
            self.log.warning(
                "admin connection refused: too many peer={p} open={n}",
                p=self.peer,
                n=len(self.server.connections),
            )
            self.refuse(
                None,
                Busy(
                    f"admin channel: {MAX_CONNECTIONS} connections are open; "
                    "retry later"
                ),
            )
            return
        self.server.connections.add(self)
        self.log.debug("admin connection opened peer={p}", p=self.peer)
        self._arm_timer(AUTH_TIMEOUT_S)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        for task in self.tasks:
            task.cancel()
        self.log.debug("admin connection closed peer={p}", p=self.peer)

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its requests.
        self.writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_active = time.monotonic()
        try:
            for message in self.decoder.feed(data):
                if self.closing:
                    return
                if not self.authenticated:
                    self._authenticate(message)
                else:
                    self.pending.append(message)
        except BadInput as exc:
            self.log.warning(
                "admin frame refused peer={p} reason={r}", p=self.peer, r=exc.message
            )
            self.refuse(None, exc)
            return
        except Exception:
            # A bug here must cost one connection, never the channel.
            self.log.opt(exception=True).error(
                "admin connection failed peer={p}", p=self.peer
            )
            self.refuse(None, Internal("admin channel: failed reading the request"))
            return
        self._pump()

    def eof_received(self) -> bool | None:
        # The client has sent all it will; answer what it asked, then close.
        self.eof = True
        if self.in_flight == 0 and not self.pending:
            self._close()
        return True

    # -- authentication -------------------------------------------------------

    def _authenticate(self, message: Message) -> None:
        if message.verb != "AI1.authenticate":
            self.log.warning(
                "admin request before authentication peer={p} verb={v}",
                p=self.peer,
                v=message.verb[:64],
            )
            self.refuse(
                message.reply,
                Unauthorized(
                    "admin channel: the first request must be AI1.authenticate "
                    f"with the admin token, got {message.verb[:64]!r}"
                ),
            )
            return
        payload = message.payload
        given = payload.get("token") if isinstance(payload, dict) else None
        delay = self.server.check_token(given, self.peer_host)
        if delay is None:
            self.authenticated = True
            self.log.debug("admin client authenticated peer={p}", p=self.peer)
            self._write(ok_frame(message.reply, {"authenticated": True}))
            self._arm_timer(IDLE_TIMEOUT_S)
            return

        # Wrong token: answer late and close, reading nothing more meanwhile.
        self.log.warning(
            "admin authentication refused peer={p} delay_s={d}", p=self.peer, d=delay
        )
        self.closing = True
        self.pending.clear()
        if self.timer is not None:
            self.timer.cancel()
        assert self.transport is not None
        self.transport.pause_reading()
        error = Unauthorized("admin channel: wrong admin token")
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(delay, self._refuse_now, message.reply, error)

    # -- requests -------------------------------------------------------------

    def _pump(self) -> None:
        # Start pending requests up to the in-flight cap; the rest wait unread.
        while self.pending and self.in_flight < MAX_IN_FLIGHT and not self.closing:
            message = self.pending.popleft()
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._serve(message))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self._update_reading()

    async def _serve(self, message: Message) -> None:
        self.log.debug(
            "admin request peer={p} verb={v} reply={r}",
            p=self.peer,
            v=message.verb[:64],
            r=message.reply,
        )
        try:
            result = await self.server.dispatch(message)
            answer = ok_frame(message.reply, result)
        except ArcError as exc:
            answer = error_frame(message.reply, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.opt(exception=True).error(
                "admin request failed verb={v}", v=message.verb
            )
            answer = error_frame(
                message.reply,
                Internal(
                    f"{message.verb}: failed inside Arcology ({type(exc).__name__})"
                ),
            )
        finally:
            self.in_flight -= 1
        self.last_active = time.monotonic()
        self._write(answer)
        if self.transport is not None and self.transport.is_closing():
            return
        if not self.closing:
            self._pump()
        if self.eof and self.in_flight == 0 and not self.pending:
            self._close()

    def _update_reading(self) -> None:
        if self.transport is None or self.closing or self.transport.is_closing():
            return
        pause = self.writing_paused or bool(self.pending)
        if pause and not self.reading_paused:
            self.transport.pause_reading()
            self.reading_paused = True
        elif not pause and self.reading_paused:
            self.transport.resume_reading()
            self.reading_paused = False

    # -- closing --------------------------------------------------------------

    def _arm_timer(self, timeout_s: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(timeout_s, self._check_idle, timeout_s)

    def _check_idle(self, timeout_s: float) -> None:
        if self.closing:
            return
        idle = time.monotonic() - self.last_active
        if self.in_flight or idle < timeout_s:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(
                max(0.1, timeout_s - idle), self._check_idle, timeout_s
            )
            return
        if not self.authenticated:
            self.log.warning("admin client did not authenticate peer={p}", p=self.peer)
            error: ArcError = Unauthorized(
                f"admin channel: no AI1.authenticate within {AUTH_TIMEOUT_S:g} s"
            )
        else:
            self.log.debug("admin connection idle peer={p}", p=self.peer)
            error = Busy(f"admin channel: closed after {timeout_s:g} s idle")
        self.refuse(None, error)

    def refuse(self, reply: int | None, error: ArcError) -> None:
        """Answer with one error frame and close the connection now."""
        self.closing = True
        self.pending.clear()
        self._refuse_now(reply, error)

    def _refuse_now(self, reply: int | None, error: ArcError) -> None:
        self._write(error_frame(reply, error))
        self._close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection without a word (the server is stopping)."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
