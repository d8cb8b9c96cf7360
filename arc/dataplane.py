"""The data plane: one asyncio loop, in its own thread, for bytes and HTTP.

How this works: sockets, TLS records, HTTP parsing and ASGI applications all
run on this loop (uvloop when it is installed), so a request or a handshake
on a cached context never crosses a thread. Actors reach the loop with
``submit`` (run a coroutine, get a ``concurrent.futures.Future``) and
``call`` (run a plain function on the loop thread).

Hyperion owns routing: it builds an immutable ``RoutingTable`` and swaps it
in whole with ``install_routes``; connections read ``routes`` once per
request, so a swap applies to the next request and never tears one. Plugin
ports map straight to an ASGI application in ``port_apps``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from loguru import logger

if TYPE_CHECKING:
    from arc.config import Config
    from arc.http.routing import RoutingTable

T = TypeVar("T")
ASGIApp = Callable[..., Any]

STOP_TIMEOUT_S = 10.0
# How often a drain looks whether the last connections are gone.
DRAIN_POLL_S = 0.05
log = logger.bind(actor="dataplane")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop where available, asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


async def _forever() -> None:
    """The root task of the data plane loop; it ends when the loop stops."""
    await asyncio.Event().wait()


class DataPlane:
    """The event loop that carries every connection of this process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = new_event_loop()
        self.port_apps: dict[int, ASGIApp] = {}
        # Answers by status class (index 1 to 5 for 1xx to 5xx); written only
        # on the loop thread, read whole by Esper's status.
        self.answers_by_class = [0] * 6
        # For a graceful stop (drain_connections): the listeners accepting
        # on this loop, the HTTP connections open on it, and whether it is
        # draining (every connection then closes after its answer).
        self.listeners: set[Any] = set()
        self.connections: set[Any] = set()
        self.draining = False
        from arc.http.routing import RoutingTable

        # The routing table in force; ``install_routes`` swaps it whole.
        self.routes: RoutingTable = RoutingTable.empty()
        self._thread = threading.Thread(
            target=self._run, name="arc-dataplane", daemon=True
        )

    def start(self) -> None:
        """Start the loop thread."""
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            # Run under a root task: anyio (Starlette) looks for the task that
            # runs the loop and, finding none, scans every task on each call.
            self.loop.run_until_complete(_forever())
        except RuntimeError:
            pass  # stop() stopped the loop before the root task ended
        finally:
            self._drain()

    def _drain(self) -> None:
        # Cancel what is left so no task outlives the loop, then close it.
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def drain_connections(self, grace_s: float) -> int:
        """Stop accepting and let requests in progress finish, within ``grace_s``.

        Call from another thread before ``stop``. Listeners close; idle
        connections close at once, busy ones after their answer (WebSockets
        get ``1001 going away``). Returns how many connections were still
        open when the grace period ended (``stop`` then cuts them).
        """
        if not self._thread.is_alive():
            return 0
        try:
            return self.run(self._drain_connections(grace_s), grace_s + 5.0)
        except (concurrent.futures.TimeoutError, RuntimeError):
            return len(self.connections)

    async def _drain_connections(self, grace_s: float) -> int:
        self.draining = True
        for listener in list(self.listeners):
            listener.close()
        if not self.connections:
            return 0
        log.info(
            "draining connections open={n} grace_s={g}",
            n=len(self.connections),
            g=grace_s,
        )
        for connection in list(self.connections):
            connection.shut_down()
        deadline = self.loop.time() + grace_s
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self.connections:
            log.warning(
                "connections cut after the grace period count={n} grace_s={g}",
                n=len(self.connections),
                g=grace_s,
            )
        else:
            log.info("connections drained")
        return len(self.connections)

    def stop(self) -> None:
        """Stop the loop and wait for its thread to end."""
        if not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=STOP_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("data plane did not stop in time")

    def requests_by_class(self) -> dict[str, int]:
        """HTTP answers so far by status class: ``{"2xx": n, ...}``."""
        counts = list(self.answers_by_class)
        return {f"{n}xx": counts[n] for n in range(1, 6)}

    def install_routes(self, table: RoutingTable) -> None:
        """Swap the whole routing table; safe from any thread."""
        self.routes = table

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run a coroutine on the loop from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the loop and wait for its result."""
        return self.submit(coro).result(timeout)

    def call(self, func: Callable[..., Any], *args: Any) -> None:
        """Run a plain function on the loop thread, soon."""
        self.loop.call_soon_threadsafe(func, *args)

    def http_protocol_factory(
        self, *, port: int, scheme: str, tls_domain: str | None
    ) -> Callable[[], asyncio.Protocol]:
        """What serves HTTP on one connection of ``port``."""
        from arc.http.server import HttpProtocol

        def factory() -> asyncio.Protocol:
            # The settings in force now: a reload replaces ``config``.
            return HttpProtocol(
                self,
                port=port,
                scheme=scheme,
                tls_domain=tls_domain,
                settings=self.config.arcology,
            )

        return factory
