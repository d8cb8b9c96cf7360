"""The bundle parser: every accepted shape, every refusal, and fuzzing."""

from __future__ import annotations

import datetime as dt
import functools
import re
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from arc.bundle import MAX_BUNDLE_BYTES, Bundle, parse_bundle
from arc.errors import BadInput
from tests.certs import Chain, make_ca, make_chain, make_key

NOW = dt.datetime.now(dt.UTC)


def openssl(*args: str, data: bytes | None = None, cwd: Path | None = None) -> bytes:
    """Run the real openssl command and return what it printed."""
    done = subprocess.run(
        ["openssl", *args],
        input=data,
        capture_output=True,
        timeout=30,
        cwd=cwd,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


@functools.cache
def ec_chain() -> Chain:
    return make_chain("shop.example.com", "www.shop.example.com")


@functools.cache
def rsa_chain() -> Chain:
    return make_chain("rsa.example.com", key_type="RSA 2048")


def pems(chain: Chain, *, root: bool = False) -> list[bytes]:
    """The chain's certificates as separate PEM blocks, leaf first."""
    certs = [chain.leaf, *chain.intermediates] + ([chain.root] if root else [])
    return [c.public_bytes(serialization.Encoding.PEM) for c in certs]


def refused(data: bytes, **kwargs: object) -> str:
    """Parse ``data`` expecting a refusal; return the message."""
    with pytest.raises(BadInput) as caught:
        parse_bundle(data, **kwargs)  # type: ignore[arg-type]
    message = caught.value.message
    assert message.startswith("bundle: ") or message.startswith("domain ")
    return message


# -- what is accepted -------------------------------------------------------------


def test_a_chain_then_key_bundle_is_accepted_with_its_san_domains() -> None:
    chain = ec_chain()

    bundle = parse_bundle(chain.bundle())

    assert isinstance(bundle, Bundle)
    assert bundle.domains == ["shop.example.com", "www.shop.example.com"]
    assert bundle.chain[0] == chain.leaf
    assert bundle.chain[1:] == list(chain.intermediates)
    assert bundle.chain_pem == chain.chain_pem
    assert bundle.fingerprint == chain.fingerprint
    assert bundle.key_type == "EC P-256"
    assert bundle.subject == "CN=shop.example.com"
    assert bundle.issuer == "CN=Arcology Test Intermediate 1"
    assert bundle.not_after == chain.leaf.not_valid_after_utc
    assert bundle.reordered is False


def test_the_key_is_given_back_as_unencrypted_pkcs8() -> None:
    chain = ec_chain()

    bundle = parse_bundle(chain.key_pem_traditional + chain.chain_pem)

    assert bundle.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert bundle.key_pem == chain.key_pem


def test_the_summary_has_iso_utc_times_and_no_key() -> None:
    bundle = parse_bundle(ec_chain().bundle())

    summary = bundle.summary(now=bundle.not_after - dt.timedelta(days=10, hours=1))

    assert summary["domain"] == "shop.example.com"
    assert summary["domains"] == ["shop.example.com", "www.shop.example.com"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", summary["not_after"])
    assert summary["days_left"] == 10
    assert summary["chain_length"] == 2
    assert summary["fingerprint"] == bundle.fingerprint
    assert not any("key_pem" in k or "PRIVATE" in str(v) for k, v in summary.items())


@pytest.mark.parametrize("key_first", [False, True])
@pytest.mark.parametrize("crlf", [False, True])
def test_key_before_or_after_the_chain_with_lf_or_crlf_is_accepted(
    key_first: bool, crlf: bool
) -> None:
    chain = ec_chain()

    bundle = parse_bundle(chain.bundle(key_first=key_first, crlf=crlf))

    assert bundle.fingerprint == chain.fingerprint
    assert bundle.reordered is False


@pytest.mark.parametrize(
    ("key_type", "expected"),
    [("EC P-256", "EC P-256"), ("EC P-384", "EC P-384"), ("RSA 2048", "RSA 2048")],
)
def test_each_supported_key_type_is_accepted_and_named(
    key_type: str, expected: str
) -> None:
    chain = (
        rsa_chain()
        if key_type == "RSA 2048"
        else make_chain("k.example", key_type=key_type)
    )

    bundle = parse_bundle(chain.bundle())

    assert bundle.key_type == expected


@pytest.mark.parametrize("which", ["ec", "rsa"])
def test_traditional_key_formats_are_accepted(which: str) -> None:
    chain = ec_chain() if which == "ec" else rsa_chain()
    label = b"EC PRIVATE KEY" if which == "ec" else b"RSA PRIVATE KEY"
    assert label in chain.key_pem_traditional

    bundle = parse_bundle(chain.chain_pem + chain.key_pem_traditional)

    assert bundle.key_pem == chain.key_pem


def test_text_around_and_between_blocks_is_ignored() -> None:
    chain = ec_chain()
    leaf, intermediate = pems(chain)
    data = (
        b"Here is my certificate\n"
        + leaf
        + b"\nsome notes: subject=/CN=x\n\n"
        + intermediate
        + b"Bag Attributes\n    localKeyID: 01 02\n"
        + chain.key_pem
        + b"trailing words\n"
    )

    assert parse_bundle(data).fingerprint == chain.fingerprint


def test_certificates_out_of_order_are_put_leaf_first() -> None:
    ca = make_ca(intermediates=2)
    chain = make_chain("deep.example", ca=ca)
    leaf, middle, top, root = pems(chain, root=True)

    bundle = parse_bundle(root + middle + chain.key_pem + leaf + top)

    assert bundle.reordered is True
    assert bundle.chain == [chain.leaf, *chain.intermediates, chain.root]
    assert bundle.chain_pem == leaf + middle + top + root


def test_a_trailing_root_is_kept_and_not_reordered() -> None:
    chain = ec_chain()

    bundle = parse_bundle(chain.bundle(root=True))

    assert bundle.chain[-1] == chain.root
    assert bundle.reordered is False


def test_the_same_certificate_twice_is_kept_once() -> None:
    chain = ec_chain()
    leaf, intermediate = pems(chain)

    bundle = parse_bundle(leaf + intermediate + intermediate + chain.key_pem)

    assert len(bundle.chain) == 2


def test_a_leaf_alone_is_accepted() -> None:
    chain = ec_chain()

    bundle = parse_bundle(chain.leaf_pem + chain.key_pem)

    assert bundle.chain == [chain.leaf]


def test_wildcard_and_idn_names_are_stored_as_a_labels() -> None:
    chain = make_chain("*.example.com", "bücher.example", "Example.COM")

    bundle = parse_bundle(chain.bundle())

    assert bundle.domains == ["*.example.com", "xn--bcher-kva.example", "example.com"]


def test_the_cn_is_the_domain_when_there_is_no_subject_alt_name() -> None:
    chain = make_chain(common_name="Legacy.Example.com")

    bundle = parse_bundle(chain.bundle())

    assert bundle.domains == ["legacy.example.com"]


def test_a_cn_that_is_not_a_domain_is_ignored_when_sans_name_domains() -> None:
    chain = make_chain("api.example.com", common_name="Our API server")

    assert parse_bundle(chain.bundle()).domains == ["api.example.com"]


def test_the_callers_domains_are_stored_when_each_is_covered() -> None:
    chain = make_chain("*.example.com", "example.com")

    bundle = parse_bundle(
        chain.bundle(),
        domains=["Shop.Example.com", "*.example.com", "shop.example.com"],
    )

    assert bundle.domains == ["shop.example.com", "*.example.com"]


def test_an_encrypted_pkcs8_key_is_opened_with_its_passphrase() -> None:
    chain = ec_chain()
    data = chain.chain_pem + chain.key_pem_encrypted(b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in data

    bundle = parse_bundle(data, passphrase=b"correct horse")

    assert bundle.key_pem == chain.key_pem


def test_a_passphrase_for_an_unencrypted_key_is_ignored() -> None:
    chain = ec_chain()

    assert parse_bundle(chain.bundle(), passphrase=b"unused").key_pem == chain.key_pem


# -- bundles made by the openssl command --------------------------------------------


def test_a_pkcs12_export_read_back_with_bag_attributes_is_accepted(
    tmp_path: Path,
) -> None:
    chain = ec_chain()
    chain_file, key_file = chain.write(tmp_path)
    openssl(
        "pkcs12", "-export", "-in", str(chain_file), "-inkey", str(key_file),
        "-out", str(tmp_path / "b.p12"), "-passout", "pass:export",
    )  # fmt: skip
    data = openssl(
        "pkcs12", "-in", str(tmp_path / "b.p12"), "-nodes", "-passin", "pass:export"
    )
    assert b"Bag Attributes" in data

    bundle = parse_bundle(data)

    assert bundle.fingerprint == chain.fingerprint
    assert bundle.domains == ["shop.example.com", "www.shop.example.com"]


def test_keys_rewritten_by_openssl_ec_and_rsa_traditional_are_accepted(
    tmp_path: Path,
) -> None:
    ec, rsa = ec_chain(), rsa_chain()
    ec_key = openssl("ec", data=ec.key_pem)
    rsa_key = openssl("rsa", "-traditional", data=rsa.key_pem)
    assert b"BEGIN EC PRIVATE KEY" in ec_key
    assert b"BEGIN RSA PRIVATE KEY" in rsa_key

    assert parse_bundle(ec.chain_pem + ec_key).key_pem == ec.key_pem
    assert parse_bundle(rsa_key + rsa.chain_pem).key_pem == rsa.key_pem


@pytest.mark.parametrize(
    "command",
    [
        ["ec", "-aes256", "-passout", "pass:s3cret"],
        ["rsa", "-traditional", "-aes256", "-passout", "pass:s3cret"],
        ["pkcs8", "-topk8", "-v2", "aes256", "-passout", "pass:s3cret"],
    ],
    ids=["ec-proc-type", "rsa-proc-type", "pkcs8"],
)
def test_keys_encrypted_by_openssl_open_with_the_passphrase(command: list[str]) -> None:
    chain = rsa_chain() if command[0] == "rsa" else ec_chain()
    key = openssl(*command, data=chain.key_pem)
    assert b"ENCRYPTED" in key

    bundle = parse_bundle(chain.chain_pem + key, passphrase=b"s3cret")

    assert bundle.key_pem == chain.key_pem
    assert "passphrase does not decrypt" in refused(
        chain.chain_pem + key, passphrase=b"wrong"
    )
    assert "no passphrase" in refused(chain.chain_pem + key)


def test_an_openssl_ecparam_key_with_its_parameters_block_is_accepted() -> None:
    key_text = openssl("ecparam", "-name", "prime256v1", "-genkey")
    assert b"BEGIN EC PARAMETERS" in key_text
    key = serialization.load_pem_private_key(key_text, password=None)
    chain = make_chain("params.example", key=key)  # type: ignore[arg-type]

    bundle = parse_bundle(key_text + chain.chain_pem)

    assert bundle.fingerprint == chain.fingerprint


def test_an_openssl_self_signed_leaf_is_accepted_when_it_is_not_a_ca(
    tmp_path: Path,
) -> None:
    base = [
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-subj", "/CN=self.example", "-days", "2",
        "-addext", "subjectAltName=DNS:self.example",
        "-keyout", "key.pem", "-out", "cert.pem",
    ]  # fmt: skip
    openssl(*base, "-addext", "basicConstraints=critical,CA:FALSE", cwd=tmp_path)
    good = (tmp_path / "cert.pem").read_bytes() + (tmp_path / "key.pem").read_bytes()
    openssl(*base, cwd=tmp_path)
    ca = (tmp_path / "cert.pem").read_bytes() + (tmp_path / "key.pem").read_bytes()

    assert parse_bundle(good).domains == ["self.example"]
    assert "CA:FALSE" in refused(ca)


# -- what is refused ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "bundle: empty"),
        (b"  \r\n\n ", "bundle: empty"),
        (b"hello world", "not PEM"),
        (b"\x30\x82\x01\x0a\x02\x82", "looks like DER"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n", "no matching -----END"),
    ],
)
def test_what_is_not_a_pem_bundle_is_refused(data: bytes, says: str) -> None:
    assert says in refused(data)


def test_a_block_left_open_after_good_blocks_is_refused() -> None:
    chain = ec_chain()

    message = refused(chain.bundle() + b"-----BEGIN CERTIFICATE-----\nMIIB\n")

    assert "without a matching -----END" in message


def test_a_bundle_without_a_certificate_is_refused() -> None:
    assert "no certificate" in refused(ec_chain().key_pem)


def test_a_bundle_without_a_key_is_refused() -> None:
    assert "no private key" in refused(ec_chain().chain_pem)


def test_a_bundle_with_two_keys_is_refused() -> None:
    chain = ec_chain()

    message = refused(chain.bundle() + make_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ))  # fmt: skip

    assert "more than one private key (found 2: PRIVATE KEY, EC PRIVATE KEY)" in message


def test_a_key_of_another_certificate_is_refused_naming_leaf_and_key() -> None:
    chain, other = ec_chain(), rsa_chain()

    message = refused(chain.chain_pem + other.key_pem)

    assert message == (
        "bundle: private key does not match the leaf certificate "
        "(leaf CN=shop.example.com, key is RSA 2048)"
    )


def test_an_intermediate_of_another_ca_is_refused_naming_it() -> None:
    chain = ec_chain()
    stranger = make_ca(name="Stranger")
    stray = stranger.intermediates[0].public_bytes(serialization.Encoding.PEM)

    message = refused(chain.leaf_pem + stray + chain.key_pem)

    assert "chain does not link" in message
    assert "certificate 2 (CN=Stranger Intermediate 1) is left over" in message
    assert "certificate 1 (CN=shop.example.com" in message


def test_an_intermediate_with_the_right_name_but_another_key_is_refused() -> None:
    chain = ec_chain()
    impostor = make_ca()  # same names, different keys
    fake = impostor.intermediates[0].public_bytes(serialization.Encoding.PEM)

    message = refused(chain.leaf_pem + fake + chain.key_pem)

    assert message == (
        "bundle: chain does not link: certificate 1 (CN=shop.example.com) is not "
        "signed by certificate 2 (CN=Arcology Test Intermediate 1): bad signature"
    )


def test_a_certificate_above_a_self_signed_root_is_refused() -> None:
    chain = ec_chain()
    leaf, intermediate = pems(chain)
    other_root = make_ca(name="Other").root_pem

    message = refused(leaf + intermediate + chain.root_pem + other_root + chain.key_pem)

    assert (
        "certificate 4 (CN=Other Root) is above the self-signed certificate 3"
        in message
    )


def test_an_expired_leaf_is_refused_with_its_date() -> None:
    past = NOW - dt.timedelta(days=2)
    chain = make_chain("old.example", not_after=past)

    message = refused(chain.bundle())

    assert message.startswith("bundle: leaf certificate (CN=old.example) expired on ")
    assert past.strftime("%Y-%m-%dT%H:%M:%SZ") in message


def test_a_leaf_not_yet_valid_is_refused() -> None:
    chain = make_chain("early.example", not_before=NOW + dt.timedelta(days=3))

    assert "is not valid until" in refused(chain.bundle())


def test_a_leaf_is_checked_against_the_given_moment() -> None:
    chain = ec_chain()

    assert "expired on" in refused(chain.bundle(), now=NOW + dt.timedelta(days=400))


def test_a_leaf_that_is_a_ca_is_refused() -> None:
    message = refused(make_chain("ca.example", ca_leaf=True).bundle())

    assert "is a CA (basicConstraints CA:TRUE)" in message


def test_a_leaf_naming_no_domain_is_refused() -> None:
    message = refused(make_chain(common_name="Test server").bundle())

    assert "names no domain" in message
    assert "Test server" in message


@pytest.mark.parametrize(
    ("key_type", "says"),
    [
        ("RSA 1024", "RSA key of 1024 bits is too weak (at least 2048)"),
        ("EC P-521", "EC key on curve secp521r1 is not supported"),
        ("Ed25519", "Ed25519 keys are not supported"),
    ],
)
def test_weak_or_unsupported_keys_are_refused(key_type: str, says: str) -> None:
    chain = make_chain("weak.example", key_type=key_type)

    assert says in refused(chain.bundle())


def test_an_unsupported_key_format_is_refused() -> None:
    chain = ec_chain()
    openssh = chain.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )

    assert "'OPENSSH PRIVATE KEY' is not supported" in refused(
        chain.chain_pem + openssh
    )


