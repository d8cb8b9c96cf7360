#!/usr/bin/env python3
"""Benchmark TLS termination: server CPU per connection, cold misses, memory.

Run by hand from the repository root (loopback only, bounded)::

    .venv/bin/python scripts/bench_tls.py [--domains 10000] [--connections 3000]
        [--rounds 7] [--cold-domains 100000] [--cold-samples 300] [--no-nginx]

What it measures, each server in its own process pinned to CPU 0, clients in
other processes pinned to the other CPUs (when the machine has two or more):

1. Server CPU time per connection: a full TLS 1.3 handshake (ECDSA P-256
   leaf and intermediate, X25519) plus one small HTTP request
   (``Connection: close``, a 2-byte static file), each connection new, the
   server name drawn at random from the stored domains. CPU is read from
   ``/proc/PID/stat`` (user + system, every thread) before and after the
   load, divided by the connections answered. Every server is started
   first; then ``--rounds`` rounds measure each in turn, the order rotated
   by one server each round, with the same client processes throughout
   (started once, so no fork lands in a measurement). This machine's speed
   drifts by 10 to 20 % over minutes (it is shared), and the drift is slow
   next to one round, so the table shows each server's median and range,
   and the comparisons are the median of the per-round ratios: both sides
   of a ratio were measured seconds apart. Servers:

   - Arcology: the real runtime (Cryptosaur + Esper, SQLite store with
     ``--domains`` certificates, each its own key), a static service for
     ``*.bench.test``, contexts warmed through ``Esper.warm`` as Hyperion
     would at start, access log off;
   - bare asyncio: ``loop.create_server(ssl=one context)`` with one
     certificate and a protocol that answers a fixed response; the same on
     uvloop; and on uvloop with every certificate, each context built at
     start and picked in ``sni_callback``: the loop's own TLS with the same
     certificates and next to no Python (that callback and the fixed
     answer). Arcology drives TLS itself rather than through the loop's
     transport, so this row is a reference, not a floor for it;
   - Arcology accept path: the Arcology server above with the bare servers'
     fixed answer in place of the HTTP layer, which tells the cost of
     accepting, reading the ClientHello, choosing the context and the
     handshake from the cost of the HTTP layer;
   - nginx (if installed): one worker, one ``server`` block per domain with
     its own certificate files (the same certificates), the same static
     file, access log off; the worker's CPU is read.

2. Arcology details: memory per cached context (RSS growth during warm-up
   divided by the contexts built), the warm-up time, and the first handshake
   after a fresh start (cold cache: ask, unseal, build, handshake).
3. Cold misses with ``--cold-domains`` domains stored (a certificate row
   each, filled as ``scripts/bench_store.py`` does): handshake latency for
   names never seen, one client, sequential; then the same names again
   (cache hits).

Every process inherits ``OPENSSL_CONF`` (the groups configuration), so all
servers and clients offer the same key-exchange groups.
"""

from __future__ import annotations

# The groups configuration must be in place before OpenSSL loads.
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from arc.tls.opensslconf import ensure_openssl_conf  # noqa: E402

GROUPS_CONFIGURED = ensure_openssl_conf()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from multiprocessing.connection import Connection  # noqa: E402
from typing import Any  # noqa: E402

from bench_http import pin, wait_ready  # noqa: E402

CLIENT_TIMEOUT_S = 10.0
# Connections before each measured round, to refill the server's caches.
WARM_UP_CONNECTIONS = 100
WARM_TIMEOUT_S = 600.0
BODY = b"ok"
SERVER_CPU = {0}
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
TICKS_S = os.sysconf("SC_CLK_TCK")


# -- measuring a process ---------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid``."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- clients ---------------------------------------------------------------------


