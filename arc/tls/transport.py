"""A TLS transport in which OpenSSL reads and writes the socket itself.

How this works
--------------
The event loop's own TLS protocols (uvloop's and asyncio's) keep OpenSSL
behind two memory buffers: every read is copied from the socket into one,
every write out of the other, and a state machine around them runs for each
record. :class:`TlsTransport` gives OpenSSL the socket instead (the
``SSL_set_fd`` way, through ``SSLContext._wrap_socket`` on a non-blocking
socket), so a handshake step or a read is one call into OpenSSL, which
makes the system calls; the loop only says when the socket is readable or
writable (``add_reader``, ``add_writer``). Measured with
``scripts/bench_tls.py``, this is where most of the difference between
Python's TLS and nginx's went.

The transport has the asyncio ``Transport`` interface that the HTTP layer
uses: ``write``, ``writelines``, ``close``, ``abort``, ``pause_reading``,
``resume_reading``, write-buffer limits with ``pause_writing`` and
``resume_writing`` on the protocol, and ``get_extra_info`` (``peername``,
``sockname``, ``socket``, ``sslcontext``, ``ssl_object``, ``cipher``,
``peercert``, ``compression``).

What always holds
-----------------
- The protocol is made only once the handshake is complete; a failed
  handshake is counted and logged at DEBUG, and the alert OpenSSL wrote
  reaches the client before the connection closes.
- ``write`` never blocks: what the socket does not take waits in the
  transport's buffer, and above the high mark the protocol is told to pause.
  A client that takes none of the waiting bytes for ``SEND_TIMEOUT_S`` is
  dropped, whether the connection is open or closing.
- ``close`` sends what is buffered, then ``close_notify``, then closes.
  When the client may still be sending (the protocol had stopped reading:
  it refused a request body, or left requests unanswered), the connection
  lingers (write side shut, reading and discarding) until the client
  closes or ``LINGER_S`` passes: closing with bytes unread, or with more
  on their way, would make the kernel send a reset, which can destroy the
  end of the answer before the client reads it.
- ``connection_lost`` is called once, soon after the close, never inside it.
- An exception from the protocol is logged with its traceback and closes
  only that connection.

LIMITATION: OpenSSL reads each record in two system calls (header, then
body), about ten reads per connection: Python offers no way to turn on
OpenSSL's read-ahead, which nginx turns on.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import select
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from loguru import logger

log = logger.bind(actor="esper")

# Decrypted bytes asked of OpenSSL per read: one full TLS record.
READ_SIZE = 16 * 1024
# asyncio's defaults for the write buffer marks.
WRITE_HIGH_BYTES = 64 * 1024
# How long a closed connection may keep draining what its client still sends.
LINGER_S = 5.0
# How long answers may wait for a client that takes none of their bytes
# before the connection is dropped: a client that stops reading must not
# hold its buffer and socket for ever. Long enough for a congested link.
SEND_TIMEOUT_S = 60.0
# Reads per readiness while lingering.
DRAIN_READS = 16

# Events handed to the loop per wake-up of a Poller.
POLL_BATCH = 256

_HANDSHAKE, _OPEN, _CLOSING, _CLOSED = range(4)
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_BROKEN = select.EPOLLERR | select.EPOLLHUP
_READABLE = _IN | _BROKEN
_WRITABLE = _OUT | _BROKEN


class Clock:
    """Deadlines that come in the order they were set, on one loop timer.

    Every deadline is the time an item was added plus the clock's one
    timeout, so they come in insertion order (a change of the timeout moves
    them all alike): a queue holds the items, and one timer, armed for the
    oldest deadline plus ``slack_s``, serves them all. Under load it fires a
    few times a second instead of once per connection. An item whose
    business ended stays queued, inert, until its deadline passes;
    ``expire`` decides what a passed deadline still means.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout_s: float,
        expire: Callable[[Any], None],
        slack_s: float = 0.25,
    ) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.slack_s = slack_s
        self._expire = expire
        self._items: deque[tuple[float, Any]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, item: Any) -> float:
        """Queue ``item``; return the time it was added (see ``deadline``)."""
        now = self.loop.time()
        self._items.append((now, item))
        if self._timer is None:
            self._arm(now)
        return now

    def set_timeout(self, timeout_s: float) -> None:
        """Change the timeout of every item, queued ones included."""
        self.timeout_s = timeout_s
        if self._timer is not None and self._items:
            # A shorter timeout brings the oldest deadline forward.
            self._timer.cancel()
            self._arm(self._items[0][0])

    def deadline(self, added_at: float) -> float:
        """The deadline of an item added at ``added_at``."""
        return added_at + self.timeout_s

    def _fire(self) -> None:
        self._timer = None
        now = self.loop.time()
        items = self._items
        while items and self.deadline(items[0][0]) <= now:
            item = items.popleft()[1]
            try:
                self._expire(item)
            except Exception:
                log.opt(exception=True).error("connection clock failed")
        if items:
            self._arm(items[0][0])

    def _arm(self, oldest_added_at: float) -> None:
        self._timer = self.loop.call_at(
            self.deadline(oldest_added_at) + self.slack_s, self._fire
        )


