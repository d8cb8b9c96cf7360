"""The runtime: starts actors in order, carries their messages, supervises.

How this works: the runtime holds a registry of actors by name. ``start``
orders the actor classes by what each ``needs`` (a topological sort; a cycle
or a missing actor is refused before anything starts), starts the data plane
loop, then each actor, waiting for one to be running before the next.
``stop`` stops them in reverse, then the data plane.

Messages: ``tell`` and ``ask`` encode a request with msgpack and put an
``Envelope`` in the actor's inbox. An ask also creates a
``concurrent.futures.Future`` that the actor's answer resolves; ``ask``
waits on it, ``ask_async`` wraps it for asyncio (the wrap hands the result
over with ``call_soon_threadsafe``, so awaiting never blocks a loop).

Supervision: when an actor crashes, ``arc.actor.Actor`` stops it and calls
``actor_crashed``. The supervisor thread restarts a fresh instance after a
back-off that doubles with each crash in the window. More than
``MAX_RESTARTS`` crashes within ``RESTART_WINDOW_S`` and the actor is marked
failed: the runtime reports it and asks the process to stop cleanly (exit
status 1), unless the actor was added as not ``essential`` (a plugin not
marked ``required``): that one is left stopped and the process goes on.
Meanwhile the other actors keep working; asks to the crashed actor get
``Busy`` and tells to it are dropped with a WARNING.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pykka
from loguru import logger

from arc.actor import Actor, Envelope
from arc.errors import ArcError, Busy, ConfigError, NotFound
from arc.messages import decode_answer, decode_request, encode_request

if TYPE_CHECKING:
    from arc.config import Config
    from arc.dataplane import DataPlane

# A crash storm: this many restarts inside the window means the actor cannot
# recover by itself, so the process stops rather than spin.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
# The first restart is quick (a one-off bug should cost little), later ones
# back off so a crash loop does not eat the machine.
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
DEFAULT_ASK_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0

log = logger.bind(actor="runtime")


@dataclass
class _Slot:
    """One named actor: its class, its current instance and its crash record."""

    cls: type[Actor]
    kwargs: dict[str, Any]
    ref: pykka.ActorRef[Actor] | None = None
    state: str = "stopped"
    restarts: int = 0
    started_once: bool = False
    crashes: list[float] = field(default_factory=list)
    # False: after a crash storm the actor is given up on, not the process.
    essential: bool = True
    # Arcology's own error that stopped the first on_start, if one did.
    start_error: ArcError | None = None


def start_order(classes: Sequence[type[Actor]]) -> list[type[Actor]]:
    """Order actor classes so each comes after every actor it needs."""
    by_name: dict[str, type[Actor]] = {}
    for cls in classes:
        if not cls.name:
            raise ConfigError(f"actor class {cls.__qualname__} has no name")
        if cls.name in by_name:
            raise ConfigError(f"two actors are named {cls.name!r}")
        by_name[cls.name] = cls
    ordered: list[type[Actor]] = []
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in visiting:
            raise ConfigError(f"actors need each other: {' -> '.join((*chain, name))}")
        if name not in by_name:
            raise ConfigError(f"actor {chain[-1]} needs {name}, which is not started")
        visiting.add(name)
        for need in by_name[name].needs:
            visit(need, (*chain, name))
        visiting.discard(name)
        done.add(name)
        ordered.append(by_name[name])

    for cls in classes:
        visit(cls.name, ())
    return ordered


class Runtime:
    """The actor system of one Arcology process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.stopping = threading.Event()
        self.failed: str | None = None
        self._slots: dict[str, _Slot] = {}
        self._order: list[str] = []
        self._hearers: dict[str, list[str]] = {}
        self._callbacks: dict[str, list[Callable[[Any], None]]] = {}
        self._lock = threading.RLock()
        self._reply_ids = itertools.count(1)
        self._restarts: queue.Queue[tuple[str, pykka.ActorRef[Actor]] | None] = (
            queue.Queue()
        )
        self._supervisor: threading.Thread | None = None
        self._dataplane: DataPlane | None = None

    # -- life -----------------------------------------------------------------

    @property
    def dataplane(self) -> DataPlane:
        """The asyncio loop that carries bytes, TLS and HTTP."""
        if self._dataplane is None:
            from arc.dataplane import DataPlane

            self._dataplane = DataPlane(self.config)
            self._dataplane.start()
        return self._dataplane

    def start(
        self,
        classes: Sequence[type[Actor]],
        extra_kwargs: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Start the actors in dependency order; raise if one cannot start."""
        ordered = start_order(classes)
        self._supervisor = threading.Thread(
            target=self._supervise, name="arc-supervisor", daemon=True
        )
        self._supervisor.start()
        for cls in ordered:
            kwargs = (extra_kwargs or {}).get(cls.name, {})
            self.add(cls, kwargs)

    def add(
        self,
        cls: type[Actor],
        kwargs: dict[str, Any] | None = None,
        *,
        essential: bool = True,
    ) -> None:
        """Start one more actor (a plugin, say) once the others run.

        An actor that is not ``essential`` is given up on after a crash storm
        (left stopped, marked failed) while the rest of Arcology goes on.
        """
        slot = _Slot(cls=cls, kwargs=dict(kwargs or {}), essential=essential)
        with self._lock:
            if cls.name in self._slots:
                raise ConfigError(f"an actor named {cls.name!r} is already running")
            self._slots[cls.name] = slot
            self._order.append(cls.name)
            for heard in cls.hears:
                self._hearers.setdefault(heard, []).append(cls.name)
        self._spawn(slot)
        if not self._wait_running(slot):
            with self._lock:
                self._forget(cls.name)
            # Arcology's own error already says what is wrong and what to do;
            # anything else was logged with its traceback by the actor.
            if slot.start_error is not None:
                error = slot.start_error
                raise type(error)(error.message) from error
            raise ConfigError(f"actor {cls.name} failed to start; see the log above")

    def stop(self) -> None:
        """Stop every actor in reverse start order, then the data plane.

        First the data plane drains: no new connections, and requests in
        progress get up to ``shutdown_grace_s`` to finish while every actor
        (and the applications they run) still serves them.
        """
        self.stopping.set()
        if self._dataplane is not None:
            self._dataplane.drain_connections(self.config.arcology.shutdown_grace_s)
        with self._lock:
            names = list(reversed(self._order))
        for name in names:
            self.remove(name)
        self._restarts.put(None)
        if self._supervisor is not None:
            self._supervisor.join(timeout=STOP_TIMEOUT_S)
        if self._dataplane is not None:
            self._dataplane.stop()
            self._dataplane = None

    def remove(self, name: str) -> None:
        """Stop one actor and forget it."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                return
            self._forget(name)
            ref, slot.ref, slot.state = slot.ref, None, "stopped"
        if ref is not None:
            try:
                ref.stop(block=True, timeout=STOP_TIMEOUT_S)
            except pykka.ActorDeadError:
                pass
            except pykka.Timeout:
                log.warning("actor did not stop in time name={name}", name=name)
        log.debug("actor stopped name={name}", name=name)

    def _forget(self, name: str) -> None:
        self._slots.pop(name, None)
        if name in self._order:
            self._order.remove(name)
        for hearers in self._hearers.values():
            if name in hearers:
                hearers.remove(name)

    def _spawn(self, slot: _Slot) -> None:
        # Hold the lock while the ref is assigned: the new actor's thread
        # reports itself started through actor_started, which must see it.
        with self._lock:
            slot.state = "starting"
            slot.ref = slot.cls.start(self, self.config, **slot.kwargs)
        log.debug("actor started name={name}", name=slot.cls.name)

    def _wait_running(self, slot: _Slot) -> bool:
        # A round trip through the inbox proves on_start finished; a crash in
        # on_start stops the actor before it answers.
        ref = slot.ref
        if ref is None:
            return False
        try:
            ref.ask(None, timeout=STOP_TIMEOUT_S * 3)
        except (pykka.ActorDeadError, pykka.Timeout):
            return False
        return bool(ref.is_alive())

    # -- supervision ----------------------------------------------------------

    def actor_started(self, name: str, urn: str) -> None:
        """Called by an actor (in its own thread) once ``on_start`` is done."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is not None and slot.ref is not None and slot.ref.actor_urn == urn:
                slot.state = "running"
                slot.started_once = True

    def has_started(self, name: str) -> bool:
        """Whether an instance of the actor ``name`` ever finished ``on_start``."""
        with self._lock:
            slot = self._slots.get(name)
            return slot is not None and slot.started_once

    def actor_crashed(self, name: str, urn: str, exc: BaseException | None) -> None:
        """Called by a crashing actor (in its own thread) to be restarted."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is None or slot.ref is None or slot.ref.actor_urn != urn:
                return
            crashed, slot.ref = slot.ref, None
            if not slot.started_once:
                # A crash in the first on_start: add() reports it, no restart.
                slot.state = "failed"
                if isinstance(exc, ArcError):
                    slot.start_error = exc
                return
            slot.state = "restarting"
        self._restarts.put((name, crashed))

    def _supervise(self) -> None:
        while True:
            item = self._restarts.get()
            if item is None or self.stopping.is_set():
                return
            name, crashed = item
            with self._lock:
                slot = self._slots.get(name)
                if slot is None:
                    continue
                now = time.monotonic()
                slot.crashes = [t for t in slot.crashes if now - t < RESTART_WINDOW_S]
                slot.crashes.append(now)
                attempts = len(slot.crashes)
            if attempts > MAX_RESTARTS and not slot.essential:
                slot.state = "failed"
                log.error(
                    "actor given up: crashed {n} times in {w:.0f} s; Arcology goes "
                    "on without it name={name}",
                    n=attempts,
                    w=RESTART_WINDOW_S,
                    name=name,
                )
                continue
            if attempts > MAX_RESTARTS:
                slot.state = "failed"
                self.failed = name
                log.error(
                    "actor failed: crashed {n} times in {w:.0f} s; stopping Arcology "
                    "name={name}",
                    n=attempts,
                    w=RESTART_WINDOW_S,
                    name=name,
                )
                self.stopping.set()
                continue
            backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (attempts - 1))
            log.error(
                "restarting actor after crash name={name} attempt={n} backoff_s={b}",
                name=name,
                n=attempts,
                b=backoff,
            )
            if self.stopping.wait(backoff):
                return
            # The crashed instance must have released what it held (its
            # port, its store) before the new one takes them.
            crashed.actor_stopped.wait(STOP_TIMEOUT_S)
            with self._lock:
                if self._slots.get(name) is not slot:
                    continue
                slot.restarts += 1
                self._spawn(slot)
            if self._wait_running(slot):
                log.info("actor restarted name={name}", name=name)

    # -- messages -------------------------------------------------------------

    def _ref(self, name: str) -> pykka.ActorRef[Actor]:
        slot = self._slots.get(name)
        if slot is None:
            raise NotFound(f"no actor named {name!r}")
        ref = slot.ref
        if ref is None:
            raise Busy(f"{name} is {slot.state}; retry shortly")
        return ref

    def tell(self, name: str, verb: str, payload: Any = None) -> None:
        """Send a message that expects no answer."""
        data = encode_request(f"{name}.{verb}", payload)
        try:
            self._ref(name).tell(Envelope(data))
        except (Busy, NotFound, pykka.ActorDeadError) as exc:
            log.warning(
                "tell dropped verb={name}.{verb} reason={r}",
                name=name,
                verb=verb,
                r=exc,
            )

    def _send_ask(
        self, full_verb: str, payload: Any
    ) -> concurrent.futures.Future[bytes]:
        name = full_verb.partition(".")[0]
        future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        data = encode_request(full_verb, payload, next(self._reply_ids))
        try:
            self._ref(name).tell(Envelope(data, future.set_result))
        except pykka.ActorDeadError as exc:
            raise Busy(f"{name} is restarting; retry shortly") from exc
        return future

    def request(
        self,
        full_verb: str,
        payload: Any = None,
        timeout: float = DEFAULT_ASK_TIMEOUT_S,
    ) -> Any:
        """Ask by the full verb (``"Cryptosaur.listCertificates"``)."""
        future = self._send_ask(full_verb, payload)
        try:
            data = future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            raise Busy(f"{full_verb} got no answer within {timeout:g} s") from exc
        return decode_answer(data)[1]

    def ask(
        self,
        name: str,
        verb: str,
        payload: Any = None,
        timeout: float = DEFAULT_ASK_TIMEOUT_S,
    ) -> Any:
        """Ask an actor and wait for its answer; raise the error it answers."""
        return self.request(f"{name}.{verb}", payload, timeout)

    async def ask_async(
        self,
        name: str,
        verb: str,
        payload: Any = None,
        timeout: float = DEFAULT_ASK_TIMEOUT_S,
    ) -> Any:
        """Ask from asyncio code without blocking its event loop."""
        future = self._send_ask(f"{name}.{verb}", payload)
        try:
            data = await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError as exc:
            raise Busy(f"{name}.{verb} got no answer within {timeout:g} s") from exc
        return decode_answer(data)[1]

    def announce(self, verb: str, payload: Any = None) -> None:
        """Tell every actor and callback that hears ``verb``."""
        data = encode_request(verb, payload)
        with self._lock:
            names = list(self._hearers.get(verb, ()))
            callbacks = list(self._callbacks.get(verb, ()))
        for name in names:
            try:
                self._ref(name).tell(Envelope(data))
            except (Busy, NotFound, pykka.ActorDeadError):
                log.warning("announcement missed verb={v} actor={a}", v=verb, a=name)
        if callbacks:
            decoded = decode_request(data).payload
            for callback in callbacks:
                try:
                    callback(decoded)
                except Exception:
                    log.exception("announcement callback failed verb={v}", v=verb)

    def subscribe(self, verb: str, callback: Callable[[Any], None]) -> None:
        """Call ``callback(payload)`` on every announcement of ``verb``."""
        with self._lock:
            self._callbacks.setdefault(verb, []).append(callback)

    def unsubscribe(self, verb: str, callback: Callable[[Any], None]) -> None:
        """Stop calling a subscribed callback."""
        with self._lock:
            callbacks = self._callbacks.get(verb, [])
            if callback in callbacks:
                callbacks.remove(callback)

    def names(self) -> list[str]:
        """The running actors, in start order."""
        with self._lock:
            return list(self._order)

    def status(self) -> dict[str, Any]:
        """Uptime and each actor's state and restart count."""
        with self._lock:
            actors = [
                {
                    "name": name,
                    "state": self._slots[name].state,
                    "restarts": self._slots[name].restarts,
                }
                for name in self._order
            ]
        return {
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 3),
            "actors": actors,
            "failed": self.failed,
        }
