"""Frames: messages on a byte stream, for the admin channel.

How this works
--------------
A socket carries a stream of bytes, not messages, so each message travels
as a frame::

    +----------------------+---------------------------------+
    | length: 4 bytes, big | one msgpack message (arc.messages)|
    | endian, unsigned     | of exactly `length` bytes         |
    +----------------------+---------------------------------+

``FrameDecoder`` is fed whatever bytes arrived, in pieces of any size, and
returns the messages completed so far. It never touches a socket, so every
split point and every hostile input can be tested in memory.

What always holds
-----------------
- A frame longer than its limit is refused as soon as its four length bytes
  are in, before any of its body is buffered: a peer cannot make the decoder
  hold more than one frame's limit plus one read.
- Every failure is ``BadInput`` with a message naming what arrived. After a
  failure the stream has lost its framing, so the decoder refuses any further
  input; the caller answers with an error frame and closes.
- A request frame holds exactly the request shape of ``arc.messages``
  (``verb``, ``payload``, ``reply``); an answer frame holds ``reply`` and one
  of ``ok`` or ``error``.

Requests are capped at ``MAX_MESSAGE_BYTES`` (2 MiB: one bundle and its
envelope). Answers come from the authenticated server and may be larger
(the list of 10,000 certificates is about 3.5 MiB), so the client reads them
with ``MAX_ANSWER_BYTES`` (64 MiB).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgpack

from arc.errors import ArcError, BadInput, error_from_kind
from arc.messages import (
    MAX_ANSWER_BYTES,
    MAX_MESSAGE_BYTES,
    Message,
    pack,
    request_from_value,
)

T = TypeVar("T")

HEADER = struct.Struct(">I")
HEADER_BYTES = HEADER.size


@dataclass(frozen=True, slots=True)
class Answer:
    """A decoded answer: the reply number and either a payload or an error."""

    reply: int | None
    ok: Any = None
    error: ArcError | None = None

    def result(self) -> Any:
        """The payload, or raise the error that the answer carries."""
        if self.error is not None:
            raise self.error
        return self.ok


def frame(body: bytes) -> bytes:
    """Prefix an encoded message with its length."""
    return HEADER.pack(len(body)) + body


def request_frame(verb: str, payload: Any = None, reply: int | None = None) -> bytes:
    """A request frame: ``{"verb", "payload", "reply"}``."""
    message: dict[str, Any] = {"verb": verb, "payload": payload}
    if reply is not None:
        message["reply"] = reply
    return frame(pack(message))


def ok_frame(reply: int | None, payload: Any) -> bytes:
    """A successful answer frame."""
    return frame(pack({"reply": reply, "ok": payload}))


def error_frame(reply: int | None, error: ArcError) -> bytes:
    """An error answer frame carrying the error's kind and message."""
    body = {"reply": reply, "error": {"kind": error.kind, "message": error.message}}
    return frame(pack(body))


def answer_from_value(value: Any) -> Answer:
    """Check a decoded value is an answer and return it."""
    if not isinstance(value, dict):
        raise BadInput(f"answer: expected a map, got {type(value).__name__}")
    if "reply" not in value:
        raise BadInput(f"answer: expected a 'reply' field, got {sorted(value)}")
    reply = value["reply"]
    if reply is not None and (not isinstance(reply, int) or isinstance(reply, bool)):
        raise BadInput(
            f"answer: 'reply' must be an integer, got {type(reply).__name__}"
        )
    extra = set(value) - {"reply", "ok", "error"}
    if extra:
        raise BadInput(f"answer: unexpected field(s) {', '.join(sorted(extra))}")
    if "error" in value:
        error = value["error"]
        if not isinstance(error, dict):
            raise BadInput(f"answer: 'error' must be a map, got {type(error).__name__}")
        kind, message = error.get("kind"), error.get("message")
        return Answer(reply=reply, error=error_from_kind(str(kind), str(message)))
    if "ok" not in value:
        raise BadInput("answer: expected 'ok' or 'error', got neither")
    return Answer(reply=reply, ok=value["ok"])


