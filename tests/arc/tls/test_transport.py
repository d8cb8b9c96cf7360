"""The TLS transport in which OpenSSL drives the socket, with real clients.

Every test runs a real TLS listener on a real data plane (see ``serving``)
and talks to it with Python's ssl module or ``openssl s_client``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from arc.tls.transport import Clock, TlsTransport
from tests.arc.tls.serving import Serving, request, s_client, serving


def _get(tls: ssl.SSLSocket, host: str, path: str, *, slow: bool = False) -> bytes:
    """GET ``path`` with Connection: close; the whole answer, read to EOF."""
    tls.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    )
    chunks: list[bytes] = []
    while chunk := tls.recv(65536):
        chunks.append(chunk)
        if slow and len(chunks) < 20:
            # Let the server's buffers fill while nothing is read.
            time.sleep(0.05)
    return b"".join(chunks)


def test_a_large_file_arrives_whole_to_a_slow_reader(tmp_path: Path) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")
        data = os.urandom(6 * 1024 * 1024)
        (tmp_path / "site" / "big.bin").write_bytes(data)
        with srv.connect("example.com") as tls:
            tls.settimeout(30)
            answer = _get(tls, "example.com", "/big.bin", slow=True)

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body) == len(data)
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


def test_requests_pipelined_after_connection_close_do_not_cut_the_answer(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")
        with srv.connect("example.com") as tls:
            first = b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
            more = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n" * 50
            tls.sendall(first + more)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk

    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"hello from site")
    assert answer.count(b"HTTP/1.1 200") == 1


def test_a_handshake_openssl_refuses_reaches_the_client_as_an_alert(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")
        # A TLS 1.2 client whose only suite (RSA key exchange) the server
        # does not offer.
        printed = s_client(
            srv.port, "example.com", tmp_path, "-tls1_2", "-cipher", "AES128-SHA"
        )
        deadline = time.monotonic() + 5
        while srv.stats.handshake_failures < 1 and time.monotonic() < deadline:
            time.sleep(0.01)

    assert "alert handshake failure" in printed
    assert srv.stats.handshake_failures == 1
    assert srv.stats.handshakes == 0


def test_a_client_that_stops_inside_the_handshake_is_closed_after_the_timeout(
    tmp_path: Path,
) -> None:
    with serving(tmp_path, handshake_timeout_s=0.4) as srv:
        srv.store.add("example.com")
        client = srv.client_context()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client.wrap_bio(incoming, outgoing, server_hostname="example.com")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        with socket.create_connection(("127.0.0.1", srv.port), 5) as raw:
            raw.sendall(outgoing.read())
            started = time.monotonic()
            received = b""
            # The server's flight, then nothing until the close.
            while chunk := raw.recv(65536):
                received += chunk
            waited = time.monotonic() - started

    assert received[:1] == b"\x16"  # the server's handshake records came
    assert 0.3 < waited < 3.0
    assert srv.stats.handshake_failures == 1
    assert srv.stats.handshakes == 0


class _Recorder(asyncio.Protocol):
    """Answers one request with what the transport says of the connection."""

    seen: dict[str, Any] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        t = self.transport
        _Recorder.seen = {
            name: t.get_extra_info(name)
            for name in ("peername", "sockname", "cipher", "sslcontext")
        }
        _Recorder.seen["socket_fd"] = t.get_extra_info("socket").fileno()
        _Recorder.seen["ssl_version"] = t.get_extra_info("ssl_object").version()
        _Recorder.seen["limits"] = t.get_write_buffer_limits()
        t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        t.close()
        _Recorder.seen["closing"] = t.is_closing()


class _Exploding(asyncio.Protocol):
    """Fails on its first bytes, as a buggy protocol would."""

    def data_received(self, data: bytes) -> None:
        raise RuntimeError("protocol bug for the test")


def _use_protocol(srv: Serving, protocol: type[asyncio.Protocol]) -> None:
    srv.plane.http_protocol_factory = lambda **_: protocol  # type: ignore[method-assign]


def test_the_transport_tells_the_protocol_about_the_connection(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")
        _use_protocol(srv, _Recorder)
        with srv.connect("example.com") as tls:
            local = tls.getsockname()
            tls.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk

    seen = _Recorder.seen
    assert answer.endswith(b"\r\n\r\nok")
    assert seen["peername"] == local
    assert seen["sockname"] == ("127.0.0.1", srv.port)
    assert seen["cipher"][1] == "TLSv1.3"
    assert seen["ssl_version"] == "TLSv1.3"
    assert isinstance(seen["sslcontext"], ssl.SSLContext)
    assert seen["socket_fd"] >= 0
    assert seen["limits"] == (16 * 1024, 64 * 1024)
    assert seen["closing"] is True


def test_a_failing_protocol_is_logged_and_ends_only_its_connection(
    tmp_path: Path, errors: list[str]
) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")
        srv.store.add("a.example.org")
        _use_protocol(srv, _Exploding)
        with srv.connect("example.com") as broken:
            broken.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
            leftover = broken.recv(100)
        # Protocol factories are kept per certificate: a.example.org's is
        # made now, from the real HTTP layer again.
        del srv.plane.http_protocol_factory
        with srv.connect("a.example.org") as tls:
            status, body = request(tls, "a.example.org")

    assert leftover == b""
    assert status == "HTTP/1.1 200 OK"
    assert body == b"hello from site"
    assert any("protocol bug for the test" in line for line in errors)
    assert any("data_received" in line for line in errors)


def test_write_buffer_limits_are_checked() -> None:
    transport = TlsTransport.__new__(TlsTransport)
    with pytest.raises(ValueError, match="must be >= low"):
        transport.set_write_buffer_limits(high=10, low=20)


def test_many_connections_at_once_all_complete(tmp_path: Path) -> None:
    with serving(tmp_path) as srv:
        srv.store.add("example.com")
        results: list[bytes] = []
        lock = threading.Lock()

        def one() -> None:
            with srv.connect("example.com") as tls:
                answer = _get(tls, "example.com", "/")
            with lock:
                results.append(answer)

        threads = [threading.Thread(target=one) for _ in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

    assert len(results) == 40
    assert all(r.endswith(b"hello from site") for r in results)
    assert srv.stats.handshakes == 40


def test_a_shorter_clock_timeout_brings_queued_deadlines_forward() -> None:
    expired: list[str] = []

    async def run() -> float:
        loop = asyncio.get_running_loop()
        clock = Clock(loop, 5.0, expired.append, slack_s=0.01)
        clock.add("first")
        started = loop.time()
        clock.set_timeout(0.05)
        while not expired and loop.time() - started < 2:
            await asyncio.sleep(0.01)
        return loop.time() - started

    waited_s = asyncio.run(run())

    assert expired == ["first"]
    assert waited_s < 1
