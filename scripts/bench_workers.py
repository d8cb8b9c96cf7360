#!/usr/bin/env python3
"""Server CPU per connection with one and two workers, and how they share.

Run by hand from the repository root (loopback only, bounded)::

    .venv/bin/python scripts/bench_workers.py [--connections 1500] [--rounds 11]
        [--clients 1] [--rate 250]

Two servers, ``--workers 1`` and ``--workers 2``, each in its own temporary
folder (SQLite store, one EC P-256 certificate, access log on as by
default), run side by side and take turns, round by round:

1. start ``arcology run --workers W`` (the default placement: no CPU
   affinity) and upload the bundle with ``ai1``;
2. per round, client processes make ``--connections`` connections in all,
   each a full TLS 1.3 handshake with SNI plus one small HTTP request, then
   close;
3. the server's CPU time for the round is read from ``/proc/PID/stat``
   (user + system) of every Arcology process (the parent too, with
   workers), and divided by the connections;
4. each connection's access line ends with ``worker=I``: counting them per
   worker gives the spread.

Two loads are measured, each for both servers:

- the same load per worker (the goal): ``--clients`` client processes per
  worker, so one worker gets N clients and two workers get 2N, each client
  starting its connections on a fixed schedule so that every worker is
  offered ``--rate`` connections a second. A process's CPU per connection
  depends on how busy it is (a busy loop handles several events per
  wake-up, an idle one sleeps and wakes for each, with cold caches), so
  only an equal rate per worker shows what running as workers costs in
  itself (clients that run flat out give one worker more connections a
  second than each of two, since the clients share the CPUs with them);
- the same total load (for information): 2N clients for both. Here each of
  two workers is half as busy as the single one, and on a small machine the
  clients compete with both workers for the CPUs, so two workers pay more
  wake-ups per connection.

Rounds alternate which server goes first. This machine's speed drifts by
10 to 20 % over minutes (it is shared), slowly next to one round, so a
comparison is the median of the per-round ratios (two workers' CPU per
connection over one worker's, measured seconds apart), not a ratio of
medians taken minutes apart.

Goals printed with the figures: at the same load per worker, the CPU per
connection of one and of two workers within 5 % of each other (workers add
no per-connection cost), and no worker taking more than 65 % of the
connections (the kernel's SO_REUSEPORT hash spreads them). The exit status
is 1 if a goal is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CPU_GOAL = 0.05
SPREAD_GOAL = 0.65
START_TIMEOUT_S = 60.0
ROUND_TIMEOUT_S = 300.0
DOMAIN = "bench.workers.test"
ACCESS_RE = re.compile(r" access .* worker=(\d+)$")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CLIENT_NICE = 10


def free_port() -> int:
    """A TCP port nothing listens on right now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process, from /proc."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def context_switches(pid: int) -> int:
    """Voluntary plus involuntary context switches of one process (all threads)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt")):
                    total += int(line.split()[1])
    return total


class Server:
    """One ``arcology run --workers W`` with its log read in a thread."""

    def __init__(self, folder: Path, workers: int) -> None:
        self.folder = folder
        self.workers = workers
        self.https = free_port()
        self.admin = free_port()
        root = folder / "site"
        root.mkdir(parents=True)
        (root / "index.html").write_text("ok\n")
        config = folder / "arcology.toml"
        config.write_text(
            "[arcology]\n"
            f'data_dir = "{folder / "arc-data"}"\n'
            f'admin = "127.0.0.1:{self.admin}"\n'
            'bind = ["127.0.0.1"]\n'
            "[[services]]\n"
            'name = "bench"\n'
            f'hosts = ["{DOMAIN}"]\n'
            'tls = "required"\n'
            f"tlsPort = {self.https}\n"
            f'root = "{root}"\n'
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "arc.cli",
                "run",
                "--config",
                str(config),
                "--workers",
                str(workers),
            ],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        ready = "running workers=" if workers > 1 else "running actors="
        self.wait_for(ready)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def log(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if any(text in line for line in self.log()):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"arcology did not log {text!r}:\n" + "\n".join(self.log()))

    def pids(self) -> list[int]:
        """Every process of this server: the parent and its workers."""
        pids = [self.process.pid]
        for line in self.log():
            found = re.search(r"worker started index=\d+ pid=(\d+)", line)
            if found:
                pids.append(int(found[1]))
        return pids

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def switches(self) -> int:
        return sum(context_switches(pid) for pid in self.pids())

    def accepts(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for line in self.log():
            found = ACCESS_RE.search(line)
            if found:
                counts[found[1]] += 1
            elif " access " in line and self.workers == 1:
                counts["0"] += 1
        return counts

    def upload(self, bundle: bytes) -> None:
        path = self.folder / "bundle.pem"
        path.write_bytes(bundle)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "arc.ai1.cli",
                "--admin",
                f"127.0.0.1:{self.admin}",
                "--token-file",
                str(self.folder / "arc-data" / "admin.token"),
                "upload",
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"upload failed: {done.stdout}{done.stderr}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


def client(port: int, count: int, root_pem: str, failures: object, rate: float) -> None:
    """Make ``count`` connections: handshake, one request, close.

    With ``rate`` (connections per second) above 0 the connections start on
    a fixed schedule (a client that falls behind goes on at once); with 0,
    back to back.
    """
    # The load generator yields to the server: on a small machine a client
    # that preempts a worker mid-handshake adds cache refills to the
    # server's CPU time that a remote client would not cause. SCHED_IDLE
    # runs the client only on a CPU nothing else wants.
    os.nice(CLIENT_NICE)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    context = ssl.create_default_context(cadata=root_pem)
    request = f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n"
    failed = 0
    started = time.monotonic()
    for number in range(count):
        if rate > 0:
            delay = started + number / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname=DOMAIN) as tls:
                    tls.sendall(request.encode("ascii"))
                    while tls.recv(65536):
                        pass
        except (OSError, ssl.SSLError):
            failed += 1
    with failures.get_lock():  # type: ignore[attr-defined]
        failures.value += failed  # type: ignore[attr-defined]


def one_round(
    server: Server, connections: int, clients: int, root_pem: str, rate: float = 0.0
) -> dict[str, Any]:
    """Load the server once; return CPU, time and the spread of this round.

    ``rate`` is the connections per second of each client (0: back to back).
    """
    failures = multiprocessing.Value("i", 0)
    share = [connections // clients] * clients
    share[0] += connections - sum(share)
    before_accepts = server.accepts()
    cpu_before = server.cpu()
    switches_before = server.switches()
    started = time.monotonic()
    procs = [
        multiprocessing.Process(
            target=client, args=(server.https, n, root_pem, failures, rate)
        )
        for n in share
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(ROUND_TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
            raise SystemExit("a client did not finish in time")
    elapsed = time.monotonic() - started
    time.sleep(0.3)  # let the last access lines arrive
    cpu = server.cpu() - cpu_before
    switches = server.switches() - switches_before
    accepts = server.accepts() - before_accepts
    return {
        "cpu_s": cpu,
        "elapsed_s": elapsed,
        "ms_per_conn": cpu / connections * 1000.0,
        "per_s": connections / elapsed,
        "switches_per_conn": switches / connections,
        "accepts": accepts,
        "failed": failures.value,
    }


def report(workers: int, rounds: list[dict[str, Any]], code: int) -> dict[str, Any]:
    """Print one worker count's rounds; return its median and totals."""
    for number, result in enumerate(rounds, 1):
        spread = ", ".join(
            f"worker {w}: {n}" for w, n in sorted(result["accepts"].items())
        )
        print(
            f"  workers={workers} round={number} "
            f"cpu={result['cpu_s']:.2f}s ms/conn={result['ms_per_conn']:.3f} "
            f"conn/s={result['per_s']:.0f} "
            f"switches/conn={result['switches_per_conn']:.1f} "
            f"failed={result['failed']} "
            f"accepts: {spread} exit={code}"
        )
    total: Counter[str] = Counter()
    for result in rounds:
        total += result["accepts"]
    return {
        "ms_per_conn": statistics.median(r["ms_per_conn"] for r in rounds),
        "rounds": [r["ms_per_conn"] for r in rounds],
        "accepts": total,
        "failed": sum(r["failed"] for r in rounds),
    }


