"""The accept path of a TLS listener: read the server name, then hand over.

How this works
--------------
Python's ``sni_callback`` runs inside the handshake and must answer at once,
so it cannot wait for a certificate that is not cached yet. Arcology chooses
the context *before* the handshake starts instead:

1. The listening sockets are watched with ``loop.add_reader``; each
   readiness accepts up to ``ACCEPT_BATCH`` connections, and each connection
   becomes its own task, so no client ever waits for another. With
   ``TCP_DEFER_ACCEPT`` the kernel hands a connection over only once its
   first bytes have arrived, so the ClientHello is usually there already.
2. The task peeks at the socket (``recv`` with ``MSG_PEEK``: nothing is
   consumed, OpenSSL will read the same bytes later) and parses the
   ClientHello with :func:`arc.tls.clienthello.parse_client_hello`. While the
   hello is incomplete (it may span TCP segments), the socket's
   ``SO_RCVLOWAT`` is set to the byte count the parser asks for, so the loop
   reports it readable only once those bytes are there instead of waking on
   every segment.
3. The server name picks the context: the cache's hit path (no await), or on
   a miss an ask to Cryptosaur (exact domain, then the wildcard one label up)
   that only this connection's task awaits. The routing table must allow TLS
   for the name (``routes.tls_allowed``). In the common case (the hello has
   arrived by the time the task runs, the name is cached) nothing is awaited
   between ``accept`` and the handshake.
4. With no server name, an unusable one, or no certificate, the fallback
   setting decides: ``"reject"`` writes a plaintext ``unrecognized_name``
   alert record and closes (asyncio would close silently), a domain serves
   that domain's context instead.
5. ``loop.connect_accepted_socket(..., ssl=context)`` runs the handshake and
   attaches the HTTP protocol made by ``dataplane.http_protocol_factory``,
   told the certificate's domain (``tls_domain``) so it can refuse hosts the
   certificate does not cover.

What always holds
-----------------
- Reading the ClientHello and choosing its context together take at most
  ``handshake_timeout_s``; the handshake proper has the same bound again. A
  client that sends nothing is held by the kernel for ``DEFER_ACCEPT_S``
  first, at no cost to the loop.
- At most ``MAX_CLIENT_HELLO_BYTES`` (16 KiB) are peeked; a larger hello is
  refused.
- A slow certificate fetch delays only the connections asking for that
  name; cached names are served meanwhile.
- Closing a listener stops accepting; connections already accepted carry on.
- Refused connections get an alert record when the refusal is Arcology's
  (policy, malformed hello); peer failures are counted and logged at DEBUG.

Limits
------
LIMITATION: a ClientHello that hides its name (Encrypted Client Hello) is
served by its outer, public name; ECH is not offered by these contexts, so
clients fall back to a plain ClientHello.
LIMITATION: a handshake that OpenSSL itself refuses (no shared group or
cipher suite, a TLS 1.1 client) ends in EOF for the client, not an alert:
neither uvloop nor asyncio sends the alert OpenSSL wrote before closing.
Only Arcology's own refusals (policy, malformed hello) carry an alert.
LIMITATION: TLS session resumption is per context; a client that reconnects
after its name's context was rebuilt (certificate change, eviction, TTL)
makes a full handshake.
"""

from __future__ import annotations

import asyncio
import errno
import select
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from loguru import logger

from arc.errors import ArcError
from arc.tls.cache import CachedContext, ContextCache
from arc.tls.clienthello import (
    ALERT_UNRECOGNIZED_NAME,
    MAX_CLIENT_HELLO_BYTES,
    ClientHello,
    ClientHelloError,
    parse_client_hello,
)
from arc.tls.listener import BACKLOG

if TYPE_CHECKING:
    from arc.http.routing import RoutingTable

# Connections taken per readiness of a listening socket: enough to drain a
# burst in one callback, few enough to let other callbacks run in between.
ACCEPT_BATCH = 64
# After EMFILE/ENFILE (out of descriptors), accepting pauses this long
# instead of spinning on a readable socket it cannot accept from.
ACCEPT_PAUSE_S = 0.1
# When woken without the bytes asked for (the peer half-closed, or the
# kernel ignored SO_RCVLOWAT), wait this long before peeking again.
PEEK_RETRY_S = 0.005
# How long the kernel holds a connection that has sent nothing before
# handing it over anyway (then the handshake timeout applies). Clients send
# their ClientHello at once, so this only delays silent ones.
DEFER_ACCEPT_S = 1
# Reads that discard what a refused peer sent, at most; a peer still
# sending after that gets a reset, which it has earned.
REFUSE_DRAIN_READS = 4
# Protocol factories kept per certificate domain (they are cheap, but one
# per connection is waste); past this many the table starts over.
MAX_FACTORIES = 4096
# The fallback value that refuses a handshake without a usable certificate.
FALLBACK_REJECT = "reject"

