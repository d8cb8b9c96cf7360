"""Two Arcology nodes on one PostgreSQL: changes everywhere, outages survived.

Each node is a real ``arcology run`` process with its own ports and data
folder and a copy of one master key file; both stores point at one
throwaway PostgreSQL. Certificates go in through the real ``ai1`` tool on
one node and are checked with TLS handshakes (Python ``ssl``, with SNI)
against the other.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.arc.tls.serving import s_client
from tests.certs import make_chain
from tests.e2e.probe import ai1, node_config, served, wait_served, write_master_key
from tests.e2e.server import ArcologyProcess
from tests.pg import ThrowawayPostgres, own_postgres, postgres_server

__all__ = ["own_postgres", "postgres_server"]

# The promise: an upload or delete on any node is served by every node
# within one second.
WITHIN_S = 1.0
# After the database comes back, a node's change feed reconnects within its
# capped back-off (5 s), then catches up.
RECOVERY_S = 8.0


@dataclass
class Node:
    """One running node: its process, folder and ports."""

    process: ArcologyProcess
    folder: Path
    ports: dict[str, int]
    config_text: str

    @property
    def tls_port(self) -> int:
        return self.ports["https"]

    def upload(self, bundle: bytes, name: str) -> None:
        path = self.folder / f"{name}.pem"
        path.write_bytes(bundle)
        done = ai1(self.folder, self.ports["admin"], "upload", str(path))
        assert done.returncode == 0, done.stdout + done.stderr

    def delete(self, domain: str) -> None:
        done = ai1(self.folder, self.ports["admin"], "delete", domain)
        assert done.returncode == 0, done.stdout + done.stderr


def start_node(folder: Path, url: str, master_key: Path) -> Node:
    """A node with its own copy of the master key, on the database ``url``."""
    folder.mkdir(parents=True, exist_ok=True)
    key_copy = folder / "master.key"
    shutil.copyfile(master_key, key_copy)
    key_copy.chmod(0o600)
    text, ports = node_config(
        folder, store=url, master_key=key_copy, hosts=["*.cluster.test"]
    )
    process = ArcologyProcess(folder, text).start()
    return Node(process, folder, ports, text)


@pytest.fixture
def cluster(
    postgres_server: ThrowawayPostgres, tmp_path: Path
) -> Iterator[tuple[Node, Node]]:
    url = postgres_server.create_database()
    key = write_master_key(tmp_path / "master.key")
    one = start_node(tmp_path / "one", url, key)
    try:
        two = start_node(tmp_path / "two", url, key)
    except BaseException:
        one.process.stop()
        raise
    try:
        yield one, two
    finally:
        codes = (two.process.stop(), one.process.stop())
        assert codes == (0, 0)


def test_an_upload_on_one_node_is_served_by_the_other_within_a_second(
    cluster: tuple[Node, Node],
) -> None:
    one, two = cluster
    first = make_chain("shop.cluster.test")
    assert served(two.tls_port, "shop.cluster.test") is None

    one.upload(first.bundle(), "first")

    assert wait_served(two.tls_port, "shop.cluster.test", first.fingerprint, 5) < (
        WITHIN_S
    )

    # A replacement reaches a node that already holds the old context.
    second = make_chain("shop.cluster.test")
    one.upload(second.bundle(), "second")
    assert wait_served(two.tls_port, "shop.cluster.test", second.fingerprint, 5) < (
        WITHIN_S
    )
    assert "changes from another process" not in one.process.log()


def test_a_delete_on_one_node_is_refused_by_the_other_within_a_second(
    cluster: tuple[Node, Node],
) -> None:
    one, two = cluster
    chain = make_chain("gone.cluster.test")
    one.upload(chain.bundle(), "gone")
    # Both nodes hold a context for it: the delete must reach their caches.
    wait_served(two.tls_port, "gone.cluster.test", chain.fingerprint, 5)
    wait_served(one.tls_port, "gone.cluster.test", chain.fingerprint, 5)

    two.delete("gone.cluster.test")

    assert wait_served(one.tls_port, "gone.cluster.test", None, 5) < WITHIN_S
    assert served(two.tls_port, "gone.cluster.test") is None


def test_nodes_serve_cached_domains_through_a_database_outage_and_catch_up(
    own_postgres: ThrowawayPostgres, tmp_path: Path
) -> None:
    url = own_postgres.create_database()
    key = write_master_key(tmp_path / "master.key")
    one = start_node(tmp_path / "one", url, key)
    two = start_node(tmp_path / "two", url, key)
    try:
        before = make_chain("steady.cluster.test")
        one.upload(before.bundle(), "steady")
        wait_served(two.tls_port, "steady.cluster.test", before.fingerprint, 5)
        wait_served(one.tls_port, "steady.cluster.test", before.fingerprint, 5)

        # A domain the second node never served, so never cached.
        cold = make_chain("cold.cluster.test")
        one.upload(cold.bundle(), "cold")

        # The database goes away: cached domains keep being served; an
        # uncached one is refused as a server failure, not an unknown name.
        own_postgres.stop()
        two.process.wait_for("certificate store unreachable", 10)
        for _ in range(10):
            assert served(one.tls_port, "steady.cluster.test") == before.fingerprint
            assert served(two.tls_port, "steady.cluster.test") == before.fingerprint
            time.sleep(0.1)
        refused = s_client(two.tls_port, "cold.cluster.test", tmp_path)
        assert "internal error" in refused, refused

        # It comes back, and a change made before the second node has
        # reconnected is still heard (caught up by sequence number).
        own_postgres.start()
        after = make_chain("steady.cluster.test")
        upload_with_retry(one, after.bundle(), "after")
        wait_served(two.tls_port, "steady.cluster.test", after.fingerprint, RECOVERY_S)

        # And later changes arrive within a second again.
        fresh = make_chain("fresh.cluster.test")
        two.process.wait_for("certificate store reachable again", RECOVERY_S)
        one.upload(fresh.bundle(), "fresh")
        assert wait_served(two.tls_port, "fresh.cluster.test", fresh.fingerprint, 5) < (
            WITHIN_S
        )

        # The outage was told once, and its end once.
        log = two.process.log()
        assert log.count("certificate store unreachable") == 1
        assert log.count("certificate store reachable again") == 1
    finally:
        assert (two.process.stop(), one.process.stop()) == (0, 0)


def test_a_node_that_was_down_during_changes_serves_the_current_state(
    cluster: tuple[Node, Node],
) -> None:
    one, two = cluster
    kept = make_chain("kept.cluster.test")
    dropped = make_chain("dropped.cluster.test")
    one.upload(kept.bundle(), "kept")
    one.upload(dropped.bundle(), "dropped")
    wait_served(two.tls_port, "dropped.cluster.test", dropped.fingerprint, 5)

    assert two.process.stop() == 0
    renewed = make_chain("kept.cluster.test")
    one.upload(renewed.bundle(), "renewed")
    one.delete("dropped.cluster.test")
    two.process = ArcologyProcess(two.folder, two.config_text).start()

    assert served(two.tls_port, "kept.cluster.test") == renewed.fingerprint
    assert served(two.tls_port, "dropped.cluster.test") is None


def upload_with_retry(node: Node, bundle: bytes, name: str) -> None:
    """Upload, retrying while the node's own connection is still coming back."""
    path = node.folder / f"{name}.pem"
    path.write_bytes(bundle)
    deadline = time.monotonic() + RECOVERY_S
    while True:
        done = ai1(node.folder, node.ports["admin"], "upload", str(path))
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, done.stdout + done.stderr
        time.sleep(0.2)
