"""A real data plane with a TLS listener, for tests of the accept path.

``serving(tmp_path, ...)`` opens a TLS port on 127.0.0.1, builds a
configuration whose services listen on it (static files answering
``hello from site``), starts a real ``DataPlane`` (uvloop, real
``HttpProtocol``) and a ``TlsListener`` whose cache fetches from the real
Cryptosaur; Cryptosaur's change announcements invalidate the cache on the
loop, as Esper wires them. Clients are real: Python's ssl module and
``openssl s_client``.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.cryptosaur import CHANGED
from arc.config import Config
from arc.dataplane import DataPlane
from arc.http.routing import RoutingTable
from arc.tls.accept import ConnectionStats, TlsListener
from arc.tls.cache import ContextCache
from arc.tls.listener import open_sockets
from tests.arc.tls.stores import CryptosaurSource, cryptosaur_source
from tests.certs import default_ca

CLIENT_TIMEOUT_S = 10.0


@dataclass
class Serving:
    """Everything a test needs to talk to one TLS listener."""

    port: int
    plane: DataPlane
    store: CryptosaurSource
    cache: ContextCache
    listener: TlsListener
    stats: ConnectionStats
    root_pem_file: Path
    plain_sockets: list[socket.socket]

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.root_pem_file))
        return context

    def connect(
        self, server_name: str | None, check_hostname: bool = True
    ) -> ssl.SSLSocket:
        """A TLS connection to the listener, handshake done."""
        context = self.client_context()
        context.check_hostname = check_hostname and server_name is not None
        if server_name is None:
            context.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection(("127.0.0.1", self.port), CLIENT_TIMEOUT_S)
        try:
            return context.wrap_socket(raw, server_hostname=server_name)
        except BaseException:
            raw.close()
            raise


def request(tls: socket.socket, host: str) -> tuple[str, bytes]:
    """Send one GET / on an open connection; return status line and body."""
    tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        data += tls.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length and time.monotonic() < deadline:
        body += tls.recv(65536)
    return head.split(b"\r\n")[0].decode(), body


def peer_common_name(tls: ssl.SSLSocket | ssl.SSLObject) -> str:
    """The commonName of the certificate the server presented."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    der = tls.getpeercert(binary_form=True)
    assert der is not None
    leaf = x509.load_der_x509_certificate(der)
    value = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return str(value)


def s_client(port: int, server_name: str | None, tmp: Path, *extra: str) -> str:
    """Run ``openssl s_client`` once; return what it printed (both streams)."""
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief"]
    args += ["-servername", server_name] if server_name else ["-noservername"]
    args += extra
    done = subprocess.run(
        args,
        input=b"",
        capture_output=True,
        timeout=CLIENT_TIMEOUT_S,
        cwd=tmp,
    )
    return (done.stdout + done.stderr).decode(errors="replace")


@contextmanager
def serving(
    tmp_path: Path,
    *,
    fallback: str = "reject",
    handshake_timeout_s: float = 10.0,
    hosts: tuple[str, ...] = ("*.example.com", "example.com", "a.example.org"),
    none_hosts: tuple[str, ...] = ("plain.example.net",),
) -> Iterator[Serving]:
    """Run a TLS listener on a real data plane for the duration of a test."""
    sockets = open_sockets(0, ["127.0.0.1"])
    port = sockets[0].getsockname()[1]
    plain_sockets = open_sockets(0, ["127.0.0.1", "::1"])
    plain_port = plain_sockets[0].getsockname()[1]
    root = tmp_path / "site"
    root.mkdir(exist_ok=True)
    (root / "index.html").write_text("hello from site")
    host_list = ", ".join(f'"{h}"' for h in hosts)
    none_list = ", ".join(f'"{h}"' for h in none_hosts)
    config = Config.from_toml_text(
        f"""
        [arcology]
        data_dir = "{tmp_path / "data"}"
        bind = ["127.0.0.1"]
        tls_fallback = "{fallback}"
        access_log = false

        [[services]]
        name = "site"
        hosts = [{host_list}]
        tls = "required"
        tlsPort = {port}
        root = "{root}"

        [[services]]
        name = "plain"
        hosts = [{none_list}]
        tls = "none"
        port = {plain_port}
        root = "{root}"
        """,
        base_dir=tmp_path,
    )
    plane = DataPlane(config)
    plane.start()
    plane.install_routes(RoutingTable.build(config.services, config.arcology))
    stack = ExitStack()
    store = stack.enter_context(cryptosaur_source(tmp_path))
    cache = ContextCache(store.fetch)

    def changed(payload: Any) -> None:
        plane.loop.call_soon_threadsafe(cache.invalidate, payload["domains"])

    store.runtime.subscribe(CHANGED, changed)
    stats = ConnectionStats()
    listener = TlsListener(
        plane,
        port,
        sockets,
        cache,
        fallback=fallback,
        handshake_timeout_s=handshake_timeout_s,
        stats=stats,
    )
    plane.run(listener.start())
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(default_ca().root_pem)
    try:
        yield Serving(
            port, plane, store, cache, listener, stats, root_pem, plain_sockets
        )
    finally:
        for sock in plain_sockets:
            sock.close()
        plane.call(listener.close)
        plane.stop()
        stack.close()
