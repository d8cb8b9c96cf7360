"""What the cluster and worker tests do to real nodes: configure, upload, probe.

``node_config`` writes the configuration of one node; ``ai1`` runs the real
admin tool against a node; ``served`` makes one TLS handshake with SNI (and
optionally one HTTP request) with Python's ``ssl`` and says which
certificate came back; ``wait_served`` polls that, bounded, and says how
long the change took to show.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from tests.certs import default_ca
from tests.e2e.server import free_port

PROBE_PAUSE_S = 0.02


def write_master_key(path: Path) -> Path:
    """A master key file (64 hex digits, 0600) that several nodes get copies of."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(0o600)
    return path


def node_config(
    folder: Path,
    *,
    store: str,
    master_key: Path | None,
    hosts: list[str],
    extra: str = "",
) -> tuple[str, dict[str, int]]:
    """The text of one node's configuration and the ports it uses."""
    ports = {"admin": free_port(), "http": free_port(), "https": free_port()}
    root = folder / "site"
    root.mkdir(parents=True, exist_ok=True)
    (root / "index.html").write_text("<p>served</p>\n")
    key_line = f'master_key_file = "{master_key}"\n' if master_key else ""
    text = (
        "[arcology]\n"
        f'data_dir = "{folder / "arc-data"}"\n'
        f'admin = "127.0.0.1:{ports["admin"]}"\n'
        f'store = "{store}"\n'
        f"{key_line}"
        'bind = ["127.0.0.1"]\n'
        f"{extra}"
        "\n[[services]]\n"
        'name = "site"\n'
        f"hosts = {hosts!r}\n".replace("'", '"')
        + f"port = {ports['http']}\n"
        'tls = "optional"\n'
        f"tlsPort = {ports['https']}\n"
        f'root = "{root}"\n'
    )
    return text, ports


def ai1(folder: Path, admin_port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``ai1`` tool against the node whose data folder is ``folder``."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "arc.ai1.cli",
            "--admin",
            f"127.0.0.1:{admin_port}",
            "--token-file",
            str(folder / "arc-data" / "admin.token"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def client_context() -> ssl.SSLContext:
    """A TLS client trusting the test CA that every test chain comes from."""
    return ssl.create_default_context(cadata=default_ca().root_pem.decode("ascii"))


def served(
    port: int, domain: str, *, request: bool = False, timeout: float = 2.0
) -> str | None:
    """The sha256 fingerprint of the leaf served for ``domain``, or None.

    None means the handshake failed (no certificate for the name, or the
    port is not open). With ``request`` one HTTP request is sent too, so the
    serving worker writes an access line.
    """
    context = client_context()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=domain) as tls:
                der = tls.getpeercert(binary_form=True)
                if request:
                    tls.sendall(
                        f"GET / HTTP/1.1\r\nHost: {domain}\r\n"
                        "Connection: close\r\n\r\n".encode("ascii")
                    )
                    while tls.recv(65536):
                        pass
    except (OSError, ssl.SSLError):
        return None
    return hashlib.sha256(der).hexdigest() if der else None


def wait_served(
    port: int, domain: str, fingerprint: str | None, timeout: float
) -> float:
    """Seconds until ``domain`` is served with ``fingerprint`` (None: refused)."""
    start = time.monotonic()
    deadline = start + timeout
    last: str | None = "never probed"
    while time.monotonic() < deadline:
        last = served(port, domain, timeout=1.0)
        if last == fingerprint:
            return time.monotonic() - start
        time.sleep(PROBE_PAUSE_S)
    raise AssertionError(
        f"port {port} served {domain} with {last} and not {fingerprint} "
        f"within {timeout} s"
    )