def client_context() -> ssl.SSLContext:
    """A TLS 1.3 client that checks nothing and never resumes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["http/1.1"])
    return context


def one_connection(context: ssl.SSLContext, port: int, name: str) -> bool:
    """Connect, handshake, GET / with Connection: close, read to the end."""
    request = f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), CLIENT_TIMEOUT_S) as raw:
            with context.wrap_socket(raw, server_hostname=name) as tls:
                tls.sendall(request.encode())
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
    except (OSError, ssl.SSLError):
        return False
    return data.startswith(b"HTTP/1.1 200") and data.endswith(BODY)


def client_loop(pipe: Connection, seed: int) -> None:
    """Serve load requests from ``pipe`` until told to stop.

    Each request is ``(port, names, count)``: make ``count`` connections with
    server names drawn from ``names`` and answer ``(ok, failed)``.
    """
    pin(set(os.sched_getaffinity(0)) - SERVER_CPU or {0})
    context = client_context()
    chooser = random.Random(seed)
    while True:
        job = pipe.recv()
        if job is None:
            return
        port, names, count = job
        ok = 0
        for _ in range(count):
            ok += one_connection(context, port, chooser.choice(names))
        pipe.send((ok, count - ok))


class ClientPool:
    """Client processes started once and reused for every load."""

    def __init__(self, clients: int) -> None:
        self.pipes: list[Connection] = []
        self.processes: list[multiprocessing.Process] = []
        for seed in range(clients):
            parent, child = multiprocessing.Pipe()
            process = multiprocessing.Process(
                target=client_loop, args=(child, seed), daemon=True
            )
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)

    def run(self, port: int, names: list[str], connections: int) -> tuple[int, int]:
        """Spread ``connections`` over the clients; return (answered, failed)."""
        share = max(1, connections // len(self.pipes))
        for pipe in self.pipes:
            pipe.send((port, names, share))
        ok = failed = 0
        for pipe in self.pipes:
            if not pipe.poll(share * CLIENT_TIMEOUT_S + 60):
                raise RuntimeError(f"clients did not finish {share} connections")
            answered, lost = pipe.recv()
            ok += answered
            failed += lost
        return ok, failed

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()


def cpu_split_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of every thread of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS_S, int(fields[12]) / TICKS_S


def cpu_per_connection(
    pid: int, port: int, names: list[str], connections: int, pool: ClientPool
) -> tuple[float, float, int]:
    """(user ms, system ms) of server CPU per answered connection, and failures.

    A short load first brings the server's caches back after another
    server's turn.
    """
    pool.run(port, names, WARM_UP_CONNECTIONS)
    user_before, system_before = cpu_split_s(pid)
    ok, failed = pool.run(port, names, connections)
    user_after, system_after = cpu_split_s(pid)
    per = 1000 / max(ok, 1)
    return (
        (user_after - user_before) * per,
        (system_after - system_before) * per,
        failed,
    )


# -- Arcology ----------------------------------------------------------------------


def serve_arcology(
    data_dir: str, port: int, site: str, fixed: bool, control: Connection
) -> None:
    """Run Cryptosaur + Esper with one TLS listener; obey ``control``.

    ``fixed`` swaps the HTTP layer for the bare servers' fixed answer, to
    tell the accept path's cost from the HTTP layer's.
    """
    pin(SERVER_CPU)
    from loguru import logger

    logger.remove()
    from actors.cryptosaur import Cryptosaur
    from actors.esper import Esper
    from arc.config import Config, ServiceConfig
    from arc.http.routing import RoutingTable
    from arc.testing import running

    config = Config.embedded(data_dir=Path(data_dir)).with_settings(
        bind=("127.0.0.1",), access_log=False, local_ca=False
    )
    service = ServiceConfig(
        "bench",
        ("*.bench.test", "*.example.com"),
        tls="required",
        tls_port=port,
        root=Path(site),
    )
    with running([Cryptosaur, Esper], config) as runtime:
        plane = runtime.dataplane
        plane.install_routes(RoutingTable.build([service], config.arcology))
        if fixed:
            plane.http_protocol_factory = lambda **_: Answer  # type: ignore[method-assign]
        runtime.ask("Esper", "listen", {"port": port, "tls": True})
        control.send("listening")
        while True:
            command, argument = control.recv()
            if command == "warm":
                runtime.ask("Esper", "warm", {"domains": argument})
                deadline = time.monotonic() + WARM_TIMEOUT_S
                while time.monotonic() < deadline:
                    size = runtime.ask("Esper", "status")["cache"]["size"]
                    if size >= len(argument):
                        break
                    time.sleep(0.05)
                control.send(size)
            elif command == "status":
                control.send(runtime.ask("Esper", "status"))
            else:
                break


class Arcology:
    """An Arcology server process and its control pipe."""

    def __init__(self, data_dir: Path, site: Path, fixed: bool = False) -> None:
        self.port = free_port()
        self.control, child = multiprocessing.Pipe()
        self.started = time.monotonic()
        self.process = multiprocessing.Process(
            target=serve_arcology,
            args=(str(data_dir), self.port, str(site), fixed, child),
            daemon=True,
        )
        self.process.start()
        if not self.control.poll(120):
            raise RuntimeError("Arcology did not start within 120 s")
        self.control.recv()
        self.ready_s = time.monotonic() - self.started

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def call(self, command: str, argument: Any = None) -> Any:
        self.control.send((command, argument))
        if not self.control.poll(WARM_TIMEOUT_S + 10):
            raise RuntimeError(f"Arcology did not answer {command}")
        return self.control.recv()

    def stop(self) -> None:
        self.control.send(("stop", None))
        self.process.join(20)
        if self.process.is_alive():
            self.process.kill()


def fill_store(data_dir: Path, chains: list[Any]) -> None:
    """Store every chain through the store's public ``put``."""
    from arc.bundle import parse_bundle
    from arc.config import Config
    from arc.store import open_store

    store = open_store(Config.embedded(data_dir=data_dir).arcology)
    for chain in chains:
        store.put(parse_bundle(chain.bundle()))
    store.close()


