"""The accept path of a TLS listener: read the server name, then hand over.

How this works
--------------
Python's ``sni_callback`` runs inside the handshake and must answer at once,
so it cannot wait for a certificate that is not cached yet. Arcology chooses
the context *before* the handshake starts instead:

1. The listener accepts by itself (``loop.add_reader`` on the listening
   socket, up to ``ACCEPT_BATCH`` connections a wake-up, no task or
   transport per connection). With ``TCP_DEFER_ACCEPT`` the kernel hands a
   connection over only once its first bytes have arrived, so the
   ClientHello is normally there at once.
2. It peeks at the ClientHello (``MSG_PEEK``: the bytes stay in the socket
   for OpenSSL) and :func:`arc.tls.clienthello.parse_client_hello` reads the
   server name.
3. The server name picks the context: the cache's hit path, synchronously.
   On a miss a task asks the cache (which asks Cryptosaur: exact domain,
   then the wildcard one label up); only that connection waits, and what
   the client sends meanwhile waits in the socket. The routing table must
   allow TLS for the name (``routes.tls_allowed``).
4. With no server name, an unusable one, or no certificate, the fallback
   setting decides: ``"reject"`` writes a plaintext ``unrecognized_name``
   alert record and closes, a domain serves that domain's context instead.
   A certificate that may exist but cannot be had (the store unreachable,
   a fetch slower than the handshake timeout) is refused with
   ``internal_error`` instead, fallback or not.
5. The handshake and the connection belong to a
   :class:`arc.tls.transport.TlsTransport`, in which OpenSSL reads and
   writes the socket itself. Once the handshake is done it makes the HTTP
   protocol from ``dataplane.http_protocol_factory`` (told the
   certificate's domain, ``tls_domain``, so it can refuse hosts the
   certificate does not cover).

A ClientHello that is not all there yet (it spans TCP segments, or the
client was silent through the deferral) waits in the listener's epoll set,
watched edge-triggered: each arrival of bytes wakes it once, the bytes are
peeked at again whole, and once the hello is complete the connection goes on
from step 3. The bytes never leave the socket before OpenSSL reads them, so
every connection, whole hello or not, is served by the same transport.

What always holds
-----------------
- Reading the ClientHello and choosing its context together take at most
  ``handshake_timeout_s``; the handshake proper has the same bound again
  (shared clocks, each up to a quarter of a second late). A client that
  sends nothing is held by the kernel for ``DEFER_ACCEPT_S`` first, at no
  cost to the loop.
- A ClientHello larger than ``MAX_CLIENT_HELLO_BYTES`` is refused.
- A slow certificate fetch delays only the connections asking for that
  name; cached names are served meanwhile.
- Closing a listener stops accepting; connections already accepted carry on.
- Running out of descriptors or memory pauses accepting for
  ``ACCEPT_RETRY_S`` (logged) instead of spinning; open connections go on.
- Refused connections get an alert record, whether the refusal is
  Arcology's (policy, a malformed hello, a client that offers nothing newer
  than TLS 1.1) or OpenSSL's (no shared cipher suite or group); peer
  failures are counted and logged at DEBUG.

Limits
------
LIMITATION: a ClientHello that hides its name (Encrypted Client Hello) is
served by its outer, public name; ECH is not offered by these contexts, so
clients fall back to a plain ClientHello.
LIMITATION: TLS session resumption is per context; a client that reconnects
after its name's context was rebuilt (certificate change, eviction, TTL)
makes a full handshake.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from loguru import logger

from arc.errors import ArcError, NotFound
from arc.tls.cache import CachedContext, ContextCache
from arc.tls.clienthello import (
    ALERT_INTERNAL_ERROR,
    ALERT_UNRECOGNIZED_NAME,
    MAX_CLIENT_HELLO_BYTES,
    ClientHello,
    ClientHelloError,
    parse_client_hello,
)
from arc.tls.listener import BACKLOG
from arc.tls.transport import (
    LINGER_S,
    Clock,
    Poller,
    TlsSocket,
    TlsTransport,
    end_lingering,
    linger,
)

if TYPE_CHECKING:
    from arc.http.routing import RoutingTable

# How long the kernel holds a connection that has sent nothing before
# handing it over anyway (then the handshake timeout applies). Clients send
# their ClientHello at once, so this only delays silent ones.
DEFER_ACCEPT_S = 1
# Connections accepted per readiness of a listening socket, so that a flood
# of new connections cannot hold the loop from the open ones.
ACCEPT_BATCH = 64
# accept() errors that mean the process or machine is out of something
# (descriptors, memory): accepting pauses this long instead of spinning.
ACCEPT_PAUSE_ERRNOS = frozenset(
    (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
)
ACCEPT_RETRY_S = 1.0
# Protocol factories kept per certificate domain (they are cheap, but one
# per connection is waste); past this many the table starts over. At least
# the default context cache size (10,000), so that every cached domain keeps
# its factory instead of the table starting over every few thousand
# handshakes; a factory is two small closures, so the bound is about 10 MB.
MAX_FACTORIES = 16384
# A connection waiting for the rest of its ClientHello: woken when bytes
# arrive or the peer closes, once per change (edge-triggered).
_HELLO_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_HELLO_ENDS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# The fallback value that refuses a handshake without a usable certificate.
FALLBACK_REJECT = "reject"

log = logger.bind(actor="esper")


class Plane(Protocol):
    """What the accept path needs from the data plane."""

    loop: asyncio.AbstractEventLoop
    # Every listener registers here while it accepts (for a graceful stop).
    listeners: set[Any]

    @property
    def routes(self) -> RoutingTable: ...

    def http_protocol_factory(
        self, *, port: int, scheme: str, tls_domain: str | None
    ) -> Callable[[], asyncio.Protocol]: ...


@dataclass
class ConnectionStats:
    """Counters shared by every listener of one Esper."""

    connections_open: int = 0
    handshakes: int = 0
    handshake_failures: int = 0
    rejected: int = 0

    def counted(
        self, factory: Callable[[], asyncio.Protocol]
    ) -> Callable[[], asyncio.Protocol]:
        """Wrap a protocol factory so that open connections are counted."""

        def make() -> asyncio.Protocol:
            protocol = factory()
            if hasattr(protocol, "connection_stats"):
                # It counts itself (HttpProtocol does): one attribute write
                # instead of two closures per connection.
                protocol.connection_stats = self
                return protocol
            made, lost = protocol.connection_made, protocol.connection_lost

            def connection_made(transport: asyncio.BaseTransport) -> None:
                self.connections_open += 1
                made(transport)

            def connection_lost(exc: Exception | None) -> None:
                self.connections_open -= 1
                # These closures and the protocol hold each other: break the
                # cycle so the connection is freed at once, not by the GC.
                del protocol.connection_made, protocol.connection_lost
                lost(exc)

            # Instance attributes: the transport calls these, and nothing is
            # added on the per-byte path.
            protocol.connection_made = connection_made  # type: ignore[method-assign]
            protocol.connection_lost = connection_lost  # type: ignore[method-assign]
            return protocol

        return make


class HandshakeRefused(Exception):
    """Arcology refuses this connection; ``alert`` says why, on the wire."""

    def __init__(self, reason: str, alert: int = ALERT_UNRECOGNIZED_NAME) -> None:
        super().__init__(reason)
        self.alert = alert


class _HelloWait:
    """A connection whose ClientHello is not all there yet.

    ``connection`` is None once the hello was read (or the connection
    dropped); its entry on the hello clock is inert from then on.
    """

    __slots__ = ("accepted_at", "connection", "listener")

    def __init__(self, listener: TlsListener, connection: TlsSocket) -> None:
        self.listener = listener
        self.connection: TlsSocket | None = connection
        self.accepted_at = 0.0

    def ready(self, events: int) -> None:
        self.listener.hello_ready(self, events)


class TlsListener:
    """Accepts connections on sockets of one TLS port and serves them."""

    def __init__(
        self,
        plane: Plane,
        port: int,
        sockets: Sequence[socket.socket],
        cache: ContextCache,
        *,
        fallback: str = FALLBACK_REJECT,
        handshake_timeout_s: float = 10.0,
        stats: ConnectionStats | None = None,
    ) -> None:
        self.plane = plane
        self.loop = plane.loop
        self.port = port
        self.sockets = list(sockets)
        self.cache = cache
        self.fallback = fallback
        self.handshake_timeout_s = handshake_timeout_s
        self.stats = stats or ConnectionStats()
        # ClientHellos that come in pieces, handshakes, and closed sockets
        # draining what their clients still send.
        self.clock = Clock(self.loop, handshake_timeout_s, self._hello_expired)
        self.handshakes = Clock(self.loop, handshake_timeout_s, self._handshake_expired)
        self.lingers = Clock(self.loop, LINGER_S, self._end_lingering)
        self._accepting: list[socket.socket] = []
        self._accept_retry: asyncio.TimerHandle | None = None
        self._poller: Poller | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._factories: dict[str, Callable[[], asyncio.Protocol]] = {}
        self._closed = False

    async def start(self) -> None:
        """Start accepting; run on the loop."""
        self.plane.listeners.add(self)
        self._poller = Poller(self.loop)
        for sock in self.sockets:
            # The kernel completes accept only once the client has sent
            # something (its ClientHello), so the first read finds it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)
            # Accepted sockets inherit it: small answers go out at once.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        self._resume_accepting()

    def close(self) -> None:
        """Stop accepting and close the listening sockets; call on the loop."""
        if self._closed:
            return
        self._closed = True
        self.plane.listeners.discard(self)
        self._stop_accepting()
        for sock in self.sockets:
            sock.close()
        if self._poller is not None:
            # Open connections carry on; the set closes after the last.
            self._poller.close_when_idle()

    def configure(self, *, fallback: str, handshake_timeout_s: float) -> None:
        """Apply new settings (a reload) to connections from now on; on the loop."""
        self.fallback = fallback
        self.handshake_timeout_s = handshake_timeout_s
        self.clock.set_timeout(handshake_timeout_s)
        self.handshakes.set_timeout(handshake_timeout_s)

    # -- accepting ---------------------------------------------------------------

    def _stop_accepting(self) -> None:
        for sock in self._accepting:
            self.loop.remove_reader(sock.fileno())
        self._accepting.clear()
        if self._accept_retry is not None:
            self._accept_retry.cancel()
            self._accept_retry = None

    def _resume_accepting(self) -> None:
        self._accept_retry = None
        if not self._closed:
            for sock in self.sockets:
                self._accepting.append(sock)
                self.loop.add_reader(
                    sock.fileno(), self._accept, sock, int(sock.family)
                )

    def _accept(self, listening: socket.socket, family: int) -> None:
        """Accept what is waiting (up to ``ACCEPT_BATCH``) and serve it."""
        for _ in range(ACCEPT_BATCH):
            try:
                fd, _ = listening._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in ACCEPT_PAUSE_ERRNOS:
                    log.error(
                        "accept failed port={} reason={}; accepting again in {} s",
                        self.port,
                        exc.strerror or exc,
                        ACCEPT_RETRY_S,
                    )
                    self._stop_accepting()
                    self._accept_retry = self.loop.call_later(
                        ACCEPT_RETRY_S, self._resume_accepting
                    )
                    return
                # The client left before it was accepted, and the like.
                log.debug("accept failed port={} reason={!r}", self.port, exc)
                continue
            try:
                connection = TlsSocket(family, socket.SOCK_STREAM, 0, fd)
            except OSError:
                os.close(fd)
                raise
            try:
                self._accepted(connection)
            except Exception:
                self.stats.handshake_failures += 1
                log.opt(exception=True).error("connection failed port={}", self.port)
                connection.close()

    def _accepted(self, connection: TlsSocket) -> None:
        """Peek at the ClientHello, choose its context, start the handshake.

        The ClientHello stays in the socket (``MSG_PEEK``), where OpenSSL
        reads it. A hello that is not all there yet waits in a
        :class:`_HelloWait` for the rest.
        """
        connection.setblocking(False)
        try:
            data = connection.recv(MAX_CLIENT_HELLO_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self._wait_for_hello(connection)
            return
        except OSError as exc:
            self._drop(connection, f"read failed: {exc!r}")
            return
        if not data:
            self._drop(connection, "connection closed before a ClientHello")
            return
        try:
            hello = parse_client_hello(data)
        except ClientHelloError as exc:
            self._refuse(connection, f"clienthello refused: {exc.message}", exc.alert)
            return
        if not hello.complete:
            self._wait_for_hello(connection)
            return
        self._serve(connection, hello, None)

    def _serve(
        self, connection: TlsSocket, hello: ClientHello, deadline: float | None
    ) -> None:
        """Start the handshake for a whole ClientHello.

        ``deadline``: when choosing the context must be done by (None: the
        handshake timeout from now).
        """
        # The common case, a cached name, is served right here.
        name = hello.server_name
        if name is not None and self.plane.routes.tls_allowed(name, normalized=True):
            entry = self.cache.lookup(name)
            if entry is not None:
                self._start_tls(connection, entry)
                return
        # A miss: this connection waits for the cache, no other does.
        if deadline is None:
            deadline = self.loop.time() + self.handshake_timeout_s
        self._spawn(self._choose_then_start(connection, hello, deadline))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _choose_then_start(
        self, connection: TlsSocket, hello: ClientHello, deadline: float
    ) -> None:
        try:
            entry = await self._choose(hello, deadline)
        except HandshakeRefused as exc:
            self.stats.rejected += 1
            self._refuse(connection, f"handshake refused: {exc}", exc.alert)
            return
        except BaseException:
            connection.close()
            raise
        self._start_tls(connection, entry)

    def _start_tls(self, connection: TlsSocket, entry: CachedContext) -> None:
        assert self._poller is not None
        factory = self._factories.get(entry.domain) or self._factory(entry.domain)
        transport = TlsTransport(
            self._poller,
            connection,
            entry.context,
            factory,
            self,
            self.lingers,
        )
        self.handshakes.add(transport)
        transport.start()

    def handshake_done(
        self, transport: TlsTransport, exc: BaseException | None
    ) -> None:
        """A handshake ended; count it."""
        if exc is None:
            self.stats.handshakes += 1
        else:
            self.stats.handshake_failures += 1
            log.debug("handshake failed port={} reason={!r}", self.port, exc)

    def _handshake_expired(self, transport: TlsTransport) -> None:
        transport.handshake_expired(self.handshake_timeout_s)

    def _end_lingering(self, connection: TlsSocket) -> None:
        end_lingering(connection, self.loop)

    def _drop(self, connection: TlsSocket, reason: str) -> None:
        """The peer left or broke the connection before its handshake."""
        self.stats.handshake_failures += 1
        log.debug("clienthello not read port={} reason={}", self.port, reason)
        connection.close()

    def _refuse(self, connection: TlsSocket, reason: str, alert: int) -> None:
        """Send a fatal alert, then close once the peer has had the chance to
        read it (the ClientHello is still unread: a close now would make the
        kernel send a reset, which can overtake the alert)."""
        self.stats.handshake_failures += 1
        log.debug("{} port={}", reason, self.port)
        try:
            connection.send(alert_record(alert))
        except OSError:
            connection.close()
            return
        linger(self.loop, connection, self.lingers)

    # -- a ClientHello in pieces ---------------------------------------------

    def _wait_for_hello(self, connection: TlsSocket) -> None:
        """Watch ``connection`` until its ClientHello is all there.

        The watch is edge-triggered: each wake-up means that bytes arrived
        or the peer closed, and each time the bytes are peeked at again,
        whole, so that they stay in the socket for OpenSSL. A client that
        sends a byte at a time costs one wake-up per byte, and the hello
        clock bounds the whole wait.
        """
        assert self._poller is not None
        wait = _HelloWait(self, connection)
        wait.accepted_at = self.clock.add(wait)
        self._poller.watch(connection.fileno(), _HELLO_EVENTS, wait.ready)

    def hello_ready(self, wait: _HelloWait, events: int) -> None:
        """Bytes arrived for ``wait`` (or the peer closed): look again."""
        connection = wait.connection
        if connection is None:
            return
        try:
            data = connection.recv(MAX_CLIENT_HELLO_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError as exc:
            self._stop_waiting(wait)
            self._drop(connection, f"read failed: {exc!r}")
            return
        closed = bool(events & _HELLO_ENDS)
        if not data:
            if closed or data is not None:
                self._stop_waiting(wait)
                self._drop(connection, "connection closed before a ClientHello")
            return
        try:
            hello = parse_client_hello(data)
        except ClientHelloError as exc:
            self._stop_waiting(wait)
            self._refuse(connection, f"clienthello refused: {exc.message}", exc.alert)
            return
        if not hello.complete:
            if closed:
                self._stop_waiting(wait)
                self._drop(connection, "connection closed inside its ClientHello")
            return
        self._stop_waiting(wait)
        # Reading the hello and choosing its context share one timeout.
        self._serve(connection, hello, self.clock.deadline(wait.accepted_at))

    def _stop_waiting(self, wait: _HelloWait) -> None:
        connection = wait.connection
        wait.connection = None
        if connection is not None and self._poller is not None:
            self._poller.forget(connection.fileno())

    def _hello_expired(self, wait: _HelloWait) -> None:
        connection = wait.connection
        if connection is None:
            return  # read and handed on in time
        self._stop_waiting(wait)
        self._drop(
            connection, f"ClientHello not complete within {self.handshake_timeout_s} s"
        )

    def _factory(self, domain: str) -> Callable[[], asyncio.Protocol]:
        """The counted HTTP protocol factory for a certificate's domain."""
        factory = self._factories.get(domain)
        if factory is None:
            if len(self._factories) >= MAX_FACTORIES:
                self._factories.clear()
            factory = self.stats.counted(
                self.plane.http_protocol_factory(
                    port=self.port, scheme="https", tls_domain=domain
                )
            )
            self._factories[domain] = factory
        return factory

    async def _choose(self, hello: ClientHello, deadline: float) -> CachedContext:
        """The context for this ClientHello, or HandshakeRefused."""
        name = hello.server_name
        if name is not None and self.plane.routes.tls_allowed(name, normalized=True):
            entry = await self._context_for(name, deadline)
            if entry is not None:
                return entry
        if self.fallback == FALLBACK_REJECT:
            raise HandshakeRefused(
                f"no certificate for server name {name!r} and tls_fallback=reject"
            )
        entry = await self._context_for(self.fallback, deadline)
        if entry is None:
            raise HandshakeRefused(
                f"no certificate for server name {name!r} nor for the fallback "
                f"domain {self.fallback}"
            )
        return entry

    async def _context_for(self, name: str, deadline: float) -> CachedContext | None:
        """The context for ``name``; None when no certificate covers it.

        Raises:
            HandshakeRefused: with ``internal_error``, when a certificate may
                exist but could not be had: the store is unreachable or busy,
                the fetch outlived the handshake timeout, or the stored chain
                and key do not make a context. The fallback is no answer to
                that: it would serve another domain's certificate.
        """
        entry = self.cache.lookup(name)
        if entry is not None:
            return entry
        try:
            async with asyncio.timeout_at(deadline):
                return await self.cache.get(name)
        except NotFound as exc:
            log.debug("no context name={} reason={}", name, exc.message)
            return None
        except ArcError as exc:
            reason = exc.message
            cause: BaseException = exc
        except TimeoutError as exc:
            reason = "not ready within the handshake timeout"
            cause = exc
        raise HandshakeRefused(
            f"certificate for {name} unavailable: {reason}", ALERT_INTERNAL_ERROR
        ) from cause


