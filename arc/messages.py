"""Messages: the only thing actors and admin clients exchange.

A message is a msgpack map::

    {"verb": "Cryptosaur.setCertificate", "payload": {...}, "reply": 7}

``verb`` is ``Actor.verb``: an imperative for a request (``setCertificate``)
or a past tense for an announcement (``certificateChanged``). ``payload`` is
any msgpack value. ``reply`` is present only on an ask; it is the number that
the answer carries back, so the same bytes can cross a socket and still be
matched to their question. An answer is::

    {"reply": 7, "ok": <payload>}   or   {"reply": 7, "error": {"kind", "message"}}

Messages are encoded when sent and decoded when received, so no actor ever
holds another's objects. Decoding never trusts its input: the buffer is
bounded, map keys must be strings, and a wrong shape raises ``BadInput``
naming what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from arc.errors import ArcError, BadInput, error_from_kind

# A 1 MiB bundle plus its envelope must fit; anything far above is an attack.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
# Answers come from actors in this process and may be larger: the list of
# every certificate (about 350 bytes each) passes 2 MiB near 6,000 domains.
MAX_ANSWER_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded request or announcement."""

    verb: str
    payload: Any
    reply: int | None = None

    @property
    def target(self) -> str:
        """The actor named before the dot (empty for a bare verb)."""
        return self.verb.partition(".")[0] if "." in self.verb else ""

    @property
    def action(self) -> str:
        """The verb after the actor's name."""
        return self.verb.rpartition(".")[2]


def pack(value: Any) -> bytes:
    """Encode any msgpack value; raises ``BadInput`` for what cannot be."""
    try:
        return msgpack.packb(value, use_bin_type=True, datetime=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadInput(f"message: cannot encode ({exc})") from exc


def unpack(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Decode one msgpack value with the limits untrusted input needs."""
    if len(data) > max_bytes:
        raise BadInput(f"message: {len(data)} bytes is over the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            timestamp=3,
        )
    except Exception as exc:  # msgpack raises many unrelated types
        raise BadInput(f"message: not valid msgpack ({exc})") from exc


def encode_request(verb: str, payload: Any = None, reply: int | None = None) -> bytes:
    """Encode a request or announcement."""
    message: dict[str, Any] = {"verb": verb, "payload": payload}
    if reply is not None:
        message["reply"] = reply
    return pack(message)


def decode_request(data: bytes) -> Message:
    """Decode a request, refusing any shape other than the documented one."""
    value = unpack(data)
    return request_from_value(value)


def request_from_value(value: Any) -> Message:
    """Check an already decoded value is a request and return it."""
    if not isinstance(value, dict):
        raise BadInput(f"message: expected a map, got {type(value).__name__}")
    verb = value.get("verb")
    if not isinstance(verb, str) or not verb:
        raise BadInput("message: 'verb' must be a non-empty string")
    reply = value.get("reply")
    if reply is not None and (not isinstance(reply, int) or isinstance(reply, bool)):
        raise BadInput("message: 'reply' must be an integer")
    extra = set(value) - {"verb", "payload", "reply"}
    if extra:
        raise BadInput(f"message: unexpected field(s) {', '.join(sorted(extra))}")
    return Message(verb=verb, payload=value.get("payload"), reply=reply)


def encode_ok(reply: int | None, payload: Any) -> bytes:
    """Encode a successful answer."""
    return pack({"reply": reply, "ok": payload})


def encode_error(reply: int | None, error: ArcError) -> bytes:
    """Encode an error answer."""
    return pack(
        {"reply": reply, "error": {"kind": error.kind, "message": error.message}}
    )


def decode_answer(data: bytes) -> tuple[int | None, Any]:
    """Decode an answer: its reply number and payload, or raise its error."""
    value = unpack(data, MAX_ANSWER_BYTES)
    if not isinstance(value, dict) or "reply" not in value:
        raise BadInput("answer: expected a map with 'reply'")
    if "error" in value:
        error = value["error"]
        if not isinstance(error, dict):
            raise BadInput("answer: 'error' must be a map")
        raise error_from_kind(str(error.get("kind")), str(error.get("message")))
    if "ok" not in value:
        raise BadInput("answer: expected 'ok' or 'error'")
    return value["reply"], value["ok"]
