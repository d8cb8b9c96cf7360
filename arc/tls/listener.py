"""Listening sockets: one port on every bind address, ready for the loop.

How this works: a listener is one port opened on each address of
``settings.bind`` (IPv4 and IPv6 sockets side by side; an IPv6 socket is
``IPV6_V6ONLY`` so the two never collide). Every socket gets
``SO_REUSEADDR`` (restart without waiting for TIME_WAIT) and
``SO_REUSEPORT`` (several worker processes may later share the port; the
kernel spreads connections between them), a backlog of ``BACKLOG`` and
non-blocking mode, ready for the event loop.

What always holds: :func:`open_sockets` either returns a socket for every
usable address or raises with none left open. An address whose family the
host lacks (no IPv6, say) is skipped with a warning, but at least one
address must bind. Port 0 asks the kernel for a free port on the first
address and reuses that number on the others.
"""

from __future__ import annotations

import errno
import resource
import socket
from collections.abc import Sequence

from loguru import logger

from arc.errors import BadInput

# Connections the kernel may queue before the loop accepts them; bursts of
# thousands of handshakes arrive faster than one loop accepts.
BACKLOG = 4096
# Errors meaning 'this host cannot use this address at all', as opposed to
# 'this port is taken' (which must fail the listener).
_ADDRESS_UNUSABLE = {errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT}

log = logger.bind(actor="esper")


def raise_fd_limit() -> int:
    """Raise the soft limit of open files to the hard limit; return it.

    Each connection holds one descriptor; the usual soft limit of 1,024
    would cap a server far below what the loop can carry.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("open files limit raised soft={} hard={}", soft, hard)
        return hard
    return soft


def open_sockets(
    port: int, bind: Sequence[str], backlog: int = BACKLOG
) -> list[socket.socket]:
    """Bind and listen on ``port`` at every address of ``bind``.

    Raises:
        BadInput: the port cannot be bound (in use, not permitted, no usable
            address); the message names port, address and the OS reason.
    """
    if not 0 <= port <= 65535:
        raise BadInput(f"port: expected 0 to 65535, got {port}")
    if not bind:
        raise BadInput("bind: expected at least one address, got none")
    sockets: list[socket.socket] = []
    try:
        for address in bind:
            sock = _bind_one(address, port, backlog)
            if sock is None:
                continue
            sockets.append(sock)
            # Port 0: the kernel chose; every other address takes the same.
            port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise BadInput(
            f"port {port}: none of the bind addresses {list(bind)} is usable here"
        )
    return sockets


def _bind_one(address: str, port: int, backlog: int) -> socket.socket | None:
    """One listening socket, or None when the host lacks the address family."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        if exc.errno in _ADDRESS_UNUSABLE:
            log.warning("address skipped address={} reason={}", address, exc.strerror)
            return None
        raise _refused(port, address, exc) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno in _ADDRESS_UNUSABLE and family == socket.AF_INET6:
            log.warning("address skipped address={} reason={}", address, exc.strerror)
            return None
        raise _refused(port, address, exc) from exc
    return sock


def _refused(port: int, address: str, exc: OSError) -> BadInput:
    return BadInput(f"port {port}: cannot listen on {address} ({exc.strerror or exc})")