def _unpack(body: bytes, what: str) -> Any:
    """Decode one msgpack value from untrusted bytes."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, timestamp=3)
    except Exception as exc:  # msgpack raises many unrelated types
        raise BadInput(
            f"{what}: frame of {len(body)} bytes is not valid msgpack ({exc})"
        ) from exc


class FrameDecoder(Generic[T]):
    """Turn bytes fed in pieces into checked messages.

    Args:
        parse: checks one decoded value and returns the message (for example
            ``request_from_value``); it raises ``BadInput`` for a wrong shape.
        max_frame_bytes: the largest body accepted; a length prefix above it
            is refused at once.
        what: names the stream in error messages ("request", "answer").
    """

    def __init__(
        self,
        parse: Callable[[Any], T],
        *,
        max_frame_bytes: int = MAX_MESSAGE_BYTES,
        what: str = "frame",
    ) -> None:
        if max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes must be positive, got {max_frame_bytes}")
        self._parse = parse
        self._max = max_frame_bytes
        self._what = what
        self._buffer = bytearray()
        self._pos = 0  # start of the unread bytes in the buffer
        self._need: int | None = None  # body length once the header is read
        self._failed: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buffer) - self._pos

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is held (the stream may end here)."""
        return self.buffered == 0 and self._need is None

    def feed(self, data: bytes) -> Iterator[T]:
        """Add received bytes; yield every message they complete, in order.

        The messages before a bad frame are yielded first, then ``BadInput``
        is raised where the bad frame starts. Iterate to the end (or to the
        error): bytes are consumed only as the iteration reaches them.

        Raises:
            BadInput: a length over the limit, bytes that are not msgpack, or a
                message of the wrong shape. The decoder is then closed.
        """
        if self._failed is not None:
            raise BadInput(f"{self._what}: stream already refused ({self._failed})")
        self._buffer += data
        try:
            while (message := self._next()) is not None:
                yield message[0]
        except BadInput as exc:
            self._failed = exc.message
            self._buffer.clear()
            self._pos = 0
            raise
        finally:
            # Drop consumed bytes once per feed, not once per frame: many
            # small frames in one read must not cost a copy each.
            del self._buffer[: self._pos]
            self._pos = 0

    def _next(self) -> tuple[T] | None:
        """Decode one frame from the buffer, or None if none is complete."""
        buffer, pos = self._buffer, self._pos

        # Header: refuse an oversized frame before holding any of its body.
        if self._need is None:
            if len(buffer) - pos < HEADER_BYTES:
                return None
            (length,) = HEADER.unpack_from(buffer, pos)
            self._pos = pos = pos + HEADER_BYTES
            if length > self._max:
                raise BadInput(
                    f"{self._what}: frame of {length} bytes is over the "
                    f"limit of {self._max}"
                )
            if length == 0:
                raise BadInput(
                    f"{self._what}: empty frame (length 0), expected one message"
                )
            self._need = length

        # Body: decode and check the shape once it is complete.
        if len(buffer) - pos < self._need:
            return None
        body = bytes(buffer[pos : pos + self._need])
        self._pos = pos + self._need
        self._need = None
        return (self._parse(_unpack(body, self._what)),)

    def feed_all(self, data: bytes) -> list[T]:
        """``feed`` collected in a list (all or nothing: raises on a bad frame)."""
        return list(self.feed(data))


def request_decoder(max_frame_bytes: int = MAX_MESSAGE_BYTES) -> FrameDecoder[Message]:
    """A decoder for the server side: request frames, capped at 2 MiB."""
    return FrameDecoder(
        request_from_value, max_frame_bytes=max_frame_bytes, what="request"
    )


def answer_decoder(max_frame_bytes: int = MAX_ANSWER_BYTES) -> FrameDecoder[Answer]:
    """A decoder for the client side: answer frames."""
    return FrameDecoder(
        answer_from_value, max_frame_bytes=max_frame_bytes, what="answer"
    )
