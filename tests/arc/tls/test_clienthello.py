"""ClientHello parsing: real hellos, fragments, and arbitrary bytes."""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arc.tls.clienthello import (
    MAX_CLIENT_HELLO_BYTES,
    ClientHello,
    ClientHelloError,
    parse_client_hello,
)


def python_client_hello(server_name: str | None, alpn: list[str] | None) -> bytes:
    """The first flight of Python's own TLS client, taken from a memory BIO."""
    context = ssl.create_default_context()
    context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def build_hello(
    extensions: bytes | None, session_id: bytes = b"", version: int = 0x0303
) -> bytes:
    """A ClientHello handshake message (without record framing)."""
    body = struct.pack("!H", version) + bytes(32)
    body += bytes([len(session_id)]) + session_id
    body += b"\x00\x02\x13\x01" + b"\x01\x00"
    if extensions is not None:
        body += struct.pack("!H", len(extensions)) + extensions
    return b"\x01" + len(body).to_bytes(3, "big") + body


def sni_extension(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(
        bytes([kind]) + struct.pack("!H", len(name)) + name for kind, name in names
    )
    data = struct.pack("!H", len(entries)) + entries
    return struct.pack("!HH", 0, len(data)) + data


def alpn_extension(*protocols: bytes) -> bytes:
    entries = b"".join(bytes([len(p)]) + p for p in protocols)
    data = struct.pack("!H", len(entries)) + entries
    return struct.pack("!HH", 16, len(data)) + data


def records(message: bytes, fragment: int = 2**14) -> bytes:
    """Frame a handshake message as TLS records of at most `fragment` bytes."""
    out = b""
    for start in range(0, len(message), fragment):
        chunk = message[start : start + fragment]
        out += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
    return out


def test_python_client_hello_gives_server_name_and_alpn() -> None:
    data = python_client_hello("Shop.Example.COM", ["h2", "http/1.1"])

    hello = parse_client_hello(data)

    assert hello == ClientHello(
        complete=True,
        wanted=len(data),
        server_name="shop.example.com",
        alpn=("h2", "http/1.1"),
    )


def test_client_hello_without_sni_gives_no_server_name() -> None:
    data = python_client_hello(None, None)

    hello = parse_client_hello(data)

    assert hello.complete
    assert hello.server_name is None
    assert hello.alpn == ()


def test_trailing_dot_is_dropped_from_the_server_name() -> None:
    data = records(build_hello(sni_extension((0, b"WWW.Example.org."))))

    assert parse_client_hello(data).server_name == "www.example.org"


def test_every_truncation_of_a_real_hello_asks_for_more_bytes() -> None:
    data = python_client_hello("a.example.com", ["http/1.1"])

    for cut in range(len(data)):
        hello = parse_client_hello(data[:cut])

        assert not hello.complete
        assert cut < hello.wanted <= len(data)


def test_hello_fragmented_over_many_records_parses_like_one_record() -> None:
    message = build_hello(
        sni_extension((0, b"frag.example.net")) + alpn_extension(b"http/1.1")
    )

    for size in (1, 2, 3, 7, 64):
        hello = parse_client_hello(records(message, size))

        assert hello.server_name == "frag.example.net"
        assert hello.alpn == ("http/1.1",)


def test_bytes_after_the_hello_are_ignored() -> None:
    data = python_client_hello("x.example.com", None)

    hello = parse_client_hello(data + b"\x17\x03\x03\x00\x05hello")

    assert hello.server_name == "x.example.com"
    assert hello.wanted == len(data)


def test_hello_without_extensions_has_no_name() -> None:
    hello = parse_client_hello(records(build_hello(None)))

    assert hello.complete
    assert hello.server_name is None


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "content type 22"),
        (b"\x80\x2e\x01\x03\x01", "content type 22"),
        (b"\x16\x02\x00\x00\x05hello", "legacy version"),
        (b"\x16\x03\x01\x00\x00", "length of 1"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "ClientHello"),
        (records(build_hello(sni_extension((0, b"bad name.com")))), "label"),
        (records(build_hello(sni_extension((0, b"caf\xc3\xa9.fr")))), "ASCII"),
        (records(build_hello(sni_extension((0, b"*.example.com")))), "ASCII"),
        (records(build_hello(sni_extension((0, b"a..b")))), "empty label"),
        (records(build_hello(sni_extension((0, b"10.0.0.1")))), "IP address"),
        (records(build_hello(sni_extension((0, b"")))), "empty"),
        (
            records(build_hello(sni_extension((0, b"a.com"), (0, b"b.com")))),
            "more than one",
        ),
        (records(build_hello(sni_extension() + sni_extension())), "twice"),
        (records(build_hello(alpn_extension())), "empty protocol list"),
        (records(build_hello(alpn_extension(b""))), "empty protocol name"),
        (records(build_hello(None, session_id=bytes(33))), "session id"),
    ],
)
def test_malformed_input_raises_a_clear_error(data: bytes, fragment: str) -> None:
    with pytest.raises(ClientHelloError, match=fragment):
        parse_client_hello(data)


