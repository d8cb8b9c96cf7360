"""Cryptosaur in a real runtime: its verbs, announcements and expiry warnings."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loguru import logger

from actors.cryptosaur import (
    CHANGED,
    CHANGES_KEPT_DAYS,
    MAX_LISTED_DOMAINS,
    Cryptosaur,
)
from arc.bundle import parse_bundle
from arc.config import Config
from arc.errors import BadInput, NotFound
from arc.runtime import Runtime
from arc.store import open_store
from arc.store.sqlite import FILE_NAME
from arc.testing import running
from tests.certs import Chain, make_chain


@functools.cache
def shop() -> Chain:
    return make_chain("shop.example.com", "www.shop.example.com")


@functools.cache
def wildcard() -> Chain:
    return make_chain("*.example.com")


class Heard:
    """Collects the announcements of certificate changes, thread-safely."""

    def __init__(self) -> None:
        self.payloads: list[Any] = []
        self.changed = threading.Condition()

    def __call__(self, payload: Any) -> None:
        with self.changed:
            self.payloads.append(payload)
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Any]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.payloads) >= count, timeout)
            return list(self.payloads)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config.embedded(data_dir=tmp_path / "data")


@pytest.fixture
def runtime(config: Config) -> Iterator[Runtime]:
    with running([Cryptosaur], config) as rt:
        yield rt


@pytest.fixture
def heard(runtime: Runtime) -> Heard:
    collector = Heard()
    runtime.subscribe(CHANGED, collector)
    return collector


def ask(runtime: Runtime, verb: str, payload: Any = None) -> Any:
    return runtime.ask("Cryptosaur", verb, payload, timeout=10.0)


# -- setCertificate -----------------------------------------------------------------


def test_an_upload_answers_a_summary_and_announces_the_domains(
    runtime: Runtime, heard: Heard
) -> None:
    chain = shop()

    summary = ask(runtime, "setCertificate", {"bundle": chain.bundle()})

    assert summary["domain"] == "shop.example.com"
    assert summary["domains"] == ["shop.example.com", "www.shop.example.com"]
    assert summary["fingerprint"] == chain.fingerprint
    assert summary["key_type"] == "EC P-256"
    assert summary["chain_length"] == 2
    assert summary["reordered"] is False
    assert summary["replaced"] is None
    assert summary["days_left"] in (88, 89)
    assert summary["not_after"].endswith("Z")
    assert heard.wait_for(1) == [
        {"domains": ["shop.example.com", "www.shop.example.com"]}
    ]


def test_a_second_upload_replaces_the_first_and_says_so(runtime: Runtime) -> None:
    old, new = make_chain("a.example"), make_chain("a.example")
    ask(runtime, "setCertificate", {"bundle": old.bundle()})

    summary = ask(runtime, "setCertificate", {"bundle": new.bundle()})

    assert summary["replaced"] == old.fingerprint
    assert summary["replaced_fingerprints"] == [old.fingerprint]
    answer = ask(runtime, "getCertificate", {"domain": "a.example"})
    assert answer["fingerprint"] == new.fingerprint


def test_an_upload_can_name_its_domains_and_an_encrypted_key_passphrase(
    runtime: Runtime,
) -> None:
    chain = wildcard()
    data = chain.chain_pem + chain.key_pem_encrypted(b"pass phrase")

    summary = ask(
        runtime,
        "setCertificate",
        {
            "bundle": data.decode(),
            "domains": ["api.example.com"],
            "passphrase": "pass phrase",
        },
    )

    assert summary["domains"] == ["api.example.com"]
    assert ask(runtime, "getCertificate", {"domain": "api.example.com"})["domain"] == (
        "api.example.com"
    )


def test_an_out_of_order_bundle_is_reported_as_reordered(runtime: Runtime) -> None:
    chain = shop()
    intermediate = chain.intermediates[0].public_bytes(serialization.Encoding.PEM)
    data = intermediate + chain.key_pem + chain.leaf_pem

    summary = ask(runtime, "setCertificate", {"bundle": data})

    assert summary["reordered"] is True


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (None, "'bundle' must be the PEM bytes"),
        ({}, "'bundle' must be the PEM bytes"),
        ("text", "payload must be a map"),
        ({"bundle": b"x", "color": "red"}, "unknown field(s) color"),
        ({"bundle": b"", "domains": "a.example"}, "'domains' must be a non-empty list"),
        ({"bundle": b"x", "passphrase": 7}, "'passphrase' must be a string or bytes"),
        ({"bundle": b"junk"}, "bundle: not PEM"),
    ],
)
def test_a_malformed_upload_is_refused_and_changes_nothing(
    runtime: Runtime, heard: Heard, payload: Any, says: str
) -> None:
    ask(runtime, "setCertificate", {"bundle": shop().bundle()})
    before = ask(runtime, "listCertificates", {})

    with pytest.raises(BadInput) as caught:
        ask(runtime, "setCertificate", payload)

    assert says in caught.value.message
    assert ask(runtime, "listCertificates", {}) == before
    assert len(heard.wait_for(1)) == 1


@pytest.mark.parametrize(
    "bad",
    [
        lambda: make_chain(
            "old.example", not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
        ).bundle(),
        lambda: shop().chain_pem + wildcard().key_pem,
        lambda: make_chain("ca.example", ca_leaf=True).bundle(),
        lambda: make_chain("weak.example", key_type="RSA 1024").bundle(),
    ],
    ids=["expired", "wrong-key", "ca-leaf", "rsa-1024"],
)
def test_a_refused_bundle_leaves_the_stored_certificate_in_place(
    runtime: Runtime, config: Config, bad: Any
) -> None:
    chain = shop()
    ask(runtime, "setCertificate", {"bundle": chain.bundle()})

    with pytest.raises(BadInput):
        ask(
            runtime,
            "setCertificate",
            {"bundle": bad(), "domains": ["shop.example.com"]},
        )

    answer = ask(runtime, "getCertificate", {"domain": "shop.example.com"})
    assert answer["fingerprint"] == chain.fingerprint
    assert [row["domain"] for row in ask(runtime, "listCertificates", {})] == [
        "shop.example.com",
        "www.shop.example.com",
    ]


# -- getCertificate -----------------------------------------------------------------


def test_get_certificate_gives_a_chain_and_key_a_tls_server_can_use(
    runtime: Runtime, tmp_path: Path
) -> None:
    chain = shop()
    ask(runtime, "setCertificate", {"bundle": chain.bundle(key_first=True)})

    answer = ask(runtime, "getCertificate", {"domain": "WWW.Shop.Example.com."})

    assert answer["domain"] == "www.shop.example.com"
    assert isinstance(answer["chain_pem"], bytes) and isinstance(
        answer["key_pem"], bytes
    )
    assert answer["not_after"].endswith("Z")
    pem = tmp_path / "server.pem"
    pem.write_bytes(answer["chain_pem"] + answer["key_pem"])
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pem)
    assert _handshake(server, chain.client_context(), "www.shop.example.com") == (
        chain.leaf_pem
    )


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, name: str
) -> bytes:
    """A real TLS handshake in memory; returns the leaf the client verified."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(20):
        for end in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if client.version() and server.version():
            try:
                client.do_handshake()
                server.do_handshake()
                break
            except ssl.SSLWantReadError:
                continue
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return ssl.DER_cert_to_PEM_cert(der).encode()


