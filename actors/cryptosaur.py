"""Cryptosaur: the certificate store's actor.

How this works: Cryptosaur opens the store named by the configuration
(``arc.store.open_store``) in ``on_start`` and is the only actor that talks to
it. Uploads are checked by ``arc.bundle.parse_bundle`` before anything is
written, so a refused upload changes nothing; an accepted one replaces every
domain of the bundle in one transaction. After every commit (upload or
delete) it announces ``Cryptosaur.certificateChanged {"domains": [...]}`` so
that Esper drops the contexts it built from the old chain.

Verbs (payloads are msgpack maps; datetimes are ISO 8601 UTC strings):

- ``setCertificate {bundle, domains?, passphrase?}`` -> summary, with
  ``replaced`` (the fingerprint the first domain had, or of any replaced
  certificate, else None) and ``replaced_fingerprints`` (all of them).
- ``getCertificate {domain}`` -> ``{domain, chain_pem, key_pem, fingerprint,
  not_after}``: the exact domain, else the wildcard one label up; ``domain``
  is the one that matched. For actors in this process only: AI1 refuses to
  forward it, so a private key never leaves the process.
- ``deleteCertificate {domain}`` -> ``{deleted: [domains]}``: the certificate
  stored for exactly that domain, with every domain that points at it.
- ``listCertificates {}`` -> one summary per domain, with ``days_left``;
  ``domains`` names at most ``MAX_LISTED_DOMAINS`` of the certificate's
  domains, ``domains_total`` counts them.
- ``showCertificate {domain}`` -> the summary of the certificate serving the
  domain (exact then wildcard) and its ``chain`` as ``[{subject, issuer,
  not_after}]``; never the key.
- ``checkExpiry {}`` -> the certificates within ``expiry_warning_days`` of
  their end, each also logged as a WARNING (one line per certificate). It
  runs at start and then once a day, sent by a ticker thread that stops in
  ``on_stop``.

- ``resealKeys {}`` -> ``{resealed}``: seals every stored private key with
  the first key of the master key file (a step of key rotation; see
  ``arc.store.keys``).
- ``pruneChanges {}`` -> ``{pruned}``: deletes the store's change records
  older than ``CHANGES_KEPT_DAYS`` (the newest always stays). The ticker
  sends it once a day. A process that was away for longer catches up by
  treating every domain as changed (see ``arc.changefeed``).

Changes made by other processes and other nodes are heard by the change feed
(``arc.changefeed``, started in ``on_start``): it announces them like local
changes within a second, on SQLite and PostgreSQL, and keeps following the
store through database outages. Own writes are registered with the feed
(``feed.writing()``) so they are announced once, here.

Every summary: ``domain, domains, fingerprint, not_before, not_after,
issuer, subject, key_type, chain_length, reordered, days_left``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import pykka
from cryptography import x509

from arc.actor import Actor, Envelope, verb
from arc.bundle import days_left, iso_utc, parse_bundle
from arc.changefeed import ChangeFeed
from arc.config import Config
from arc.errors import BadInput, Busy, NotFound
from arc.messages import encode_request
from arc.names import candidates, normalise_domain
from arc.runtime import Runtime
from arc.store import Store, lookup, open_store

CHANGED = "Cryptosaur.certificateChanged"
EXPIRY_CHECK_INTERVAL_S = 86_400.0
# Domains of its certificate that each listCertificates row names.
MAX_LISTED_DOMAINS = 20
# How long change records are kept: a node or worker away for longer than
# this catches up by dropping every cached context instead of replaying.
CHANGES_KEPT_DAYS = 7
# A store where thousands expire at once gets this many WARNING lines and a
# count, not thousands of lines.
MAX_EXPIRY_LINES = 50


class Cryptosaur(Actor):
    """Owns the certificate store: takes bundles, gives chains and keys."""

    name = "Cryptosaur"

    def __init__(self, runtime: Runtime, config: Config) -> None:
        super().__init__(runtime, config)
        self.store: Store | None = None
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None
        self.feed: ChangeFeed | None = None

    # -- life -------------------------------------------------------------------

    def on_start(self) -> None:
        """Open the store, warn about expiring certificates, start the ticker."""
        settings = self.config.arcology
        self.store = open_store(settings)
        seq = self.store.current_seq()
        self.log.debug(
            "store opened kind={k} data_dir={d} seq={s}",
            k=settings.store,
            d=settings.data_dir,
            s=seq,
        )
        self.check_expiry(None)
        self.feed = ChangeFeed(
            settings,
            lambda domains: self.runtime.announce(CHANGED, {"domains": domains}),
            start_seq=seq,
            owner=self.runtime,
        )
        self.feed.start()
        self._ticker = threading.Thread(
            target=self._tick, name="cryptosaur-ticker", daemon=True
        )
        self._ticker.start()

    def on_stop(self) -> None:
        """Stop the ticker and close the store."""
        self._stopping.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join(timeout=5.0)
        if self.feed is not None:
            self.feed.stop()
            self.feed = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def _tick(self) -> None:
        # Runs in its own thread and only sends messages: the store is used
        # by the actor's thread alone.
        while not self._stopping.wait(EXPIRY_CHECK_INTERVAL_S):
            self._tell_self("checkExpiry")
            self._tell_self("pruneChanges")

    def _tell_self(self, action: str) -> None:
        try:
            self.actor_ref.tell(Envelope(encode_request(f"{self.name}.{action}", {})))
        except pykka.ActorDeadError:
            self._stopping.set()

    def _writing(self) -> AbstractContextManager[Callable[[Iterable[int]], None]]:
        # Holds the change feed back while a write of ours is registered.
        if self.feed is None:
            return contextlib.nullcontext(lambda _seqs: None)
        return self.feed.writing()

    def _store(self) -> Store:
        if self.store is None:
            raise Busy("Cryptosaur: the certificate store is not open; retry shortly")
        return self.store

    # -- verbs ------------------------------------------------------------------

    @verb("setCertificate")
    def set_certificate(self, payload: Any) -> Any:
        """Check a bundle, store it for its domains, announce the change."""
        fields = _fields(payload, "setCertificate", {"bundle", "domains", "passphrase"})
        data = fields.get("bundle")
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, bytes):
            raise BadInput(
                "setCertificate: 'bundle' must be the PEM bytes of the bundle "
                f"(got {type(data).__name__})"
            )
        domains = fields.get("domains")
        if domains is not None and (
            not isinstance(domains, list)
            or not domains
            or not all(isinstance(d, str) for d in domains)
        ):
            raise BadInput(
                "setCertificate: 'domains' must be a non-empty list of strings"
            )
        passphrase = fields.get("passphrase")
        if isinstance(passphrase, str):
            passphrase = passphrase.encode("utf-8")
        if passphrase is not None and not isinstance(passphrase, bytes):
            raise BadInput("setCertificate: 'passphrase' must be a string or bytes")

        # Every check happens before the one write; a refusal stores nothing.
        bundle = parse_bundle(data, domains=domains, passphrase=passphrase)
        with self._writing() as mine:
            seq, replaced = self._store().put(bundle)
            mine(range(seq - len(bundle.domains) + 1, seq + 1))
        self.runtime.announce(CHANGED, {"domains": list(bundle.domains)})

        self.log.info(
            "certificate installed domains={d} fingerprint={f} not_after={n} "
            "key_type={k} replaced={r}",
            d=",".join(bundle.domains),
            f=bundle.fingerprint,
            n=iso_utc(bundle.not_after),
            k=bundle.key_type,
            r=",".join(replaced) or "none",
        )
        summary = bundle.summary()
        summary["replaced"] = replaced[0] if replaced else None
        summary["replaced_fingerprints"] = replaced
        return summary

    @verb("getCertificate")
    def get_certificate(self, payload: Any) -> Any:
        """The chain and key for a domain: exact, then the wildcard one up."""
        name = _domain_field(payload, "getCertificate")
        found = lookup(self._store(), name)
        if found is None:
            raise NotFound(
                f"no certificate for {name} (looked for {', '.join(candidates(name))})"
            )
        return {
            "domain": found.domain,
            "chain_pem": found.chain_pem,
            "key_pem": found.key_pem,
            "fingerprint": found.fingerprint,
            "not_after": iso_utc(found.not_after),
        }

    @verb("deleteCertificate")
    def delete_certificate(self, payload: Any) -> Any:
        """Delete the certificate stored for exactly a domain, with its domains."""
        domain = normalise_domain(_domain_field(payload, "deleteCertificate"))
        store = self._store()
        with self._writing() as mine:
            before = store.current_seq()
            deleted = store.delete(domain)
            if not deleted:
                raise NotFound(f"no certificate stored for {domain}")
            after = store.current_seq()
            if after - before == len(deleted):
                # No other process wrote in between: these changes are ours.
                mine(range(before + 1, after + 1))
        self.runtime.announce(CHANGED, {"domains": deleted})
        self.log.info("certificate deleted domains={d}", d=",".join(deleted))
        return {"deleted": deleted}

    @verb("listCertificates")
    def list_certificates(self, payload: Any) -> Any:
        """Every stored domain's summary, with days left.

        Each row names at most ``MAX_LISTED_DOMAINS`` of its certificate's
        domains (``domains_total`` counts them all): a bundle for N domains
        has N rows, and repeating all N names in each would make the answer
        grow as N squared. ``showCertificate`` gives the whole list.
        """
        _fields(payload, "listCertificates", set())
        now = dt.datetime.now(dt.UTC)
        rows = self._store().list()
        for row in rows:
            row["days_left"] = days_left(
                dt.datetime.fromisoformat(row["not_after"]), now
            )
            domains = row["domains"]
            row["domains_total"] = len(domains)
            if len(domains) > MAX_LISTED_DOMAINS:
                row["domains"] = domains[:MAX_LISTED_DOMAINS]
        return rows

    @verb("showCertificate")
    def show_certificate(self, payload: Any) -> Any:
        """The summary and chain of the certificate serving a domain; no key."""
        name = _domain_field(payload, "showCertificate")
        store = self._store()
        found = lookup(store, name)
        if found is None:
            raise NotFound(
                f"no certificate for {name} (looked for {', '.join(candidates(name))})"
            )
        chain = x509.load_pem_x509_certificates(found.chain_pem)
        result = {
            "domain": found.domain,
            "domains": store.domains_of(found.fingerprint),
            "fingerprint": found.fingerprint,
            "not_before": iso_utc(found.not_before),
            "not_after": iso_utc(found.not_after),
            "issuer": found.issuer,
            "subject": found.subject,
            "key_type": found.key_type,
            "chain_length": found.chain_length,
            "reordered": found.reordered,
            "days_left": days_left(found.not_after),
            "stored_at": iso_utc(found.stored_at),
            "chain": [
                {
                    "subject": cert.subject.rfc4514_string(),
                    "issuer": cert.issuer.rfc4514_string(),
                    "not_after": iso_utc(cert.not_valid_after_utc),
                }
                for cert in chain
            ],
        }
        return result

    @verb("checkExpiry")
    def check_expiry(self, payload: Any) -> Any:
        """Log a WARNING per certificate near its end; return them."""
        # The runtime's settings: a reload may have changed them.
        warning_days = self.runtime.config.arcology.expiry_warning_days
        now = dt.datetime.now(dt.UTC)
        found = self._store().expiring(now + dt.timedelta(days=warning_days))
        for item in found:
            item["days_left"] = days_left(
                dt.datetime.fromisoformat(item["not_after"]), now
            )
        for item in found[:MAX_EXPIRY_LINES]:
            state = "expired" if item["days_left"] < 0 else "expires soon"
            self.log.warning(
                "certificate {state} domains={d} not_after={n} days_left={l} "
                "fingerprint={f}",
                state=state,
                d=",".join(item["domains"]),
                n=item["not_after"],
                l=item["days_left"],
                f=item["fingerprint"],
            )
        if len(found) > MAX_EXPIRY_LINES:
            self.log.warning(
                "more certificates expire soon count={c} shown={s}",
                c=len(found),
                s=MAX_EXPIRY_LINES,
            )
        return found

    @verb("resealKeys")
    def reseal_keys(self, payload: Any) -> Any:
        """Seal every stored private key with the master key file's first key."""
        _fields(payload, "resealKeys", set())
        resealed = self._store().reseal()
        self.log.info("private keys re-sealed count={n}", n=resealed)
        return {"resealed": resealed}

    @verb("pruneChanges")
    def prune_changes(self, payload: Any) -> Any:
        """Delete change records older than ``CHANGES_KEPT_DAYS``."""
        _fields(payload, "pruneChanges", set())
        before = dt.datetime.now(dt.UTC) - dt.timedelta(days=CHANGES_KEPT_DAYS)
        pruned = self._store().prune_changes(before)
        if pruned:
            self.log.info(
                "change records pruned count={n} older_than_days={d}",
                n=pruned,
                d=CHANGES_KEPT_DAYS,
            )
        return {"pruned": pruned}


def _fields(payload: Any, verb_name: str, allowed: set[str]) -> dict[str, Any]:
    """The payload as a map, refusing other shapes and unknown fields."""
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise BadInput(
            f"{verb_name}: payload must be a map (got {type(payload).__name__})"
        )
    unknown = set(payload) - allowed
    if unknown:
        raise BadInput(
            f"{verb_name}: unknown field(s) {', '.join(sorted(map(str, unknown)))}"
        )
    return payload


def _domain_field(payload: Any, verb_name: str) -> str:
    domain = _fields(payload, verb_name, {"domain"}).get("domain")
    if not isinstance(domain, str):
        raise BadInput(f"{verb_name}: 'domain' must be a string (got {domain!r})")
    return domain
