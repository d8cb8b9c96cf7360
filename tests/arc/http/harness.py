"""A real data plane serving HTTP on loopback ports, for the HTTP tests.

``Plane`` starts a ``DataPlane`` (its own uvloop thread), binds free ports on
127.0.0.1 and serves ``HttpProtocol`` on them: plain through the loop's
server, TLS through Arcology's own ``TlsListener`` and TLS transport (one
trustme certificate, served for every name and to clients without SNI).
Services are defined after the ports are known, since routing matches a
service's port.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import trustme

from arc.config import Config, ServiceConfig, Settings
from arc.dataplane import DataPlane
from arc.http.routing import RoutingTable
from arc.tls.accept import TlsListener
from arc.tls.cache import ContextCache

CA = trustme.CA()
CERT = CA.issue_cert("shop.example.com", "*.example.com", "localhost", "127.0.0.1")


def client_context() -> ssl.SSLContext:
    """A client context trusting the test CA."""
    ctx = ssl.create_default_context()
    CA.configure_trust(ctx)
    return ctx


async def _fetch_test_certificate(name: str) -> dict[str, Any]:
    """The test certificate, whatever the name (as a store would answer)."""
    chain = b"".join(blob.bytes() for blob in CERT.cert_chain_pems)
    return {"domain": name, "chain_pem": chain, "key_pem": CERT.private_key_pem.bytes()}


class _TlsPlane:
    """The data plane as a TlsListener sees it, with the test's ``tls_domain``."""

    def __init__(self, dataplane: DataPlane, tls_domain: str | None) -> None:
        self.dataplane = dataplane
        self.tls_domain = tls_domain
        self.loop = dataplane.loop
        self.listeners = dataplane.listeners

    @property
    def routes(self) -> RoutingTable:
        return self.dataplane.routes

    def http_protocol_factory(
        self, *, port: int, scheme: str, tls_domain: str | None
    ) -> Any:
        return self.dataplane.http_protocol_factory(
            port=port, scheme=scheme, tls_domain=self.tls_domain
        )


def free_socket() -> socket.socket:
    """A listening socket on a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class Plane:
    """A started data plane with listeners; ``close`` stops everything."""

    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.settings = Settings(data_dir=tmp_path, **settings)
        self.config = Config(arcology=self.settings)
        self.dataplane = DataPlane(self.config)
        self.dataplane.start()
        self.servers: list[Any] = []

    def listen(self, *, tls: bool = False, tls_domain: str | None = None) -> int:
        """Serve HTTP on a new free port; the port number.

        ``tls_domain``: the certificate domain the HTTP layer checks Host
        headers against (None: no check).
        """
        sock = free_socket()
        port: int = sock.getsockname()[1]
        if tls:
            listener = TlsListener(
                _TlsPlane(self.dataplane, tls_domain),
                port,
                [sock],
                ContextCache(_fetch_test_certificate),
                fallback="shop.example.com",
            )
            self.dataplane.run(listener.start())
            self.servers.append(listener)
            return port
        factory = self.dataplane.http_protocol_factory(
            port=port, scheme="http", tls_domain=None
        )

        async def serve() -> Any:
            loop = self.dataplane.loop
            return await loop.create_server(factory, sock=sock)

        self.servers.append(self.dataplane.run(serve()))
        return port

    def route(
        self,
        services: Iterable[ServiceConfig],
        base_dir: Path | None = None,
        apps: dict[str, Any] | None = None,
    ) -> None:
        """Install a routing table built from ``services``."""
        table = RoutingTable.build(
            tuple(services), self.settings, base_dir=base_dir, apps=apps
        )
        self.dataplane.install_routes(table)

    def close(self) -> None:
        """Close the listeners and stop the loop."""

        async def shut() -> None:
            for server in self.servers:
                server.close()

        self.dataplane.run(shut())
        self.dataplane.stop()


def raw_exchange(
    port: int,
    data: bytes,
    *,
    tls: bool = False,
    server_name: str = "shop.example.com",
    timeout: float = 5.0,
    until_close: bool = True,
) -> bytes:
    """Send ``data`` and read the answer until the server closes (bounded)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if tls:
        sock = client_context().wrap_socket(sock, server_hostname=server_name)
    try:
        sock.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ssl.SSLError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
            if not until_close and b"\r\n\r\n" in out:
                break
        return out
    finally:
        sock.close()