def test_get_certificate_falls_back_to_the_wildcard_one_label_up(
    runtime: Runtime,
) -> None:
    chain = wildcard()
    ask(runtime, "setCertificate", {"bundle": chain.bundle()})

    answer = ask(runtime, "getCertificate", {"domain": "blog.example.com"})

    assert answer["domain"] == "*.example.com"
    assert answer["key_pem"] == chain.key_pem
    with pytest.raises(NotFound, match=r"a\.blog\.example\.com \(looked for"):
        ask(runtime, "getCertificate", {"domain": "a.blog.example.com"})


def test_get_certificate_for_an_unknown_or_bad_domain_is_refused(
    runtime: Runtime,
) -> None:
    with pytest.raises(NotFound, match="looked for x.example.org, \\*.example.org"):
        ask(runtime, "getCertificate", {"domain": "x.example.org"})
    with pytest.raises(BadInput, match="'domain' must be a string"):
        ask(runtime, "getCertificate", {})
    with pytest.raises(BadInput, match="leftmost"):
        ask(runtime, "getCertificate", {"domain": "a.*.example"})


# -- delete, list, show -------------------------------------------------------------


def test_delete_removes_every_domain_of_the_certificate_and_announces_them(
    runtime: Runtime, heard: Heard
) -> None:
    ask(runtime, "setCertificate", {"bundle": shop().bundle()})

    answer = ask(runtime, "deleteCertificate", {"domain": "www.shop.example.com"})

    assert answer == {"deleted": ["shop.example.com", "www.shop.example.com"]}
    assert heard.wait_for(2)[1] == {
        "domains": ["shop.example.com", "www.shop.example.com"]
    }
    assert ask(runtime, "listCertificates", {}) == []
    with pytest.raises(NotFound, match="no certificate stored for shop.example.com"):
        ask(runtime, "deleteCertificate", {"domain": "shop.example.com"})


