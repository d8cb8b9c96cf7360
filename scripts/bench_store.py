#!/usr/bin/env python3
"""Benchmark the certificate store; run by hand, prints a table.

    .venv/bin/python scripts/bench_store.py [--domains 100000] [--uploads 40]

What it measures, each in a fresh data directory under a temporary folder:

1. ``setCertificate`` through a running Cryptosaur (``runtime.ask``): parse
   and check the bundle, seal the key, one SQLite transaction with
   ``synchronous=FULL`` (an fsync), the announcement. Separately, the parse
   alone. EC P-256 and RSA 2048 bundles, made before timing starts.
2. ``getCertificate`` with ``--domains`` domains stored: through the actor
   (an ask: exact lookup, wildcard fallback, key unsealed) and
   ``Store.get`` alone. Median and 99th percentile over random domains.
3. Opening a store of ``--domains`` domains (``open_store``, including
   ``PRAGMA quick_check``) and starting Cryptosaur on it.

How the large stores are filled (making 100,000 certificates would take
minutes of key generation alone):

- "one certificate": one wildcard bundle stored with ``Store.put`` for all
  the domains in one transaction (real rows through the public interface,
  but a small file: every domain points at the same certificate row);
- "a certificate each": 100,000 certificate rows written with SQL straight
  into the schema, each holding the real chain of one of a few bundles and
  that bundle's key sealed with the store's master key under the row's own
  (made-up) fingerprint, so ``get`` unseals a real key per row and the file
  has the size of a real store of 100,000 certificates.

The page cache is warm (the file was just written): a first open after a
reboot also pays for reading the file from disk.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loguru import logger

from actors.cryptosaur import Cryptosaur
from arc.bundle import parse_bundle
from arc.config import Config
from arc.store import SealedStore, open_store
from arc.store.sqlite import FILE_NAME
from arc.testing import running
from tests.certs import Chain, make_chain

ROWS: list[tuple[str, str, str, str]] = []


def report(what: str, samples_s: list[float], note: str = "") -> None:
    """Add one line to the table: median and p99 in milliseconds."""
    ordered = sorted(samples_s)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    ROWS.append(
        (
            what,
            str(len(samples_s)),
            f"{statistics.median(samples_s) * 1000:9.3f}",
            f"{p99 * 1000:9.3f}" if len(samples_s) > 1 else "",
        )
    )
    if note:
        ROWS.append((f"  ({note})", "", "", ""))


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def bench_uploads(base: Path, uploads: int) -> None:
    for key_type in ("EC P-256", "RSA 2048"):
        chains = [
            make_chain(f"u{n}.example", key_type=key_type) for n in range(uploads)
        ]
        bundles = [c.bundle() for c in chains]
        report(
            f"parse_bundle {key_type}",
            [timed(lambda b=b: parse_bundle(b)) for b in bundles],  # type: ignore[misc]
        )
        config = Config.embedded(data_dir=base / f"uploads-{key_type.replace(' ', '')}")
        with running([Cryptosaur], config) as rt:
            samples = [
                timed(
                    lambda b=b: rt.ask("Cryptosaur", "setCertificate", {"bundle": b})  # type: ignore[misc]
                )
                for b in bundles
            ]
        report(f"setCertificate {key_type} (ask, fsync'd)", samples)


def fill_one_certificate(config: Config, domains: list[str]) -> None:
    store = open_store(config.arcology)
    data = make_chain("*.example.com").bundle()
    bundle = parse_bundle(data, domains=[*domains, "*.example.com"])
    store.put(bundle)
    store.close()


def fill_a_certificate_each(config: Config, domains: list[str]) -> None:
    store = open_store(config.arcology)
    assert isinstance(store, SealedStore)
    templates: list[Chain] = [make_chain("*.example.com") for _ in range(8)]
    bundles = [parse_bundle(c.bundle()) for c in templates]
    now = dt.datetime.now(dt.UTC).isoformat()
    master = store._key  # the bench seals like the store does
    store.close()

    def rows() -> Iterator[tuple[Any, ...]]:
        for n, domain in enumerate(domains):
            b = bundles[n % len(bundles)]
            fingerprint = hashlib.sha256(domain.encode()).hexdigest()
            yield (
                fingerprint,
                b.chain_pem,
                master.seal(b.key_pem, fingerprint),
                b.not_before.isoformat(),
                b.not_after.isoformat(),
                b.issuer,
                b.subject,
                b.key_type,
                len(b.chain),
                0,
                now,
            )

    with sqlite3.connect(config.arcology.data_dir / FILE_NAME) as db:
        db.executemany(
            "INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows()
        )
        db.executemany(
            "INSERT INTO domains VALUES (?, ?, ?)",
            ((d, hashlib.sha256(d.encode()).hexdigest(), now) for d in domains),
        )
    with sqlite3.connect(config.arcology.data_dir / FILE_NAME) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def bench_large(base: Path, count: int, layout: str) -> None:
    config = Config.embedded(data_dir=base / f"large-{layout.replace(' ', '-')}")
    domains = [f"d{n}.example.com" for n in range(count)]
    started = time.perf_counter()
    if layout == "one certificate":
        fill_one_certificate(config, domains)
    else:
        fill_a_certificate_each(config, domains)
    fill_s = time.perf_counter() - started
    size_mb = (config.arcology.data_dir / FILE_NAME).stat().st_size / 1e6
    label = f"{count:,} domains, {layout}"

    opens = []
    for _ in range(5):
        started = time.perf_counter()
        store = open_store(config.arcology)
        opens.append(time.perf_counter() - started)
        store.close()
    report(
        f"open_store: {label}",
        opens,
        f"{size_mb:.0f} MB file, filled in {fill_s:.1f} s",
    )

    store = open_store(config.arcology)
    picks = [random.choice(domains) for _ in range(5000)]
    report(f"Store.get: {label}", [timed(lambda d=d: store.get(d)) for d in picks])  # type: ignore[misc]
    store.close()

    started = time.perf_counter()
    with running([Cryptosaur], config) as rt:
        report(f"start Cryptosaur: {label}", [time.perf_counter() - started])
        samples = [
            timed(lambda d=d: rt.ask("Cryptosaur", "getCertificate", {"domain": d}))  # type: ignore[misc]
            for d in picks
        ]
        # Only the "one certificate" store holds *.example.com: names not
        # stored exactly are answered by the wildcard, after a miss.
        wild = [
            timed(
                lambda n=n: rt.ask(  # type: ignore[misc]
                    "Cryptosaur", "getCertificate", {"domain": f"x{n}.example.com"}
                )
            )
            for n in range(2000)
            if layout == "one certificate"
        ]
    report(f"getCertificate ask: {label}", samples)
    if wild:
        report(f"getCertificate ask, wildcard fallback: {label}", wild)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", type=int, default=100_000)
    parser.add_argument("--uploads", type=int, default=40)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with tempfile.TemporaryDirectory(prefix="arc-bench-") as folder:
        base = Path(folder)
        bench_uploads(base, args.uploads)
        bench_large(base, args.domains, "one certificate")
        bench_large(base, args.domains, "a certificate each")

    width = max(len(r[0]) for r in ROWS)
    print(f"{'what':<{width}}  {'n':>5}  {'median ms':>9}  {'p99 ms':>9}")
    print("-" * (width + 30))
    for what, n, median, p99 in ROWS:
        print(f"{what:<{width}}  {n:>5}  {median:>9}  {p99:>9}")


if __name__ == "__main__":
    main()