# -- bare servers ----------------------------------------------------------------


class Answer(asyncio.Protocol):
    """Answer one request with a fixed response and close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
                + BODY
            )
            self.transport.close()


def serve_bare(port: int, files: dict[str, str], use_uvloop: bool) -> None:
    """A fixed answer; one certificate, or many picked by ``sni_callback``.

    With several certificates every context is built at start and the
    callback switches to the one for the server name (the way a server
    that loads everything up front picks a certificate), so the row shows
    what the loop's own TLS costs with many contexts before any request
    handling.
    """
    pin(SERVER_CPU)
    from arc.tls.context import new_server_context

    contexts: dict[str, ssl.SSLContext] = {}
    for name, path in files.items():
        contexts[name] = new_server_context()
        contexts[name].load_cert_chain(path)
    context = next(iter(contexts.values()))
    if len(contexts) > 1:

        def pick(sslobj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            chosen = contexts.get(name) if name else None
            if chosen is not None:
                sslobj.context = chosen

        context.sni_callback = pick
    loop: asyncio.AbstractEventLoop
    if use_uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    loop.run_until_complete(
        loop.create_server(Answer, "127.0.0.1", port, ssl=context, backlog=4096)
    )
    loop.run_forever()


def run_bare(
    files: dict[str, Path], use_uvloop: bool
) -> tuple[int, multiprocessing.Process]:
    port = free_port()
    process = multiprocessing.Process(
        target=serve_bare,
        args=(port, {name: str(path) for name, path in files.items()}, use_uvloop),
        daemon=True,
    )
    process.start()
    # Building thousands of contexts takes seconds.
    wait_ready(port, timeout_s=WARM_TIMEOUT_S)
    return port, process


# -- nginx -------------------------------------------------------------------------


def nginx_config(base: Path, port: int, site: Path, files: dict[str, Path]) -> str:
    from arc.tls.context import INTERMEDIATE_CIPHERS

    servers = "\n".join(
        f"  server {{ listen 127.0.0.1:{port} ssl; server_name {name}; "
        f"ssl_certificate {path}; ssl_certificate_key {path}; }}"
        for name, path in files.items()
    )
    return f"""
