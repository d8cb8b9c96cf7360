"""The store Cryptosaur uses: bundles in, chains and keys out, keys sealed.

``SealedStore`` turns a checked ``Bundle`` into a ``CertificateRecord`` whose
private key is sealed with the master key (bound to the leaf fingerprint),
hands it to a ``Backend``, and opens the key again on ``get``. The backend
never sees a plaintext key, so any backend inherits encryption at rest.
"""

from __future__ import annotations

import datetime as dt

from arc.bundle import Bundle
from arc.errors import Internal
from arc.names import candidates
from arc.store.base import (
    Backend,
    CertificateRecord,
    Changes,
    Domains,
    Store,
    StoredCertificate,
    Summaries,
    expiring_from_rows,
)
from arc.store.keys import MasterKey, UnsealError

MASTER_KEY_CHECK = "master_key_check"
# Certificates re-sealed per transaction.
RESEAL_BATCH = 500


class SealedStore:
    """A ``Store`` over any ``Backend``, sealing keys with a ``MasterKey``."""

    def __init__(self, backend: Backend, master_key: MasterKey) -> None:
        self.backend = backend
        self._key = master_key

    def get(self, domain: str) -> StoredCertificate | None:
        """The certificate stored for exactly ``domain``, key opened."""
        record = self.backend.get(domain)
        if record is None:
            return None
        try:
            key_pem = self._key.unseal(record.key_sealed, record.fingerprint)
        except UnsealError as exc:
            raise Internal(
                f"certificate store: the key of {domain} (fingerprint "
                f"{record.fingerprint}) does not open with the master key; the "
                "row was altered or copied from another store"
            ) from exc
        return StoredCertificate(
            domain=domain,
            fingerprint=record.fingerprint,
            chain_pem=record.chain_pem,
            key_pem=key_pem,
            not_before=record.not_before,
            not_after=record.not_after,
            issuer=record.issuer,
            subject=record.subject,
            key_type=record.key_type,
            chain_length=record.chain_length,
            reordered=record.reordered,
            stored_at=record.stored_at,
        )

    def put(self, bundle: Bundle) -> tuple[int, Domains]:
        """Seal the key and store the bundle for all its domains at once."""
        record = CertificateRecord(
            fingerprint=bundle.fingerprint,
            chain_pem=bundle.chain_pem,
            key_sealed=self._key.seal(bundle.key_pem, bundle.fingerprint),
            not_before=bundle.not_before,
            not_after=bundle.not_after,
            issuer=bundle.issuer,
            subject=bundle.subject,
            key_type=bundle.key_type,
            chain_length=len(bundle.chain),
            reordered=bundle.reordered,
            stored_at=dt.datetime.now(dt.UTC),
        )
        return self.backend.put(record, list(bundle.domains))

    def delete(self, domain: str) -> Domains:
        """Delete the certificate of ``domain`` with every domain it serves."""
        return self.backend.delete(domain)

    def list(self) -> Summaries:
        """One summary per domain, sorted by domain."""
        return self.backend.list()

    def expiring(self, before: dt.datetime) -> Summaries:
        """Certificates ending before ``before``, soonest first.

        Each is ``{fingerprint, not_after, domains}``. A backend with its own
        ``expiring`` answers from an index; otherwise the list is filtered.
        """
        own = getattr(self.backend, "expiring", None)
        if own is not None:
            return list(own(before))
        rows = (
            (row["fingerprint"], row["not_after"], row["domain"])
            for row in self.backend.list()
            if dt.datetime.fromisoformat(row["not_after"]) < before
        )
        found = expiring_from_rows(rows, str)
        return sorted(found, key=lambda e: str(e["not_after"]))

    def domains_of(self, fingerprint: str) -> Domains:
        """The domains pointing at the certificate ``fingerprint``, sorted."""
        return self.backend.domains_of(fingerprint)

    def changes_since(self, seq: int, limit: int = 1000) -> Changes:
        """Changes after ``seq`` as (seq, domain), oldest first."""
        return self.backend.changes_since(seq, limit)

    def current_seq(self) -> int:
        """The sequence number of the last change (0 for none)."""
        return self.backend.current_seq()

    def prune_changes(self, before: dt.datetime) -> int:
        """Delete changes made before ``before``, never the newest; the count."""
        return self.backend.prune_changes(before)

    def pruned_through(self) -> int:
        """The highest sequence number ever pruned (0 for none)."""
        return self.backend.pruned_through()

    def reseal(self) -> int:
        """Seal every stored private key with the first master key; the count.

        Keys sealed with an older key of the file are opened and sealed
        again, ``RESEAL_BATCH`` certificates per transaction; the check value
        follows once all are done. A key no key of the file opens is left as
        it is and reported (``Internal``) after the others are done.
        """
        done = 0
        unopened: list[str] = []
        after = ""
        while True:
            rows = self.backend.sealed_keys(after, RESEAL_BATCH)
            if not rows:
                break
            after = rows[-1][0]
            swaps = []
            for fingerprint, sealed in rows:
                if self._key.is_current(sealed, fingerprint):
                    continue
                try:
                    plain = self._key.unseal(sealed, fingerprint)
                except UnsealError:
                    unopened.append(fingerprint)
                    continue
                swaps.append((fingerprint, sealed, self._key.seal(plain, fingerprint)))
            if swaps:
                done += self.backend.replace_sealed(swaps)
        if unopened:
            raise Internal(
                f"re-sealing: {len(unopened)} private keys open with no key of the "
                f"master key file (first fingerprints: {', '.join(unopened[:3])}); "
                f"{done} were re-sealed"
            )
        check = self.backend.get_meta(MASTER_KEY_CHECK)
        if check is None or not self._key.is_current(check):
            self.backend.set_meta(MASTER_KEY_CHECK, self._key.check_value())
        return done

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()


def lookup(store: Store, name: str) -> StoredCertificate | None:
    """The certificate for ``name``: exact, else the wildcard one label up.

    Raises:
        BadInput: ``name`` is not a domain.
    """
    for candidate in candidates(name):
        found = store.get(candidate)
        if found is not None:
            return found
    return None
