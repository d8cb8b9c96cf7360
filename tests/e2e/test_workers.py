"""``arcology run --workers 2``: two processes share each port and each change.

Which worker served a connection is read from the access log: every line a
worker writes ends with ``worker=I``, and each test connection sends one
HTTP request, so each accepted connection leaves exactly one access line
naming the host and the worker. With SQLite the workers hear each other
through the change feed's 200 ms poll; with PostgreSQL by notification.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import make_chain
from tests.e2e.probe import ai1, node_config, served
from tests.e2e.server import ArcologyProcess
from tests.pg import ThrowawayPostgres, postgres_server

__all__ = ["postgres_server"]

WITHIN_S = 1.0
CONNECTIONS = 40
ACCESS_RE = re.compile(r"access .*host=(?P<host>\S+) .* worker=(?P<worker>\d+)$")


class Workers:
    """A running ``--workers 2`` parent with its ports."""

    def __init__(
        self, folder: Path, store: str = "sqlite", extra: tuple[str, ...] = ()
    ) -> None:
        text, self.ports = node_config(
            folder, store=store, master_key=None, hosts=["*.workers.test"]
        )
        self.folder = folder
        self.process = ArcologyProcess(
            folder, text, extra_args=("--workers", "2", *extra)
        )

    def start(self) -> Workers:
        self.process.start()
        self.process.wait_for("running workers=2", 30)
        return self

    def upload(self, bundle: bytes, name: str) -> None:
        path = self.folder / f"{name}.pem"
        path.write_bytes(bundle)
        done = ai1(self.folder, self.ports["admin"], "upload", str(path))
        assert done.returncode == 0, done.stdout + done.stderr

    def accepts_by_worker(self, host: str, lines: list[str]) -> Counter[str]:
        counts: Counter[str] = Counter()
        for line in lines:
            found = ACCESS_RE.search(line)
            if found and found["host"] == host:
                counts[found["worker"]] += 1
        return counts

    def lines(self) -> list[str]:
        return self.process.log().splitlines()

    def worker_pids(self) -> dict[int, int]:
        pids: dict[int, int] = {}
        for line in self.lines():
            found = re.search(r"worker started index=(\d+) pid=(\d+)", line)
            if found:
                pids[int(found[1])] = int(found[2])
        return pids


@pytest.fixture(params=["sqlite", "postgresql"])
def workers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Workers]:
    store = "sqlite"
    if request.param == "postgresql":
        server: ThrowawayPostgres = request.getfixturevalue("postgres_server")
        store = server.create_database()
    running = Workers(tmp_path, store).start()
    try:
        yield running
    finally:
        if running.process.process is not None:
            running.process.stop(signal.SIGTERM)


def burst(port: int, domain: str) -> list[str | None]:
    """One handshake and one request per connection, CONNECTIONS times."""
    return [served(port, domain, request=True) for _ in range(CONNECTIONS)]


def settle_access_lines(workers: Workers, host: str, expected: int) -> list[str]:
    # Access lines are written as responses finish; give the log a moment.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = workers.lines()
        if sum(workers.accepts_by_worker(host, lines).values()) >= expected:
            return lines
        time.sleep(0.05)
    return workers.lines()


def test_both_workers_accept_and_both_serve_a_new_upload_within_a_second(
    workers: Workers,
) -> None:
    port = workers.ports["https"]
    old = make_chain("shop.workers.test")
    workers.upload(old.bundle(), "old")
    time.sleep(WITHIN_S)

    # Both workers take connections, and both now hold the old context.
    assert burst(port, "shop.workers.test") == [old.fingerprint] * CONNECTIONS
    lines = settle_access_lines(workers, "shop.workers.test", CONNECTIONS)
    first = workers.accepts_by_worker("shop.workers.test", lines)
    assert set(first) == {"0", "1"}, first
    assert sum(first.values()) == CONNECTIONS

    # The replacement goes in through worker 0's admin channel; a second
    # later every connection, whichever worker takes it, gets the new chain.
    new = make_chain("shop.workers.test")
    workers.upload(new.bundle(), "new")
    uploaded = time.monotonic()
    time.sleep(max(0.0, WITHIN_S - (time.monotonic() - uploaded)))
    assert burst(port, "shop.workers.test") == [new.fingerprint] * CONNECTIONS
    lines = settle_access_lines(workers, "shop.workers.test", 2 * CONNECTIONS)
    both = workers.accepts_by_worker("shop.workers.test", lines)
    second = {w: both[w] - first[w] for w in ("0", "1")}
    assert second["0"] > 0 and second["1"] > 0, second


def test_a_dead_worker_is_replaced_a_hangup_reloads_all_and_stopping_stops_all(
    workers: Workers,
) -> None:
    before = workers.worker_pids()
    assert sorted(before) == [0, 1]

    os.kill(before[1], signal.SIGKILL)
    workers.process.wait_for("worker exited; starting it again index=1", 10)
    workers.process.wait_until(
        lambda line: (
            "running actors=" in line
            and line.endswith("worker=1")
            and f"pid={before[1]}" not in line
        ),
        30,
        "a new worker 1 running",
    )
    after = workers.worker_pids()
    assert after[1] != before[1] and after[0] == before[0]
    chain = make_chain("back.workers.test")
    workers.upload(chain.bundle(), "back")
    time.sleep(WITHIN_S)
    assert burst(workers.ports["https"], "back.workers.test") == (
        [chain.fingerprint] * CONNECTIONS
    )

    # A SIGHUP to the parent reloads the services in every worker.
    assert workers.process.process is not None
    workers.process.process.send_signal(signal.SIGHUP)
    for index in (0, 1):

        def reloading(line: str, i: int = index) -> bool:
            return "reloading services signal=SIGHUP" in line and line.endswith(
                f"worker={i}"
            )

        workers.process.wait_until(reloading, 10, f"worker {index} reloading")

    assert workers.process.stop(signal.SIGTERM) == 0
    for pid in after.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "stopped workers count=2" in workers.process.log()


def allowed_cpus(pid: int) -> set[int]:
    """The CPUs each thread of ``pid`` may run on, united."""
    cpus: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        cpus |= os.sched_getaffinity(int(task.name))
    return cpus


def test_cpu_affinity_auto_pins_each_worker_and_its_threads_to_one_cpu(
    tmp_path: Path,
) -> None:
    available = sorted(os.sched_getaffinity(0))
    running = Workers(tmp_path, extra=("--cpu-affinity", "auto")).start()
    try:
        pids = running.worker_pids()
        pinned = {index: allowed_cpus(pid) for index, pid in pids.items()}

        # A replaced worker is pinned like the one before it.
        os.kill(pids[1], signal.SIGKILL)
        running.process.wait_until(
            lambda line: (
                "running actors=" in line
                and line.endswith("worker=1")
                and f"pid={pids[1]}" not in line
            ),
            30,
            "a new worker 1 running",
        )
        replaced = allowed_cpus(running.worker_pids()[1])
    finally:
        assert running.process.stop(signal.SIGTERM) == 0

    assert pinned[0] == {available[0]}
    assert pinned[1] == {available[1 % len(available)]}
    assert replaced == pinned[1]
    assert "cpu_affinity=auto" in running.process.log()


def test_without_cpu_affinity_workers_may_run_on_every_cpu(workers: Workers) -> None:
    available = os.sched_getaffinity(0)

    cpus = [allowed_cpus(pid) for pid in workers.worker_pids().values()]

    assert cpus == [available, available]


def test_ai1_status_shows_every_worker_and_their_totals(tmp_path: Path) -> None:
    running = Workers(tmp_path).start()
    try:
        chain = make_chain("count.workers.test")
        running.upload(chain.bundle(), "count")
        time.sleep(WITHIN_S)
        assert burst(running.ports["https"], "count.workers.test") == (
            [chain.fingerprint] * CONNECTIONS
        )
        lines = settle_access_lines(running, "count.workers.test", CONNECTIONS)
        served_by = running.accepts_by_worker("count.workers.test", lines)
        time.sleep(2.5)  # every worker has reported since

        shown = ai1(running.folder, running.ports["admin"], "status", "--json")
        text = ai1(running.folder, running.ports["admin"], "status")
        pids = running.worker_pids()
    finally:
        running.process.stop(signal.SIGTERM)

    assert shown.returncode == 0, shown.stderr
    workers = json.loads(shown.stdout)["workers"]
    each = {w["index"]: w for w in workers["each"]}
    assert sorted(each) == [0, 1]
    for index in (0, 1):
        assert each[index]["pid"] == pids[index]
        assert each[index]["age_s"] < 2.0
        assert each[index]["handshakes"] == served_by[str(index)]
    assert workers["totals"]["handshakes"] == CONNECTIONS
    assert text.returncode == 0
    assert "workers: 2" in text.stdout
    assert re.search(rf"^all\s+0\s+{CONNECTIONS}\s+0\s+0\s", text.stdout, re.M)
