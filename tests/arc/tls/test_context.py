"""Per-domain server contexts: protocol settings, key checks, groups."""

from __future__ import annotations

import contextlib
import os
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from arc.errors import BadInput
from arc.tls.context import INTERMEDIATE_CIPHERS, build_context
from arc.tls.opensslconf import OPENSSL_CONF_PATH
from tests.certs import make_chain

ROOT = Path(__file__).resolve().parents[3]


class Link:
    """A client and a server object joined by memory BIOs."""

    def __init__(
        self, server: ssl.SSLContext, client: ssl.SSLContext, name: str
    ) -> None:
        self.c_in, self.c_out, self.s_in, self.s_out = (
            ssl.MemoryBIO() for _ in range(4)
        )
        self.client = client.wrap_bio(self.c_in, self.c_out, server_hostname=name)
        self.server = server.wrap_bio(self.s_in, self.s_out, server_side=True)

    def carry(self) -> None:
        """Deliver what each side wrote to the other."""
        self.s_in.write(self.c_out.read())
        self.c_in.write(self.s_out.read())

    def handshake(self) -> None:
        """Run the handshake to its end."""
        for _ in range(10):
            for side in (self.client, self.server):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
            self.carry()
            if self.client.version() and self.server.version():
                return
        raise AssertionError("handshake did not finish in 10 rounds")


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, name: str
) -> ssl.SSLObject:
    """Run a handshake between two contexts over memory BIOs; return the client."""
    link = Link(server, client, name)
    link.handshake()
    return link.client


def test_context_presents_the_chain_and_speaks_tls13_with_http11() -> None:
    chain = make_chain("shop.example.com")
    client = chain.client_context()
    client.set_alpn_protocols(["h2", "http/1.1"])

    tls = handshake(
        build_context("shop.example.com", chain.chain_pem, chain.key_pem),
        client,
        "shop.example.com",
    )

    assert tls.version() == "TLSv1.3"
    assert tls.selected_alpn_protocol() == "http/1.1"
    cert = tls.getpeercert()
    assert cert is not None
    assert cert["subject"] == ((("commonName", "shop.example.com"),),)


def test_server_objects_carry_data_both_ways_and_close_cleanly() -> None:
    chain = make_chain("shop.example.com")
    context = build_context("shop.example.com", chain.chain_pem, chain.key_pem)
    link = Link(context, chain.client_context(), "shop.example.com")
    server, client = link.server, link.client

    link.handshake()
    client.write(b"GET / HTTP/1.1\r\n\r\n")
    link.carry()
    request = server.read(1024)
    buffer = bytearray(64)
    server.write(b"HTTP/1.1 200 OK\r\n\r\n")
    link.carry()
    answered = client.read(64, buffer)
    with contextlib.suppress(ssl.SSLWantReadError):
        server.unwrap()
    link.carry()

    assert server.version() == "TLSv1.3"
    assert server.getpeercert() is None  # no client certificate asked for
    assert server.cipher() == client.cipher()
    assert server.compression() is None
    assert server.server_side and server.context is context
    assert server.pending() == 0
    assert request == b"GET / HTTP/1.1\r\n\r\n"
    assert isinstance(answered, int)  # the count read into the buffer
    assert bytes(buffer[:answered]) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert client.read(64) == b""  # the server's close_notify arrived


def test_rsa_chain_works_over_tls12() -> None:
    chain = make_chain("rsa.example.com", key_type="RSA 2048")
    client = chain.client_context()
    client.maximum_version = ssl.TLSVersion.TLSv1_2

    tls = handshake(
        build_context("rsa.example.com", chain.chain_pem, chain.key_pem),
        client,
        "rsa.example.com",
    )

    cipher = tls.cipher()
    assert cipher is not None
    assert tls.version() == "TLSv1.2"
    assert cipher[0] in INTERMEDIATE_CIPHERS.split(":")
    assert cipher[0].startswith("ECDHE-RSA-")


