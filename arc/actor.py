"""The base of every Arcology actor: verb dispatch over encoded messages.

How this works: an actor is a Pykka ``ThreadingActor`` whose inbox carries
``Envelope`` objects. An envelope holds the msgpack bytes of one message and,
for an ask, a callable that takes the encoded answer. ``on_receive`` decodes
the bytes, finds the method registered for the verb with ``@verb`` and
encodes what it returns (or the error it raised) as the answer. So no actor
ever holds another's objects, and the same bytes could have come over a
socket.

What always holds:

- An unknown verb or a malformed message is answered with ``BadInput``
  naming it; the actor keeps running.
- A handler that raises an ``ArcError`` answers with that error; the actor
  keeps running (bad input is the sender's problem, not a crash). For a tell,
  which has nobody to answer, the error is logged as a WARNING.
- A handler that raises anything else is a crash: the asker gets
  ``Internal``, the traceback is logged at ERROR, ``on_stop`` runs to release
  what the actor holds, and the runtime restarts a fresh instance with
  back-off (see ``arc.runtime``). A crash in ``on_start`` is treated the same,
  except that an ``ArcError`` there (an unreachable store, a wrong master
  key) is no bug: no traceback is logged, the first start raises that error
  from ``Runtime.add`` and a restart logs its message on one ERROR line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import pykka
from loguru import logger

from arc.errors import ArcError, BadInput, Busy, Internal
from arc.messages import decode_request, encode_error, encode_ok

if TYPE_CHECKING:
    from arc.config import Config
    from arc.runtime import Runtime

F = TypeVar("F", bound=Callable[..., Any])

ReplyTo = Callable[[bytes], None]


@dataclass(frozen=True, slots=True)
class Envelope:
    """One encoded message in an actor's inbox, with where its answer goes."""

    data: bytes
    reply_to: ReplyTo | None = None


def verb(name: str) -> Callable[[F], F]:
    """Register the decorated method as the handler of ``name``.

    ``name`` is the actor's own verb (``"setCertificate"``) or the full name
    of an announcement it hears (``"Cryptosaur.certificateChanged"``).
    """

    def mark(method: F) -> F:
        method.__arc_verb__ = name  # type: ignore[attr-defined]
        return method

    return mark


class Actor(pykka.ThreadingActor):
    """An Arcology actor: a name, what it needs started first, what it hears."""

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    hears: ClassVar[tuple[str, ...]] = ()
    _verbs: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        verbs: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                name = getattr(value, "__arc_verb__", None)
                if isinstance(name, str):
                    verbs[name] = attr
        cls._verbs = verbs

    def __init__(self, runtime: Runtime, config: Config) -> None:
        super().__init__()
        self.runtime = runtime
        self.config = config
        self.log = logger.bind(actor=self.name.lower())

    def on_receive(self, message: Any) -> Any:
        """Decode, dispatch and answer one envelope."""
        if not isinstance(message, Envelope):
            return None
        reply_to = message.reply_to
        reply_id: int | None = None
        try:
            request = decode_request(message.data)
            reply_id = request.reply
            prefix = self.name + "."
            key = request.verb
            if key.startswith(prefix):
                key = key[len(prefix) :]
            method = self._verbs.get(key)
            if method is None:
                raise BadInput(f"{self.name}: unknown verb {request.verb!r}")
            result = getattr(self, method)(request.payload)
            answer = encode_ok(reply_id, result)
        except ArcError as exc:
            if reply_to is None:
                # A tell (or an announcement) has nobody to answer: say it here.
                self.log.warning(
                    "message not handled actor={} error={}", self.name, exc.message
                )
                return None
            answer = encode_error(reply_id, exc)
        except Exception as exc:
            # Mark the actor as restarting before the asker hears of the
            # crash, so that what it sends next gets Busy, not a dead inbox.
            self.runtime.actor_crashed(self.name, self.actor_urn, exc)
            if reply_to is not None:
                failure = Internal(
                    f"{self.name} crashed handling the request "
                    f"({type(exc).__name__}: {exc}); it is being restarted"
                )
                _deliver(reply_to, encode_error(reply_id, failure))
            raise
        if reply_to is not None:
            _deliver(reply_to, answer)
        return None

    def _handle_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Pykka calls this for a crash in on_start or in a handler; it stops
        # the actor. Release what the instance holds, then let the runtime
        # decide whether to restart it.
        if isinstance(exception_value, ArcError):
            # Only on_start gets here with Arcology's own error (a handler's
            # is answered to its asker). Its message is the whole story: the
            # first start raises it from Runtime.add, a restart says it here.
            if self.runtime.has_started(self.name):
                self.log.error(
                    "actor could not restart actor={name} reason={reason}",
                    name=self.name,
                    reason=exception_value.message,
                )
        else:
            self.log.opt(exception=(exception_type, exception_value, traceback)).error(
                "actor crashed actor={name}", name=self.name
            )
        try:
            self.on_stop()
        except Exception:
            self.log.opt(exception=sys.exc_info()).error(
                "cleanup after crash failed actor={name}", name=self.name
            )
        # Tell the runtime first, so new messages get Busy instead of landing
        # in this inbox; what already landed is answered by the teardown.
        self.runtime.actor_crashed(self.name, self.actor_urn, exception_value)
        pykka.ActorRegistry.unregister(self.actor_ref)
        self.actor_stopped.set()

    def _actor_loop_setup(self) -> None:
        super()._actor_loop_setup()
        if not self.actor_stopped.is_set():
            self.runtime.actor_started(self.name, self.actor_urn)

    def _actor_loop_teardown(self) -> None:
        # Asks still queued when the actor stops must not wait for ever.
        while not self.actor_inbox.empty():
            envelope = self.actor_inbox.get()
            message = envelope.message
            if isinstance(message, Envelope) and message.reply_to is not None:
                try:
                    reply = decode_request(message.data).reply
                except ArcError:
                    reply = None
                gone = Busy(f"{self.name} stopped before answering; retry shortly")
                _deliver(message.reply_to, encode_error(reply, gone))
            elif envelope.reply_to is not None:
                envelope.reply_to.set(None)


def _deliver(reply_to: ReplyTo, answer: bytes) -> None:
    try:
        reply_to(answer)
    except Exception:
        logger.opt(exception=sys.exc_info()).warning("answer could not be delivered")
