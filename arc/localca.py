"""The local development CA: HTTPS on localhost without a real certificate.

How this works: with ``local_ca`` set (the embedded defaults set it), the first
start creates a small certificate authority in the data folder (``ca.pem``,
mode 0644, for browsers and ``curl --cacert``; ``ca.key``, mode 0600) and
issues a certificate for localhost (SAN ``localhost``, ``127.0.0.1``,
``::1``) as a bundle, which Hyperion stores through Cryptosaur like any
upload. Later starts reuse the CA and issue again only when the store has no
certificate for localhost or the stored one has fewer than
``REISSUE_WITHIN_DAYS`` days left. A certificate someone uploaded for
localhost is left alone until it comes close to its end.

What always holds: the CA may only sign for localhost and the loopback
addresses (a critical name constraint), so trusting ``ca.pem`` can never make
a client trust this CA for any other name. It is for development only and the
log says so.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from loguru import logger

from arc.errors import ConfigError, NotFound

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
LOCALHOST = "localhost"
# Ten years: the CA outlives many leaves and is trusted by hand once.
CA_VALID_DAYS = 3650
# A year less a day, counting the five minutes of back-dating: browsers
# accept up to 398 days, and Mozilla's TLS profiles ask for under 366.
LEAF_VALID_DAYS = 364
# Issue again when the stored certificate is this close to its end.
REISSUE_WITHIN_DAYS = 30

Ask = Callable[[str, str, dict[str, Any]], Any]

log = logger.bind(actor="hyperion")


@dataclass(frozen=True)
class LocalCA:
    """The CA certificate, its key, and where ``ca.pem`` lives."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _loopback() -> list[x509.GeneralName]:
    return [
        x509.DNSName(LOCALHOST),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]


def load_or_create_ca(data_dir: Path) -> LocalCA:
    """The CA of ``data_dir``, created on the first call."""
    cert_path, key_path = data_dir / CA_CERT_FILE, data_dir / CA_KEY_FILE
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"local CA: {cert_path} or {key_path} is not a PEM certificate and "
                f"key ({exc}); remove both to have a new CA made"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"local CA: {key_path} must hold an EC key")
        return LocalCA(cert, key, cert_path)
    return _create_ca(data_dir)


def _create_ca(data_dir: Path) -> LocalCA:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Arcology"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Arcology local development CA"),
        ]
    )
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[
                    x509.DNSName(LOCALHOST),
                    x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")),
                    x509.IPAddress(ipaddress.ip_network("::1/128")),
                ],
                excluded_subtrees=None,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
        .sign(key, hashes.SHA256())
    )

    # The key first and private from its first byte; then the public part.
    key_path, cert_path = data_dir / CA_KEY_FILE, data_dir / CA_CERT_FILE
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("local CA created for development only ca={}", cert_path)
    return LocalCA(cert, key, cert_path)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def issue_localhost(ca: LocalCA, valid_days: int = LEAF_VALID_DAYS) -> bytes:
    """A bundle for localhost: leaf, then the CA, then the leaf's key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    public = key.public_key()
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOCALHOST)]))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(_loopback()), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski.value
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM)
        + ca.cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def days_left(not_after: str, now: dt.datetime | None = None) -> int:
    """Whole days from now to an ISO 8601 ``not_after`` (negative: expired)."""
    end = dt.datetime.fromisoformat(not_after.replace("Z", "+00:00"))
    if end.tzinfo is None:
        end = end.replace(tzinfo=dt.UTC)
    return (end - (now or _now())).days


def ensure_localhost(data_dir: Path, ask: Ask) -> bool:
    """Make sure the store has a certificate for localhost; True if issued.

    ``ask(actor, verb, payload)`` is the runtime's blocking ask. The CA is
    made (or loaded) every time, so ``ca.pem`` is there to trust.
    """
    ca = load_or_create_ca(data_dir)
    try:
        stored = ask("Cryptosaur", "showCertificate", {"domain": LOCALHOST})
    except NotFound:
        stored = None
    if stored is not None:
        left = days_left(str(stored["not_after"]))
        if left > REISSUE_WITHIN_DAYS:
            return False
        log.info("localhost certificate ends soon, issuing again days_left={}", left)
    ask("Cryptosaur", "setCertificate", {"bundle": issue_localhost(ca)})
    log.info(
        "local CA issued a certificate for localhost, for development only; "
        "trust it with ca={}",
        ca.cert_path,
    )
    return True
