"""Certificates for tests, made on the spot (never checked in).

The whole API::

    from tests.certs import make_ca, make_chain, make_key

    chain = make_chain("shop.example.com")     # EC P-256 leaf <- intermediate <- root
    chain.bundle()                             # chain then key: an upload
    chain.chain_pem, chain.key_pem             # leaf first; PKCS#8 key
    chain.root_pem                             # the trust anchor, for a client
    chain.client_context()                     # ssl.SSLContext trusting that root
    chain.write(tmp_path)                      # (chain file, key file) for openssl & co

    make_chain("*.example.com", "example.com")       # wildcard and apex
    make_chain("bücher.example")                     # IDN: the SAN holds the A-label
    make_chain("a.example", key_type="RSA 2048")     # also "EC P-384", "RSA 1024", ...
    make_chain("a.example", not_after=past)          # expired (not_before moves too)
    make_chain(common_name="a.example")              # CN only, no subjectAltName
    make_chain(common_name="Test server")            # no DNS name at all
    make_chain("a.example", ca_leaf=True)            # basicConstraints CA:TRUE
    make_chain("a.example", ca=make_ca(intermediates=2))

``key_type`` is one of ``"EC P-256"``, ``"EC P-384"``, ``"EC P-521"``,
``"RSA <bits>"`` or ``"Ed25519"``. CA keys are EC P-256 and the default CA
is made once per test process (signing is fast, key generation for RSA is
not); every leaf gets a fresh key unless one is passed as ``key=``.
"""

from __future__ import annotations

import datetime as dt
import encodings.idna
import functools
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_CURVES: dict[str, ec.EllipticCurve] = {
    "EC P-256": ec.SECP256R1(),
    "EC P-384": ec.SECP384R1(),
    "EC P-521": ec.SECP521R1(),
}


def make_key(key_type: str = "EC P-256") -> PrivateKey:
    """A fresh private key of ``key_type`` (see the module docstring)."""
    if key_type in _CURVES:
        return ec.generate_private_key(_CURVES[key_type])
    if key_type.startswith("RSA "):
        return rsa.generate_private_key(
            public_exponent=65537, key_size=int(key_type[4:])
        )
    if key_type == "Ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"make_key: unknown key type {key_type!r}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _a_label(name: str) -> str:
    """The ASCII form a certificate carries for a (possibly IDN) domain."""
    return ".".join(
        label if label.isascii() else encodings.idna.ToASCII(label).decode()
        for label in name.split(".")
    )


def _sign(key: PrivateKey, builder: x509.CertificateBuilder) -> x509.Certificate:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


@dataclass(frozen=True)
class CA:
    """A root and its intermediates; ``issuer`` and ``key`` sign leaves."""

    root: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    key: PrivateKey

    @property
    def issuer(self) -> x509.Certificate:
        """The certificate that signs leaves (the last intermediate, or root)."""
        return self.intermediates[-1] if self.intermediates else self.root

    @property
    def root_pem(self) -> bytes:
        """The root certificate in PEM."""
        return self.root.public_bytes(serialization.Encoding.PEM)


def make_ca(intermediates: int = 1, name: str = "Arcology Test") -> CA:
    """A fresh root with ``intermediates`` intermediates below it (EC P-256)."""
    now = _now()
    root_key = make_key()
    root = _sign(
        root_key,
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} Root"))
        .issuer_name(_name(f"{name} Root"))
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=3650))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()),
            critical=False,
        ),
    )
    chain: list[x509.Certificate] = []
    parent, parent_key = root, root_key
    for depth in range(intermediates):
        key = make_key()
        cert = _sign(
            parent_key,
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} Intermediate {depth + 1}"))
            .issuer_name(parent.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=3000))
            .not_valid_after(now + dt.timedelta(days=3000))
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=None), critical=True
            )
            .add_extension(_ca_usage(), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    parent_key.public_key()
                ),
                critical=False,
            ),
        )
        chain.append(cert)
        parent, parent_key = cert, key
    return CA(root=root, intermediates=tuple(chain), key=parent_key)


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


