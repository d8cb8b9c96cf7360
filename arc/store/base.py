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
from dataclasses import dataclass
from typing import Any, Protocol

from arc.bundle import Bundle

# Aliases, because a method named ``list`` hides the builtin in class bodies.
Domains = list[str]
Summaries = list[dict[str, Any]]
Changes = list[tuple[int, str]]


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

    def close(self) -> None:
        """Release the store."""
        ...