# Look without taking, and without waiting: accepted sockets stay blocking
# until the loop's transport takes them.
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT

log = logger.bind(actor="esper")


class _AcceptedInet(socket.socket):
    """An accepted IPv4 TCP socket whose ``family`` and ``type`` are constants.

    ``socket.socket`` turns both into enums on every read (about 0.4 us each)
    and accepting plus ``connect_accepted_socket`` read them five times.
    """

    __slots__ = ()
    family = socket.AF_INET
    type = socket.SOCK_STREAM


class _AcceptedInet6(socket.socket):
    """The same for IPv6."""

    __slots__ = ()
    family = socket.AF_INET6
    type = socket.SOCK_STREAM


def _accepted_class(listening: socket.socket) -> type[socket.socket]:
    """The class accepted sockets of ``listening`` are made with."""
    if listening.type != socket.SOCK_STREAM:
        return socket.socket
    if listening.family == socket.AF_INET:
        return _AcceptedInet
    if listening.family == socket.AF_INET6:
        return _AcceptedInet6
    return socket.socket


class Plane(Protocol):
    """What the accept path needs from the data plane."""

    loop: asyncio.AbstractEventLoop

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
        self._tasks: set[asyncio.Task[None]] = set()
        self._factories: dict[str, Callable[[], asyncio.Protocol]] = {}
        self._closed = False

    def start(self) -> None:
        """Start accepting; call on the loop thread."""
        for sock in self.sockets:
            # The kernel completes accept only once the client has sent
            # something (its ClientHello), so the first peek finds it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)
            self.loop.add_reader(
                sock.fileno(), self._accept, sock, _accepted_class(sock)
            )

    def close(self) -> None:
        """Stop accepting and close the listening sockets; call on the loop."""
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    def _accept(self, listening: socket.socket, accepted: type[socket.socket]) -> None:
        family, kind, proto = listening.family, listening.type, listening.proto
        for _ in range(ACCEPT_BATCH):
            try:
                # socket.accept() without its per-call enum conversions; the
                # listening socket is non-blocking, so it sets no timeout.
                fd, _address = listening._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._accept_failed(listening, exc)
                return
            sock = accepted(family, kind, proto, fd)
            # No setblocking or TCP_NODELAY here: peeks pass MSG_DONTWAIT, and
            # the loop's transport sets both when it takes the socket.
            task = self.loop.create_task(self._serve(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _accept_failed(self, listening: socket.socket, exc: OSError) -> None:
        # Out of descriptors: the socket stays readable, so stop watching it
        # for a moment rather than spin; other errors concern one connection.
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            log.warning(
                "accept paused port={} reason={} pause_s={}",
                self.port,
                exc.strerror,
                ACCEPT_PAUSE_S,
            )
            fd = listening.fileno()
            self.loop.remove_reader(fd)
            self.loop.call_later(ACCEPT_PAUSE_S, self._resume, listening)
        else:
            log.debug("accept failed port={} reason={}", self.port, exc)

    def _resume(self, listening: socket.socket) -> None:
        if not self._closed:
            self.loop.add_reader(
                listening.fileno(),
                self._accept,
                listening,
                _accepted_class(listening),
            )

    async def _serve(self, sock: socket.socket) -> None:
        """One connection: ClientHello, context, handshake, then HTTP."""
        deadline = self.loop.time() + self.handshake_timeout_s
        try:
            # Deferred accept means the hello is normally there already: one
            # peek, no waiting. Otherwise read_client_hello waits for it.
            try:
                data = sock.recv(MAX_CLIENT_HELLO_BYTES, _PEEK)
            except (BlockingIOError, InterruptedError):
                data = b""
            hello = parse_client_hello(data) if data else None
            if hello is None or not hello.complete:
                hello = await read_client_hello(self.loop, sock, deadline)
            # The common case, a cached name, costs no further await.
            name = hello.server_name
            entry = None
            # parse_client_hello normalised the name already.
            if name is not None and self.plane.routes.tls_allowed(
                name, normalized=True
            ):
                entry = self.cache.lookup(name)
            if entry is None:
                entry = await self._choose(hello, deadline)
        except HandshakeRefused as exc:
            self.stats.rejected += 1
            self.stats.handshake_failures += 1
            log.debug("handshake refused port={} reason={}", self.port, exc)
            refuse(sock, exc.alert)
            return
        except ClientHelloError as exc:
            self.stats.handshake_failures += 1
            log.debug("clienthello refused port={} reason={}", self.port, exc.message)
            refuse(sock, exc.alert)
            return
        except (OSError, TimeoutError, EOFError) as exc:
            self.stats.handshake_failures += 1
            log.debug("clienthello not read port={} reason={!r}", self.port, exc)
            sock.close()
            return
        except Exception:
            self._failed_unexpectedly(sock)
            return

        # The handshake and everything after belong to the transport.
        try:
            await self.loop.connect_accepted_socket(
                self._factory(entry.domain),
                sock,
                ssl=entry.context,
                ssl_handshake_timeout=self.handshake_timeout_s,
            )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            # The transport owned the socket and closed it; closing again is
            # a no-op (uvloop detaches it, asyncio closes the same object).
            self.stats.handshake_failures += 1
            log.debug("handshake failed port={} reason={!r}", self.port, exc)
            sock.close()
            return
        except Exception:
            self._failed_unexpectedly(sock)
            return
        self.stats.handshakes += 1

    def _failed_unexpectedly(self, sock: socket.socket) -> None:
        # A bug, not the peer: no caller will see it, so it is logged here.
        self.stats.handshake_failures += 1
        log.opt(exception=True).error("connection failed port={}", self.port)
        sock.close()

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
        entry = self.cache.lookup(name)
        if entry is not None:
            return entry
        try:
            async with asyncio.timeout_at(deadline):
                return await self.cache.get(name)
        except ArcError as exc:
            log.debug("no context name={} reason={}", name, exc.message)
            return None


async def read_client_hello(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, deadline: float
) -> ClientHello:
    """Peek at ``sock`` until a whole ClientHello is there; consume nothing.

    Raises:
        ClientHelloError: the bytes are not a usable ClientHello.
        EOFError: the peer closed before sending one.
        TimeoutError: ``deadline`` (loop time) passed first.
    """
    low_water = 1
    seen = 0
    try:
        while True:
            try:
                data = sock.recv(MAX_CLIENT_HELLO_BYTES, _PEEK)
            except (BlockingIOError, InterruptedError):
                data = None
            if data is not None:
                if not data:
                    raise EOFError("connection closed before a ClientHello")
                hello = parse_client_hello(data)
                if hello.complete:
                    return hello
                if len(data) == seen:
                    # Woken without progress: the peer half-closed, or the
                    # kernel ignored the low-water mark; never spin.
                    if _peer_closed(sock):
                        raise EOFError("connection closed inside the ClientHello")
                    await asyncio.sleep(PEEK_RETRY_S)
                    if loop.time() >= deadline:
                        raise TimeoutError("ClientHello not complete in time")
                    continue
                seen = len(data)
                if hello.wanted != low_water:
                    low_water = hello.wanted
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, low_water)
            await wait_readable(loop, sock, deadline)
    finally:
        if low_water != 1 and sock.fileno() != -1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the peer has shut down its side (POLLRDHUP), without waiting."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return any(mask & (select.POLLRDHUP | select.POLLHUP) for _, mask in poller.poll(0))


async def wait_readable(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, deadline: float
) -> None:
    """Wait until ``sock`` is readable or raise TimeoutError at ``deadline``."""
    waiter: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    def expired() -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError("ClientHello not received in time"))

    fd = sock.fileno()
    loop.add_reader(fd, ready)
    timer = loop.call_at(deadline, expired)
    try:
        await waiter
    finally:
        timer.cancel()
        loop.remove_reader(fd)


def alert_record(description: int) -> bytes:
    """A plaintext fatal alert record (RFC 8446 6), TLS 1.2 record version."""
    return bytes((0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description))


def refuse(sock: socket.socket, alert: int) -> None:
    """Send a fatal alert on a raw socket and close it cleanly.

    The peeked bytes are consumed first: closing a socket with unread data
    makes the kernel send a reset, which can reach the client before the
    alert is read and hide it.
    """
    try:
        for _ in range(REFUSE_DRAIN_READS):
            if not sock.recv(MAX_CLIENT_HELLO_BYTES, socket.MSG_DONTWAIT):
                break
    except OSError:
        pass
    try:
        sock.send(alert_record(alert), socket.MSG_DONTWAIT)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


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
        for server in self._servers:
            server.close()
        self._servers.clear()
        for sock in self.sockets:
            sock.close()


def listener_addresses(sockets: Sequence[socket.socket]) -> list[list[Any]]:
    """The bound ``[host, port]`` of each socket, for status answers."""
    return [list(sock.getsockname()[:2]) for sock in sockets]