def test_delete_takes_the_exact_domain_not_the_wildcard(runtime: Runtime) -> None:
    ask(runtime, "setCertificate", {"bundle": wildcard().bundle()})

    with pytest.raises(NotFound):
        ask(runtime, "deleteCertificate", {"domain": "blog.example.com"})

    assert ask(runtime, "deleteCertificate", {"domain": "*.example.com"}) == {
        "deleted": ["*.example.com"]
    }


def test_list_gives_every_domain_with_days_left(runtime: Runtime) -> None:
    ask(runtime, "setCertificate", {"bundle": shop().bundle()})
    ask(runtime, "setCertificate", {"bundle": wildcard().bundle()})

    rows = ask(runtime, "listCertificates", {})

    assert [row["domain"] for row in rows] == [
        "*.example.com",
        "shop.example.com",
        "www.shop.example.com",
    ]
    assert all(row["days_left"] in (88, 89) for row in rows)
    assert rows[1]["domains"] == ["shop.example.com", "www.shop.example.com"]


def test_show_gives_the_summary_and_chain_but_never_the_key(runtime: Runtime) -> None:
    chain = wildcard()
    ask(runtime, "setCertificate", {"bundle": chain.bundle(root=True)})

    shown = ask(runtime, "showCertificate", {"domain": "any.example.com"})

    assert shown["domain"] == "*.example.com"
    assert shown["domains"] == ["*.example.com"]
    assert shown["fingerprint"] == chain.fingerprint
    assert shown["chain_length"] == 3
    assert [link["subject"] for link in shown["chain"]] == [
        "CN=*.example.com",
        "CN=Arcology Test Intermediate 1",
        "CN=Arcology Test Root",
    ]
    assert shown["chain"][0]["issuer"] == "CN=Arcology Test Intermediate 1"
    assert "PRIVATE KEY" not in repr(shown)
    assert not any("key_pem" in name for name in shown)


# -- lifecycle ----------------------------------------------------------------------


def test_certificates_survive_a_restart_of_the_process(config: Config) -> None:
    chain = shop()
    with running([Cryptosaur], config) as first:
        ask(first, "setCertificate", {"bundle": chain.bundle()})

    with running([Cryptosaur], config) as second:
        answer = ask(second, "getCertificate", {"domain": "shop.example.com"})

    assert answer["key_pem"] == chain.key_pem


def test_certificates_near_their_end_are_warned_about_at_start(config: Config) -> None:
    soon = make_chain(
        "soon.example",
        not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=5, hours=1),
    )
    later = shop()
    store = open_store(config.arcology)
    store.put(parse_bundle(soon.bundle()))
    store.put(parse_bundle(later.bundle()))
    store.close()
    lines: list[str] = []
    sink = logger.add(
        lambda m: lines.append(str(m)), level="WARNING", format="{message}"
    )
    try:
        with running([Cryptosaur], config) as rt:
            expiring = ask(rt, "checkExpiry", {})
    finally:
        logger.remove(sink)

    assert [item["domains"] for item in expiring] == [["soon.example"]]
    assert expiring[0]["days_left"] == 5
    warned = [line for line in lines if "soon.example" in line]
    assert len(warned) == 2  # at start, and when asked
    assert "certificate expires soon domains=soon.example" in warned[0]
    assert "days_left=5" in warned[0]
    assert not any("shop.example.com" in line for line in lines)


def test_the_ticker_stops_with_the_actor(config: Config) -> None:
    with running([Cryptosaur], config):
        assert any(t.name == "cryptosaur-ticker" for t in threading.enumerate())

    assert not any(t.name == "cryptosaur-ticker" for t in threading.enumerate())


