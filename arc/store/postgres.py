"""The PostgreSQL backend: one database shared by every node of a cluster.

How this works: the same rows as the SQLite backend (certificates, domains,
changes, meta) in tables prefixed ``arc_``, reached over one psycopg
connection in autocommit mode; each ``put``, ``delete`` and ``set_meta`` is
one explicit transaction, so a write is all or nothing and a reader on any
node sees the old certificate or the new one, never a mix. Private keys
arrive sealed (``arc.store.sealed``): the database never holds a plaintext
key, and every node must read the same ``master_key_file``.

The change sequence. ``arc_changes.seq`` is a BIGSERIAL, and a sequence
hands out numbers in the order transactions *ask* for them, not the order
they commit: with two writers, seq 6 could be visible before seq 5, and a
reader that moved past 6 would never see 5. So every write first takes one
transaction-scoped advisory lock (``WRITE_LOCK``): writers run one at a
time, and a change row is visible only after every smaller one. Certificate
writes are rare and take milliseconds, so the queue costs nothing real.

Telling other nodes. The same transaction runs ``pg_notify`` on
``NOTIFY_CHANNEL`` with the last sequence number; PostgreSQL delivers it at
commit, and only then. A change feed (``arc.changefeed``) opens its own
backend, calls ``listen`` and ``wait_for_change``, and reads
``changes_since`` — a notification is a wake-up, the rows are the truth, so
a lost notification (a dropped connection) costs only latency.

Migrations. ``MIGRATIONS[n]`` takes the schema from version n-1 to n. They
run in one transaction holding ``SCHEMA_LOCK``, so two nodes starting at the
same moment do not both create the tables: the second waits, then finds the
schema current. A database at a newer version than this code is refused.

Failures. A connection that breaks (the server stopped, the network gone)
is closed and every call raises ``Busy`` naming the database (never its
password) until a new connection succeeds; connecting again is tried at most
every ``RECONNECT_PAUSE_S`` so a caller in a loop cannot hammer a dead host.
Nothing is cached here: serving from memory during an outage is Esper's job.

The changes table is pruned as in the SQLite backend (``prune_changes``,
the newest row kept, the highest pruned number in ``arc_meta``); several
nodes pruning at once delete the same rows under the write lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import psycopg
from loguru import logger

from arc.bundle import iso_utc
from arc.errors import Busy, ConfigError, Internal
from arc.store.base import (
    PRUNED_THROUGH,
    RECORD_COLUMNS,
    SUMMARY_COLUMNS,
    CertificateRecord,
    Changes,
    Domains,
    SealedKeys,
    Summaries,
    expiring_from_rows,
    record_from_row,
    summaries_from_rows,
)

T = TypeVar("T")

NOTIFY_CHANNEL = "arcology_changes"
# Advisory lock keys (any two distinct 64-bit numbers; these spell "ARCSCHEM"
# and "ARCWRITE" in ASCII, so they are recognisable in pg_locks).
SCHEMA_LOCK = 0x4152435343484D
WRITE_LOCK = 0x41524357524954
# A refused connection fails at once; this bounds a host that does not answer.
CONNECT_TIMEOUT_S = 3
# After a failed connection, calls fail fast for this long before trying again.
RECONNECT_PAUSE_S = 0.5
# No statement of this backend takes more than milliseconds; a stuck one
# (a lock held by a crashed client) must not hang Cryptosaur.
STATEMENT_TIMEOUT_MS = 10_000
# Keepalives notice a silently dead peer (a node cut off by the network)
# within about idle + interval * count = 11 s.
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 3

MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE arc_certificates (
            fingerprint TEXT PRIMARY KEY,
            chain_pem BYTEA NOT NULL,
            key_sealed BYTEA NOT NULL,
            not_before TIMESTAMPTZ NOT NULL,
            not_after TIMESTAMPTZ NOT NULL,
            issuer TEXT NOT NULL,
            subject TEXT NOT NULL,
            key_type TEXT NOT NULL,
            chain_length INTEGER NOT NULL,
            reordered BOOLEAN NOT NULL,
            stored_at TIMESTAMPTZ NOT NULL
        )""",
        """CREATE TABLE arc_domains (
            domain TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL REFERENCES arc_certificates (fingerprint),
            updated_at TIMESTAMPTZ NOT NULL
        )""",
        "CREATE INDEX arc_domains_by_fingerprint ON arc_domains (fingerprint)",
        """CREATE TABLE arc_changes (
            seq BIGSERIAL PRIMARY KEY,
            domain TEXT NOT NULL,
            fingerprint TEXT,
            changed_at TIMESTAMPTZ NOT NULL
        )""",
        """CREATE TABLE arc_meta (
            name TEXT PRIMARY KEY,
            value BYTEA NOT NULL
        )""",
    ],
    2: ["CREATE INDEX arc_certificates_by_not_after ON arc_certificates (not_after)"],
}
SCHEMA_VERSION = max(MIGRATIONS)