def test_a_domain_the_certificate_does_not_cover_is_refused_by_name() -> None:
    chain = make_chain("*.example.com")

    message = refused(chain.bundle(), domains=["shop.example.com", "a.b.example.com"])

    assert message == (
        "bundle: domain a.b.example.com is not covered by the certificate "
        "(it names *.example.com)"
    )


def test_a_requested_name_that_is_not_a_domain_is_refused() -> None:
    assert "leftmost" in refused(ec_chain().bundle(), domains=["a.*.example.com"])
    assert "non-empty list" in refused(ec_chain().bundle(), domains=[])


def test_a_bundle_over_one_mebibyte_is_refused() -> None:
    data = ec_chain().bundle() + b"#" * MAX_BUNDLE_BYTES

    assert "over the limit of 1048576" in refused(data)


def test_more_than_ten_certificates_are_refused() -> None:
    chain = ec_chain()
    many = chain.leaf_pem * 11 + chain.key_pem

    assert "11 certificates, more than 10" in refused(many)


def test_a_certificate_with_broken_base64_is_refused_naming_it() -> None:
    chain = ec_chain()
    leaf, intermediate = pems(chain)
    broken = intermediate.replace(b"\n", b"\n!", 2)

    assert "certificate 2 cannot be read" in refused(leaf + broken + chain.key_pem)


