"""The change feed: how a process hears certificate changes made elsewhere.

How this works: every Arcology process runs one ``ChangeFeed`` thread
(started by Cryptosaur). It opens a backend of its own (``open_backend``; its
own database connection, never the actor's), remembers the sequence number
it has read up to, and loops:

1. read ``changes_since(last_seq)`` in batches until none are left;
2. drop the changes this process wrote itself (Cryptosaur registers them
   with ``writing``) and hand the domains of the others to ``on_foreign``,
   which announces ``Cryptosaur.certificateChanged`` so Esper drops the
   stale contexts;
3. wait for the next change: PostgreSQL wakes the thread with LISTEN/NOTIFY
   (the notification is sent in the writing transaction, so it arrives at
   commit); SQLite has no notifications across processes, so the thread
   polls every ``SQLITE_POLL_S`` (one indexed query). On PostgreSQL the rows
   are also read every ``SAFETY_READ_S`` without a notification, so a lost
   one costs latency, never a change.

Own changes. Cryptosaur already announces its own writes at once. To leave
them out without a race (PostgreSQL may deliver the notification before
``put`` has even returned), Cryptosaur holds ``writing()`` around its write
and registers the sequence numbers it got before letting go; the feed takes
the same lock before deciding what is foreign. A change the writer could not
attribute (a delete interleaved with another node's write) is announced
twice, which costs one rebuilt context and is never wrong.

Outages. When the database cannot be reached (the read or the wait fails),
the feed logs one WARNING, closes its backend and tries again after a
back-off that doubles from ``FIRST_BACKOFF_S`` to ``MAX_BACKOFF_S``.
Meanwhile Esper keeps serving the contexts it has cached. When a read works
again the feed logs one INFO line and catches up from ``last_seq``: every
change made during the outage is announced, in order. A database whose last
sequence number is *below* ``last_seq`` was replaced (restored from a
backup, or a new one); then no sequence number can be trusted and every
stored domain is announced. The same happens when changes after
``last_seq`` were pruned before the feed read them (the store keeps a week
of changes; see ``Cryptosaur.pruneChanges``).

Restarts. A feed keeps its position per owner (Cryptosaur passes its
runtime), so when Cryptosaur crashes and is restarted, the new feed resumes
where the old one stopped and a change made in between is still announced;
Esper's cache, which outlives Cryptosaur, would otherwise keep a stale
context.

What always holds: the feed never raises into its caller, ``stop`` returns
within about ``WAIT_S`` plus one query, and nothing it logs carries a key.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from loguru import logger

from arc.errors import ArcError
from arc.store.postgres import PostgresBackend, describe_url

if TYPE_CHECKING:
    from arc.store import StoreSettings
    from arc.store.base import Backend, Changes

# SQLite: how often another process's upload is looked for. The query reads
# the tail of an index, microseconds; 200 ms keeps "served everywhere within
# a second" with room for Esper to rebuild a context.
SQLITE_POLL_S = 0.2
# PostgreSQL: the longest a wait for a notification lasts before the thread
# checks whether it should stop; and how often rows are read with no
# notification at all (a safety net for a notification lost with a dropped
# connection).
WAIT_S = 0.5
SAFETY_READ_S = 5.0
# Back-off between attempts to reach a lost database.
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 5.0
# Changes read per query; more are read at once, in further queries.
BATCH = 1000
STOP_TIMEOUT_S = 10.0

log = logger.bind(actor="cryptosaur")

# Where each owner's feed had read up to; outlives a feed (and the Cryptosaur
# instance that ran it) but not the owner.
_positions: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()


def store_label(settings: StoreSettings) -> str:
    """Where the store is, for log lines (never a password)."""
    if settings.store == "sqlite":
        return str(settings.data_dir)
    return describe_url(settings.store)


class ChangeFeed:
    """A thread that announces certificate changes made by other processes."""

    def __init__(
        self,
        settings: StoreSettings,
        on_foreign: Callable[[list[str]], None],
        *,
        start_seq: int | None = None,
        open_backend: Callable[[StoreSettings], Backend] | None = None,
        owner: object | None = None,
    ) -> None:
        """Prepare the feed; ``start`` runs it.

        Args:
            settings: the store settings (``config.arcology``).
            on_foreign: called in the feed's thread with the domains another
                process changed (deduplicated, in the order of the changes).
            start_seq: the sequence number already known (Cryptosaur reads it
                when it opens the store); None means the current last one.
            open_backend: opens a backend (tests pass their own).
            owner: what the position belongs to (Cryptosaur passes its
                runtime): a feed started again for the same owner, after a
                crash and restart of Cryptosaur, resumes where the last one
                stopped, so a change made meanwhile is still announced.
        """
        if open_backend is None:
            from arc.store import open_backend as default_open

            def unchecked(settings: StoreSettings) -> Backend:
                # Cryptosaur checked the file when it opened the store; a
                # second full read here, concurrent with the first handshakes,
                # would only compete with them for the CPU.
                return default_open(settings, check=False)

            open_backend = unchecked

        self.settings = settings
        self.where = store_label(settings)
        self._owner = owner
        if owner is not None and owner in _positions:
            start_seq = _positions[owner]
        self.last_seq = start_seq
        self._on_foreign = on_foreign
        self._open_backend = open_backend
        self._backend: Backend | None = None
        self._own: set[int] = set()
        self._own_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.outage_since: float | None = None
        self.announced = 0  # domains announced so far, for tests and status

    # -- life ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the feed thread."""
        self._thread = threading.Thread(
            target=self._run, name="arc-changefeed", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close its backend."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("change feed did not stop in time store={w}", w=self.where)

    # -- own writes -------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[Callable[[Iterable[int]], None]]:
        """Hold around a write of this process; call the mark with its seqs."""
        with self._own_lock:
            yield self._own.update

    # -- the loop ---------------------------------------------------------------

    def _run(self) -> None:
        backoff = FIRST_BACKOFF_S
        next_safety_read = 0.0
        while not self._stop.is_set():
            try:
                backend = self._connected()
                self._read_all(backend)
                if self.outage_since is not None:
                    log.info(
                        "certificate store reachable again store={w} outage_s={d:.1f} "
                        "seq={s}",
                        w=self.where,
                        d=time.monotonic() - self.outage_since,
                        s=self.last_seq,
                    )
                    self.outage_since = None
                backoff = FIRST_BACKOFF_S
                next_safety_read = time.monotonic() + SAFETY_READ_S

                # Wait for the next change (or a reason to read anyway).
                while not self._stop.is_set():
                    if isinstance(backend, PostgresBackend):
                        if backend.wait_for_change(WAIT_S):
                            break
                        if time.monotonic() >= next_safety_read:
                            break
                    else:
                        self._stop.wait(SQLITE_POLL_S)
                        break
            except Exception as exc:
                self._lost(exc)
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
        self._close()

    def _connected(self) -> Backend:
        if self._backend is None:
            backend = self._open_backend(self.settings)
            try:
                if isinstance(backend, PostgresBackend):
                    backend.listen()
                if self.last_seq is None:
                    self.last_seq = backend.current_seq()
                else:
                    self._check_position(backend)
                self._remember()
            except BaseException:
                backend.close()
                raise
            self._backend = backend
        return self._backend

    def _check_position(self, backend: Backend) -> None:
        # The changes after the feed's position must all still be there: not
        # when the database is not the one it read (restored from a backup,
        # or a new one: its sequence is behind the position), nor when
        # changes it never read were pruned meanwhile (a process away for
        # longer than the store keeps them). Then every domain is announced.
        current = backend.current_seq()
        if self.last_seq is None:
            return
        if current < self.last_seq:
            why = "start over (restored or replaced)"
        elif backend.pruned_through() > self.last_seq:
            why = "were pruned before they were read"
        else:
            return
        domains = [row["domain"] for row in backend.list()]
        log.warning(
            "certificate store changes {why}; announcing every domain "
            "store={w} seq={s} last_seq={l} domains={n}",
            why=why,
            w=self.where,
            s=current,
            l=self.last_seq,
            n=len(domains),
        )
        self.last_seq = current
        with self._own_lock:
            self._own.clear()
        if domains:
            self._announce(domains)

    def _read_all(self, backend: Backend) -> None:
        while not self._stop.is_set():
            assert self.last_seq is not None
            changes = backend.changes_since(self.last_seq, BATCH)
            if not changes:
                return
            self._handle(changes)
            if len(changes) < BATCH:
                return

    def _handle(self, changes: Changes) -> None:
        foreign: list[str] = []
        seen: set[str] = set()
        with self._own_lock:
            for seq, domain in changes:
                if seq in self._own:
                    self._own.discard(seq)
                elif domain not in seen:
                    seen.add(domain)
                    foreign.append(domain)
            self.last_seq = changes[-1][0]
            self._remember()
            # Marks below the position can never match again.
            self._own = {s for s in self._own if s > self.last_seq}
        if foreign:
            log.debug(
                "changes from another process domains={d} seq={s}",
                d=",".join(foreign[:20]) + (",..." if len(foreign) > 20 else ""),
                s=self.last_seq,
            )
            self._announce(foreign)

    def _remember(self) -> None:
        if self._owner is not None and self.last_seq is not None:
            _positions[self._owner] = self.last_seq

    def _announce(self, domains: list[str]) -> None:
        try:
            self._on_foreign(domains)
            self.announced += len(domains)
        except Exception:
            log.exception("announcing changes failed domains={n}", n=len(domains))

    def _lost(self, exc: Exception) -> None:
        self._close()
        # The driver's own words name the cause; the store is named already.
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        reason = cause.message if isinstance(cause, ArcError) else f"{cause}"
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            log.warning(
                "certificate store unreachable; serving cached certificates and "
                "retrying store={w} reason={r}",
                w=self.where,
                r=reason.splitlines()[0] if reason else type(exc).__name__,
            )
        else:
            log.debug("certificate store still unreachable reason={r}", r=reason)

    def _close(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            with contextlib.suppress(Exception):
                backend.close()
