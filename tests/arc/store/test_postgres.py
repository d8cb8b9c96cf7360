"""The PostgreSQL backend: the store's behaviour, on a real throwaway server.

Every test of ``tests/arc/store/test_sqlite.py`` that needs nothing but a
``store`` is collected here too and runs against PostgreSQL, so the new
backend is held to exactly what SQLite does; the behaviour tests below add
to them. The tests after those are about what only a shared database has:
schema migrations raced by two nodes, notifications at commit, the order of
the change sequence under concurrent writers, and an outage.
"""

from __future__ import annotations

import datetime as dt
import inspect
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trustme

from arc.bundle import parse_bundle
from arc.config import Config, Settings
from arc.errors import Busy, ConfigError
from arc.store import Store, lookup, open_store
from arc.store.postgres import SCHEMA_VERSION, PostgresBackend
from tests.arc.store import test_sqlite as sqlite_tests
from tests.certs import make_chain
from tests.pg import (
    ThrowawayPostgres,
    own_postgres,
    pg_url,
    postgres_server,
    require_postgres,
)

__all__ = ["own_postgres", "pg_url", "postgres_server"]


def settings_for(tmp_path: Path, store: str) -> Settings:
    return (
        Config.embedded(data_dir=tmp_path / "data").with_settings(store=store).arcology
    )


@pytest.fixture
def store(pg_url: str, tmp_path: Path) -> Iterator[Store]:
    opened = open_store(settings_for(tmp_path, pg_url))
    try:
        yield opened
    finally:
        opened.close()


# The SQLite backend's behaviour tests that take only a store, run here on
# PostgreSQL (pytest gives them this module's ``store``).
for _name, _test in vars(sqlite_tests).copy().items():
    if (
        _name.startswith("test_")
        and callable(_test)
        and list(inspect.signature(_test).parameters) == ["store"]
    ):
        globals()[_name] = _test


def bundle_for(*names: str) -> bytes:
    return make_chain(*names).bundle()


# -- more of the same behaviour ---------------------------------------------------


def test_a_put_bundle_is_served_with_its_key_for_every_domain(store: Store) -> None:
    chain = make_chain("shop.example.com", "www.shop.example.com")

    seq, replaced = store.put(parse_bundle(chain.bundle()))

    assert seq > 0 and replaced == []
    for name in ("shop.example.com", "www.shop.example.com"):
        got = store.get(name)
        assert got is not None
        assert got.fingerprint == chain.fingerprint
        assert got.key_pem.strip() == chain.key_pem.strip()
        assert got.chain_pem.startswith(chain.leaf_pem.strip())
        assert got.not_after.tzinfo is not None
    assert store.get("other.example.com") is None


def test_a_second_bundle_replaces_the_first_and_drops_it(store: Store) -> None:
    first = make_chain("a.example.com", "b.example.com")
    second = make_chain("a.example.com", "b.example.com")
    store.put(parse_bundle(first.bundle()))

    _seq, replaced = store.put(parse_bundle(second.bundle()))

    assert replaced == [first.fingerprint]
    assert {s["fingerprint"] for s in store.list()} == {second.fingerprint}


def test_a_partial_replace_keeps_the_old_certificate_for_other_domains(
    store: Store,
) -> None:
    first = make_chain("a.example.com", "b.example.com")
    second = make_chain("a.example.com")
    store.put(parse_bundle(first.bundle()))

    store.put(parse_bundle(second.bundle()))

    a, b = store.get("a.example.com"), store.get("b.example.com")
    assert a is not None and a.fingerprint == second.fingerprint
    assert b is not None and b.fingerprint == first.fingerprint


def test_delete_removes_the_certificate_with_all_its_domains(store: Store) -> None:
    store.put(parse_bundle(bundle_for("b.example.com", "a.example.com")))
    store.put(parse_bundle(bundle_for("keep.example.com")))

    deleted = store.delete("b.example.com")

    assert deleted == ["a.example.com", "b.example.com"]
    assert store.get("a.example.com") is None
    assert [s["domain"] for s in store.list()] == ["keep.example.com"]
    assert store.delete("b.example.com") == []