def test_a_certificate_that_is_not_der_is_refused_naming_it() -> None:
    garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"

    assert "certificate 1 cannot be read" in refused(garbage + ec_chain().key_pem)


def test_a_damaged_key_is_refused() -> None:
    chain = ec_chain()
    damaged = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"

    assert "private key cannot be read" in refused(chain.chain_pem + damaged)


def test_what_is_not_bytes_is_refused() -> None:
    assert "expected bytes, got str" in refused("text")  # type: ignore[arg-type]


# -- fuzzing ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash_the_parser(data: bytes) -> None:
    with pytest.raises(BadInput):
        parse_bundle(data)


def _mangle(data: bytes, draw: st.DrawFn) -> bytes:
    """Apply a few random edits that real damage and careless editing make."""
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "lines", "truncate"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data = (
                data[:at]
                + bytes([data[at] ^ draw(st.integers(1, 255))])
                + data[at + 1 :]
            )
        elif kind == "cut":
            data = data[:at] + data[at + draw(st.integers(1, 200)) :]
        elif kind == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:]
        elif kind == "truncate":
            data = data[:at]
        else:
            lines = data.split(b"\n")
            order = draw(st.permutations(range(len(lines))))
            keep = draw(st.integers(1, len(lines)))
            data = b"\n".join(lines[i] for i in order[:keep])
    return data


@st.composite
def mangled_bundles(draw: st.DrawFn) -> bytes:
    chain = draw(st.sampled_from([ec_chain(), rsa_chain()]))
    base = chain.bundle(
        key_first=draw(st.booleans()),
        root=draw(st.booleans()),
        crlf=draw(st.booleans()),
    )
    return _mangle(base, draw)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mangled_bundles())
def test_mangled_bundles_are_refused_or_parsed_never_crash(data: bytes) -> None:
    try:
        bundle = parse_bundle(data)
    except BadInput as exc:
        assert exc.message.startswith(("bundle: ", "domain "))
        event(exc.message[:40])
        return
    event("accepted")

    # Whatever survived must still be a consistent bundle.
    leaf = x509.load_pem_x509_certificates(bundle.chain_pem)[0]
    key = serialization.load_pem_private_key(bundle.key_pem, password=None)
    assert leaf.public_key() == key.public_key()