user root;
worker_processes 1;
daemon off;
master_process on;
pid {base}/nginx.pid;
error_log {base}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  server_names_hash_max_size 65536;
  server_names_hash_bucket_size 128;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_ciphers {INTERMEDIATE_CIPHERS};
  ssl_prefer_server_ciphers off;
  root {site};
  index index.html;
  server {{ listen 127.0.0.1:{port} ssl default_server; server_name _;
           ssl_reject_handshake on; }}
{servers}
}}
"""


def run_nginx(
    base: Path, site: Path, files: dict[str, Path]
) -> tuple[int, subprocess.Popen[bytes], int, float] | None:
    """Start nginx; return (port, master, worker pid, seconds to start)."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        return None
    port = free_port()
    conf = base / "nginx.conf"
    conf.write_text(nginx_config(base, port, site, files))
    started = time.monotonic()
    master = subprocess.Popen(
        ["taskset", "-c", "0", binary, "-p", str(base), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(port, timeout_s=300)
    start_s = time.monotonic() - started
    children = Path(f"/proc/{master.pid}/task/{master.pid}/children")
    deadline = time.monotonic() + 10
    workers: list[str] = []
    while time.monotonic() < deadline and not workers:
        workers = children.read_text().split()
        time.sleep(0.05)
    if len(workers) != 1:
        master.kill()
        raise RuntimeError(f"nginx: expected one worker, found {workers}")
    return port, master, int(workers[0]), start_s


def stop_nginx(master: subprocess.Popen[bytes]) -> None:
    """Stop nginx gracefully (its workers finish first)."""
    master.send_signal(signal.SIGQUIT)
    master.wait(30)


# -- the run -------------------------------------------------------------------


def timed_connection(port: int, name: str, context: ssl.SSLContext) -> float:
    started = time.perf_counter()
    if not one_connection(context, port, name):
        raise RuntimeError(f"connection for {name} failed")
    return time.perf_counter() - started


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--cold-domains", type=int, default=100_000)
    parser.add_argument("--cold-samples", type=int, default=300)
    parser.add_argument("--no-nginx", action="store_true")
    args = parser.parse_args()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    from tests.certs import make_chain

    base = Path(tempfile.mkdtemp(prefix="arc-bench-tls-"))
    site = base / "site"
    site.mkdir()
    (site / "index.html").write_bytes(BODY)
    os.chmod(base, 0o755)
    rows: list[tuple[str, str]] = []
    # Per server, one (user ms, system ms) per round, in round order.
    samples: dict[str, list[tuple[float, float]]] = {}
    failures: dict[str, int] = {}
    stoppers: list[Callable[[], None]] = []
    try:
        # Certificates: one chain and key per domain, as files for nginx and
        # as store rows for Arcology.
        say(f"making {args.domains} certificates (EC P-256) ...")
        names = [f"d{n}.bench.test" for n in range(args.domains)]
        chains = [make_chain(name) for name in names]
        files: dict[str, Path] = {}
        pem_dir = base / "pem"
        pem_dir.mkdir()
        for name, chain in zip(names, chains, strict=True):
            path = pem_dir / f"{name}.pem"
            path.write_bytes(chain.chain_pem + chain.key_pem)
            files[name] = path
        data_dir = base / "arcology"
        say("filling the store ...")
        fill_store(data_dir, chains)

        # First handshake after a fresh start (nothing cached).
        say("Arcology: first handshake after start ...")
        fresh = Arcology(data_dir, site)
        first = timed_connection(fresh.port, names[0], client_context())
        second = timed_connection(fresh.port, names[0], client_context())
        fresh.stop()
        rows.append(
            (
                "Arcology start to listening (runtime, store, listener)",
                f"{fresh.ready_s * 1000:.0f} ms",
            )
        )
        rows.append(
            (
                "Arcology first handshake + request after start (cold) / again",
                f"{first * 1000:.1f} ms / {second * 1000:.1f} ms",
            )
        )

        # Every server up before any load, so that the rounds interleave
        # them and a disturbance on the machine touches all alike.
        servers: dict[str, tuple[int, int]] = {}
        say("Arcology: start, warm ...")
        arcology = Arcology(data_dir, site)
        stoppers.append(arcology.stop)
        rss_before = rss_bytes(arcology.pid)
        warm_started = time.monotonic()
        built = arcology.call("warm", names)
        warm_s = time.monotonic() - warm_started
        rss_after = rss_bytes(arcology.pid)
        servers["Arcology"] = (arcology.pid, arcology.port)
        rows.append(
            (f"Arcology warm-up of {built} contexts (Esper.warm)", f"{warm_s:.1f} s")
        )
        rows.append(
            (
                "Arcology memory per cached context (RSS delta / contexts)",
                f"{(rss_after - rss_before) / max(built, 1) / 1024:.1f} KiB",
            )
        )
        say("Arcology accept path with a fixed answer: start, warm ...")
        accept_only = Arcology(data_dir, site, fixed=True)
        stoppers.append(accept_only.stop)
        accept_only.call("warm", names)
        servers["Arcology accept path"] = (accept_only.pid, accept_only.port)
        bare = (
            ("bare asyncio", False, {names[0]: files[names[0]]}),
            ("bare uvloop", True, {names[0]: files[names[0]]}),
            ("bare uvloop, all certs", True, files),
        )
        for label, use_uvloop, certificates in bare:
            say(f"{label}: start ...")
            port, process = run_bare(certificates, use_uvloop)
            stoppers.append(process.terminate)
            assert process.pid is not None
            servers[label] = (process.pid, port)
        started = None if args.no_nginx else run_nginx(base, site, files)
        if started is not None:
            port, master, worker, start_s = started
            stoppers.append(lambda: stop_nginx(master))
            servers["nginx"] = (worker, port)
            rows.append(
                (f"nginx start with {len(files)} certificates", f"{start_s:.1f} s")
            )

        pool = ClientPool(args.clients)
        stoppers.append(pool.close)
        labels = list(servers)
        for number in range(args.rounds):
            # Each round starts one server later, so none is always first.
            turn = number % len(labels)
            for label in labels[turn:] + labels[:turn]:
                say(f"round {number + 1}: {label} ...")
                pid, port = servers[label]
                user, system, failed = cpu_per_connection(
                    pid, port, names, args.connections, pool
                )
                samples.setdefault(label, []).append((user, system))
                failures[label] = failures.get(label, 0) + failed
        status = arcology.call("status")
        rows.append(
            (
                "Arcology cache after the load: hits / misses / size",
                f"{status['cache']['hits']} / {status['cache']['misses']} / "
                f"{status['cache']['size']}",
            )
        )
        rows.append(
            (
                "Arcology handshakes / failures / still open",
                f"{status['handshakes']} / {status['handshake_failures']} / "
                f"{status['connections_open']}",
            )
        )
        for stop in reversed(stoppers):
            stop()
        stoppers.clear()

        # Cold misses with a large store.
        if args.cold_domains:
            rows.extend(cold_misses(base, site, args.cold_domains, args.cold_samples))
    finally:
        for stop in reversed(stoppers):
            stop()
        shutil.rmtree(base, ignore_errors=True)

    print_table(args, samples, failures, rows)


def cold_misses(
    base: Path, site: Path, count: int, samples: int
) -> list[tuple[str, str]]:
    """Handshake latency for names never seen, with ``count`` domains stored."""
    print(f"cold misses: filling a store of {count} domains ...", file=sys.stderr)
    try:
        from bench_store import fill_a_certificate_each
    except ImportError:
        return [("cold-miss handshakes", "skipped: scripts/bench_store.py missing")]
    from arc.config import Config

    data_dir = base / "cold"
    domains = [f"d{n}.example.com" for n in range(count)]
    fill_a_certificate_each(Config.embedded(data_dir=data_dir), domains)
    server = Arcology(data_dir, site)
    try:
        context = client_context()
        chosen = random.Random(7).sample(domains, samples)
        first = timed_connection(server.port, chosen[0], context)
        cold = [timed_connection(server.port, name, context) for name in chosen[1:]]
        warm = [timed_connection(server.port, name, context) for name in chosen[1:]]
    finally:
        server.stop()
    return [
        (
            f"start to first handshake + request served, {count} stored",
            f"{(server.ready_s + first) * 1000:.0f} ms "
            f"(listening {server.ready_s * 1000:.0f} ms)",
        ),
        (
            f"cold-miss handshake + request, {count} stored: p50 / p99",
            f"{statistics.median(cold) * 1000:.1f} / "
            f"{percentile(cold, 0.99) * 1000:.1f} ms",
        ),
        (
            "the same names again (cache hits): p50 / p99",
            f"{statistics.median(warm) * 1000:.1f} / "
            f"{percentile(warm, 0.99) * 1000:.1f} ms",
        ),
    ]


def totals(rounds: list[tuple[float, float]]) -> list[float]:
    """User + system ms per connection of each round."""
    return [user + system for user, system in rounds]


def print_table(
    args: argparse.Namespace,
    samples: dict[str, list[tuple[float, float]]],
    failures: dict[str, int],
    rows: list[tuple[str, str]],
) -> None:
    print()
    print(
        f"Server CPU per connection in ms, {args.rounds} rounds of "
        f"{args.connections} connections ({args.clients} client processes): "
        "full TLS 1.3 handshake, ECDSA P-256, one GET"
    )
    header = [
        "Arcology",
        "Arcology accept path",
        "bare asyncio",
        "bare uvloop",
        "bare uvloop, all certs",
        "nginx",
    ]
    domains = [
        f"{args.domains} domains, HTTP layer",
        f"{args.domains} domains, fixed answer",
        "1 cert, fixed answer",
        "1 cert, fixed answer",
        f"{args.domains} certs by sni_callback, fixed answer",
        f"{args.domains} certs, static file",
    ]

    def cell(label: str, show: Callable[[list[tuple[float, float]]], str]) -> str:
        if label not in samples:
            return "not run"
        failed = failures.get(label)
        return show(samples[label]) + (f" ({failed} failed)" if failed else "")

    def spread(rounds: list[tuple[float, float]]) -> str:
        values = totals(rounds)
        return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    def split(rounds: list[tuple[float, float]]) -> str:
        user = statistics.median(u for u, _ in rounds)
        system = statistics.median(s for _, s in rounds)
        return f"{user:.3f} + {system:.3f}"

    print("| | " + " | ".join(header) + " |")
    print("|---|" + "|".join("---" for _ in header) + "|")
    print("| serves | " + " | ".join(domains) + " |")
    print("| median (range) | " + " | ".join(cell(h, spread) for h in header) + " |")
    print("| user + system | " + " | ".join(cell(h, split) for h in header) + " |")
    comparisons = (
        ("Arcology", "nginx", "goal: at most 1.25"),
        ("Arcology", "bare asyncio", "goal: below 1"),
        # What the HTTP layer leaves out: accepting, SNI, context, handshake.
        ("Arcology accept path", "nginx", "without the HTTP layer"),
        ("bare uvloop, all certs", "nginx", "the loop's own TLS, next to no Python"),
    )
    for mine, other, meaning in comparisons:
        if mine not in samples or other not in samples:
            continue
        # Both sides of each ratio come from the same round, seconds apart.
        ratios = [
            a / b
            for a, b in zip(totals(samples[mine]), totals(samples[other]), strict=True)
        ]
        print(
            f"{mine} / {other}: {statistics.median(ratios):.2f} "
            f"(median of {len(ratios)} per-round ratios, range "
            f"{min(ratios):.2f}-{max(ratios):.2f}; {meaning})"
        )
    print()
    width = max(len(r[0]) for r in rows)
    for what, value in rows:
        print(f"{what.ljust(width)}  {value}")
    label = "OpenSSL groups restricted (OPENSSL_CONF)"
    print(f"{label.ljust(width)}  {GROUPS_CONFIGURED}")


if __name__ == "__main__":
    main()
