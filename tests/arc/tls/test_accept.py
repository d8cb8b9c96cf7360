"""The TLS accept path with real clients: names, fallback, changes, load."""

from __future__ import annotations

import asyncio
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from arc.tls.accept import PlainListener
from arc.tls.listener import raise_fd_limit
from tests.arc.tls.serving import (
    Serving,
    peer_common_name,
    request,
    s_client,
    serving,
)


def test_two_domains_get_their_own_certificates(tmp_path: Path) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")
        srv.store.add("a.example.org")

        with (
            srv.connect("example.com") as first,
            srv.connect("a.example.org") as second,
        ):
            names = peer_common_name(first), peer_common_name(second)
            answer = request(first, "example.com")

    assert names == ("example.com", "a.example.org")
    assert answer == ("HTTP/1.1 200 OK", b"hello from site")


def test_a_wildcard_serves_names_one_label_below_in_any_case(tmp_path: Path) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("*.example.com")

        with srv.connect("shop.example.com") as tls:
            name = peer_common_name(tls)
            answer = request(tls, "shop.example.com")
        printed = s_client(srv.port, "SHOP.Example.COM", tmp_path)

    assert name == "*.example.com"
    assert answer[0] == "HTTP/1.1 200 OK"
    assert "CN = *.example.com" in printed or "CN=*.example.com" in printed
    assert srv.store.calls == ["shop.example.com"]


@pytest.mark.parametrize("server_name", [None, "unknown.example.com"])
def test_reject_fallback_sends_unrecognized_name(
    tmp_path: Path, server_name: str | None
) -> None:
    with serving(tmp_path, fallback="reject") as srv:
        srv.store.add("example.com")

        printed = s_client(srv.port, server_name, tmp_path)
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            srv.connect(server_name)

    assert "unrecognized name" in printed
    assert srv.stats.rejected == 2


@pytest.mark.parametrize("server_name", [None, "unknown.example.com"])
def test_domain_fallback_serves_that_domain(
    tmp_path: Path, server_name: str | None
) -> None:
    with serving(tmp_path, fallback="example.com") as srv:
        srv.store.add("example.com")

        printed = s_client(srv.port, server_name, tmp_path)
        with srv.connect(server_name, check_hostname=False) as tls:
            name = peer_common_name(tls)
            answer = request(tls, "example.com")

    assert "unrecognized name" not in printed
    assert "CN = example.com" in printed or "CN=example.com" in printed
    assert name == "example.com"
    assert answer[0] == "HTTP/1.1 200 OK"


def test_a_name_whose_services_refuse_tls_is_rejected(tmp_path: Path) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("plain.example.net")

        printed = s_client(srv.port, "plain.example.net", tmp_path)

    assert "unrecognized name" in printed
    assert srv.store.calls == []


