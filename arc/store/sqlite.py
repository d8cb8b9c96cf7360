"""The SQLite backend: one file in the data directory, shared by processes.

How this works: the file (``certificates.sqlite3``) is opened in WAL mode, so
readers in other processes never wait for a writer, with
``synchronous=FULL``: when ``put`` or ``delete`` returns, the transaction is
in the WAL and fsynced, so an acknowledged upload survives a crash or a
power cut. Every write is one ``BEGIN IMMEDIATE ... COMMIT``; on any error it
is rolled back and nothing is changed.

Opening does only cheap work besides the integrity check: no row is read into
memory (100,000 domains open in well under a second; see
``scripts/bench_store.py``). ``PRAGMA quick_check`` runs on every open
(unless the opener asks otherwise: the change feed, which only reads the
changes table of a file Cryptosaur has just checked) and a damaged file is
refused with a message that names it.

The schema version lives in ``PRAGMA user_version``. ``MIGRATIONS[n]`` takes
a store from version n-1 to n inside one transaction; a file written by a
newer Arcology (a higher version than this code knows) is refused rather than
guessed at.

Files are created mode 0600 (SQLite gives the ``-wal`` and ``-shm`` files the
database file's mode) in a data directory of mode 0700.

The changes table is pruned by ``prune_changes`` (Cryptosaur calls it daily
with ``CHANGES_KEPT_DAYS``); the newest row always stays, so the sequence
never appears to start over, and the highest pruned number is kept in
``meta`` (``PRUNED_THROUGH``) for readers that fell behind it.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

from arc.bundle import iso_utc
from arc.errors import ConfigError, Internal
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

FILE_NAME = "certificates.sqlite3"
# Another process holding the write lock (an upload there) finishes in
# milliseconds; this only bounds a stuck one.
BUSY_TIMEOUT_S = 5.0

MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE certificates (
            fingerprint TEXT PRIMARY KEY,
            chain_pem BLOB NOT NULL,
            key_sealed BLOB NOT NULL,
            not_before TEXT NOT NULL,
            not_after TEXT NOT NULL,
            issuer TEXT NOT NULL,
            subject TEXT NOT NULL,
            key_type TEXT NOT NULL,
            chain_length INTEGER NOT NULL,
            reordered INTEGER NOT NULL,
            stored_at TEXT NOT NULL
        )""",
        """CREATE TABLE domains (
            domain TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL REFERENCES certificates (fingerprint),
            updated_at TEXT NOT NULL
        )""",
        "CREATE INDEX domains_by_fingerprint ON domains (fingerprint)",
        """CREATE TABLE changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            domain TEXT NOT NULL,
            fingerprint TEXT,
            changed_at TEXT NOT NULL
        )""",
        """CREATE TABLE meta (
            name TEXT PRIMARY KEY,
            value BLOB NOT NULL
        )""",
    ],
    # The daily expiry check reads only the certificates near their end.
    2: ["CREATE INDEX certificates_by_not_after ON certificates (not_after)"],
}
SCHEMA_VERSION = max(MIGRATIONS)