def test_list_gives_one_sorted_summary_per_domain_without_keys(store: Store) -> None:
    chain = make_chain("z.example.com", "m.example.com")
    store.put(parse_bundle(chain.bundle()))

    summaries = store.list()

    assert [s["domain"] for s in summaries] == ["m.example.com", "z.example.com"]
    first = summaries[0]
    assert first["domains"] == ["m.example.com", "z.example.com"]
    assert first["fingerprint"] == chain.fingerprint
    assert first["key_type"] == "EC P-256"
    assert first["not_after"].endswith("Z")
    assert dt.datetime.fromisoformat(first["not_after"]) > dt.datetime.now(dt.UTC)
    assert not any("key" in name and name != "key_type" for name in first)


def test_every_written_or_deleted_domain_is_a_change_in_order(store: Store) -> None:
    start = store.current_seq()

    seq1, _ = store.put(parse_bundle(bundle_for("a.example.com", "b.example.com")))
    store.delete("a.example.com")

    changes = store.changes_since(start)
    assert [d for _s, d in changes[:2]] == ["a.example.com", "b.example.com"]
    assert sorted(d for _s, d in changes[2:]) == ["a.example.com", "b.example.com"]
    seqs = [s for s, _d in changes]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert seq1 == seqs[1]
    assert store.current_seq() == seqs[-1]
    assert store.changes_since(seqs[1]) == changes[2:]
    assert store.changes_since(start, limit=1) == changes[:1]


def test_a_wildcard_serves_one_label_down(store: Store) -> None:
    store.put(parse_bundle(bundle_for("*.example.com")))

    found = lookup(store, "shop.example.com")

    assert found is not None and found.domain == "*.example.com"
    assert lookup(store, "a.shop.example.com") is None


# -- what only PostgreSQL has ------------------------------------------------------


def test_a_node_with_another_master_key_is_refused(pg_url: str, tmp_path: Path) -> None:
    first = open_store(settings_for(tmp_path / "one", pg_url))
    first.put(parse_bundle(bundle_for("a.example.com")))
    first.close()

    # A second node that was not given a copy of the key file...
    with pytest.raises(ConfigError, match="is missing"):
        open_store(settings_for(tmp_path / "two", pg_url))
    # ...or was given some other key.
    other = settings_for(tmp_path / "two", pg_url)
    other.master_key_file.parent.mkdir(parents=True, exist_ok=True)
    other.master_key_file.write_text("11" * 32 + "\n")
    with pytest.raises(ConfigError, match="does not open this certificate store"):
        open_store(other)


def test_private_keys_reach_the_database_only_sealed(
    pg_url: str, tmp_path: Path
) -> None:
    chain = make_chain("secret.example.com")
    store = open_store(settings_for(tmp_path, pg_url))
    store.put(parse_bundle(chain.bundle()))
    store.close()

    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT chain_pem, key_sealed FROM arc_certificates")
        blobs = b"".join(bytes(c) + bytes(k) for c, k in rows)
    assert b"PRIVATE KEY" not in blobs
    assert chain.key_der not in blobs


def test_two_nodes_opening_a_fresh_database_at_once_migrate_it_once(
    pg_url: str,
) -> None:
    opened: list[PostgresBackend] = []
    failures: list[BaseException] = []
    gate = threading.Barrier(4)

    def open_one() -> None:
        gate.wait(10)
        try:
            opened.append(PostgresBackend(pg_url))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert failures == []
    assert len(opened) == 4
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM arc_schema")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    for backend in opened:
        backend.close()