def test_a_new_certificate_is_served_next_while_open_connections_go_on(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as srv:
        old = srv.store.add("example.com")
        before = srv.connect("example.com")
        assert request(before, "example.com")[0] == "HTTP/1.1 200 OK"

        new = srv.store.add("example.com")
        with srv.connect("example.com") as after:
            new_der = after.getpeercert(binary_form=True)
        old_answer = request(before, "example.com")
        old_der = before.getpeercert(binary_form=True)
        before.close()

    assert old_answer == ("HTTP/1.1 200 OK", b"hello from site")
    assert old_der == old.leaf.public_bytes(Encoding.DER)
    assert new_der == new.leaf.public_bytes(Encoding.DER)


def test_a_deleted_certificate_stops_being_served(tmp_path: Path) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")
        srv.connect("example.com").close()

        srv.store.delete("example.com")

        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            srv.connect("example.com")


def _memory_client(
    context: ssl.SSLContext, name: str
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    """A client on memory buffers, and the ClientHello it wants to send."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return tls, incoming, outgoing, outgoing.read()


def test_a_client_hello_split_over_two_segments_is_read_whole(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")
        context = srv.client_context()
        tls, incoming, outgoing, hello = _memory_client(context, "example.com")

        with socket.create_connection(("127.0.0.1", srv.port), 5) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.sendall(hello[:3])
            time.sleep(0.05)
            raw.sendall(hello[3:100])
            time.sleep(0.05)
            raw.sendall(hello[100:])
            for _ in range(10):
                incoming.write(raw.recv(65536))
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    raw.sendall(outgoing.read())
            version = tls.version()

    assert version == "TLSv1.3"


def test_a_client_hello_sent_a_byte_at_a_time_is_read_whole(tmp_path: Path) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")
        tls, incoming, outgoing, hello = _memory_client(
            srv.client_context(), "example.com"
        )

        with socket.create_connection(("127.0.0.1", srv.port), 5) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for offset in range(0, 40):
                raw.sendall(hello[offset : offset + 1])
                time.sleep(0.002)
            raw.sendall(hello[40:])
            name = _finish_handshake(raw, tls, incoming, outgoing)

    assert name == "example.com"
    assert srv.stats.handshakes == 1


def test_a_split_hello_that_openssl_refuses_gets_an_alert(tmp_path: Path) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")
        # A TLS 1.2 client whose only suite (RSA key exchange) the server
        # does not offer.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("AES128-SHA")
        *_, hello = _memory_client(context, "example.com")

        with socket.create_connection(("127.0.0.1", srv.port), 5) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.sendall(hello[:10])
            time.sleep(0.05)
            raw.sendall(hello[10:])
            answer = raw.recv(100)

    # A fatal handshake_failure (40) alert record.
    assert answer[:1] == b"\x15" and answer[-2:] == b"\x02\x28"
    assert srv.stats.handshake_failures == 1


def test_a_silent_client_is_closed_after_the_handshake_timeout(
    tmp_path: Path,
) -> None:
    with serving(tmp_path, handshake_timeout_s=0.3) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), 5) as raw:
            started = time.monotonic()
            data = raw.recv(100)
            waited = time.monotonic() - started

    assert data == b""
    assert 0.25 < waited < 3.0
    assert srv.stats.handshake_failures == 1


def test_a_client_that_stops_inside_its_hello_is_closed_after_the_timeout(
    tmp_path: Path,
) -> None:
    with serving(tmp_path, handshake_timeout_s=0.3) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), 5) as raw:
            raw.sendall(bytes.fromhex("160301020001") + bytes(50))
            started = time.monotonic()
            try:
                data = raw.recv(100)
            except ConnectionResetError:  # the unread hello makes it a reset
                data = b""
            waited = time.monotonic() - started

    assert data == b""
    assert 0.2 < waited < 3.0
    assert srv.stats.handshake_failures == 1


def test_plain_http_on_a_tls_port_gets_a_decode_error_alert(tmp_path: Path) -> None:
    with serving(tmp_path) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), 5) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
            data = raw.recv(100)

    assert data == bytes.fromhex("15030300020232")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_tls11_client_is_told_protocol_version_before_any_fetch(
    tmp_path: Path,
) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    # OpenSSL's default security level would not even offer TLS 1.1.
    old.set_ciphers("DEFAULT@SECLEVEL=0")
    with serving(tmp_path) as srv:
        srv.store.add("example.com")

        printed = s_client(
            srv.port,
            "example.com",
            tmp_path,
            "-tls1_1",
            "-cipher",
            "DEFAULT@SECLEVEL=0",
        )
        with socket.create_connection(("127.0.0.1", srv.port), 5) as raw:
            with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
                old.wrap_socket(raw, server_hostname="example.com")
        with srv.connect("example.com") as tls:
            answer = request(tls, "example.com")

    assert "protocol version" in printed
    assert srv.store.calls == ["example.com"]  # only for the modern client
    assert answer[0] == "HTTP/1.1 200 OK"


def test_a_slow_fetch_does_not_delay_handshakes_of_cached_domains(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")
        srv.store.add("*.example.com")
        srv.connect("example.com").close()
        srv.store.delay_s = 0.5
        slow = [
            threading.Thread(target=_try_connect, args=(srv, f"s{i}.example.com"))
            for i in range(10)
        ]
        for thread in slow:
            thread.start()
        time.sleep(0.05)

        durations: list[float] = []
        while any(thread.is_alive() for thread in slow) and len(durations) < 200:
            started = time.perf_counter()
            srv.connect("example.com").close()
            durations.append(time.perf_counter() - started)
        for thread in slow:
            thread.join()

    assert len(durations) >= 20
    p99 = statistics.quantiles(durations, n=100)[98]
    assert p99 < 0.020, f"p99 {p99 * 1000:.1f} ms over {len(durations)} handshakes"
    assert srv.cache.counters()["size"] == 11


def test_a_fetch_slower_than_the_handshake_timeout_is_refused_with_internal_error(
    tmp_path: Path, errors: list[str]
) -> None:
    with serving(tmp_path, handshake_timeout_s=0.3, fallback="example.com") as srv:
        srv.store.add("example.com")
        srv.connect("example.com").close()
        srv.store.add("slow.example.com")
        srv.store.delay_s = 1.0

        printed = s_client(srv.port, "slow.example.com", tmp_path)
        failures = srv.stats.handshake_failures

    # Not the fallback's certificate: the name may well have its own.
    assert "internal error" in printed
    assert "CN = example.com" not in printed and "CN=example.com" not in printed
    assert failures == 1
    assert errors == []


# Records a client might send right after its ClientHello: a
# change_cipher_spec, which TLS 1.3 servers must drop (RFC 8446 5), and an
# application_data record, which no server may accept before the handshake.
COMPAT_CCS = bytes((0x14, 0x03, 0x03, 0x00, 0x01, 0x01))
EARLY_DATA = bytes((0x17, 0x03, 0x03, 0x00, 0x05)) + b"hello"


@contextmanager
def _fetching(
    srv: Serving,
) -> Iterator[tuple[socket.socket, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]]:
    """A connection whose ClientHello waits while its context is fetched
    (slowly): the socket and the memory-buffer client, for _finish_handshake."""
    srv.store.add("late.example.com")
    srv.store.delay_s = 0.3
    client, incoming, outgoing, hello = _memory_client(
        srv.client_context(), "late.example.com"
    )
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
        raw.sendall(hello)
        time.sleep(0.1)  # Esper is fetching the context now
        yield raw, client, incoming, outgoing


@pytest.mark.parametrize(
    ("extra", "accepted"), [(COMPAT_CCS, True), (EARLY_DATA, False)]
)
def test_bytes_sent_while_the_context_is_fetched_reach_the_handshake(
    tmp_path: Path, extra: bytes, accepted: bool
) -> None:
    with serving(tmp_path) as srv:
        with _fetching(srv) as (raw, client, incoming, outgoing):
            raw.sendall(extra)
            name = _finish_handshake(raw, client, incoming, outgoing)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not (
                srv.stats.handshakes or srv.stats.handshake_failures
            ):
                time.sleep(0.01)

    # OpenSSL saw the bytes, in order, after the ClientHello: it dropped the
    # first kind and refused the second. (The server's flight leaves before
    # it reads on, so the client may finish its side either way.)
    assert (srv.stats.handshakes, srv.stats.handshake_failures) == (
        (1, 0) if accepted else (0, 1)
    )
    if accepted:
        assert name == "late.example.com"
    assert srv.store.calls == ["late.example.com"]


def _finish_handshake(
    raw: socket.socket,
    client: ssl.SSLObject,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
) -> str | None:
    """Drive a memory-BIO client over ``raw``: the certificate's common name,
    or None when the server ended the handshake."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        data = raw.recv(65536)
        if not data:
            return None
        incoming.write(data)
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            continue
        except ssl.SSLError:
            return None
        raw.sendall(outgoing.read())
        return peer_common_name(client)
    raise AssertionError("the handshake did not finish in time")


def _try_connect(srv: Serving, name: str) -> None:
    srv.connect(name).close()


def test_a_thousand_open_connections_do_not_stop_new_handshakes(
    tmp_path: Path,
) -> None:
    # Client and server ends share this process: 2,000 descriptors at least.
    assert raise_fd_limit() >= 2500
    with serving(tmp_path) as srv:
        srv.store.add("example.com")

        async def hold(count: int) -> int:
            context = srv.client_context()
            gate = asyncio.Semaphore(64)

            async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                async with gate:
                    return await asyncio.open_connection(
                        "127.0.0.1",
                        srv.port,
                        ssl=context,
                        server_hostname="example.com",
                    )

            streams = await asyncio.wait_for(
                asyncio.gather(*(one() for _ in range(count))), 60
            )
            # A TLS 1.3 client is done before the server has read its
            # Finished: give the server a moment to count the last ones.
            for _ in range(500):
                if srv.stats.connections_open >= count:
                    break
                await asyncio.sleep(0.01)
            opened = srv.stats.connections_open
            with srv.connect("example.com") as extra:
                assert request(extra, "example.com")[0] == "HTTP/1.1 200 OK"
            for _, writer in streams:
                writer.close()
            return opened

        opened = asyncio.run(hold(1000))

    assert opened == 1000


def test_closing_the_listener_keeps_open_connections(tmp_path: Path) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")
        tls = srv.connect("example.com")

        srv.plane.call(srv.listener.close)
        srv.plane.run(asyncio.sleep(0))
        answer = request(tls, "example.com")
        tls.close()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", srv.port), 2).close()

    assert answer[0] == "HTTP/1.1 200 OK"


def test_a_hello_in_pieces_carries_on_after_the_listener_closes(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")
        client, incoming, outgoing, hello = _memory_client(
            srv.client_context(), "example.com"
        )

        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.sendall(hello[:50])
            time.sleep(0.1)  # accepted, waiting for the rest of its hello
            srv.plane.call(srv.listener.close)
            srv.plane.run(asyncio.sleep(0))
            raw.sendall(hello[50:])
            name = _finish_handshake(raw, client, incoming, outgoing)

    assert name == "example.com"
    assert srv.stats.handshakes == 1


def test_a_fetch_in_progress_carries_on_after_the_listener_closes(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as srv:
        with _fetching(srv) as (raw, client, incoming, outgoing):
            srv.plane.call(srv.listener.close)
            name = _finish_handshake(raw, client, incoming, outgoing)

    assert name == "late.example.com"
    assert srv.stats.handshakes == 1


def test_plain_listener_serves_http_on_ipv4_and_ipv6(tmp_path: Path) -> None:
    with serving(tmp_path, none_hosts=("plain.example.net",)) as srv:
        sockets = srv.plain_sockets
        plain_port = sockets[0].getsockname()[1]
        listener = PlainListener(srv.plane, plain_port, sockets)
        srv.plane.run(listener.start())
        answers = []
        for host in ("127.0.0.1", "::1"):
            with socket.create_connection((host, plain_port), 5) as raw:
                answers.append(request(raw, "plain.example.net"))
        srv.plane.call(listener.close)

    assert answers == [("HTTP/1.1 200 OK", b"hello from site")] * 2
    assert len(sockets) == 2


def test_upper_case_sni_from_python_uses_the_cache_key_in_lower_case(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")

        with srv.connect("EXAMPLE.com") as tls:
            name = peer_common_name(tls)

    assert name == "example.com"
    assert srv.store.calls == ["example.com"]


def test_a_client_closing_inside_its_hello_is_dropped_at_once(tmp_path: Path) -> None:
    with serving(tmp_path, handshake_timeout_s=5.0) as srv:
        hello = bytes.fromhex("160301020001") + bytes(50)
        with socket.create_connection(("127.0.0.1", srv.port), 5) as raw:
            raw.sendall(hello)
            time.sleep(0.05)
            started = time.monotonic()
            raw.shutdown(socket.SHUT_WR)
            try:
                data = raw.recv(100)
            except ConnectionResetError:
                data = b""
            waited = time.monotonic() - started

    assert data == b""
    assert waited < 1.0