class TlsSocket(_socket.socket):
    """An accepted TLS connection's socket.

    The C socket type itself: ``socket.socket`` adds Python-level steps to
    making and closing a socket that a connection does not need. OpenSSL's
    side of the connection needs the weak reference.
    """

    __slots__ = ("__weakref__",)


class Poller:
    """Readiness of many sockets through one epoll set the loop watches.

    The loop's own ``add_reader`` costs several system calls per socket
    (uvloop checks, adds, re-adds and deletes it with ``epoll_ctl``, and
    sets it non-blocking again) and Python-level bookkeeping. Here a socket
    costs one ``epoll_ctl`` to watch and one to forget, and the loop wakes
    for the set as a whole. The watches are level-triggered, like the
    loop's.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._closing = False
        self._epoll = self._open()

    def _open(self) -> select.epoll:
        epoll = select.epoll()
        self.loop.add_reader(epoll.fileno(), self._ready)
        return epoll

    def watch(self, fd: int, events: int, handler: Callable[[int], None]) -> None:
        """Call ``handler(events)`` while ``fd`` is ready for ``events``."""
        if self._epoll.closed:
            # Closed when idle after its listener closed, while a connection
            # accepted before was still reading its ClientHello or waiting
            # for its certificate: it carries on in a set of its own.
            self._epoll = self._open()
        self._epoll.register(fd, events)
        self._handlers[fd] = handler

    def change(self, fd: int, events: int) -> None:
        """Watch ``fd`` for ``events`` from now on (0: errors and hang-ups only)."""
        self._epoll.modify(fd, events)

    def forget(self, fd: int) -> None:
        """Stop watching ``fd``; call before it is closed."""
        if self._handlers.pop(fd, None) is not None:
            # Not contextlib.suppress: it costs three calls per connection.
            try:  # noqa: SIM105
                self._epoll.unregister(fd)
            except OSError:
                pass  # closed already
        if self._closing and not self._handlers:
            self._close()

    def close_when_idle(self) -> None:
        """Close the set once nothing is watched any more (a later ``watch``
        opens a new one, which closes alike)."""
        self._closing = True
        if not self._handlers:
            self._close()

    def _close(self) -> None:
        if not self._epoll.closed:
            self.loop.remove_reader(self._epoll.fileno())
            self._epoll.close()

    def _ready(self) -> None:
        handlers = self._handlers
        for fd, events in self._epoll.poll(0, POLL_BATCH):
            handler = handlers.get(fd)
            if handler is None:
                # Forgotten within this batch.
                continue
            try:
                handler(events)
            except Exception:
                log.opt(exception=True).error("connection handler failed fd={}", fd)


class TlsTransport(asyncio.Transport):
    """One server-side TLS connection whose socket OpenSSL drives.

    ``owner`` is told ``handshake_done(transport, exc)`` once, whether the
    handshake ended well (``exc`` None) or not; ``make_protocol`` is called
    after a good handshake. Start it with :meth:`start`.
    """

    __slots__ = (
        "_context",
        "_events",
        "_fd",
        "_high",
        "_lingers",
        "_loop",
        "_low",
        "_make_protocol",
        "_more_may_come",
        "_owner",
        "_pending",
        "_pending_size",
        "_poller",
        "_progress_at",
        "_protocol",
        "_reading",
        "_sock",
        "_ssl",
        "_stall_timer",
        "_state",
        "_writing_paused",
    )

    def __init__(
        self,
        poller: Poller,
        sock: _socket.socket,
        context: ssl.SSLContext,
        make_protocol: Callable[[], asyncio.Protocol],
        owner: Any,
        lingers: Clock,
    ) -> None:
        self._poller = poller
        self._loop = poller.loop
        self._sock: _socket.socket | None = sock
        self._fd = sock.fileno()
        self._context = context
        # OpenSSL reads and writes the socket's descriptor; the socket
        # object must live as long as this transport (OpenSSL's side keeps
        # only a weak reference).
        self._ssl: Any = context._wrap_socket(  # type: ignore[attr-defined]
            sock, True, None, owner=None, session=None
        )
        self._make_protocol = make_protocol
        self._protocol: Any = None
        self._owner = owner
        self._lingers = lingers
        self._more_may_come = False
        self._state = _HANDSHAKE
        self._events = _IN
        self._reading = True
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._high = WRITE_HIGH_BYTES
        self._low = WRITE_HIGH_BYTES // 4
        self._writing_paused = False
        # While bytes wait for the client: when it last took some, and the
        # timer that drops it after SEND_TIMEOUT_S without progress.
        self._progress_at = 0.0
        self._stall_timer: asyncio.TimerHandle | None = None

    def _want(self, events: int) -> None:
        if events != self._events:
            self._events = events
            self._poller.change(self._fd, events)

    def _on_event(self, events: int) -> None:
        state = self._state
        if state == _HANDSHAKE:
            self._handshake()
            return
        if self._pending and events & _WRITABLE:
            self._on_writable()
        if self._state == _OPEN and events & _READABLE:
            if self._reading:
                self._read()
            elif events & _BROKEN:
                # Reading is paused and the peer is gone: nothing more can
                # be sent or received.
                self._fatal(ConnectionResetError("connection reset by peer"))

    # -- the handshake --------------------------------------------------------

    def start(self) -> None:
        """Start the handshake with what the client has sent so far."""
        self._poller.watch(self._fd, _IN, self._on_event)
        self._handshake()

    def handshake_expired(self, timeout_s: float) -> None:
        """The handshake timeout passed: end the connection if it is still on."""
        if self._state == _HANDSHAKE:
            self._handshake_failed(
                TimeoutError(f"handshake not complete within {timeout_s} s")
            )

    def _handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            if self._events != _IN:
                self._want(_IN)
            return
        except ssl.SSLWantWriteError:
            # The first flight did not fit in the socket buffer: go on once
            # the socket can take more.
            self._want(_IN | _OUT)
            return
        except (ssl.SSLError, OSError) as exc:
            self._handshake_failed(exc)
            return
        if self._events != _IN:
            self._want(_IN)
        self._state = _OPEN
        self._owner.handshake_done(self, None)
        try:
            self._protocol = self._make_protocol()
            self._protocol.connection_made(self)
        except Exception as exc:
            self._protocol_failed(exc, "connection_made")
            return
        # The client's first request usually came with its Finished.
        self._read()

    def _handshake_failed(self, exc: BaseException) -> None:
        self._owner.handshake_done(self, exc)
        # Whatever alert OpenSSL wrote is on its way; let the client read it.
        self._finish(None, linger_on=True)

    # -- reading ----------------------------------------------------------------

    def _read(self) -> None:
        read = self._ssl.read
        while self._reading and self._state == _OPEN:
            try:
                data = read(READ_SIZE)
            except ssl.SSLWantReadError:
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            if not data:
                self._eof()
                return
            try:
                self._protocol.data_received(data)
            except Exception as exc:
                self._protocol_failed(exc, "data_received")
                return

    def _read_pending(self) -> None:
        if self._reading and self._state == _OPEN:
            self._read()

    def _eof(self) -> None:
        try:
            self._protocol.eof_received()
        except Exception as exc:
            self._protocol_failed(exc, "eof_received")
            return
        # TLS cannot stay half-open: what is buffered goes out, then the close.
        self.close()

    def is_reading(self) -> bool:
        return self._reading and self._state == _OPEN

    def pause_reading(self) -> None:
        if self._reading and self._state == _OPEN:
            self._reading = False
            self._want(_OUT if self._pending else 0)

    def resume_reading(self) -> None:
        if not self._reading and self._state == _OPEN:
            self._reading = True
            self._want(_IN | _OUT if self._pending else _IN)
            # OpenSSL may hold decrypted bytes the socket will not announce.
            if self._ssl.pending():
                self._loop.call_soon(self._read_pending)

    # -- writing ------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state != _OPEN or not data:
            return
        if self._pending:
            self._pending.append(bytes(data))
            self._pending_size += len(data)
            self._check_high()
            return
        try:
            self._ssl.write(data)
        except ssl.SSLWantWriteError:
            self._pending.append(bytes(data))
            self._pending_size += len(data)
            self._want(self._events | _OUT)
            self._progress_at = self._loop.time()
            if self._stall_timer is None:
                self._stall_timer = self._loop.call_later(
                    SEND_TIMEOUT_S, self._check_stall
                )
            self._check_high()
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)

    def writelines(
        self, list_of_data: Iterable[bytes | bytearray | memoryview]
    ) -> None:
        self.write(b"".join(list_of_data))

    def _on_writable(self) -> None:
        # Writable again: the client took bytes since the last try.
        self._progress_at = self._loop.time()
        pending = self._pending
        # A retried write must start with the bytes of the refused one;
        # OpenSSL takes it up where it stopped.
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending[:] = [data]
        try:
            self._ssl.write(data)
        except ssl.SSLWantWriteError:
            return
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)
            return
        pending.clear()
        self._pending_size = 0
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._state == _CLOSING:
            self._shutdown()
            return
        self._want(_IN if self._reading else 0)
        if self._writing_paused:
            self._writing_paused = False
            try:
                self._protocol.resume_writing()
            except Exception as exc:
                self._protocol_failed(exc, "resume_writing")

    def _check_stall(self) -> None:
        self._stall_timer = None
        if self._state == _CLOSED or not self._pending:
            return
        idle_s = self._loop.time() - self._progress_at
        if idle_s >= SEND_TIMEOUT_S:
            self._fatal(TimeoutError(f"the client took no data for {SEND_TIMEOUT_S} s"))
            return
        self._stall_timer = self._loop.call_later(
            SEND_TIMEOUT_S - idle_s, self._check_stall
        )

    def _check_high(self) -> None:
        if self._pending_size > self._high and not self._writing_paused:
            self._writing_paused = True
            try:
                self._protocol.pause_writing()
            except Exception as exc:
                self._protocol_failed(exc, "pause_writing")

    def get_write_buffer_size(self) -> int:
        return self._pending_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def set_write_buffer_limits(
        self, high: int | None = None, low: int | None = None
    ) -> None:
        if high is None:
            high = WRITE_HIGH_BYTES if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._check_high()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot be half-closed")

    # -- closing ------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._state != _OPEN

    def close(self) -> None:
        """Send what is buffered and ``close_notify``, then close.

        If the protocol had stopped reading, the client may still be
        sending: the socket lingers after the close (see :func:`linger`).
        """
        if self._state != _OPEN:
            return
        self._state = _CLOSING
        self._more_may_come = not self._reading
        self._reading = False
        if self._pending:
            self._want(_OUT)
        else:
            self._shutdown()

    def abort(self) -> None:
        """Close at once; buffered bytes are dropped."""
        if self._state != _CLOSED:
            self._finish(None)

    def _shutdown(self) -> None:
        # Sends close_notify, then tries to read the client's, which is not
        # awaited. Wanting to read means the socket had nothing more just
        # now: unless the client may still be sending, it closes at once.
        try:
            self._ssl.shutdown()
        except ssl.SSLWantReadError:
            self._finish(None, linger_on=self._more_may_come)
            return
        except (ssl.SSLError, OSError):
            self._finish(None, linger_on=True)
            return
        self._finish(None)

    def _fatal(self, exc: BaseException) -> None:
        log.debug("tls connection failed fd={} reason={!r}", self._fd, exc)
        self._finish(exc)

    def _protocol_failed(self, exc: BaseException, call: str) -> None:
        log.opt(exception=exc).error("protocol.{}() failed; connection closed", call)
        self._finish(exc)

    def _finish(self, exc: BaseException | None, linger_on: bool = False) -> None:
        """Release the socket and tell the protocol, once.

        ``linger_on``: the client may have sent bytes nobody read, or may
        still be sending; see :func:`linger`.
        """
        self._state = _CLOSED
        if self._pending:
            self._pending.clear()
            self._pending_size = 0
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        sock, self._sock = self._sock, None
        self._ssl = None
        if sock is not None:
            self._poller.forget(self._fd)
            if linger_on:
                linger(self._loop, sock, self._lingers, self._more_may_come)
            else:
                sock.close()
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            self._loop.call_soon(protocol.connection_lost, exc)

    # -- what the protocol may ask ----------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sock, ssl_object = self._sock, self._ssl
        if sock is None:
            return default
        if name == "peername":
            return _address_or(sock.getpeername, default)
        if name == "sockname":
            return _address_or(sock.getsockname, default)
        if name == "socket":
            return sock
        if name == "sslcontext":
            return self._context
        if ssl_object is None:
            return default
        if name == "ssl_object":
            return ssl_object
        if name == "cipher":
            return ssl_object.cipher()
        if name == "peercert":
            return ssl_object.getpeercert()
        if name == "compression":
            return ssl_object.compression()
        return default

    def get_protocol(self) -> asyncio.BaseProtocol:
        protocol: asyncio.BaseProtocol = self._protocol
        return protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol


def _address_or(read: Callable[[], Any], default: Any) -> Any:
    try:
        return read()
    except OSError:
        return default


def linger(
    loop: asyncio.AbstractEventLoop,
    sock: _socket.socket,
    clock: Clock,
    more_may_come: bool = False,
) -> None:
    """Close ``sock`` once the peer has nothing unread in it.

    With nothing waiting (one system call to see) it closes at once, unless
    ``more_may_come`` (the peer was still sending when reading stopped).
    Otherwise the write side is shut, so the peer sees the end, and
    whatever arrives is read and dropped until the peer closes or ``clock``
    runs out.
    """
    try:
        waiting = sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        if not more_may_come:
            sock.close()
            return
    except OSError:
        sock.close()
        return
    else:
        if not waiting:
            sock.close()  # the peer closed its side: nothing more comes
            return
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        sock.close()
        return
    fd = sock.fileno()

    def drain() -> None:
        # Bounded per call, so a client that keeps sending cannot hold the
        # loop; the clock ends it.
        try:
            for _ in range(DRAIN_READS):
                if not sock.recv(65536):
                    break
            else:
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE):
                log.debug("linger read failed reason={!r}", exc)
        loop.remove_reader(fd)
        sock.close()

    loop.add_reader(fd, drain)
    drain()
    if sock.fileno() != -1:
        clock.add(sock)


def end_lingering(sock: _socket.socket, loop: asyncio.AbstractEventLoop) -> None:
    """The linger time passed: close ``sock`` if it is still open."""
    fd = sock.fileno()
    if fd != -1:
        loop.remove_reader(fd)
        sock.close()