log = logger.bind(actor="cryptosaur")


def describe_url(url: str) -> str:
    """``host:port/dbname`` of a database URL, without user or password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "the configured database"
    name = parts.path.lstrip("/") or "(default database)"
    return f"{host}:{port}/{name}"


def _as_moment(value: dt.datetime) -> dt.datetime:
    # psycopg gives TIMESTAMPTZ columns as aware datetimes already.
    return value


class PostgresBackend:
    """Certificates, domains and changes in one PostgreSQL database."""

    def __init__(self, url: str, *, connect_timeout_s: float = CONNECT_TIMEOUT_S):
        self.url = url
        self.where = describe_url(url)
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._listening = False
        self._retry_at = 0.0
        self._closed = False
        # The first connection also brings the schema up to date; failing
        # here fails the start, which names the database.
        with self._lock:
            self._connection()

    # -- connection ---------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        """The live connection, connecting (and migrating) if there is none."""
        if self._closed:
            raise Internal(f"certificate store {self.where} is closed")
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if time.monotonic() < self._retry_at:
            raise Busy(f"certificate store {self.where} is unreachable; retry shortly")
        try:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=max(1, round(self._connect_timeout_s)),
                application_name="arcology",
                keepalives=1,
                keepalives_idle=KEEPALIVE_IDLE_S,
                keepalives_interval=KEEPALIVE_INTERVAL_S,
                keepalives_count=KEEPALIVE_COUNT,
            )
        except psycopg.Error as exc:
            self._retry_at = time.monotonic() + RECONNECT_PAUSE_S
            raise self._unreachable(exc) from exc
        try:
            conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS:d}")
            self._migrate(conn)
            if self._listening:
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS arc_schema ("
                "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
            )
            row = conn.execute("SELECT MAX(version) FROM arc_schema").fetchone()
            version = int(row[0] or 0) if row else 0
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"certificate store {self.where} has schema version "
                    f"{version}, newer than this Arcology knows ({SCHEMA_VERSION}); "
                    "run a newer Arcology"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO arc_schema (version, applied_at) VALUES (%s, now())",
                    (target,),
                )
                log.info(
                    "store schema migrated store={w} version={v}",
                    w=self.where,
                    v=target,
                )

    def _run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run ``work`` on the connection; a broken connection becomes Busy."""
        with self._lock:
            conn = self._connection()
            try:
                return work(conn)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                # The connection is gone or unusable: drop it, the next call
                # connects afresh. The write, if any, was rolled back.
                self._drop()
                raise self._unreachable(exc) from exc

    def _unreachable(self, exc: BaseException) -> Busy:
        """The error for a call that could not reach the database, with why."""
        return Busy(
            f"certificate store {self.where} is unreachable "
            f"({_reason(exc)}); retry shortly"
        )

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def close(self) -> None:
        """Close the connection; later calls fail."""
        with self._lock:
            self._closed = True
            self._drop()

    # -- reads --------------------------------------------------------------------

    def get(self, domain: str) -> CertificateRecord | None:
        """The certificate stored for exactly ``domain``."""

        def work(conn: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
            return conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM arc_domains d "
                "JOIN arc_certificates c ON c.fingerprint = d.fingerprint "
                "WHERE d.domain = %s",
                (domain,),
            ).fetchone()

        row = self._run(work)
        return None if row is None else record_from_row(row, _as_moment)

    def list(self) -> Summaries:
        """One summary per domain, sorted by domain."""

        def work(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return conn.execute(
                f"SELECT {SUMMARY_COLUMNS} FROM arc_domains d "
                "JOIN arc_certificates c ON c.fingerprint = d.fingerprint "
                'ORDER BY d.domain COLLATE "C"'
            ).fetchall()

        rows = self._run(work)
        return summaries_from_rows(rows, iso_utc)

    def expiring(self, before: dt.datetime) -> Summaries:
        """Certificates ending before ``before``: fingerprint, not_after, domains.

        Soonest first. Reads the ``not_after`` index, not the whole table.
        """

        def work(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT c.fingerprint, c.not_after, d.domain FROM arc_certificates c "
                "JOIN arc_domains d ON d.fingerprint = c.fingerprint "
                "WHERE c.not_after < %s "
                'ORDER BY c.not_after, c.fingerprint, d.domain COLLATE "C"',
                (before.replace(microsecond=0),),
            ).fetchall()

        return expiring_from_rows(self._run(work), iso_utc)

    def domains_of(self, fingerprint: str) -> Domains:
        """The domains pointing at the certificate ``fingerprint``, sorted."""

        def work(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT domain FROM arc_domains WHERE fingerprint = %s "
                'ORDER BY domain COLLATE "C"',
                (fingerprint,),
            ).fetchall()

        return [str(row[0]) for row in self._run(work)]

    def changes_since(self, seq: int, limit: int = 1000) -> Changes:
        """Changes after ``seq`` as (seq, domain), oldest first."""

        def work(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT seq, domain FROM arc_changes WHERE seq > %s "
                "ORDER BY seq LIMIT %s",
                (seq, limit),
            ).fetchall()

        return [(int(s), str(d)) for s, d in self._run(work)]

    def current_seq(self) -> int:
        """The sequence number of the last change (0 for none)."""

        def work(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute("SELECT MAX(seq) FROM arc_changes").fetchone()
            return int(row[0] or 0) if row else 0

        return self._run(work)

    def sealed_keys(self, after: str, limit: int) -> SealedKeys:
        """(fingerprint, sealed key) of certificates after ``after``, in order."""

        def work(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT fingerprint, key_sealed FROM arc_certificates "
                "WHERE fingerprint > %s ORDER BY fingerprint LIMIT %s",
                (after, limit),
            ).fetchall()

        return [(str(f), bytes(k)) for f, k in self._run(work)]

    def replace_sealed(self, rows: Sequence[tuple[str, bytes, bytes]]) -> int:
        """Swap sealed keys still in place, in one transaction; the count."""

        def work(conn: psycopg.Connection[Any]) -> int:
            swapped = 0
            with _write_transaction(conn):
                for fingerprint, old, new in rows:
                    done = conn.execute(
                        "UPDATE arc_certificates SET key_sealed = %s "
                        "WHERE fingerprint = %s AND key_sealed = %s",
                        (new, fingerprint, old),
                    )
                    swapped += done.rowcount
            return swapped

        return self._run(work)

    def pruned_through(self) -> int:
        """The highest sequence number ever pruned (0 for none)."""
        value = self.get_meta(PRUNED_THROUGH)
        return int(value) if value else 0

    def get_meta(self, name: str) -> bytes | None:
        """A value the store keeps about itself."""

        def work(conn: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
            return conn.execute(
                "SELECT value FROM arc_meta WHERE name = %s", (name,)
            ).fetchone()

        row = self._run(work)
        return None if row is None else bytes(row[0])

    # -- writes -------------------------------------------------------------------

    def set_meta(self, name: str, value: bytes) -> None:
        """Keep a value about the store (one transaction)."""

        def work(conn: psycopg.Connection[Any]) -> None:
            with _write_transaction(conn):
                conn.execute(
                    "INSERT INTO arc_meta (name, value) VALUES (%s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (name, value),
                )

        self._run(work)

    def prune_changes(self, before: dt.datetime) -> int:
        """Delete changes made before ``before``, never the newest; the count."""

        def work(conn: psycopg.Connection[Any]) -> int:
            with _write_transaction(conn):
                row = conn.execute(
                    "SELECT MAX(seq) FROM arc_changes WHERE changed_at < %s "
                    "AND seq < (SELECT MAX(seq) FROM arc_changes)",
                    (before,),
                ).fetchone()
                through = row[0] if row else None
                if through is None:
                    return 0
                deleted = conn.execute(
                    "DELETE FROM arc_changes WHERE seq <= %s", (through,)
                )
                conn.execute(
                    "INSERT INTO arc_meta (name, value) VALUES (%s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value "
                    "WHERE convert_from(arc_meta.value, 'UTF8')::bigint "
                    "< convert_from(excluded.value, 'UTF8')::bigint",
                    (PRUNED_THROUGH, str(int(through)).encode("ascii")),
                )
                return int(deleted.rowcount)

        return self._run(work)

    def put(self, record: CertificateRecord, domains: Domains) -> tuple[int, Domains]:
        """Point ``domains`` at ``record`` in one transaction."""

        def work(conn: psycopg.Connection[Any]) -> tuple[int, Domains]:
            with _write_transaction(conn):
                conn.execute(
                    "INSERT INTO arc_certificates (fingerprint, chain_pem, "
                    "key_sealed, not_before, not_after, issuer, subject, key_type, "
                    "chain_length, reordered, stored_at) VALUES "
                    "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (fingerprint) DO UPDATE SET "
                    "chain_pem = excluded.chain_pem, "
                    "key_sealed = excluded.key_sealed, "
                    "chain_length = excluded.chain_length, "
                    "reordered = excluded.reordered, stored_at = excluded.stored_at",
                    (
                        record.fingerprint,
                        record.chain_pem,
                        record.key_sealed,
                        record.not_before,
                        record.not_after,
                        record.issuer,
                        record.subject,
                        record.key_type,
                        record.chain_length,
                        record.reordered,
                        record.stored_at,
                    ),
                )

                # Repoint each domain, remembering what it pointed at.
                replaced: Domains = []
                seq = 0
                for domain in domains:
                    old = conn.execute(
                        "SELECT fingerprint FROM arc_domains WHERE domain = %s "
                        "FOR UPDATE",
                        (domain,),
                    ).fetchone()
                    if old is not None and old[0] not in replaced:
                        replaced.append(str(old[0]))
                    conn.execute(
                        "INSERT INTO arc_domains (domain, fingerprint, updated_at) "
                        "VALUES (%s, %s, %s) ON CONFLICT (domain) DO UPDATE SET "
                        "fingerprint = excluded.fingerprint, "
                        "updated_at = excluded.updated_at",
                        (domain, record.fingerprint, record.stored_at),
                    )
                    row = conn.execute(
                        "INSERT INTO arc_changes (domain, fingerprint, changed_at) "
                        "VALUES (%s, %s, %s) RETURNING seq",
                        (domain, record.fingerprint, record.stored_at),
                    ).fetchone()
                    seq = int(row[0]) if row else seq

                # A certificate no domain points at any more goes with this write.
                for fingerprint in replaced:
                    if fingerprint != record.fingerprint:
                        _drop_if_unused(conn, fingerprint)
                _notify(conn, seq)
            return seq, replaced

        return self._run(work)

    def delete(self, domain: str) -> Domains:
        """Delete the certificate ``domain`` points at, with all its domains."""

        def work(conn: psycopg.Connection[Any]) -> Domains:
            with _write_transaction(conn):
                row = conn.execute(
                    "SELECT fingerprint FROM arc_domains WHERE domain = %s",
                    (domain,),
                ).fetchone()
                if row is None:
                    return []
                fingerprint = row[0]
                deleted = [
                    str(r[0])
                    for r in conn.execute(
                        "SELECT domain FROM arc_domains WHERE fingerprint = %s "
                        'ORDER BY domain COLLATE "C"',
                        (fingerprint,),
                    )
                ]
                conn.execute(
                    "DELETE FROM arc_domains WHERE fingerprint = %s", (fingerprint,)
                )
                conn.execute(
                    "DELETE FROM arc_certificates WHERE fingerprint = %s",
                    (fingerprint,),
                )
                seq = 0
                for name in deleted:
                    inserted = conn.execute(
                        "INSERT INTO arc_changes (domain, fingerprint, changed_at) "
                        "VALUES (%s, NULL, now()) RETURNING seq",
                        (name,),
                    ).fetchone()
                    seq = int(inserted[0]) if inserted else seq
                _notify(conn, seq)
            return deleted

        return self._run(work)

    # -- hearing other nodes --------------------------------------------------------

    def listen(self) -> None:
        """Subscribe this connection to change notifications (and reconnects)."""

        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")

        self._listening = True
        self._run(work)

    def wait_for_change(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a change notification; True if one came.

        Only for a backend on which ``listen`` was called, and used by one
        thread (the change feed's): it holds the connection while it waits.
        """

        def work(conn: psycopg.Connection[Any]) -> bool:
            heard = False
            for _notify_message in conn.notifies(timeout=timeout_s, stop_after=1):
                heard = True
            return heard

        return self._run(work)


@contextlib.contextmanager
def _write_transaction(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """One transaction holding ``WRITE_LOCK``: writers run one at a time."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        yield


def _notify(conn: psycopg.Connection[Any], seq: int) -> None:
    # Delivered to listeners at commit, and only if the transaction commits.
    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(seq)))


def _drop_if_unused(conn: psycopg.Connection[Any], fingerprint: str) -> None:
    conn.execute(
        "DELETE FROM arc_certificates WHERE fingerprint = %s AND NOT EXISTS "
        "(SELECT 1 FROM arc_domains WHERE arc_domains.fingerprint = %s)",
        (fingerprint, fingerprint),
    )


def _reason(exc: BaseException) -> str:
    """The first line of a driver error, which names the cause."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
