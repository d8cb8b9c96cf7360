"""The certificate store on SQLite: transactions, durability, keys at rest."""

from __future__ import annotations

import base64
import datetime as dt
import os
import signal
import sqlite3
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from arc.bundle import Bundle, parse_bundle
from arc.config import Config, Settings
from arc.errors import ConfigError, Internal
from arc.store import Store, lookup, open_store
from arc.store.sqlite import FILE_NAME, SCHEMA_VERSION, SqliteBackend
from tests.certs import Chain, make_chain

REPO = Path(__file__).resolve().parents[3]


def settings_for(data_dir: Path, **changes: object) -> Settings:
    return Config.embedded(data_dir=data_dir).with_settings(**changes).arcology


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    opened = open_store(settings_for(data_dir))
    yield opened
    opened.close()


def db_rows(data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the store's file directly, as another process would."""
    with sqlite3.connect(data_dir / FILE_NAME) as db:
        return db.execute(sql).fetchall()


def bundle_of(chain: Chain, domains: list[str] | None = None) -> Bundle:
    return parse_bundle(chain.bundle(), domains=domains)


# -- put, get, delete, list ---------------------------------------------------------


def test_a_stored_bundle_gives_back_its_chain_and_key(store: Store) -> None:
    chain = make_chain("shop.example.com", "www.example.com")

    seq, replaced = store.put(bundle_of(chain))
    found = store.get("www.example.com")

    assert (seq, replaced) == (2, [])
    assert found is not None
    assert found.domain == "www.example.com"
    assert found.chain_pem == chain.chain_pem
    assert found.key_pem == chain.key_pem
    assert found.fingerprint == chain.fingerprint
    assert found.not_after == chain.leaf.not_valid_after_utc
    assert found.key_type == "EC P-256"
    assert chain.key_pem.decode() not in repr(found)


def test_get_is_exact_and_lookup_falls_back_to_the_wildcard_one_label_up(
    store: Store,
) -> None:
    wildcard = make_chain("*.example.com")
    apex = make_chain("example.com")
    store.put(bundle_of(wildcard))
    store.put(bundle_of(apex))

    assert store.get("shop.example.com") is None
    found = lookup(store, "Shop.Example.com.")
    assert found is not None and found.domain == "*.example.com"
    assert lookup(store, "a.shop.example.com") is None
    exact = lookup(store, "example.com")
    assert exact is not None and exact.fingerprint == apex.fingerprint


def test_a_new_bundle_replaces_every_domain_and_drops_the_unused_certificate(
    store: Store, data_dir: Path
) -> None:
    old = make_chain("a.example", "b.example")
    new = make_chain("a.example", "b.example")
    store.put(bundle_of(old))

    seq, replaced = store.put(bundle_of(new))

    assert seq == 4
    assert replaced == [old.fingerprint]
    assert store.get("a.example").fingerprint == new.fingerprint  # type: ignore[union-attr]
    assert store.get("b.example").fingerprint == new.fingerprint  # type: ignore[union-attr]
    assert db_rows(data_dir, "SELECT fingerprint FROM certificates") == [
        (new.fingerprint,)
    ]


def test_a_certificate_still_serving_other_domains_is_kept(store: Store) -> None:
    old = make_chain("a.example", "b.example")
    store.put(bundle_of(old))

    _, replaced = store.put(bundle_of(make_chain("a.example")))

    assert replaced == [old.fingerprint]
    assert store.get("b.example").fingerprint == old.fingerprint  # type: ignore[union-attr]


def test_a_put_that_fails_midway_changes_nothing(store: Store, data_dir: Path) -> None:
    old = make_chain("a.example", "b.example")
    store.put(bundle_of(old))
    with sqlite3.connect(data_dir / FILE_NAME) as db:
        db.execute(
            "CREATE TRIGGER refuse_b BEFORE UPDATE ON domains "
            "WHEN NEW.domain = 'b.example' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    seq = store.current_seq()

    with pytest.raises(sqlite3.IntegrityError, match="refused"):
        store.put(bundle_of(make_chain("a.example", "b.example")))

    assert store.get("a.example").fingerprint == old.fingerprint  # type: ignore[union-attr]
    assert store.current_seq() == seq
    assert len(db_rows(data_dir, "SELECT * FROM certificates")) == 1


def test_delete_removes_the_certificate_with_all_its_domains(store: Store) -> None:
    chain = make_chain("a.example", "b.example", "c.example")
    other = make_chain("d.example")
    store.put(bundle_of(chain))
    store.put(bundle_of(other))

    deleted = store.delete("b.example")

    assert deleted == ["a.example", "b.example", "c.example"]
    assert store.get("a.example") is None
    assert store.get("d.example") is not None
    assert store.delete("b.example") == []
    assert [(s, d) for s, d in store.changes_since(4)] == [
        (5, "a.example"),
        (6, "b.example"),
        (7, "c.example"),
    ]


def test_list_gives_one_summary_per_domain_sorted_without_keys(store: Store) -> None:
    chain = make_chain("b.example", "a.example")
    store.put(bundle_of(chain))

    rows = store.list()

    assert [row["domain"] for row in rows] == ["a.example", "b.example"]
    assert rows[0]["domains"] == ["a.example", "b.example"]
    assert rows[0]["fingerprint"] == chain.fingerprint
    assert rows[0]["not_after"].endswith("Z")
    assert rows[0]["chain_length"] == 2
    assert not any("key" in name and name != "key_type" for name in rows[0])


def test_pruning_keeps_the_newest_change_and_remembers_how_far_it_went(
    store: Store,
) -> None:
    start = store.current_seq()
    store.put(bundle_of(make_chain("a.example", "b.example")))
    store.put(bundle_of(make_chain("c.example")))
    written = store.changes_since(start)
    newest = store.current_seq()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)

    pruned = store.prune_changes(later)
    again = store.prune_changes(later)

    assert pruned >= 2  # a shared database may hold older changes too
    assert again == 0
    assert store.changes_since(0) == [(newest, "c.example")]
    assert store.current_seq() == newest
    assert store.pruned_through() == written[-2][0]
    assert lookup(store, "a.example") is not None  # certificates stay


def test_pruning_leaves_changes_newer_than_the_cut(store: Store) -> None:
    start = store.current_seq()
    store.put(bundle_of(make_chain("a.example", "b.example")))
    through = store.pruned_through()

    pruned = store.prune_changes(dt.datetime.now(dt.UTC) - dt.timedelta(days=1))

    assert pruned == 0
    assert [d for _s, d in store.changes_since(start)] == ["a.example", "b.example"]
    assert store.pruned_through() == through


def test_changes_have_increasing_sequence_numbers(store: Store) -> None:
    assert store.current_seq() == 0
    store.put(bundle_of(make_chain("a.example", "b.example")))
    store.put(bundle_of(make_chain("a.example")))

    assert store.changes_since(0) == [
        (1, "a.example"),
        (2, "b.example"),
        (3, "a.example"),
    ]
    assert store.changes_since(2) == [(3, "a.example")]
    assert store.changes_since(0, limit=1) == [(1, "a.example")]
    assert store.current_seq() == 3


def test_the_store_survives_a_reopen(data_dir: Path) -> None:
    chain = make_chain("keep.example")
    first = open_store(settings_for(data_dir))
    first.put(bundle_of(chain))
    first.close()

    second = open_store(settings_for(data_dir))
    found = second.get("keep.example")
    second.close()

    assert found is not None and found.key_pem == chain.key_pem


# -- files, modes and keys at rest --------------------------------------------------


def test_the_data_directory_is_0700_and_every_file_0600(
    store: Store, data_dir: Path
) -> None:
    store.put(bundle_of(make_chain("modes.example")))

    names = sorted(p.name for p in data_dir.iterdir())

    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert FILE_NAME + "-wal" in names and "master.key" in names
    for path in data_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_the_store_is_in_wal_mode_with_full_sync(data_dir: Path, store: Store) -> None:
    assert db_rows(data_dir, "PRAGMA journal_mode") == [("wal",)]
    assert db_rows(data_dir, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def _key_material(chain: Chain) -> list[bytes]:
    body = b"".join(chain.key_pem.splitlines()[1:-1])
    der = chain.key_der
    traditional = base64.b64decode(
        b"".join(chain.key_pem_traditional.splitlines()[1:-1])
    )
    # The PEM body, its first line alone, the DER and a slice of it.
    return [body, chain.key_pem.splitlines()[1], der, der[-32:], traditional]


@pytest.mark.parametrize("closed", [False, True], ids=["open", "closed"])
def test_no_private_key_is_in_the_clear_anywhere_in_the_data_directory(
    data_dir: Path, closed: bool
) -> None:
    chains = [make_chain("ec.example"), make_chain("rsa.example", key_type="RSA 2048")]
    store = open_store(settings_for(data_dir))
    for chain in chains:
        store.put(bundle_of(chain))
    if closed:
        store.close()

    files = [p for p in data_dir.rglob("*") if p.is_file() and p.name != "master.key"]
    contents = {p.name: p.read_bytes() for p in files}

    assert FILE_NAME in contents
    for chain in chains:
        # The search finds what is stored in the clear: the certificate.
        assert chain.leaf_pem.splitlines()[1] in b"".join(contents.values())
        for secret in _key_material(chain):
            for name, content in contents.items():
                assert secret not in content, f"key material in {name}"
    if not closed:
        store.close()


def test_a_copy_of_the_store_without_its_master_key_does_not_open(
    data_dir: Path, tmp_path: Path
) -> None:
    store = open_store(settings_for(data_dir))
    store.put(bundle_of(make_chain("copy.example")))
    store.close()
    copy = tmp_path / "copy"
    copy.mkdir(mode=0o700)
    (copy / FILE_NAME).write_bytes((data_dir / FILE_NAME).read_bytes())

    with pytest.raises(ConfigError, match="master key file .* is missing"):
        open_store(settings_for(copy))

    assert not (copy / "master.key").exists()


def test_another_master_key_is_refused_and_left_as_it_is(
    data_dir: Path, tmp_path: Path
) -> None:
    open_store(settings_for(data_dir)).close()
    other = tmp_path / "other.key"
    other.write_text("ab" * 32 + "\n")

    with pytest.raises(ConfigError, match="does not open this certificate store"):
        open_store(settings_for(data_dir, master_key_file=other))

    assert other.read_text() == "ab" * 32 + "\n"


def test_a_short_master_key_file_is_refused_and_not_overwritten(
    data_dir: Path,
) -> None:
    open_store(settings_for(data_dir)).close()
    key_file = data_dir / "master.key"
    key_file.write_bytes(b"0123")

    with pytest.raises(ConfigError, match="expected 64 hex digits"):
        open_store(settings_for(data_dir))

    assert key_file.read_bytes() == b"0123"


def test_a_sealed_key_moved_to_another_certificate_does_not_open(
    store: Store, data_dir: Path
) -> None:
    one, two = make_chain("one.example"), make_chain("two.example")
    store.put(bundle_of(one))
    store.put(bundle_of(two))
    with sqlite3.connect(data_dir / FILE_NAME) as db:
        db.execute(
            "UPDATE certificates SET key_sealed = "
            "(SELECT key_sealed FROM certificates WHERE fingerprint = ?) "
            "WHERE fingerprint = ?",
            (one.fingerprint, two.fingerprint),
        )

    with pytest.raises(Internal, match="does not open with the master key"):
        store.get("two.example")


# -- opening ------------------------------------------------------------------------


def test_a_file_that_is_not_a_database_is_refused_clearly(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    (data_dir / FILE_NAME).write_bytes(b"this is not sqlite" * 100)

    with pytest.raises(Internal) as caught:
        open_store(settings_for(data_dir))

    assert str(data_dir / FILE_NAME) in caught.value.message
    assert "restore it from a backup" in caught.value.message


def damaged_store(data_dir: Path) -> Path:
    """A store of 40 domains whose pages after the schema page are scribbled on."""
    store = open_store(settings_for(data_dir))
    chain = make_chain("*.example.com")
    for n in range(40):
        store.put(bundle_of(chain, [f"d{n}.example.com"]))
    store.close()
    path = data_dir / FILE_NAME
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    for start in range(2 * page, len(data), page):
        data[start + 8 : start + 200] = b"\xa5" * 192
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_page_is_found_on_open(data_dir: Path) -> None:
    damaged_store(data_dir)

    with pytest.raises(Internal) as caught:
        open_store(settings_for(data_dir))

    assert "certificate store" in caught.value.message
    assert "backup" in caught.value.message


def test_a_connection_opened_without_the_check_does_not_read_the_whole_file(
    data_dir: Path,
) -> None:
    path = damaged_store(data_dir)

    with pytest.raises(Internal):
        SqliteBackend(path)
    unchecked = SqliteBackend(path, check=False)

    assert unchecked.path == path
    unchecked.close()


def test_a_store_from_a_newer_arcology_is_refused(data_dir: Path) -> None:
    open_store(settings_for(data_dir)).close()
    with sqlite3.connect(data_dir / FILE_NAME) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    with pytest.raises(ConfigError, match="newer than this Arcology knows"):
        open_store(settings_for(data_dir))


def test_opening_100k_domains_is_fast_and_get_stays_under_a_millisecond(
    store: Store, data_dir: Path
) -> None:
    chain = make_chain("*.example.com")
    store.put(bundle_of(chain, ["seed.example.com"]))
    store.close()
    with sqlite3.connect(data_dir / FILE_NAME) as db:
        db.executemany(
            "INSERT INTO domains (domain, fingerprint, updated_at) VALUES (?, ?, '')",
            ((f"d{n}.example.com", chain.fingerprint) for n in range(100_000)),
        )

    started = time.perf_counter()
    reopened = open_store(settings_for(data_dir))
    open_s = time.perf_counter() - started
    timings = []
    for n in range(0, 100_000, 500):
        t = time.perf_counter()
        found = reopened.get(f"d{n}.example.com")
        timings.append(time.perf_counter() - t)
        assert found is not None
    reopened.close()

    assert open_s < 1.0
    assert statistics.median(timings) < 0.001


# -- durability ---------------------------------------------------------------------

_UPLOADER = """
import sys
from pathlib import Path
from arc.bundle import parse_bundle
from arc.config import Config
from arc.store import open_store

data_dir, bundle_file = Path(sys.argv[1]), Path(sys.argv[2])
store = open_store(Config.embedded(data_dir=data_dir).arcology)
data = bundle_file.read_bytes()
for n in range(100_000):
    store.put(parse_bundle(data, domains=[f"d{n}.example.com"]))
    print(n, flush=True)
"""


def test_every_upload_acknowledged_before_a_sigkill_is_there_after_reopening(
    data_dir: Path, tmp_path: Path
) -> None:
    bundle_file = tmp_path / "bundle.pem"
    bundle_file.write_bytes(make_chain("*.example.com").bundle())
    child = subprocess.Popen(
        [sys.executable, "-c", _UPLOADER, str(data_dir), str(bundle_file)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    acknowledged: list[int] = []
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 30
        while len(acknowledged) < 60 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acknowledged.append(int(line))
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert len(acknowledged) == 60

    reopened = open_store(settings_for(data_dir))
    missing = [n for n in acknowledged if reopened.get(f"d{n}.example.com") is None]
    reopened.close()

    assert missing == []
    assert db_rows(data_dir, "PRAGMA integrity_check") == [("ok",)]


def test_expiring_lists_only_certificates_ending_before_the_moment(
    store: Store,
) -> None:
    now = dt.datetime.now(dt.UTC)
    soon = make_chain(
        "soon.example", "www.soon.example", not_after=now + dt.timedelta(days=3)
    )
    later = make_chain("later.example", not_after=now + dt.timedelta(days=60))
    store.put(bundle_of(later))
    store.put(bundle_of(soon))

    found = store.expiring(now + dt.timedelta(days=30))

    assert found == [
        {
            "fingerprint": soon.fingerprint,
            "not_after": soon.leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "domains": ["soon.example", "www.soon.example"],
        }
    ]
    assert [e["fingerprint"] for e in store.expiring(now + dt.timedelta(days=90))] == [
        soon.fingerprint,
        later.fingerprint,
    ]


def test_a_store_of_an_older_schema_is_migrated_on_open(data_dir: Path) -> None:
    store = open_store(settings_for(data_dir))
    store.put(bundle_of(make_chain("old.example")))
    store.close()
    with sqlite3.connect(data_dir / FILE_NAME) as db:
        db.execute("DROP INDEX certificates_by_not_after")
        db.execute("PRAGMA user_version = 1")

    reopened = open_store(settings_for(data_dir))
    found = reopened.get("old.example")
    reopened.close()

    assert found is not None
    assert db_rows(data_dir, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    indexes = db_rows(data_dir, "SELECT name FROM sqlite_master WHERE type = 'index'")
    assert ("certificates_by_not_after",) in indexes


# -- master key rotation ------------------------------------------------------------


def rotate_and_reseal(settings: Settings) -> None:
    """Rotate the store's master key the documented way; check every step."""
    chains = [make_chain(f"r{n}.example") for n in range(3)]
    store = open_store(settings)
    for chain in chains:
        store.put(bundle_of(chain))
    store.close()
    key_file = settings.master_key_file
    old, new = key_file.read_text().strip(), os.urandom(32).hex()

    # A new first key, the old one after it: old keys still open.
    key_file.write_text(f"{new}\n{old}\n")
    store = open_store(settings)
    opened = lookup(store, "r0.example")
    late = make_chain("late.example")
    store.put(bundle_of(late))  # sealed with the new key already
    resealed = store.reseal()
    again = store.reseal()
    store.close()

    # The old key gone: everything opens with the new one alone.
    key_file.write_text(f"{new}\n")
    store = open_store(settings)
    keys = [lookup(store, f"r{n}.example") for n in range(3)]
    late_key = lookup(store, "late.example")
    store.close()
    key_file.write_text(f"{old}\n")
    with pytest.raises(ConfigError, match="does not open this certificate store"):
        open_store(settings)

    assert opened is not None and opened.key_pem == chains[0].key_pem
    assert resealed == 3 and again == 0
    assert [k.key_pem if k else None for k in keys] == [c.key_pem for c in chains]
    assert late_key is not None and late_key.key_pem == late.key_pem


def test_a_rotated_master_key_reseals_every_private_key(data_dir: Path) -> None:
    rotate_and_reseal(settings_for(data_dir))
