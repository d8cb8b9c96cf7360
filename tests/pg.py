"""A throwaway PostgreSQL server for tests: real binaries, a temporary folder.

How this works: ``ThrowawayPostgres`` runs ``initdb -A trust`` in a new
temporary folder and starts the server with ``pg_ctl``, listening only on
127.0.0.1 on a free port, with its Unix socket in the same folder. Both
programs refuse to run as root, so when the tests run as root the folder is
given to the ``postgres`` user and the programs run through
``runuser -u postgres --``. ``stop`` and ``start`` can be called again on the
same server (the tests use that to cut the database away from running
nodes); ``destroy`` stops it for good and removes the folder.

Fixtures (import them into a test module with ``from tests.pg import ...``):

- ``postgres_server`` (session): one server shared by a whole test run.
- ``pg_url`` (function): a fresh, empty database on that server.
- ``own_postgres`` (function): a server of the test's own, for tests that
  stop and restart it.

``ThrowawayPostgres(tls=ca)`` serves TLS with a certificate for 127.0.0.1
issued by the ``trustme`` CA ``ca``, and its ``pg_hba.conf`` accepts TCP
clients over TLS only (``hostssl``), so a test can tell that a connection
really was encrypted.

Where the binaries are missing the tests are skipped with the reason, except
in CI (``CI=true``), where a missing PostgreSQL fails them: a green run must
mean the PostgreSQL backend was exercised.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.e2e.server import free_port

PG_BIN = Path(os.environ.get("ARC_PG_BIN", "/usr/lib/postgresql/15/bin"))
# initdb takes about a second; a start or stop well under one. The bound is
# for a slow CI machine, not the usual case.
PG_CTL_TIMEOUT_S = 60
START_ATTEMPTS = 3  # a free port may be taken by someone else before we bind it


def postgres_missing() -> str | None:
    """Why no throwaway PostgreSQL can run here, or None when one can."""
    for program in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / program).is_file():
            return f"PostgreSQL not installed: {PG_BIN / program} is missing"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root and runuser is missing, so initdb cannot run"
    return None


def require_postgres() -> None:
    """Skip the calling test without PostgreSQL; fail it instead in CI."""
    reason = postgres_missing()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
    pytest.skip(reason)


class ThrowawayPostgres:
    """One PostgreSQL server in a temporary folder, owned by the test run."""

    def __init__(self, tls: trustme.CA | None = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="arc-pg-"))
        self.data = self.folder / "data"
        self.log_file = self.folder / "server.log"
        self.port = 0
        self.tls = tls is not None
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.folder, user="postgres")
        self._run("initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8")
        if tls is not None:
            self._serve_tls(tls)

    def _serve_tls(self, ca: trustme.CA) -> None:
        # The server reads its key only if no one else may (mode 0600, owned
        # by the user it runs as); TCP clients must come over TLS.
        issued = ca.issue_cert("127.0.0.1", "localhost")
        files = {
            "server.crt": b"".join(blob.bytes() for blob in issued.cert_chain_pems),
            "server.key": issued.private_key_pem.bytes(),
        }
        for name, data in files.items():
            path = self.data / name
            path.write_bytes(data)
            path.chmod(0o600)
            if self.as_postgres:
                shutil.chown(path, user="postgres")
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n"
        )

    @property
    def url(self) -> str:
        """The URL of the ``postgres`` database."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _command(self, program: str, *args: str) -> list[str]:
        command = [str(PG_BIN / program), "-D", str(self.data), *args]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return command

    def _run(self, program: str, *args: str) -> None:
        extra = ("--no-sync",) if program == "initdb" else ()
        done = subprocess.run(
            self._command(program, *args, *extra),
            capture_output=True,
            text=True,
            timeout=PG_CTL_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            log = self.log_file.read_text() if self.log_file.exists() else ""
            raise RuntimeError(
                f"{program} {' '.join(args)} failed ({done.returncode}): "
                f"{done.stdout}{done.stderr}{log[-2000:]}"
            )

    def start(self) -> None:
        """Start the server (on the port it had, or a new free one)."""
        attempts = 1 if self.port else START_ATTEMPTS
        for attempt in range(attempts):
            port = self.port or free_port()
            options = (
                f"-p {port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=200" + (" -c ssl=on" if self.tls else "")
            )
            try:
                self._run(
                    "pg_ctl", "-w", "-l", str(self.log_file), "-o", options, "start"
                )
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                continue
            self.port = port
            return

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``fast`` ends every client connection at once."""
        self._run("pg_ctl", "-w", "-m", mode, "stop")

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"arc_{secrets.token_hex(6)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.database_url(name)

    def destroy(self) -> None:
        """Stop the server if it runs and remove its folder."""
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    """A started throwaway PostgreSQL, destroyed on leaving (skips if missing)."""
    require_postgres()
    server = ThrowawayPostgres()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[ThrowawayPostgres]:
    """One throwaway PostgreSQL for the whole test run."""
    with throwaway_postgres() as server:
        yield server


@pytest.fixture
def pg_url(postgres_server: ThrowawayPostgres) -> str:
    """A fresh, empty database on the shared throwaway server."""
    return postgres_server.create_database()


@pytest.fixture
def own_postgres() -> Iterator[ThrowawayPostgres]:
    """A throwaway PostgreSQL of the test's own, free to stop and restart."""
    with throwaway_postgres() as server:
        yield server
