"""HTTP error answers: status lines and the short bodies of error responses.

Two kinds of error reach a client, as in any HTTP server: the peer broke HTTP
(bad framing 400, a slow head 408, a body over the limit 413, headers over
the limit 431), after which the connection closes because the framing can no
longer be trusted; or a service failed (500), logged with its traceback. The
connection code decides which; this module only spells the answers.
"""

from __future__ import annotations

from http import HTTPStatus


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