def _text(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat()


def _moment(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def _iso_z(text: str) -> str:
    return iso_utc(_moment(text))


class SqliteBackend:
    """Certificates, domains and changes in one SQLite file."""

    def __init__(self, path: Path, *, check: bool = True) -> None:
        """Open (and create, or migrate) the store file at ``path``.

        Args:
            path: the database file.
            check: run ``PRAGMA quick_check`` first. It reads the whole file
                (about 200 ms of CPU for 100,000 domains); a second
                connection of a process that has checked the file already
                skips it.
        """
        self.path = path
        self._lock = threading.Lock()
        self._db = self._open(path, check)

    # -- opening ----------------------------------------------------------------

    def _open(self, path: Path, check: bool) -> sqlite3.Connection:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(
                path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
            # Never open and close the file ourselves: closing any descriptor
            # of it drops every POSIX lock this process holds on it, including
            # those of other connections (the change feed's), after which a
            # closing connection may think it is the last and remove the WAL
            # under the others. chmod needs no descriptor. SQLite creates the
            # -wal and -shm files with the database file's mode, so this
            # comes before WAL mode is switched on.
            if stat.S_IMODE(path.stat().st_mode) != 0o600:
                os.chmod(path, 0o600)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(
                f"certificate store {path} cannot be opened ({exc})"
            ) from exc
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise ConfigError(
                    f"certificate store {path}: cannot switch to WAL mode "
                    f"(journal_mode is {mode})"
                )
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            problems = (
                [row[0] for row in db.execute("PRAGMA quick_check")]
                if check
                else ["ok"]
            )
            if problems != ["ok"]:
                raise Internal(
                    f"certificate store {path} is damaged (quick_check: "
                    f"{'; '.join(problems[:3])}); restore it from a backup"
                )
            self._migrate(db, path)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise Internal(
                f"certificate store {path} is not a readable SQLite database "
                f"({exc}); restore it from a backup or move it away"
            ) from exc
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _migrate(db: sqlite3.Connection, path: Path) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"certificate store {path} has schema version {version}, newer "
                f"than this Arcology knows ({SCHEMA_VERSION}); run a newer Arcology"
            )
        if version == SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while this one waited.
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {target:d}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- reads ------------------------------------------------------------------

    def get(self, domain: str) -> CertificateRecord | None:
        """The certificate stored for exactly ``domain``."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {RECORD_COLUMNS} FROM domains d "
                "JOIN certificates c ON c.fingerprint = d.fingerprint "
                "WHERE d.domain = ?",
                (domain,),
            ).fetchone()
        return None if row is None else record_from_row(row, _moment)

    def list(self) -> Summaries:
        """One summary per domain, sorted by domain."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {SUMMARY_COLUMNS} FROM domains d "
                "JOIN certificates c ON c.fingerprint = d.fingerprint "
                "ORDER BY d.domain"
            ).fetchall()
        return summaries_from_rows(rows, _iso_z)

    def expiring(self, before: dt.datetime) -> Summaries:
        """Certificates ending before ``before``: fingerprint, not_after, domains.

        Soonest first. Reads the ``not_after`` index, not the whole table.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT c.fingerprint, c.not_after, d.domain FROM certificates c "
                "JOIN domains d ON d.fingerprint = c.fingerprint "
                "WHERE c.not_after < ? ORDER BY c.not_after, c.fingerprint, d.domain",
                (_text(before.replace(microsecond=0)),),
            ).fetchall()
        return expiring_from_rows(rows, _iso_z)

    def domains_of(self, fingerprint: str) -> Domains:
        """The domains pointing at the certificate ``fingerprint``, sorted."""
        with self._lock:
            rows = self._db.execute(
                "SELECT domain FROM domains WHERE fingerprint = ? ORDER BY domain",
                (fingerprint,),
            ).fetchall()
        return [str(row[0]) for row in rows]

    def changes_since(self, seq: int, limit: int = 1000) -> Changes:
        """Changes after ``seq`` as (seq, domain), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, domain FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall()
        return [(int(s), str(d)) for s, d in rows]

    def current_seq(self) -> int:
        """The sequence number of the last change (0 for none)."""
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM changes").fetchone()
        return int(row[0] or 0)

    def sealed_keys(self, after: str, limit: int) -> SealedKeys:
        """(fingerprint, sealed key) of certificates after ``after``, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT fingerprint, key_sealed FROM certificates "
                "WHERE fingerprint > ? ORDER BY fingerprint LIMIT ?",
                (after, limit),
            ).fetchall()
        return [(str(f), bytes(k)) for f, k in rows]

    def replace_sealed(self, rows: Sequence[tuple[str, bytes, bytes]]) -> int:
        """Swap sealed keys still in place, in one transaction; the count."""
        swapped = 0
        with self._lock, self._transaction():
            for fingerprint, old, new in rows:
                done = self._db.execute(
                    "UPDATE certificates SET key_sealed = ? "
                    "WHERE fingerprint = ? AND key_sealed = ?",
                    (new, fingerprint, old),
                )
                swapped += done.rowcount
        return swapped

    def pruned_through(self) -> int:
        """The highest sequence number ever pruned (0 for none)."""
        value = self.get_meta(PRUNED_THROUGH)
        return int(value) if value else 0

    def get_meta(self, name: str) -> bytes | None:
        """A value the store keeps about itself."""
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM meta WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else bytes(row[0])

    # -- writes -----------------------------------------------------------------

    def set_meta(self, name: str, value: bytes) -> None:
        """Keep a value about the store (one transaction)."""
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    def prune_changes(self, before: dt.datetime) -> int:
        """Delete changes made before ``before``, never the newest; the count."""
        with self._lock, self._transaction():
            db = self._db
            row = db.execute(
                "SELECT MAX(seq) FROM changes WHERE changed_at < ? "
                "AND seq < (SELECT MAX(seq) FROM changes)",
                (_text(before),),
            ).fetchone()
            through = row[0]
            if through is None:
                return 0
            deleted = db.execute("DELETE FROM changes WHERE seq <= ?", (through,))
            db.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value "
                "WHERE CAST(meta.value AS INTEGER) < CAST(excluded.value AS INTEGER)",
                (PRUNED_THROUGH, str(int(through)).encode("ascii")),
            )
            return int(deleted.rowcount)

    def put(self, record: CertificateRecord, domains: Domains) -> tuple[int, Domains]:
        """Point ``domains`` at ``record`` in one transaction."""
        now = _text(record.stored_at)
        with self._lock, self._transaction():
            db = self._db
            db.execute(
                "INSERT INTO certificates (fingerprint, chain_pem, key_sealed, "
                "not_before, not_after, issuer, subject, key_type, chain_length, "
                "reordered, stored_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (fingerprint) DO UPDATE SET "
                "chain_pem = excluded.chain_pem, key_sealed = excluded.key_sealed, "
                "chain_length = excluded.chain_length, "
                "reordered = excluded.reordered, stored_at = excluded.stored_at",
                (
                    record.fingerprint,
                    record.chain_pem,
                    record.key_sealed,
                    _text(record.not_before),
                    _text(record.not_after),
                    record.issuer,
                    record.subject,
                    record.key_type,
                    record.chain_length,
                    int(record.reordered),
                    now,
                ),
            )

            # Repoint each domain, remembering what it pointed at.
            replaced: Domains = []
            seq = 0
            for domain in domains:
                old = db.execute(
                    "SELECT fingerprint FROM domains WHERE domain = ?", (domain,)
                ).fetchone()
                if old is not None and old[0] not in replaced:
                    replaced.append(old[0])
                db.execute(
                    "INSERT INTO domains (domain, fingerprint, updated_at) "
                    "VALUES (?, ?, ?) ON CONFLICT (domain) DO UPDATE SET "
                    "fingerprint = excluded.fingerprint, "
                    "updated_at = excluded.updated_at",
                    (domain, record.fingerprint, now),
                )
                cursor = db.execute(
                    "INSERT INTO changes (domain, fingerprint, changed_at) "
                    "VALUES (?, ?, ?)",
                    (domain, record.fingerprint, now),
                )
                seq = int(cursor.lastrowid or 0)

            # A certificate no domain points at any more goes with this write.
            for fingerprint in replaced:
                if fingerprint != record.fingerprint:
                    self._drop_if_unused(fingerprint)
        return seq, replaced

    def delete(self, domain: str) -> Domains:
        """Delete the certificate ``domain`` points at, with all its domains."""
        now = _text(dt.datetime.now(dt.UTC))
        with self._lock, self._transaction():
            db = self._db
            row = db.execute(
                "SELECT fingerprint FROM domains WHERE domain = ?", (domain,)
            ).fetchone()
            if row is None:
                return []
            fingerprint = row[0]
            deleted = [
                str(r[0])
                for r in db.execute(
                    "SELECT domain FROM domains WHERE fingerprint = ? ORDER BY domain",
                    (fingerprint,),
                )
            ]
            db.execute("DELETE FROM domains WHERE fingerprint = ?", (fingerprint,))
            db.execute("DELETE FROM certificates WHERE fingerprint = ?", (fingerprint,))
            db.executemany(
                "INSERT INTO changes (domain, fingerprint, changed_at) "
                "VALUES (?, NULL, ?)",
                [(d, now) for d in deleted],
            )
        return deleted

    def _drop_if_unused(self, fingerprint: str) -> None:
        self._db.execute(
            "DELETE FROM certificates WHERE fingerprint = ? AND NOT EXISTS "
            "(SELECT 1 FROM domains WHERE domains.fingerprint = ?)",
            (fingerprint, fingerprint),
        )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def close(self) -> None:
        """Close the file; the last process to close folds the WAL back in."""
        with self._lock:
            self._db.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if kind is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