@functools.cache
def default_ca() -> CA:
    """The CA every ``make_chain`` uses unless given another (one per process)."""
    return make_ca()


@dataclass(frozen=True)
class Chain:
    """A leaf, its key and the CA above it, with the PEM forms tests need."""

    leaf: x509.Certificate
    key: PrivateKey
    ca: CA
    intermediates: tuple[x509.Certificate, ...] = field(default=())

    @property
    def root(self) -> x509.Certificate:
        """The self-signed root at the top."""
        return self.ca.root

    @property
    def leaf_pem(self) -> bytes:
        """The leaf alone, PEM."""
        return self.leaf.public_bytes(serialization.Encoding.PEM)

    @property
    def chain_pem(self) -> bytes:
        """Leaf then intermediates (no root), PEM: what a server sends."""
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM)
            for c in (self.leaf, *self.intermediates)
        )

    @property
    def root_pem(self) -> bytes:
        """The root, PEM: what a client trusts."""
        return self.ca.root_pem

    @property
    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM (``BEGIN PRIVATE KEY``)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def key_der(self) -> bytes:
        """The private key, unencrypted PKCS#8 DER."""
        return self.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def key_pem_traditional(self) -> bytes:
        """``BEGIN RSA PRIVATE KEY`` or ``BEGIN EC PRIVATE KEY``."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    def key_pem_encrypted(self, passphrase: bytes) -> bytes:
        """``BEGIN ENCRYPTED PRIVATE KEY`` (PKCS#8, AES-256) under ``passphrase``."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )

    @property
    def fingerprint(self) -> str:
        """Lower hex SHA-256 of the leaf's DER."""
        return self.leaf.fingerprint(hashes.SHA256()).hex()

    def bundle(
        self, *, key_first: bool = False, root: bool = False, crlf: bool = False
    ) -> bytes:
        """The upload: chain (leaf first, root if asked) and key, as PEM bytes."""
        chain = self.chain_pem + (self.root_pem if root else b"")
        data = self.key_pem + chain if key_first else chain + self.key_pem
        return data.replace(b"\n", b"\r\n") if crlf else data

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write ``chain.pem`` and ``key.pem`` (mode 0600) into ``directory``."""
        chain_path, key_path = directory / "chain.pem", directory / "key.pem"
        chain_path.write_bytes(self.chain_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(self.key_pem)
        return chain_path, key_path

    def client_context(self) -> ssl.SSLContext:
        """A TLS client context that trusts this chain's root (and only it)."""
        context = ssl.create_default_context(cadata=self.root_pem.decode())
        return context


def make_chain(
    *domains: str,
    key_type: str = "EC P-256",
    key: PrivateKey | None = None,
    common_name: str | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    ca_leaf: bool = False,
    ca: CA | None = None,
) -> Chain:
    """A leaf for ``domains`` (subjectAltName DNS names) signed by ``ca``.

    With no domains there is no subjectAltName; ``common_name`` then is the
    only name the leaf has. ``not_after`` in the past gives an expired leaf,
    ``not_before`` in the future one not yet valid. IDN domains may be given
    in Unicode; the certificate carries their A-labels.
    """
    ca = ca or default_ca()
    key = key or make_key(key_type)
    now = _now()
    not_after = not_after or now + dt.timedelta(days=90)
    not_before = not_before or min(now, not_after) - dt.timedelta(days=1)
    cn = common_name or (_a_label(domains[0]) if domains else None)
    subject = _name(cn) if cn else x509.Name([])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=ca_leaf, path_length=None), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if domains:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(_a_label(d)) for d in domains]),
            critical=not cn,
        )
    leaf = _sign(ca.key, builder)
    return Chain(
        leaf=leaf, key=key, ca=ca, intermediates=tuple(reversed(ca.intermediates))
    )
