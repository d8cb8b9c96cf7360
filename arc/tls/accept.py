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

The slow way: a ClientHello that is not all there yet (it spans TCP
segments, or the client was silent through the deferral) or that cannot be
parsed goes to the event loop's own transport with a :class:`_HelloReader`,
which collects the bytes as they come (peeking again on every readiness
would spin), refuses what must be refused, and hands the connection to the
loop's own ``SSLProtocol`` (uvloop's, or asyncio's on the default loop)
with the bytes already read.

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
LIMITATION: on the slow way, a handshake that OpenSSL itself refuses ends
in EOF for the client, not an alert: neither uvloop nor asyncio sends the
alert OpenSSL wrote before closing.
LIMITATION: TLS session resumption is per context; a client that reconnects
after its name's context was rebuilt (certificate change, eviction, TTL)
makes a full handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
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
        self.accepted_at = listener.clock.add(self)
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
        # Readers of ClientHellos that came in pieces, handshakes, and
        # closed sockets draining what their clients still send.
        self.clock = Clock(self.loop, handshake_timeout_s, self._expired)
        self.handshakes = Clock(self.loop, handshake_timeout_s, self._handshake_expired)
        self.lingers = Clock(self.loop, LINGER_S, self._end_lingering)
        self.read_buffer = memoryview(bytearray(MAX_CLIENT_HELLO_BYTES))
        self._ssl_protocol = _ssl_protocol_class(self.loop)
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
        self.clock.timeout_s = handshake_timeout_s
        self.handshakes.timeout_s = handshake_timeout_s

    def _new_reader(self) -> _HelloReader:
        return _HelloReader(self)

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
        reads it. A hello that is not all there yet, or that is refused,
        goes the slow way (:meth:`_read_slowly`).
        """
        connection.setblocking(False)
        try:
            data = connection.recv(MAX_CLIENT_HELLO_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self._read_slowly(connection)
            return
        except OSError as exc:
            self.stats.handshake_failures += 1
            log.debug("clienthello not read port={} reason={!r}", self.port, exc)
            connection.close()
            return
        if not data:
            self.stats.handshake_failures += 1
            log.debug(
                "clienthello not read port={} reason=connection closed before "
                "a ClientHello",
                self.port,
            )
            connection.close()
            return
        try:
            hello = parse_client_hello(data)
        except ClientHelloError:
            self._read_slowly(connection)
            return
        if not hello.complete:
            self._read_slowly(connection)
            return
        # The common case, a cached name, is served right here.
        name = hello.server_name
        if name is not None and self.plane.routes.tls_allowed(name, normalized=True):
            entry = self.cache.lookup(name)
            if entry is not None:
                self._start_tls(connection, entry)
                return
        # A miss: this connection waits for the cache, no other does.
        self._spawn(self._choose_then_start(connection, hello))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _choose_then_start(
        self, connection: TlsSocket, hello: ClientHello
    ) -> None:
        try:
            entry = await self._choose(
                hello, self.loop.time() + self.handshake_timeout_s
            )
        except HandshakeRefused as exc:
            self.stats.rejected += 1
            self.stats.handshake_failures += 1
            log.debug("handshake refused: {} port={}", exc, self.port)
            with contextlib.suppress(OSError):
                connection.send(alert_record(exc.alert))
            # The ClientHello is still unread: drained, so that no reset
            # overtakes the alert.
            linger(self.loop, connection, self.lingers)
            return
        except BaseException:
            connection.close()
            raise
        self._start_tls(connection, entry)

    def _read_slowly(self, connection: TlsSocket) -> None:
        """Serve ``connection`` through the loop's transports and TLS protocol.

        For ClientHellos that arrive in pieces, and for those to refuse:
        :class:`_HelloReader` collects the bytes as they come (the socket
        cannot be read by OpenSSL once they are taken, and peeking again on
        every readiness would spin), then hands over to the loop's own TLS.
        """

        sock = socket.socket(connection.family, connection.type, 0, connection.detach())

        async def connect() -> None:
            try:
                await self.loop.connect_accepted_socket(self._new_reader, sock)
            except BaseException:
                sock.close()
                raise

        self._spawn(connect())

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
            self._spawn(self._choose_and_hand_over(reader, hello))
        except Exception:
            self._failed_unexpectedly(reader)

    async def _choose_and_hand_over(
        self, reader: _HelloReader, hello: ClientHello
    ) -> None:
        try:
            entry = await self._choose(hello, self.clock.deadline(reader.accepted_at))
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