def alert_record(description: int) -> bytes:
    """A plaintext fatal alert record (RFC 8446 6), TLS 1.2 record version."""
    return bytes((0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description))


class PlainListener:
    """Serves plain HTTP on sockets of one port through ``loop.create_server``."""

    def __init__(
        self,
        plane: Plane,
        port: int,
        sockets: Sequence[socket.socket],
        stats: ConnectionStats | None = None,
    ) -> None:
        self.plane = plane
        self.port = port
        self.sockets = list(sockets)
        self.stats = stats or ConnectionStats()
        self._servers: list[asyncio.AbstractServer] = []

    async def start(self) -> None:
        """Start serving; run on the loop."""
        self.plane.listeners.add(self)
        factory = self.stats.counted(
            self.plane.http_protocol_factory(
                port=self.port, scheme="http", tls_domain=None
            )
        )
        for sock in self.sockets:
            server = await self.plane.loop.create_server(
                factory, sock=sock, backlog=BACKLOG
            )
            self._servers.append(server)

    def close(self) -> None:
        """Stop accepting; open connections carry on. Call on the loop."""
        self.plane.listeners.discard(self)
        for server in self._servers:
            server.close()
        self._servers.clear()
        for sock in self.sockets:
            sock.close()


def listener_addresses(sockets: Sequence[socket.socket]) -> list[list[Any]]:
    """The bound ``[host, port]`` of each socket, for status answers."""
    return [list(sock.getsockname()[:2]) for sock in sockets]
