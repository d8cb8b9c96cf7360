"""HTTP errors: what went wrong with a request, and the status to answer.

Two kinds, as in any HTTP server: ``PeerError`` when the client broke HTTP
(bad framing, headers too large, a body over the limit, too slow) and
``AppError`` when a service failed. Each carries the status the connection
answers with; the connection closes after every ``PeerError`` because the
framing can no longer be trusted.
"""

from __future__ import annotations

from http import HTTPStatus


class HttpError(Exception):
    """An error that answers with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class PeerError(HttpError):
    """The client sent something this server will not take; close after."""


class AppError(HttpError):
    """A service failed; the log has the traceback."""


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


# Status lines, built once: the response path only looks them up.
STATUS_LINES: dict[int, bytes] = {
    int(s): f"HTTP/1.1 {int(s)} {s.phrase}\r\n".encode() for s in HTTPStatus
}


def status_line(status: int) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n`` for any status, known or not."""
    line = STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} {_phrase(status)}\r\n".encode()
    return line


def error_body(status: int, message: str | None = None) -> bytes:
    """The short plain-text body of an error answer."""
    text = message if message is not None else _phrase(status).lower()
    return f"{status} {text}\n".encode()