@pytest.mark.parametrize(
    ("version", "extensions", "name"),
    [
        (0x0302, sni_extension((0, b"example.com")), "TLS 1.1"),
        (0x0301, None, "TLS 1.0"),
        (0x0300, b"", "SSL 3.0"),
    ],
)
def test_a_client_older_than_tls12_is_refused_with_protocol_version(
    version: int, extensions: bytes | None, name: str
) -> None:
    data = records(build_hello(extensions, version=version))

    with pytest.raises(ClientHelloError, match=f"at most {name}") as refused:
        parse_client_hello(data)

    assert refused.value.alert == 70  # protocol_version


def test_supported_versions_overrides_an_old_legacy_version() -> None:
    # RFC 8446 4.2.1: with supported_versions, legacy_version is not read.
    versions = struct.pack("!HHB", 43, 3, 2) + struct.pack("!H", 0x0304)
    data = records(
        build_hello(sni_extension((0, b"example.com")) + versions, version=0x0301)
    )

    hello = parse_client_hello(data)

    assert hello.complete
    assert hello.server_name == "example.com"


def test_a_hello_longer_than_the_bound_is_refused() -> None:
    padding = struct.pack("!HH", 21, 20000) + bytes(20000)
    data = records(build_hello(padding + sni_extension((0, b"big.example.com"))))

    with pytest.raises(ClientHelloError, match="at most"):
        parse_client_hello(data[:MAX_CLIENT_HELLO_BYTES])


def test_unknown_extensions_and_other_name_types_are_skipped() -> None:
    extensions = (
        struct.pack("!HH", 0xFE0D, 3)
        + b"abc"
        + sni_extension((7, b"opaque"), (0, b"named.example"))
    )

    hello = parse_client_hello(records(build_hello(extensions)))

    assert hello.server_name == "named.example"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_give_a_value_or_a_client_hello_error(data: bytes) -> None:
    try:
        hello = parse_client_hello(data)
    except ClientHelloError:
        return

    assert isinstance(hello, ClientHello)
    if not hello.complete:
        assert len(data) < hello.wanted <= MAX_CLIENT_HELLO_BYTES


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_real_hellos_never_crash(data: st.DataObject) -> None:
    hello_bytes = bytearray(python_client_hello("m.example.com", ["http/1.1"]))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(hello_bytes) - 1))
        hello_bytes[index] = data.draw(st.integers(0, 255))

    try:
        hello = parse_client_hello(bytes(hello_bytes))
    except ClientHelloError:
        return

    assert hello.complete or hello.wanted > len(hello_bytes)


@settings(max_examples=100, deadline=None)
@given(
    st.from_regex(
        r"[a-z][a-z0-9]{0,19}(\.[a-z][a-z0-9-]{0,18}[a-z0-9]){0,4}", fullmatch=True
    ),
    st.integers(1, 300),
)
def test_any_valid_name_survives_any_fragmentation(name: str, size: int) -> None:
    message = build_hello(sni_extension((0, name.upper().encode())))

    hello = parse_client_hello(records(message, size))

    assert hello.server_name == name