def test_the_client_cipher_order_wins_in_tls12() -> None:
    chain = make_chain("order.example.com")
    client = chain.client_context()
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256")

    tls = handshake(
        build_context("order.example.com", chain.chain_pem, chain.key_pem),
        client,
        "order.example.com",
    )

    cipher = tls.cipher()
    assert cipher is not None
    assert cipher[0] == "ECDHE-ECDSA-CHACHA20-POLY1305"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls11_and_weak_ciphers_are_refused() -> None:
    chain = make_chain("old.example.com")
    server = build_context("old.example.com", chain.chain_pem, chain.key_pem)
    old = chain.client_context()
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    cbc = chain.client_context()
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA")

    for client in (old, cbc):
        with pytest.raises(ssl.SSLError, match="UNSUPPORTED_PROTOCOL|NO_SHARED_CIPHER"):
            handshake(server, client, "old.example.com")


def test_options_turn_off_compression_renegotiation_and_server_order() -> None:
    chain = make_chain("opt.example.com")

    context = build_context("opt.example.com", chain.chain_pem, chain.key_pem)

    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert not context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_key_of_another_certificate_is_refused_by_name() -> None:
    chain = make_chain("mine.example.com")
    other = make_chain("other.example.com")

    with pytest.raises(BadInput, match=r"mine\.example\.com: private key does not"):
        build_context("mine.example.com", chain.chain_pem, other.key_pem)


@pytest.mark.parametrize(
    ("chain_pem", "key_pem", "fragment"),
    [
        (b"not pem", None, "expected a PEM chain"),
        (
            None,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "key",
        ),
    ],
)
def test_unreadable_input_is_refused_with_a_message(
    chain_pem: bytes | None, key_pem: bytes | None, fragment: str
) -> None:
    chain = make_chain("bad.example.com")

    with pytest.raises(BadInput, match=fragment):
        build_context(
            "bad.example.com", chain_pem or chain.chain_pem, key_pem or chain.key_pem
        )


def test_building_leaves_no_descriptor_open() -> None:
    chain = make_chain("fd.example.com")
    before = len(os.listdir("/proc/self/fd"))

    for _ in range(20):
        build_context("fd.example.com", chain.chain_pem, chain.key_pem)

    assert len(os.listdir("/proc/self/fd")) == before


GROUP_PROBE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    {prelude}
    from arc.tls.opensslconf import ensure_openssl_conf
    print("configured", ensure_openssl_conf())
    import ssl
    from arc.tls.context import build_context
    from tests.certs import make_chain
    from tests.arc.tls.test_context import handshake

    chain = make_chain("g.example.com")
    server = build_context("g.example.com", chain.chain_pem, chain.key_pem)
    for curve in ("secp521r1", "prime256v1"):
        client = chain.client_context()
        client.set_ecdh_curve(curve)
        try:
            handshake(server, client, "g.example.com")
            print(curve, "ok")
        except ssl.SSLError as exc:
            print(curve, "refused", exc.reason)
    """
)
LOAD_OPENSSL = "import hashlib; hashlib.sha256(b'').digest()"
RESTRICTED = [
    "configured True",
    "secp521r1 refused NO_SUITABLE_KEY_SHARE",
    "prime256v1 ok",
]


def run_probe(script: Path) -> list[str]:
    """Run a probe script with no OPENSSL_CONF inherited; return its lines."""
    environment = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    probe = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return probe.stdout.splitlines()


def test_the_configuration_restricts_groups_when_set_before_openssl_loads(
    tmp_path: Path,
) -> None:
    script = tmp_path / "probe.py"
    script.write_text(GROUP_PROBE.format(root=str(ROOT), prelude=""))

    assert run_probe(script) == RESTRICTED
    assert OPENSSL_CONF_PATH.is_file()


def test_the_arcology_command_re_executes_itself_when_openssl_loaded_first(
    tmp_path: Path,
) -> None:
    script = tmp_path / "arcology"
    script.write_text(GROUP_PROBE.format(root=str(ROOT), prelude=LOAD_OPENSSL))

    assert run_probe(script) == RESTRICTED


def test_a_host_program_is_never_re_executed_and_is_told_so(tmp_path: Path) -> None:
    script = tmp_path / "host.py"
    script.write_text(GROUP_PROBE.format(root=str(ROOT), prelude=LOAD_OPENSSL))

    assert run_probe(script) == ["configured False", "secp521r1 ok", "prime256v1 ok"]
