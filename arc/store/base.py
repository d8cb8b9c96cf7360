"""What a certificate store is, apart from where it keeps its rows.

Two layers, so that a second database can be added without touching the
cryptography:

- ``Store`` is what Cryptosaur uses: bundles in, chains and plaintext keys
  out. ``arc.store.sealed.SealedStore`` is the one implementation; it seals
  every private key with the master key before handing it down.
- ``Backend`` is what a database implements: rows in which the private key is
  already an opaque sealed blob (``CertificateRecord.key_sealed``). SQLite is
  ``arc.store.sqlite``; a PostgreSQL backend implements the same methods with
  the same semantics (each write one transaction; ``changes`` ordered by a
  sequence that only grows).

The data model, for any backend: a *certificate* row per leaf fingerprint
(chain, sealed key, what a summary shows) and a *domain* row per domain
pointing at one certificate. Putting a bundle points every domain of the
bundle at its certificate in one transaction; a certificate no domain points
at any more is removed in that same transaction. Every domain written or
deleted adds a row to *changes* with the next sequence number, which is how
other processes (and other nodes) learn what to drop from their caches.

A backend may also offer ``expiring(before)`` (same shape as
``Store.expiring``) to answer the daily expiry check from an index;
``SealedStore`` filters ``list()`` for a backend without it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from arc.bundle import Bundle

# Aliases, because a method named ``list`` hides the builtin in class bodies.
Domains = list[str]
Summaries = list[dict[str, Any]]
Changes = list[tuple[int, str]]
# (fingerprint, sealed private key) rows, for re-sealing under a new key.
SealedKeys = list[tuple[str, bytes]]
# The meta entry holding the highest change sequence number pruned.
PRUNED_THROUGH = "changes_pruned_through"

# The columns of a certificate row in ``CertificateRecord`` order, for a
# query that joins the certificates table as ``c``; ``record_from_row`` reads
# a row selected with them.
RECORD_COLUMNS = (
    "c.fingerprint, c.chain_pem, c.key_sealed, c.not_before, c.not_after, "
    "c.issuer, c.subject, c.key_type, c.chain_length, c.reordered, c.stored_at"
)
# The columns ``summaries_from_rows`` reads, for a query that joins the
# domains table as ``d`` with the certificates table as ``c``.
SUMMARY_COLUMNS = (
    "d.domain, c.fingerprint, c.not_before, c.not_after, "
    "c.issuer, c.subject, c.key_type, c.chain_length, c.reordered, "
    "c.stored_at"
)


@dataclass(frozen=True)
class CertificateRecord:
    """One certificate as a backend stores it (the key already sealed)."""

    fingerprint: str
    chain_pem: bytes
    key_sealed: bytes
    not_before: dt.datetime
    not_after: dt.datetime
    issuer: str
    subject: str
    key_type: str
    chain_length: int
    reordered: bool
    stored_at: dt.datetime


@dataclass(frozen=True)
class StoredCertificate:
    """What ``Store.get`` gives: the chain and the plaintext key for a domain."""

    domain: str
    fingerprint: str
    chain_pem: bytes
    key_pem: bytes
    not_before: dt.datetime
    not_after: dt.datetime
    issuer: str
    subject: str
    key_type: str
    chain_length: int
    reordered: bool
    stored_at: dt.datetime

    def __repr__(self) -> str:
        # Never print the key, even by accident in a traceback or a log line.
        return (
            f"StoredCertificate(domain={self.domain!r}, "
            f"fingerprint={self.fingerprint!r}, not_after={self.not_after.isoformat()})"
        )


class Backend(Protocol):
    """Rows of certificates, domains and changes in one database."""

    def get(self, domain: str) -> CertificateRecord | None:
        """The certificate stored for exactly ``domain``."""
        ...

    def put(self, record: CertificateRecord, domains: Domains) -> tuple[int, Domains]:
        """Point ``domains`` at ``record`` in one transaction.

        Returns the sequence number of the last change written and the
        fingerprints the domains pointed at before (distinct, in order).
        """
        ...

    def delete(self, domain: str) -> Domains:
        """Delete the certificate ``domain`` points at, with all its domains.

        Returns the deleted domains, sorted; empty when ``domain`` had none.
        """
        ...

    def list(self) -> Summaries:
        """One summary per domain, sorted by domain (no keys)."""
        ...

    def domains_of(self, fingerprint: str) -> Domains:
        """The domains pointing at the certificate ``fingerprint``, sorted."""
        ...

    def changes_since(self, seq: int, limit: int = 1000) -> Changes:
        """Changes after ``seq`` as (seq, domain), oldest first."""
        ...

    def current_seq(self) -> int:
        """The sequence number of the last change (0 for none)."""
        ...

    def prune_changes(self, before: dt.datetime) -> int:
        """Delete changes made before ``before``, never the newest; the count.

        The highest sequence number deleted is kept (``pruned_through``), so
        a reader whose position is below it knows it missed changes.
        """
        ...

    def pruned_through(self) -> int:
        """The highest sequence number ever pruned (0 for none)."""
        ...

    def sealed_keys(self, after: str, limit: int) -> SealedKeys:
        """(fingerprint, sealed key) of certificates after ``after``, in order."""
        ...

    def replace_sealed(self, rows: Sequence[tuple[str, bytes, bytes]]) -> int:
        """Swap each (fingerprint, old sealed key, new sealed key) in one
        transaction, where the old one is still in place; the count swapped."""
        ...

    def get_meta(self, name: str) -> bytes | None:
        """A value the store keeps about itself (the master key check)."""
        ...

    def set_meta(self, name: str, value: bytes) -> None:
        """Keep a value about the store."""
        ...

    def close(self) -> None:
        """Release the database; later calls fail."""
        ...


class Store(Protocol):
    """The certificate store as Cryptosaur sees it."""

    def get(self, domain: str) -> StoredCertificate | None:
        """The certificate stored for exactly ``domain`` (no wildcard lookup)."""
        ...

    def put(self, bundle: Bundle) -> tuple[int, Domains]:
        """Store ``bundle`` for all its domains at once.

        Returns the change sequence number and the fingerprints replaced.
        """
        ...

    def delete(self, domain: str) -> Domains:
        """Delete the certificate of ``domain`` with every domain it serves."""
        ...

    def list(self) -> Summaries:
        """One summary per domain, sorted by domain."""
        ...

    def domains_of(self, fingerprint: str) -> Domains:
        """The domains pointing at the certificate ``fingerprint``, sorted."""
        ...

    def expiring(self, before: dt.datetime) -> Summaries:
        """Certificates ending before ``before`` as ``{fingerprint, not_after,
        domains}``, soonest first."""
        ...

    def changes_since(self, seq: int, limit: int = 1000) -> Changes:
        """Changes after ``seq`` as (seq, domain), oldest first."""
        ...

    def current_seq(self) -> int:
        """The sequence number of the last change (0 for none)."""
        ...

    def prune_changes(self, before: dt.datetime) -> int:
        """Delete changes made before ``before``, never the newest; the count.

        The highest sequence number deleted is kept (``pruned_through``), so
        a reader whose position is below it knows it missed changes.
        """
        ...

    def pruned_through(self) -> int:
        """The highest sequence number ever pruned (0 for none)."""
        ...

    def reseal(self) -> int:
        """Seal every private key with the first master key; the count."""
        ...

    def close(self) -> None:
        """Release the store."""
        ...


# -- rows into values, for every backend ------------------------------------------
#
# A backend reads its timestamps in its own form (SQLite keeps ISO 8601 text,
# PostgreSQL gives datetimes), so each passes the function that turns one of
# its stored timestamps into a ``datetime`` or into ISO 8601 UTC text.


def record_from_row(
    row: Sequence[Any], moment: Callable[[Any], dt.datetime]
) -> CertificateRecord:
    """The record of a row selected with ``RECORD_COLUMNS``."""
    return CertificateRecord(
        fingerprint=row[0],
        chain_pem=bytes(row[1]),
        key_sealed=bytes(row[2]),
        not_before=moment(row[3]),
        not_after=moment(row[4]),
        issuer=row[5],
        subject=row[6],
        key_type=row[7],
        chain_length=int(row[8]),
        reordered=bool(row[9]),
        stored_at=moment(row[10]),
    )


def summaries_from_rows(
    rows: Sequence[Sequence[Any]], iso_z: Callable[[Any], str]
) -> Summaries:
    """One summary per row selected with ``SUMMARY_COLUMNS``, in row order.

    ``domains`` of each summary lists every domain of the rows that points at
    the same certificate, in row order.
    """
    by_fingerprint: dict[str, list[str]] = {}
    for row in rows:
        by_fingerprint.setdefault(row[1], []).append(row[0])
    return [
        {
            "domain": row[0],
            "domains": by_fingerprint[row[1]],
            "fingerprint": row[1],
            "not_before": iso_z(row[2]),
            "not_after": iso_z(row[3]),
            "issuer": row[4],
            "subject": row[5],
            "key_type": row[6],
            "chain_length": row[7],
            "reordered": bool(row[8]),
            "stored_at": iso_z(row[9]),
        }
        for row in rows
    ]


def expiring_from_rows(
    rows: Iterable[Sequence[Any]], iso_z: Callable[[Any], str]
) -> Summaries:
    """``Store.expiring`` entries from (fingerprint, not_after, domain) rows.

    One entry per fingerprint, in the order the rows first name it, with its
    domains in row order.
    """
    found: dict[str, dict[str, Any]] = {}
    for fingerprint, not_after, domain in rows:
        entry = found.setdefault(
            fingerprint,
            {
                "fingerprint": fingerprint,
                "not_after": iso_z(not_after),
                "domains": [],
            },
        )
        entry["domains"].append(domain)
    return list(found.values())
