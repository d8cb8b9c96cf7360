"""The local development CA, with a real Cryptosaur and a real TLS client."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from actors.cryptosaur import Cryptosaur
from arc.config import Config
from arc.localca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    ensure_localhost,
    issue_localhost,
    load_or_create_ca,
)
from arc.runtime import Runtime
from arc.testing import running


def asker(rt: Runtime) -> Any:
    return lambda actor, verb, payload: rt.ask(actor, verb, payload, timeout=10.0)


def handshake(chain_pem: bytes, key_pem: bytes, cafile: Path, tmp_path: Path) -> str:
    """Serve the chain on loopback once; a client trusting only cafile connects."""
    (tmp_path / "chain.pem").write_bytes(chain_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    try:
        with client_ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=5),
            server_hostname="localhost",
        ) as tls:
            version = tls.version() or ""
            tls.sendall(b"x")
    finally:
        thread.join(5)
        listener.close()
    return version


def test_first_start_makes_the_ca_and_a_localhost_certificate_a_client_trusts(
    tmp_path: Path,
) -> None:
    config = Config.embedded(data_dir=tmp_path / "data")
    data = config.arcology.data_dir

    with running([Cryptosaur], config) as rt:
        issued = ensure_localhost(data, asker(rt))
        stored = rt.ask("Cryptosaur", "getCertificate", {"domain": "localhost"})

    assert issued is True
    assert (data / CA_CERT_FILE).stat().st_mode & 0o777 == 0o644
    assert (data / CA_KEY_FILE).stat().st_mode & 0o777 == 0o600
    leaf = x509.load_pem_x509_certificate(stored["chain_pem"])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "::1",
    ]
    assert handshake(
        stored["chain_pem"], stored["key_pem"], data / CA_CERT_FILE, tmp_path
    )


def test_later_starts_reuse_the_ca_and_keep_a_valid_certificate(tmp_path: Path) -> None:
    config = Config.embedded(data_dir=tmp_path / "data")
    data = config.arcology.data_dir

    with running([Cryptosaur], config) as rt:
        ensure_localhost(data, asker(rt))
        ca_before = (data / CA_CERT_FILE).read_bytes()
        first = rt.ask("Cryptosaur", "getCertificate", {"domain": "localhost"})
    with running([Cryptosaur], config) as rt:
        issued = ensure_localhost(data, asker(rt))
        second = rt.ask("Cryptosaur", "getCertificate", {"domain": "localhost"})

    assert issued is False
    assert (data / CA_CERT_FILE).read_bytes() == ca_before
    assert first["fingerprint"] == second["fingerprint"]


def test_a_certificate_within_30_days_of_its_end_is_issued_again(
    tmp_path: Path,
) -> None:
    config = Config.embedded(data_dir=tmp_path / "data")
    data = config.arcology.data_dir
    ca = load_or_create_ca(data)

    with running([Cryptosaur], config) as rt:
        rt.ask("Cryptosaur", "setCertificate", {"bundle": issue_localhost(ca, 10)})
        issued = ensure_localhost(data, asker(rt))
        summary = rt.ask("Cryptosaur", "showCertificate", {"domain": "localhost"})

    assert issued is True
    assert summary["days_left"] > 300


def test_the_ca_cannot_vouch_for_other_names(tmp_path: Path) -> None:
    ca = load_or_create_ca(tmp_path)
    constraints = ca.cert.extensions.get_extension_for_class(x509.NameConstraints)

    assert constraints.critical
    assert x509.DNSName("localhost") in (constraints.value.permitted_subtrees or [])


def test_a_damaged_ca_file_is_refused_with_its_path(tmp_path: Path) -> None:
    load_or_create_ca(tmp_path)
    (tmp_path / CA_CERT_FILE).write_text("not a certificate")

    from arc.errors import ConfigError

    with pytest.raises(ConfigError, match="ca.pem"):
        load_or_create_ca(tmp_path)
