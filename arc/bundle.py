"""Bundles: the PEM an operator uploads, checked before anything is stored.

How this works: ``parse_bundle`` is a plain function over bytes. It finds
the PEM blocks itself (so it can say which block is wrong and ignore the
text around them), decodes every certificate, loads the one private key
once (an RSA key costs about 40 ms to load because of its consistency
check, so this happens at upload and never per handshake), and then:

1. picks the leaf: the certificate whose public key is the private key's;
2. builds the chain upwards from the leaf, one link at a time with
   ``verify_directly_issued_by`` (issuer name and signature), taking the
   certificates in whatever order the file had them;
3. checks the leaf: valid now, not a CA, names at least one domain;
4. decides the domains: the leaf's subjectAltName DNS names (its CN when it
   has none), or the caller's list, each of which the leaf must cover.

What always holds: the result has a leaf-first chain in which every
certificate is signed by the next, a key that matches the leaf, and domains
the leaf is valid for. Anything else raises ``BadInput`` with a message that
names the problem and the certificate (``certificate 2 (CN=...)`` counts
certificates in the order of the file, from 1). Nothing is stored here.

What it accepts: key before or after the chain; PKCS#8, ``RSA PRIVATE KEY``
and ``EC PRIVATE KEY``; encrypted PKCS#8 or legacy ``Proc-Type`` encrypted
keys with a passphrase; LF or CRLF; text before, between and after blocks
(the ``Bag Attributes`` of ``openssl pkcs12``); ``EC PARAMETERS`` and other
non-key blocks, which are ignored; the same certificate twice (kept once);
a self-signed root at the end (kept, as sent).

LIMITATION: the chain is not checked against a trust store, so a chain that
links but ends at an unknown or self-signed root is accepted (clients decide
whom they trust). Intermediates are not checked for expiry, because real
bundles still carry expired cross-signs that clients skip.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from arc.errors import BadInput
from arc.names import covers, normalise_domain

# A chain with a 4096-bit RSA key and three intermediates is about 10 KiB;
# 1 MiB leaves room for Bag Attributes and comments and still bounds the
# work an upload can cause.
MAX_BUNDLE_BYTES = 1024 * 1024
# Leaf, two or three intermediates, perhaps a root and a cross-sign: real
# chains are far below this.
MAX_CERTIFICATES = 10
MIN_RSA_BITS = 2048
# Larger keys make every handshake slower without a real gain; above this
# loading the key alone takes seconds.
MAX_RSA_BITS = 8192

_CURVE_NAMES = {"secp256r1": "EC P-256", "secp384r1": "EC P-384"}
_KEY_LABELS = {"PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"}
_ENCRYPTED_KEY_LABEL = "ENCRYPTED PRIVATE KEY"

_BEGIN = re.compile(rb"-----BEGIN ([^\n-]{1,64})-----")
_BLOCK = re.compile(rb"-----BEGIN ([^\n-]{1,64})-----\n(.*?)-----END \1-----", re.S)

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Bundle:
    """A checked bundle, ready to be stored.

    ``chain`` is leaf first; ``key_pem`` is the key as unencrypted PKCS#8
    PEM; ``fingerprint`` is the lower hex SHA-256 of the leaf's DER.
    """

    domains: list[str]
    chain: list[x509.Certificate]
    chain_pem: bytes
    key_pem: bytes
    fingerprint: str
    not_before: dt.datetime
    not_after: dt.datetime
    issuer: str
    subject: str
    key_type: str
    reordered: bool

    def summary(self, now: dt.datetime | None = None) -> dict[str, Any]:
        """What an operator is shown: no key, datetimes as ISO 8601 UTC."""
        return {
            "domain": self.domains[0],
            "domains": list(self.domains),
            "fingerprint": self.fingerprint,
            "not_before": iso_utc(self.not_before),
            "not_after": iso_utc(self.not_after),
            "issuer": self.issuer,
            "subject": self.subject,
            "key_type": self.key_type,
            "chain_length": len(self.chain),
            "reordered": self.reordered,
            "days_left": days_left(self.not_after, now),
        }


def iso_utc(moment: dt.datetime) -> str:
    """``2027-01-01T00:00:00Z``: an aware datetime as ISO 8601 in UTC."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def days_left(not_after: dt.datetime, now: dt.datetime | None = None) -> int:
    """Whole days from ``now`` until ``not_after`` (negative once expired)."""
    now = _aware(now)
    return int((not_after - now).total_seconds() // 86400)


def _aware(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    return now if now.tzinfo else now.replace(tzinfo=dt.UTC)


def parse_bundle(
    data: bytes,
    *,
    domains: list[str] | None = None,
    passphrase: bytes | None = None,
    now: dt.datetime | None = None,
) -> Bundle:
    """Check an uploaded bundle and return it in the shape the store keeps.

    Args:
        data: the PEM text: certificates and one private key, any order.
        domains: the domains to store it for; each must be covered by the
            leaf. ``None`` means every DNS name of the leaf.
        passphrase: decrypts an encrypted private key; ignored otherwise.
        now: the moment validity is checked at (default: now).

    Raises:
        BadInput: the bundle is refused; the message says why.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadInput(f"bundle: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_BUNDLE_BYTES:
        raise BadInput(
            f"bundle: {len(data)} bytes is over the limit of {MAX_BUNDLE_BYTES}"
        )
    try:
        return _parse(data, domains, passphrase, _aware(now))
    except (ValueError, TypeError, UnsupportedAlgorithm, UnicodeError) as exc:
        # Each step translates the errors it expects; this catches what a
        # malformed certificate can still raise from a lazily parsed field.
        if isinstance(exc, BadInput):
            raise
        raise BadInput(f"bundle: cannot be read ({_short(exc)})") from exc


def _parse(
    data: bytes,
    domains: list[str] | None,
    passphrase: bytes | None,
    now: dt.datetime,
) -> Bundle:
    blocks = _pem_blocks(data)
    cert_blocks = [body for label, _, body in blocks if label == "CERTIFICATE"]
    key_blocks = [(label, text) for label, text, _ in blocks if _is_key(label)]

    # Counts first: they are cheap and bound the work below.
    if not cert_blocks:
        raise BadInput("bundle: no certificate (expected a BEGIN CERTIFICATE block)")
    if len(cert_blocks) > MAX_CERTIFICATES:
        raise BadInput(
            f"bundle: {len(cert_blocks)} certificates, more than "
            f"{MAX_CERTIFICATES} (send the leaf and its intermediates)"
        )
    if not key_blocks:
        raise BadInput("bundle: no private key (expected a BEGIN PRIVATE KEY block)")
    if len(key_blocks) > 1:
        labels = ", ".join(label for label, _ in key_blocks)
        raise BadInput(
            f"bundle: more than one private key (found {len(key_blocks)}: {labels}); "
            "send only the leaf's key"
        )

    certs = _decode_certificates(cert_blocks)
    key, key_type = _load_key(*key_blocks[0], passphrase)
    leaf = _find_leaf(certs, key, key_type)
    chain = _build_chain(certs, leaf)
    _check_leaf(leaf, now)
    stored = _choose_domains(leaf, domains)

    return Bundle(
        domains=stored,
        chain=chain,
        chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        fingerprint=hashlib.sha256(
            leaf.public_bytes(serialization.Encoding.DER)
        ).hexdigest(),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        issuer=leaf.issuer.rfc4514_string(),
        subject=leaf.subject.rfc4514_string(),
        key_type=key_type,
        reordered=[id(c) for c in chain] != [id(c) for c in certs],
    )


def _pem_blocks(data: bytes) -> list[tuple[str, bytes, bytes]]:
    """Every PEM block as (label, full block text, body), in file order."""
    text = data.replace(b"\r\n", b"\n")
    blocks = []
    for match in _BLOCK.finditer(text):
        label = match.group(1).decode("ascii", "replace").strip()
        blocks.append((label, match.group(0) + b"\n", match.group(2)))
    begins = len(_BEGIN.findall(text))
    if not blocks:
        if not text.strip():
            raise BadInput("bundle: empty")
        if begins:
            raise BadInput("bundle: a -----BEGIN----- line has no matching -----END")
        hint = " (it looks like DER; convert it to PEM)" if text[:1] == b"\x30" else ""
        raise BadInput(
            f"bundle: not PEM{hint}; expected -----BEGIN CERTIFICATE----- blocks "
            "and one private key"
        )
    if begins != len(blocks):
        raise BadInput(
            f"bundle: {begins - len(blocks)} -----BEGIN----- line(s) without a "
            "matching -----END line"
        )
    return blocks


def _is_key(label: str) -> bool:
    return label.endswith("PRIVATE KEY")


def _decode_certificates(bodies: list[bytes]) -> list[x509.Certificate]:
    """Decode every certificate block, naming the one that fails."""
    certs: list[x509.Certificate] = []
    seen: set[bytes] = set()
    for number, body in enumerate(bodies, start=1):
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
            cert = x509.load_der_x509_certificate(der)
            # Touch the fields used below so a malformed one fails here.
            cert.subject.rfc4514_string()
            cert.issuer.rfc4514_string()
            _ = cert.not_valid_after_utc, cert.not_valid_before_utc
        except (binascii.Error, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise BadInput(
                f"bundle: certificate {number} cannot be read ({_short(exc)})"
            ) from exc
        # The same certificate twice (a careless concatenation) is kept once.
        if der not in seen:
            seen.add(der)
            certs.append(cert)
    return certs


def _load_key(label: str, block: bytes, passphrase: bytes | None) -> tuple[Key, str]:
    """Load the private key once and say what it is, refusing weak kinds."""
    if label not in _KEY_LABELS and label != _ENCRYPTED_KEY_LABEL:
        raise BadInput(
            f"bundle: private key of type {label!r} is not supported (send "
            "'PRIVATE KEY', 'RSA PRIVATE KEY' or 'EC PRIVATE KEY' PEM)"
        )
    encrypted = label == _ENCRYPTED_KEY_LABEL or b"Proc-Type: 4,ENCRYPTED" in block
    if encrypted and not passphrase:
        raise BadInput("bundle: private key is encrypted and no passphrase was given")
    try:
        loaded: PrivateKeyTypes = serialization.load_pem_private_key(
            block, password=passphrase if encrypted else None
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        if encrypted and "password" in str(exc).lower():
            raise BadInput(
                "bundle: the passphrase does not decrypt the private key"
            ) from exc
        raise BadInput(f"bundle: private key cannot be read ({_short(exc)})") from exc

    if isinstance(loaded, rsa.RSAPrivateKey):
        bits = loaded.key_size
        if bits < MIN_RSA_BITS:
            raise BadInput(
                f"bundle: RSA key of {bits} bits is too weak (at least {MIN_RSA_BITS})"
            )
        if bits > MAX_RSA_BITS:
            raise BadInput(
                f"bundle: RSA key of {bits} bits is too large (at most {MAX_RSA_BITS})"
            )
        return loaded, f"RSA {bits}"
    if isinstance(loaded, ec.EllipticCurvePrivateKey):
        curve = loaded.curve.name
        if curve not in _CURVE_NAMES:
            raise BadInput(
                f"bundle: EC key on curve {curve} is not supported (use P-256 or P-384)"
            )
        return loaded, _CURVE_NAMES[curve]
    raise BadInput(
        f"bundle: {_key_kind(loaded)} keys are not supported "
        "(use EC P-256, EC P-384 or RSA of 2048 bits or more)"
    )


def _key_kind(key: object) -> str:
    name = type(key).__name__.replace("PrivateKey", "")
    return name or "this kind of"


def _find_leaf(
    certs: list[x509.Certificate], key: Key, key_type: str
) -> x509.Certificate:
    """The certificate that the private key belongs to."""
    wanted = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for cert in certs:
        try:
            spki = cert.public_key().public_bytes(
                serialization.Encoding.DER,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
        except (ValueError, UnsupportedAlgorithm):
            continue
        if spki == wanted:
            return cert
    # Name the certificate that looks like the leaf: the first one that is
    # not a CA, which is what the operator meant as the leaf.
    presumed = next((c for c in certs if not _is_ca(c)), certs[0])
    raise BadInput(
        "bundle: private key does not match the leaf certificate "
        f"(leaf {_describe(presumed)}, key is {key_type})"
    )


def _build_chain(
    certs: list[x509.Certificate], leaf: x509.Certificate
) -> list[x509.Certificate]:
    """Order the certificates leaf first, checking each link's signature."""
    number = {id(c): n for n, c in enumerate(certs, start=1)}
    chain = [leaf]
    remaining = [c for c in certs if c is not leaf]
    while remaining:
        current = chain[-1]
        if current.issuer == current.subject:
            stray = remaining[0]
            raise BadInput(
                f"bundle: chain does not link: certificate {number[id(stray)]} "
                f"({_describe(stray)}) is above the self-signed certificate "
                f"{number[id(current)]} ({_describe(current)})"
            )

        # Try each certificate named as the issuer; keep the signature error
        # to report if none of them verifies.
        failure: tuple[x509.Certificate, Exception] | None = None
        parent = None
        for candidate in remaining:
            if candidate.subject != current.issuer:
                continue
            try:
                current.verify_directly_issued_by(candidate)
            except (
                InvalidSignature,
                ValueError,
                TypeError,
                UnsupportedAlgorithm,
            ) as exc:
                failure = (candidate, exc)
                continue
            parent = candidate
            break

        if parent is None and failure is not None:
            candidate, error = failure
            reason = (
                "bad signature"
                if isinstance(error, InvalidSignature)
                else _short(error)
            )
            raise BadInput(
                f"bundle: chain does not link: certificate {number[id(current)]} "
                f"({_describe(current)}) is not signed by certificate "
                f"{number[id(candidate)]} ({_describe(candidate)}): {reason}"
            )
        if parent is None:
            stray = remaining[0]
            raise BadInput(
                f"bundle: chain does not link: nothing in the bundle issued "
                f"certificate {number[id(current)]} ({_describe(current)}, issuer "
                f"{current.issuer.rfc4514_string()}); certificate "
                f"{number[id(stray)]} ({_describe(stray)}) is left over"
            )
        if _ca_flag(parent) is False:
            raise BadInput(
                f"bundle: chain does not link: certificate {number[id(parent)]} "
                f"({_describe(parent)}) signs certificate {number[id(current)]} "
                "but is not a CA (basicConstraints CA:FALSE)"
            )
        chain.append(parent)
        remaining.remove(parent)
    return chain


def _check_leaf(leaf: x509.Certificate, now: dt.datetime) -> None:
    """Refuse a leaf no client would accept for a server."""
    if leaf.not_valid_after_utc <= now:
        raise BadInput(
            f"bundle: leaf certificate ({_describe(leaf)}) expired on "
            f"{iso_utc(leaf.not_valid_after_utc)}"
        )
    if leaf.not_valid_before_utc > now:
        raise BadInput(
            f"bundle: leaf certificate ({_describe(leaf)}) is not valid until "
            f"{iso_utc(leaf.not_valid_before_utc)}"
        )
    if _is_ca(leaf):
        raise BadInput(
            f"bundle: leaf certificate ({_describe(leaf)}) is a CA "
            "(basicConstraints CA:TRUE); a server certificate must not be one "
            "(for a self-signed test certificate add "
            "-addext basicConstraints=critical,CA:FALSE)"
        )


def leaf_names(leaf: x509.Certificate) -> list[str]:
    """The DNS names a leaf is for: its SAN DNS names, else its CN."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = list(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [
            str(a.value)
            for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return names


def _choose_domains(leaf: x509.Certificate, requested: list[str] | None) -> list[str]:
    """The domains to store: the caller's (each covered) or the leaf's own."""
    names = leaf_names(leaf)
    own: list[str] = []
    for name in names:
        try:
            domain = normalise_domain(name)
        except BadInput:
            continue  # e.g. a CN that is a description, not a domain
        own.append(domain)
    own = list(dict.fromkeys(own))
    if not own:
        shown = f" (it names {', '.join(names)})" if names else ""
        raise BadInput(
            f"bundle: leaf certificate ({_describe(leaf)}) names no domain: no "
            f"DNS name in subjectAltName and no CN that is a domain{shown}"
        )
    if requested is None:
        return own

    if not isinstance(requested, list) or not requested:
        raise BadInput("bundle: 'domains' must be a non-empty list of domains")
    chosen: dict[str, None] = {}  # ordered and deduplicated
    for name in requested:
        domain = normalise_domain(name)
        if not covers(own, domain):
            raise BadInput(
                f"bundle: domain {domain} is not covered by the certificate "
                f"(it names {', '.join(own)})"
            )
        chosen[domain] = None
    return list(chosen)


def _ca_flag(cert: x509.Certificate) -> bool | None:
    """basicConstraints CA, or None when the extension is absent."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    return _ca_flag(cert) is True


def _describe(cert: x509.Certificate) -> str:
    """``CN=shop.example.com``, or the whole subject when it has no CN."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        return f"CN={cns[0].value!s}"
    subject = cert.subject.rfc4514_string()
    return subject or "empty subject"


def _short(exc: BaseException) -> str:
    """The first sentence of a library's error, which is the useful part."""
    text = str(exc).split(". ")[0].strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
