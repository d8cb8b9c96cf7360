"""Build a server-side TLS context for one domain from PEM bytes in memory.

How this works: ``SSLContext.load_cert_chain`` accepts only file paths, so
the chain and key are written to an anonymous memory file
(``os.memfd_create``) and loaded through ``/proc/self/fd/N``; the file has
no name in any filesystem and disappears when its descriptor is closed, so
the private key never touches the disk. Before OpenSSL sees them, the key
is checked against the leaf here, because OpenSSL reports a mismatch as the
misleading ``NO_CERTIFICATE_ASSIGNED``.

What every context built here holds (Mozilla's "intermediate" profile):

- TLS 1.2 and TLS 1.3 only; for TLS 1.2 the profile's ECDHE AEAD cipher
  suites; TLS 1.3 keeps OpenSSL's three suites, which are the profile's;
- the client's cipher order wins (``OP_CIPHER_SERVER_PREFERENCE`` off, as the
  profile says, since every suite offered is strong);
- no compression, no renegotiation;
- ALPN offers ``http/1.1`` only (the protocol Arcology serves), on every
  context, since a handshake reads ALPN from the context it ends with;
- key-exchange groups X25519, P-256, P-384, through the OpenSSL
  configuration set up by :mod:`arc.tls.opensslconf` (a context cannot set
  them in Python 3.11).

Session tickets stay on (OpenSSL's default): their keys belong to the
context, so they are renewed whenever the cache rebuilds it (at the latest
after ``cache_ttl_s``).

Cost: about 1 ms of CPU per context and about 25 KiB of memory.

LIMITATION: the DHE suites of the profile are left out: Python 3.11 cannot
load the ffdhe2048 group the profile prescribes, so they would never be
chosen; clients that support only DHE (none among current browsers) cannot
connect.
"""

from __future__ import annotations

import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from arc.errors import BadInput

# Mozilla intermediate profile, TLS 1.2 part, without the DHE suites (see the
# LIMITATION above).
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
ALPN_PROTOCOLS = ["http/1.1"]


def build_context(domain: str, chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """Build the server context that presents ``chain_pem`` for ``domain``.

    Args:
        domain: the certificate's domain, used in error messages only.
        chain_pem: the chain, leaf first, as PEM.
        key_pem: the leaf's private key as unencrypted PEM.

    Raises:
        BadInput: the chain or key cannot be read, or the key is not the
            leaf's; the message names the domain and what was wrong.
    """
    check_key_matches_leaf(domain, chain_pem, key_pem)
    context = new_server_context()
    fd = os.memfd_create("arc-tls-bundle", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem + b"\n" + key_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except (ssl.SSLError, OSError) as exc:
        raise BadInput(
            f"certificate for {domain}: OpenSSL refused the chain or key ({exc})"
        ) from exc
    finally:
        os.close(fd)
    return context


def new_server_context() -> ssl.SSLContext:
    """A server context with the protocol settings and no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    # One TLS 1.3 session ticket per handshake instead of OpenSSL's two: a
    # client resumes its next connection with one, and each ticket costs an
    # encryption and a record on every full handshake.
    context.num_tickets = 1
    return context


def check_key_matches_leaf(domain: str, chain_pem: bytes, key_pem: bytes) -> None:
    """Raise BadInput unless ``key_pem`` is the private key of the leaf.

    The RSA consistency check (about 40 ms a key) is skipped: the store
    checked the key when the bundle was uploaded; here only the pairing is
    in question.
    """
    try:
        certificates = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise BadInput(
            f"certificate for {domain}: expected a PEM chain, got unreadable "
            f"data ({exc})"
        ) from exc
    try:
        key = serialization.load_pem_private_key(
            key_pem, password=None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError) as exc:
        raise BadInput(
            f"certificate for {domain}: expected an unencrypted PEM private key, "
            f"got unreadable data ({exc})"
        ) from exc
    leaf = certificates[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(
        der, spki
    ):
        raise BadInput(
            f"certificate for {domain}: private key does not match the leaf "
            f"certificate (leaf {leaf.subject.rfc4514_string()})"
        )