def test_an_upload_by_another_process_on_the_same_store_is_announced(
    runtime: Runtime, heard: Heard, config: Config
) -> None:
    chain = make_chain("elsewhere.example")
    other = open_store(config.arcology)  # what another Arcology process holds

    other.put(parse_bundle(chain.bundle()))
    other.close()

    assert heard.wait_for(1, timeout=5.0) == [{"domains": ["elsewhere.example"]}]
    assert ask(runtime, "getCertificate", {"domain": "elsewhere.example"})[
        "fingerprint"
    ] == (chain.fingerprint)
    time.sleep(1.5)
    assert len(heard.payloads) == 1


# -- fuzzing through the actor ------------------------------------------------------


@st.composite
def damaged_bundles(draw: st.DrawFn) -> bytes:
    data = shop().bundle(key_first=draw(st.booleans()))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        if kind == "flip":
            data = (
                data[:at]
                + bytes([data[at] ^ draw(st.integers(1, 255))])
                + data[at + 1 :]
            )
        elif kind == "cut":
            data = data[:at] + data[at + draw(st.integers(1, 300)) :]
        else:
            data = data[:at] + draw(st.binary(min_size=1, max_size=40)) + data[at:]
    return data


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(st.binary(max_size=2048), damaged_bundles()))
def test_random_and_damaged_uploads_never_crash_and_never_change_the_store(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    data_dir = tmp_path_factory.getbasetemp() / "cryptosaur-fuzz" / "data"
    config = Config.embedded(data_dir=data_dir)
    with running([Cryptosaur], config) as rt:
        before = ask(rt, "listCertificates", {})
        try:
            ask(rt, "setCertificate", {"bundle": data, "domains": ["shop.example.com"]})
        except BadInput:
            assert ask(rt, "listCertificates", {}) == before
        else:
            # Damage in the text around the blocks leaves a good bundle.
            assert ask(rt, "getCertificate", {"domain": "shop.example.com"})
        assert rt.status()["actors"][0]["restarts"] == 0


# -- pruneChanges -------------------------------------------------------------------


def test_prune_changes_deletes_records_older_than_a_week_only(
    runtime: Runtime, config: Config
) -> None:
    for name in ("old.example", "older.example", "new.example"):
        ask(runtime, "setCertificate", {"bundle": make_chain(name).bundle()})
    # The first two changes were made long ago.
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=CHANGES_KEPT_DAYS + 1)
    with sqlite3.connect(config.arcology.data_dir / FILE_NAME) as db:
        db.execute(
            "UPDATE changes SET changed_at = ? WHERE seq <= 2", (long_ago.isoformat(),)
        )

    answer = ask(runtime, "pruneChanges", {})

    assert answer == {"pruned": 2}
    store = open_store(config.arcology)
    try:
        assert store.changes_since(0) == [(3, "new.example")]
        assert [row["domain"] for row in store.list()] == [
            "new.example",
            "old.example",
            "older.example",
        ]
    finally:
        store.close()


def test_prune_changes_refuses_fields(runtime: Runtime) -> None:
    with pytest.raises(BadInput, match="pruneChanges: unknown field"):
        ask(runtime, "pruneChanges", {"days": 1})


def test_list_rows_name_a_bounded_part_of_a_large_bundle_and_count_it_all(
    runtime: Runtime,
) -> None:
    names = [f"site-{i:03d}.example.com" for i in range(MAX_LISTED_DOMAINS + 30)]
    ask(runtime, "setCertificate", {"bundle": make_chain(*names).bundle()})

    rows = ask(runtime, "listCertificates", {})
    shown = ask(runtime, "showCertificate", {"domain": names[-1]})

    assert [row["domain"] for row in rows] == sorted(names)
    assert all(row["domains_total"] == len(names) for row in rows)
    assert all(row["domains"] == sorted(names)[:MAX_LISTED_DOMAINS] for row in rows)
    assert shown["domains"] == sorted(names)


def test_reseal_keys_answers_how_many_it_resealed(runtime: Runtime) -> None:
    ask(runtime, "setCertificate", {"bundle": make_chain("seal.example").bundle()})

    answer = ask(runtime, "resealKeys", {})

    assert answer == {"resealed": 0}  # already sealed with the first key
    with pytest.raises(BadInput, match="resealKeys: unknown field"):
        ask(runtime, "resealKeys", {"now": True})
