"""The accept path of a TLS listener: read the server name, then hand over.

How this works
--------------
Python's ``sni_callback`` runs inside the handshake and must answer at once,
so it cannot wait for a certificate that is not cached yet. Arcology chooses
the context *before* the handshake starts instead:

1. ``loop.create_server`` accepts (in the loop's own code, no task per
   connection) and gives each connection a :class:`_HelloReader`. With
   ``TCP_DEFER_ACCEPT`` the kernel hands a connection over only once its
   first bytes have arrived, so the ClientHello is usually whole in the
   first read.
2. The reader collects bytes until :func:`arc.tls.clienthello.parse_client_hello`
   finds a whole ClientHello (it may span TCP segments; at most
   ``MAX_CLIENT_HELLO_BYTES``).
3. The server name picks the context: the cache's hit path, synchronously,
   inside the read callback. On a miss, reading pauses and a task asks the
   cache (which asks Cryptosaur: exact domain, then the wildcard one label
   up); only that connection waits. The routing table must allow TLS for the
   name (``routes.tls_allowed``).
4. With no server name, an unusable one, or no certificate, the fallback
   setting decides: ``"reject"`` writes a plaintext ``unrecognized_name``
   alert record and closes (the loop's TLS code would close silently), a
   domain serves that domain's context instead. A certificate that may exist
   but cannot be had (the store unreachable, a fetch slower than the
   handshake timeout) is refused with ``internal_error`` instead, fallback
   or not.
5. Hand-over: the loop's own ``SSLProtocol`` (uvloop's, or asyncio's on
   the default loop) is made for the chosen context and the HTTP protocol
   from ``dataplane.http_protocol_factory`` (told the certificate's domain,
   ``tls_domain``, so it can refuse hosts the certificate does not cover).
   The bytes already read are written into its incoming buffer *before*
   ``connection_made`` starts the handshake, so OpenSSL reads the same
   ClientHello the reader parsed; then it becomes the transport's protocol.
   This is what ``loop.start_tls`` does, minus its await and minus losing
   the bytes uvloop has read already; ``MSG_PEEK`` plus
   ``connect_accepted_socket`` would work too, at the cost of a peek system
   call and a task per connection.

What always holds
-----------------
- Reading the ClientHello and choosing its context together take at most
  ``handshake_timeout_s`` (checked by one shared clock, up to
  ``CLOCK_SLACK_S`` late); the handshake proper has the same bound again. A
  client that sends nothing is held by the kernel for ``DEFER_ACCEPT_S``
  first, at no cost to the loop.
- A ClientHello larger than ``MAX_CLIENT_HELLO_BYTES`` is refused.
- A slow certificate fetch delays only the connections asking for that
  name; cached names are served meanwhile.
- Closing a listener stops accepting; connections already accepted carry on.
- Refused connections get an alert record when the refusal is Arcology's
  (policy, a malformed hello, a client that offers nothing newer than
  TLS 1.1); peer failures are counted and logged at DEBUG.

Limits
------
LIMITATION: a ClientHello that hides its name (Encrypted Client Hello) is
served by its outer, public name; ECH is not offered by these contexts, so
clients fall back to a plain ClientHello.
LIMITATION: a handshake that OpenSSL itself refuses (no shared group or
cipher suite) ends in EOF for the client, not an alert: neither uvloop nor
asyncio sends the alert OpenSSL wrote before closing. Only Arcology's own
refusals carry an alert; they include clients too old to speak TLS 1.2,
which the ClientHello shows before OpenSSL sees it.
LIMITATION: TLS session resumption is per context; a client that reconnects
after its name's context was rebuilt (certificate change, eviction, TTL)
makes a full handshake.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import deque
from collections.abc import Callable, Sequence
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

if TYPE_CHECKING:
    from arc.http.routing import RoutingTable

# How long the kernel holds a connection that has sent nothing before
# handing it over anyway (then the handshake timeout applies). Clients send
# their ClientHello at once, so this only delays silent ones.
DEFER_ACCEPT_S = 1
# How late the hello clock may close an overdue connection: its one timer
# is armed for the oldest deadline plus this, so under load it fires a few
# times a second instead of once per connection.
CLOCK_SLACK_S = 0.25
# Protocol factories kept per certificate domain (they are cheap, but one
# per connection is waste); past this many the table starts over. At least
# the default context cache size (10,000), so that every cached domain keeps
# its factory instead of the table starting over every few thousand
# handshakes; a factory is two small closures, so the bound is about 10 MB.
MAX_FACTORIES = 16384
# The fallback value that refuses a handshake without a usable certificate.
FALLBACK_REJECT = "reject"

log = logger.bind(actor="esper")


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    """The loop's own TLS protocol: uvloop's on a uvloop loop, else asyncio's.

    Each loop's transports know their own class best (uvloop reads straight
    into its buffer, with no Python call per read).
    """
    if type(loop).__module__.startswith("uvloop"):
        import uvloop.loop

        protocol: Callable[..., Any] = uvloop.loop.SSLProtocol  # type: ignore[attr-defined]
        return protocol
    from asyncio.sslproto import SSLProtocol

    return SSLProtocol


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


class _HelloReader(asyncio.BufferedProtocol):
    """One connection until its ClientHello is read and its context chosen.

    ``received`` holds every byte the connection has sent so far;
    ``choosing`` is set while a task fetches the context; ``refused`` once
    an alert was sent and only the close remains; ``transport`` is None once
    the connection is handed over or gone.
    """

    __slots__ = (
        "accepted_at",
        "choosing",
        "listener",
        "received",
        "refused",
        "transport",
    )

    def __init__(self, listener: TlsListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.received = b""
        self.choosing = False
        self.refused = False
        self.accepted_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same API.
        self.transport = transport  # type: ignore[assignment]
        listener = self.listener
        listener.clock.add(self)
        # Deferred accept means the ClientHello is normally waiting: read it
        # now, before the loop starts reading for this protocol. A cached
        # name is then handed over before the loop ever reads, which spares
        # the loop a stop and restart of reading (two system calls) and a
        # wait for readiness.
        try:
            fd = transport.get_extra_info("socket").fileno()
            data = os.read(fd, MAX_CLIENT_HELLO_BYTES)
        except (BlockingIOError, InterruptedError):
            return  # not there yet: the loop reads it when it comes
        except OSError as exc:
            listener.hello_failed(self, f"read failed: {exc!r}")
            transport.abort()  # type: ignore[attr-defined]
            return
        if not data:
            listener.hello_failed(self, "connection closed before a ClientHello")
            transport.close()
            return
        listener.hello_received(self, data)

    def get_buffer(self, sizehint: int) -> memoryview:
        # Every reader shares one buffer: the loop calls buffer_updated
        # before it reads for any other connection.
        return self.listener.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = self.listener.read_buffer[:nbytes].tobytes()
        if self.refused or self.transport is None:
            return
        data = self.received + data
        if self.choosing:
            # Early bytes after the hello wait with it for the hand-over.
            if len(data) > MAX_CLIENT_HELLO_BYTES:
                self.listener.hello_failed(self, "too many bytes before the handshake")
                self.abort()
                return
            self.received = data
            return
        self.listener.hello_received(self, data)

    def eof_received(self) -> bool | None:
        if self.transport is not None and not self.refused:
            self.listener.hello_failed(self, "connection closed before a ClientHello")
        self.transport = None
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None and not self.refused:
            self.listener.hello_failed(self, f"connection lost: {exc!r}")
        self.transport = None

    def abort(self) -> None:
        """Drop the connection at once."""
        transport = self.transport
        self.transport = None
        if transport is not None:
            transport.abort()


class _HelloClock:
    """Closes connections whose ClientHello and context took too long.

    Every deadline is accept time plus the one timeout in force, so they
    come in accept order (a reload that changes the timeout moves them all
    alike): a queue holds the readers, and one timer, armed for the oldest
    deadline plus ``CLOCK_SLACK_S``, serves them all. A reader that has
    moved on stays queued, small and inert, until its deadline passes.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout_s: float,
        expire: Callable[[_HelloReader], None],
    ) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self._expire = expire
        self._readers: deque[_HelloReader] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, reader: _HelloReader) -> None:
        reader.accepted_at = self.loop.time()
        self._readers.append(reader)
        if self._timer is None:
            self._timer = self.loop.call_at(
                self.deadline(reader) + CLOCK_SLACK_S, self._fire
            )

    def deadline(self, reader: _HelloReader) -> float:
        """When ``reader``'s ClientHello and context must be done."""
        return reader.accepted_at + self.timeout_s

    def _fire(self) -> None:
        self._timer = None
        now = self.loop.time()
        readers = self._readers
        while readers and self.deadline(readers[0]) <= now:
            reader = readers.popleft()
            if reader.transport is not None:
                try:
                    self._expire(reader)
                except Exception:
                    log.opt(exception=True).error("hello clock failed")
        if readers:
            self._timer = self.loop.call_at(
                self.deadline(readers[0]) + CLOCK_SLACK_S, self._fire
            )


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
        self.clock = _HelloClock(self.loop, handshake_timeout_s, self._expired)
        self.read_buffer = memoryview(bytearray(MAX_CLIENT_HELLO_BYTES))
        self._ssl_protocol = _ssl_protocol_class(self.loop)
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._factories: dict[str, Callable[[], asyncio.Protocol]] = {}
        self._closed = False

    async def start(self) -> None:
        """Start accepting; run on the loop."""
        self.plane.listeners.add(self)
        for sock in self.sockets:
            # The kernel completes accept only once the client has sent
            # something (its ClientHello), so the first read finds it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)
            server = await self.loop.create_server(
                self._new_reader, sock=sock, backlog=BACKLOG
            )
            self._servers.append(server)

    def close(self) -> None:
        """Stop accepting and close the listening sockets; call on the loop."""
        if self._closed:
            return
        self._closed = True
        self.plane.listeners.discard(self)
        for server in self._servers:
            server.close()
        self._servers.clear()
        for sock in self.sockets:
            sock.close()

    def configure(self, *, fallback: str, handshake_timeout_s: float) -> None:
        """Apply new settings (a reload) to connections from now on; on the loop."""
        self.fallback = fallback
        self.handshake_timeout_s = handshake_timeout_s
        self.clock.timeout_s = handshake_timeout_s

    def _new_reader(self) -> _HelloReader:
        return _HelloReader(self)

    # -- the ClientHello -----------------------------------------------------

    def hello_received(self, reader: _HelloReader, data: bytes) -> None:
        """``data`` is everything the connection has sent so far."""
        try:
            try:
                hello = parse_client_hello(data)
            except ClientHelloError as exc:
                self._refuse(reader, f"clienthello refused: {exc.message}", exc.alert)
                return
            if not hello.complete:
                reader.received = data
                return

            # The common case, a cached name, is served right here.
            name = hello.server_name
            entry = None
            # parse_client_hello normalised the name already.
            if name is not None and self.plane.routes.tls_allowed(
                name, normalized=True
            ):
                entry = self.cache.lookup(name)
            if entry is not None:
                reader.received = b""
                self._hand_over(reader, data, entry)
                return

            # A miss: this connection waits for the cache, no other does.
            assert reader.transport is not None
            reader.received = data
            reader.choosing = True
            reader.transport.pause_reading()
            task = self.loop.create_task(self._choose_and_hand_over(reader, hello))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        except Exception:
            self._failed_unexpectedly(reader)

    async def _choose_and_hand_over(
        self, reader: _HelloReader, hello: ClientHello
    ) -> None:
        try:
            entry = await self._choose(hello, self.clock.deadline(reader))
        except HandshakeRefused as exc:
            if reader.transport is not None:
                self.stats.rejected += 1
                self._refuse(reader, f"handshake refused: {exc}", exc.alert)
            return
        except Exception:
            self._failed_unexpectedly(reader)
            return
        transport = reader.transport
        if transport is None or transport.is_closing():
            # Timed out, or the client left, while the context was fetched.
            return
        data, reader.received, reader.choosing = reader.received, b"", False
        try:
            self._hand_over(reader, data, entry)
            transport.resume_reading()
        except Exception:
            self._failed_unexpectedly(reader)

    def hello_failed(self, reader: _HelloReader, reason: str) -> None:
        """The peer went away before its context was chosen."""
        reader.transport = None
        self.stats.handshake_failures += 1
        log.debug("clienthello not read port={} reason={}", self.port, reason)

    def _expired(self, reader: _HelloReader) -> None:
        transport = reader.transport
        reader.transport = None
        if transport is None:
            return
        if not reader.refused:
            self.stats.handshake_failures += 1
            log.debug(
                "clienthello not read port={} reason=not complete within {} s",
                self.port,
                self.handshake_timeout_s,
            )
        transport.abort()

    def _refuse(self, reader: _HelloReader, reason: str, alert: int) -> None:
        """Send a fatal alert and end the connection once the peer has read it.

        The connection half-closes after the alert and reads on (discarding)
        until the peer closes or the hello clock runs out: closing at once
        with unread bytes would make the kernel send a reset, which can reach
        the client before the alert and hide it.
        """
        transport = reader.transport
        if transport is None or reader.refused:
            return
        reader.refused = True
        reader.received = b""
        self.stats.handshake_failures += 1
        log.debug("{} port={}", reason, self.port)
        transport.write(alert_record(alert))
        if transport.can_write_eof():
            transport.write_eof()
        else:  # pragma: no cover - TCP transports can
            transport.close()
        if not transport.is_reading():
            transport.resume_reading()

    def _failed_unexpectedly(self, reader: _HelloReader) -> None:
        # A bug, not the peer: no caller will see it, so it is logged here.
        self.stats.handshake_failures += 1
        log.opt(exception=True).error("connection failed port={}", self.port)
        reader.abort()

    # -- the handshake ---------------------------------------------------------

    def _hand_over(
        self, reader: _HelloReader, data: bytes, entry: CachedContext
    ) -> None:
        """Give the connection to a TLS protocol for ``entry``'s context."""
        transport = reader.transport
        assert transport is not None
        reader.transport = None
        waiter = self.loop.create_future()
        protocol = self._ssl_protocol(
            self.loop,
            self._factory(entry.domain)(),
            entry.context,
            waiter,
            server_side=True,
            ssl_handshake_timeout=self.handshake_timeout_s,
        )
        # The bytes go in before the handshake starts, so OpenSSL's first
        # read finds the ClientHello that was parsed here.
        size = len(data)
        protocol.get_buffer(size)[:size] = data
        protocol.buffer_updated(size)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        waiter.add_done_callback(self._handshake_done)

    def _handshake_done(self, waiter: asyncio.Future[None]) -> None:
        exc = None if waiter.cancelled() else waiter.exception()
        if exc is None:
            self.stats.handshakes += 1
        else:
            self.stats.handshake_failures += 1
            log.debug("handshake failed port={} reason={!r}", self.port, exc)

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