def measure(
    args: argparse.Namespace, bundle: bytes, root: str
) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Both worker counts under both loads, their rounds interleaved.

    Both servers run side by side (an idle one costs nothing measurable) and
    take turns, so a change in the machine's background load during the run
    falls on both alike instead of on whichever went second.
    """
    # Per load, per worker count: client processes and each one's rate.
    paced = args.rate / args.clients
    loads = {
        "same load per worker": {
            1: (args.clients, paced),
            2: (2 * args.clients, paced),
        },
        "same total load": {1: (2 * args.clients, paced), 2: (2 * args.clients, paced)},
    }
    with tempfile.TemporaryDirectory(prefix="arc-bench-workers-") as tmp:
        servers = {w: Server(Path(tmp) / f"w{w}", w) for w in (1, 2)}
        rounds: dict[tuple[str, int], list[dict[str, Any]]] = {}
        codes: dict[int, int] = {}
        try:
            for server in servers.values():
                server.upload(bundle)
            time.sleep(1.0)
            for server in servers.values():
                one_round(server, max(50, args.connections // 10), args.clients, root)
            for number in range(args.rounds):
                for load, clients in loads.items():
                    for workers in (1, 2) if number % 2 == 0 else (2, 1):
                        rounds.setdefault((load, workers), []).append(
                            one_round(
                                servers[workers],
                                args.connections,
                                clients[workers][0],
                                root,
                                clients[workers][1],
                            )
                        )
        finally:
            for workers, server in servers.items():
                codes[workers] = server.stop()
        results: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        for load, clients in loads.items():
            print(
                f"{load}: {clients[1][0]} / {clients[2][0]} client processes, "
                + (
                    f"{clients[1][1]:g} connections/s each"
                    if clients[1][1]
                    else "back to back"
                )
            )
            results[load] = (
                report(1, rounds[(load, 1)], codes[1]),
                report(2, rounds[(load, 2)], codes[2]),
            )
        return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument(
        "--clients", type=int, default=1, help="client processes per worker"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=250.0,
        help="connections per second per worker at the same load per worker",
    )
    args = parser.parse_args()
    if (
        not 1 <= args.connections <= 100_000
        or not 1 <= args.rounds <= 20
        or not 1 <= args.rate <= 10_000
    ):
        raise SystemExit("--connections 1..100000, --rounds 1..20, --rate 1..10000")

    from tests.certs import make_chain

    chain = make_chain(DOMAIN)
    root = chain.root_pem.decode("ascii")
    print(
        f"bench_workers: {args.connections} connections x {args.rounds} rounds, "
        f"{args.clients} client processes per worker, {os.cpu_count()} CPUs, "
        "TLS 1.3 EC P-256 + one HTTP request each"
    )
    results = measure(args, chain.bundle(), root)

    def ratios(one: dict[str, Any], two: dict[str, Any]) -> list[float]:
        # Both sides of each ratio come from the same round.
        return [b / a for a, b in zip(one["rounds"], two["rounds"], strict=True)]

    def compared(one: dict[str, Any], two: dict[str, Any]) -> tuple[float, str]:
        each = ratios(one, two)
        middle = statistics.median(each)
        return abs(middle - 1), (
            f"1 worker {one['ms_per_conn']:.3f} ms, "
            f"2 workers {two['ms_per_conn']:.3f} ms (medians); "
            f"2 / 1 per round: median {middle:.3f}, "
            f"range {min(each):.3f}-{max(each):.3f}"
        )

    one, two = results["same load per worker"]
    difference, text = compared(one, two)
    cpu_ok = difference <= CPU_GOAL
    print(
        f"server CPU per connection, same load per worker: {text}; "
        f"apart {difference * 100:.1f} % (goal <= {CPU_GOAL * 100:.0f} %): "
        f"{'ok' if cpu_ok else 'MISSED'}"
    )
    one_total, two_total = results["same total load"]
    difference_total, text_total = compared(one_total, two_total)
    print(
        f"server CPU per connection, same total load (no goal): {text_total}; "
        f"apart {difference_total * 100:.1f} %"
    )

    accepts = two["accepts"] + two_total["accepts"]
    total = sum(accepts.values()) or 1
    largest = max(accepts.values(), default=0) / total
    spread_ok = largest <= SPREAD_GOAL and len(accepts) == 2
    shares = ", ".join(
        f"worker {w} {n / total * 100:.1f} %" for w, n in sorted(accepts.items())
    )
    print(
        f"spread over 2 workers: {shares} (goal: none above "
        f"{SPREAD_GOAL * 100:.0f} %): {'ok' if spread_ok else 'MISSED'}"
    )
    failed = sum(r["failed"] for pair in results.values() for r in pair)
    if failed:
        print(f"failed connections: {failed}")
    return 0 if cpu_ok and spread_ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