def test_a_database_from_a_newer_arcology_is_refused(pg_url: str) -> None:
    PostgresBackend(pg_url).close()
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "INSERT INTO arc_schema (version, applied_at) VALUES (%s, now())",
            (SCHEMA_VERSION + 1,),
        )

    with pytest.raises(ConfigError, match="newer than this Arcology knows"):
        PostgresBackend(pg_url)


def test_a_listener_hears_a_change_at_commit(pg_url: str, tmp_path: Path) -> None:
    store = open_store(settings_for(tmp_path, pg_url))
    listener = PostgresBackend(pg_url)
    listener.listen()
    assert listener.wait_for_change(0.05) is False

    seq, _ = store.put(parse_bundle(bundle_for("heard.example.com")))

    assert listener.wait_for_change(5.0) is True
    assert listener.changes_since(seq - 1) == [(seq, "heard.example.com")]
    store.close()
    listener.close()


def test_concurrent_writers_never_make_a_later_sequence_visible_first(
    pg_url: str, tmp_path: Path
) -> None:
    # Readers follow the sequence; if a higher number became visible before
    # a lower one, a reader would skip the lower for ever. Hammer it.
    bundles = [parse_bundle(bundle_for(f"w{i}.example.com")) for i in range(24)]
    writers = [open_store(settings_for(tmp_path, pg_url)) for _ in range(4)]
    reader = PostgresBackend(pg_url)
    seen: list[int] = []
    done = threading.Event()

    def follow() -> None:
        last = 0
        while not done.is_set() or reader.current_seq() > last:
            for seq, _domain in reader.changes_since(last):
                seen.append(seq)
                last = seq

    def write(index: int) -> None:
        for bundle in bundles[index::4]:
            writers[index].put(bundle)

    follower = threading.Thread(target=follow)
    follower.start()
    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    done.set()
    follower.join(30)

    assert len(seen) == 24 and len(set(seen)) == 24
    for store in writers:
        store.close()
    reader.close()


def test_a_stopped_database_is_busy_and_the_backend_reconnects_after(
    own_postgres: ThrowawayPostgres, tmp_path: Path
) -> None:
    url = own_postgres.create_database()
    store = open_store(settings_for(tmp_path, url))
    store.put(parse_bundle(bundle_for("before.example.com")))

    own_postgres.stop()
    with pytest.raises(Busy, match="unreachable") as caught:
        store.get("before.example.com")
    assert "postgres@" not in caught.value.message
    own_postgres.start()

    # The first call after the restart may still be inside the reconnect
    # pause; a bounded retry shows that the backend comes back by itself.
    got = None
    for _ in range(50):
        try:
            got = store.get("before.example.com")
            break
        except Busy:
            threading.Event().wait(0.1)
    assert got is not None
    store.close()


# -- TLS to the database --------------------------------------------------------------


def test_the_store_works_over_tls_and_a_plain_connection_is_refused(
    tmp_path: Path,
) -> None:
    require_postgres()
    ca = trustme.CA()
    root = tmp_path / "db-ca.pem"
    ca.cert_pem.write_to_path(str(root))
    server = ThrowawayPostgres(tls=ca)
    try:
        server.start()
        url = server.create_database()
        verified = f"{url}?sslmode=verify-full&sslrootcert={root}"
        chain = make_chain("tls.example.com")

        store = open_store(settings_for(tmp_path, verified))
        try:
            store.put(parse_bundle(chain.bundle()))
            found = lookup(store, "tls.example.com")
        finally:
            store.close()
        with psycopg.connect(verified) as conn:
            row = conn.execute(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
        with pytest.raises(Busy) as refused:
            open_store(settings_for(tmp_path / "plain", f"{url}?sslmode=disable"))
    finally:
        server.destroy()

    assert found is not None and found.fingerprint == chain.fingerprint
    assert row == (True,)
    assert "no encryption" in refused.value.message


def test_a_rotated_master_key_reseals_every_private_key_on_postgres(
    pg_url: str, tmp_path: Path
) -> None:
    sqlite_tests.rotate_and_reseal(settings_for(tmp_path, pg_url))
