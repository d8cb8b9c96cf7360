"""Esper: listeners, TLS and the per-domain context cache of the data plane.

How this works: Esper is the control-plane face of the accept path in
:mod:`arc.tls.accept`. Its verbs run in the actor's thread and act on the data
plane loop (``runtime.dataplane``) through ``dataplane.run``; connections and
handshakes never pass through the actor.

- ``listen {port, tls, owner?}`` opens a port on every bind address, once: a
  second ``listen`` in the same mode answers ``already_open``, in the other
  mode it is refused (BadInput). A port that cannot be bound is refused with
  the OS reason and logged at WARNING; nothing else changes. Port 0 takes a
  free port (the answer names it).
- ``stopListener {port}`` closes the listening sockets; connections already
  accepted carry on until they end.
- ``status {}`` reports listeners, cache counters and connection counters.
- ``warm {domains}`` builds contexts in the background; the answer does not
  wait for them.
- ``applySettings {}`` puts the runtime's settings in force after a reload
  (fallback, handshake timeout, cache limits).
- ``publishStatus {}`` (workers only) writes this worker's status for worker
  0's ``ai1 status``; a ticker thread sends it every ``STATUS_EVERY_S``.
- Hearing ``Cryptosaur.certificateChanged {domains}`` drops the stale contexts
  on the loop, so the next handshake fetches the new chain.

What always holds: the listeners, the cache and the counters live in a
``_Station`` tied to the data plane, not to the actor instance. When Esper
crashes and the runtime restarts it, the new instance adopts the station, so
listeners keep accepting and cached contexts keep serving throughout; only a
real stop (the runtime stopping, or Esper being removed) closes them.

Logging: INFO for a listener opened or closed, WARNING for a port that cannot
be bound, DEBUG for cache invalidations and per-connection traces.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pykka

from arc.actor import Actor, Envelope, verb
from arc.config import Config
from arc.dataplane import DataPlane
from arc.errors import BadInput, NotFound
from arc.messages import encode_request
from arc.names import normalise_domain
from arc.runtime import Runtime
from arc.tls.accept import (
    ConnectionStats,
    PlainListener,
    TlsListener,
    listener_addresses,
)
from arc.tls.cache import ContextCache
from arc.tls.listener import open_sockets, raise_fd_limit
from arc.workers import STATUS_EVERY_S, publish_status, worker_count, worker_index

CHANGED = "Cryptosaur.certificateChanged"
LISTENER_OPENED = "Esper.listenerOpened"
LISTENER_CLOSED = "Esper.listenerClosed"
# How long a loop operation started by a verb may take before the verb gives
# up (opening a listener is a few system calls).
LOOP_CALL_TIMEOUT_S = 10.0
# Threads that build contexts on cache misses, off the loop; one keeps a
# storm of misses from taking both cores from the handshakes.
BUILD_THREADS = 1


@dataclass
class _Listening:
    """One open port."""

    port: int
    tls: bool
    owner: str | None
    listener: TlsListener | PlainListener
    addresses: list[list[Any]]

    def describe(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "tls": self.tls,
            "owner": self.owner,
            "addresses": self.addresses,
        }


@dataclass
class _Station:
    """What Esper keeps on the data plane, across restarts of the actor."""

    cache: ContextCache
    executor: concurrent.futures.ThreadPoolExecutor
    stats: ConnectionStats = field(default_factory=ConnectionStats)
    listening: dict[int, _Listening] = field(default_factory=dict)
    warming: set[concurrent.futures.Future[int]] = field(default_factory=set)


_stations: weakref.WeakKeyDictionary[DataPlane, _Station] = weakref.WeakKeyDictionary()


class Esper(Actor):
    """Owns sockets, TLS and the per-domain context cache."""

    name = "Esper"
    needs = ("Cryptosaur",)
    hears = (CHANGED,)

    def __init__(self, runtime: Runtime, config: Config) -> None:
        super().__init__(runtime, config)
        self.plane: DataPlane | None = None
        self.station: _Station | None = None
        self._stopping = threading.Event()
        self._publisher: threading.Thread | None = None

    # -- life -------------------------------------------------------------------

    def on_start(self) -> None:
        """Adopt the data plane's station, or set one up."""
        limit = raise_fd_limit()
        self.plane = self.runtime.dataplane
        station = _stations.get(self.plane)
        if station is None:
            settings = self.config.arcology
            executor = concurrent.futures.ThreadPoolExecutor(
                BUILD_THREADS, thread_name_prefix="arc-tls-build"
            )
            cache = ContextCache(
                self._fetch,
                size=settings.cache_size,
                ttl_s=settings.cache_ttl_s,
                negative_ttl_s=settings.negative_ttl_s,
                executor=executor,
            )
            station = _Station(cache=cache, executor=executor)
            _stations[self.plane] = station
            self.log.debug("station ready open_files_limit={}", limit)
        else:
            self.log.debug("station adopted listeners={}", sorted(station.listening))
        self.station = station
        if worker_count() > 1:
            # Worker 0 answers ai1 status for every worker (arc.workers).
            self._publisher = threading.Thread(
                target=self._publish_every_second, name="esper-status", daemon=True
            )
            self._publisher.start()

    def on_stop(self) -> None:
        """Close every listener, unless this is a restart after a crash."""
        self._stopping.set()
        publisher = self._publisher
        if publisher is not None and publisher is not threading.current_thread():
            publisher.join(timeout=5.0)
        if self.plane is None or self.station is None:
            return
        restarting = (
            not self.runtime.stopping.is_set() and self.name in self.runtime.names()
        )
        if restarting:
            return
        station = _stations.pop(self.plane, None)
        if station is None:
            return
        for port in sorted(station.listening):
            self._close(station, port)
        station.executor.shutdown(wait=False, cancel_futures=True)

    def _publish_every_second(self) -> None:
        # Only sends a message: the status is read on the actor's thread.
        request = encode_request(f"{self.name}.publishStatus", {})
        while not self._stopping.wait(STATUS_EVERY_S):
            try:
                self.actor_ref.tell(Envelope(request))
            except pykka.ActorDeadError:
                return

    async def _fetch(self, name: str) -> Mapping[str, Any]:
        """Ask Cryptosaur for a name's chain and key, without blocking the loop."""
        answer: Mapping[str, Any] = await self.runtime.ask_async(
            "Cryptosaur",
            "getCertificate",
            {"domain": name},
            timeout=self.config.arcology.handshake_timeout_s,
        )
        return answer

    def _ready(self) -> tuple[DataPlane, _Station]:
        assert self.plane is not None and self.station is not None
        return self.plane, self.station

    # -- verbs ------------------------------------------------------------------

    @verb("listen")
    def listen(self, payload: Any) -> Any:
        """Open a port (plain or TLS) once; see the module docstring."""
        plane, station = self._ready()
        port, tls = _port_field(payload, "listen"), payload.get("tls")
        if not isinstance(tls, bool):
            raise BadInput(f"listen: tls must be true or false, got {tls!r}")
        owner = payload.get("owner")
        if owner is not None and not isinstance(owner, str):
            raise BadInput(f"listen: owner must be a string, got {owner!r}")

        # Each port once; the same port in the other mode is a conflict.
        current = station.listening.get(port)
        if current is not None:
            if current.tls != tls:
                raise BadInput(
                    f"listen: port {port} is already open for {_mode(current.tls)} "
                    f"(owner {current.owner}), asked for {_mode(tls)}"
                    f"{f' by {owner}' if owner else ''}"
                )
            return {
                "port": port,
                "tls": tls,
                "already_open": True,
                "addresses": current.addresses,
            }

        settings = self.config.arcology
        try:
            sockets = open_sockets(port, settings.bind)
        except BadInput as exc:
            self.log.warning("listener not opened port={} reason={}", port, exc.message)
            raise
        port = sockets[0].getsockname()[1]
        listener: TlsListener | PlainListener
        if tls:
            listener = TlsListener(
                plane,
                port,
                sockets,
                station.cache,
                fallback=settings.tls_fallback,
                handshake_timeout_s=settings.handshake_timeout_s,
                stats=station.stats,
            )
        else:
            listener = PlainListener(plane, port, sockets, station.stats)
        try:
            plane.run(listener.start(), LOOP_CALL_TIMEOUT_S)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        opened = _Listening(port, tls, owner, listener, listener_addresses(sockets))
        station.listening[port] = opened
        self.log.info(
            "listener opened port={} tls={} addresses={}", port, tls, opened.addresses
        )
        self.runtime.announce(LISTENER_OPENED, {"port": port, "tls": tls})
        return {
            "port": port,
            "tls": tls,
            "already_open": False,
            "addresses": opened.addresses,
        }

    @verb("stopListener")
    def stop_listener(self, payload: Any) -> Any:
        """Close a port's listening sockets; open connections carry on."""
        _plane, station = self._ready()
        port = _port_field(payload, "stopListener")
        if port not in station.listening:
            raise NotFound(
                f"stopListener: port {port} is not open (open: "
                f"{sorted(station.listening) or 'none'})"
            )
        tls = self._close(station, port)
        return {"port": port, "tls": tls, "closed": True}

    def _close(self, station: _Station, port: int) -> bool:
        plane, _ = self._ready()
        listening = station.listening.pop(port)
        try:
            plane.run(_stop(listening.listener), LOOP_CALL_TIMEOUT_S)
        except RuntimeError:
            # The loop is already gone (process ending): close the sockets
            # from here.
            for sock in listening.listener.sockets:
                sock.close()
        self.log.info("listener closed port={} tls={}", port, listening.tls)
        self.runtime.announce(LISTENER_CLOSED, {"port": port, "tls": listening.tls})
        return listening.tls

    @verb("status")
    def status(self, payload: Any) -> Any:
        """Listeners, cache counters and connection counters."""
        plane, station = self._ready()
        stats = station.stats
        return {
            "listeners": [
                station.listening[port].describe() for port in sorted(station.listening)
            ],
            "cache": station.cache.counters(),
            "connections_open": stats.connections_open,
            "handshakes": stats.handshakes,
            "handshake_failures": stats.handshake_failures,
            "rejected": stats.rejected,
            "requests": plane.requests_by_class(),
        }

    @verb("applySettings")
    def apply_settings(self, payload: Any) -> Any:
        """Put the runtime's current settings in force (after a reload).

        The fallback and handshake timeout apply to connections accepted from
        now on; the cache's limits at once (a smaller size evicts).
        """
        plane, station = self._ready()
        self.config = self.runtime.config
        settings = self.config.arcology
        tls = [
            opened.listener
            for opened in station.listening.values()
            if isinstance(opened.listener, TlsListener)
        ]

        async def apply() -> None:
            station.cache.configure(
                size=settings.cache_size,
                ttl_s=settings.cache_ttl_s,
                negative_ttl_s=settings.negative_ttl_s,
            )
            for listener in tls:
                listener.configure(
                    fallback=settings.tls_fallback,
                    handshake_timeout_s=settings.handshake_timeout_s,
                )

        plane.run(apply(), LOOP_CALL_TIMEOUT_S)
        return {"listeners": len(tls), "cache_size": settings.cache_size}

    @verb("publishStatus")
    def publish_status(self, payload: Any) -> Any:
        """Write this worker's status for worker 0 (see ``arc.workers``)."""
        index = worker_index()
        if index is None:
            raise BadInput("publishStatus: this process is not a worker")
        publish_status(self.config.arcology.data_dir, index, self.status(None))
        return {"published": index}

    @verb("warm")
    def warm(self, payload: Any) -> Any:
        """Build contexts for ``domains`` in the background; answer at once."""
        plane, station = self._ready()
        domains = payload.get("domains") if isinstance(payload, dict) else None
        if not isinstance(domains, list) or not all(
            isinstance(d, str) for d in domains
        ):
            raise BadInput(f"warm: domains must be a list of strings, got {domains!r}")
        names = []
        for domain in domains:
            try:
                name = normalise_domain(domain)
            except BadInput as exc:
                self.log.debug("warm skipped name={} reason={}", domain, exc.message)
                continue
            # A wildcard is warmed through a name it covers; the cache key is
            # always an asked name, never '*'.
            if not name.startswith("*."):
                names.append(name)
        future = plane.submit(station.cache.warm(names))
        station.warming.add(future)
        future.add_done_callback(station.warming.discard)
        return {"warming": len(names)}

    @verb(CHANGED)
    def certificate_changed(self, payload: Any) -> None:
        """Drop the contexts of changed domains, on the loop."""
        plane, station = self._ready()
        domains = payload.get("domains") if isinstance(payload, dict) else None
        if not isinstance(domains, list):
            self.log.warning("certificateChanged without domains payload={!r}", payload)
            return
        self.log.debug("contexts invalidated domains={}", domains)
        plane.call(station.cache.invalidate, [str(d) for d in domains])


async def _stop(listener: TlsListener | PlainListener) -> None:
    listener.close()
    await asyncio.sleep(0)


def _port_field(payload: Any, where: str) -> int:
    port = payload.get("port") if isinstance(payload, dict) else None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise BadInput(f"{where}: port must be an integer 0 to 65535, got {port!r}")
    return port


def _mode(tls: bool) -> str:
    return "TLS" if tls else "plain HTTP"
