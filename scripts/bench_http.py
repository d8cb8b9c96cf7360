#!/usr/bin/env python3
"""Keep-alive requests per second over TLS: Arcology's HttpProtocol vs uvicorn.

Run by hand from the repository root::

    .venv/bin/python scripts/bench_http.py [--duration 10] [--connections 50]

Each case starts one server process (pinned to CPU 0 when the machine has two
or more), warms it up, then runs the load generator (pinned to the other
CPUs) against https://127.0.0.1:PORT/ with keep-alive connections:

- ``wrk`` when it is installed (``apt-get install -y wrk``), one thread;
- otherwise a small multiprocess Python client (``--client python``): each
  process keeps its connections open and sends one request after another
  until the time is up.

Cases, each served by both servers in the same run:

- ``hello``: a hello-world ASGI application (the same object for both);
- ``static``: a 1 KiB file; Arcology serves it with its own static files
  service, uvicorn with Starlette's ``StaticFiles``;
- ``static-app``: the same file through Starlette's ``StaticFiles``
  application on both servers (the same ASGI application again).

Both servers run with access logs off (``--access-log``: on for both,
written to /dev/null), uvloop, one process. Certificates are
made on the spot with trustme (EC P-256), never read from the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOST = "bench.example.com"
FILE_BYTES = 1024


async def hello(scope: Any, receive: Any, send: Any) -> None:
    """The hello-world ASGI application."""
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"13"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"Hello, world!"})


def starlette_static(root: str) -> Any:
    """Starlette's StaticFiles application over ``root``."""
    from starlette.staticfiles import StaticFiles

    return StaticFiles(directory=root)


def pin(cpus: set[int]) -> None:
    """Keep this process on ``cpus`` when the machine has them."""
    available = os.sched_getaffinity(0)
    if len(available) >= 2 and cpus <= available:
        os.sched_setaffinity(0, cpus)


# -- servers -----------------------------------------------------------------


def quiet(access_log: bool) -> None:
    """Send the server's output (its access lines, if any) to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


def serve_arcology(
    port: int, cert: str, key: str, root: str, case: str, access_log: bool
) -> None:
    """Serve ``case`` with HttpProtocol on a uvloop loop in this process."""
    pin({0})
    from loguru import logger

    logger.remove()
    quiet(access_log)
    if access_log:
        logger.add(sys.stderr, level="INFO")
    from arc.config import Config, ServiceConfig, Settings
    from arc.dataplane import DataPlane
    from arc.http.routing import RoutingTable

    settings = Settings(data_dir=Path(root).parent, access_log=access_log)
    dataplane = DataPlane(Config(arcology=settings))
    if case == "static":
        service = ServiceConfig(
            "bench", (HOST,), tls="required", tls_port=port, root=Path(root)
        )
        apps: dict[str, Any] = {}
    else:
        spec = "bench:hello" if case == "hello" else "bench:static"
        service = ServiceConfig(
            "bench", (HOST,), tls="required", tls_port=port, app=spec
        )
        apps = {spec: hello if case == "hello" else starlette_static(root)}
    dataplane.install_routes(RoutingTable.build([service], settings, apps=apps))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    loop = dataplane.loop
    asyncio.set_event_loop(loop)
    factory = dataplane.http_protocol_factory(
        port=port, scheme="https", tls_domain=None
    )
    loop.run_until_complete(
        loop.create_server(factory, "127.0.0.1", port, ssl=ctx, backlog=1024)
    )
    # A root task, as the data plane has (anyio looks for one).
    loop.run_until_complete(asyncio.Event().wait())


def serve_uvicorn(
    port: int, cert: str, key: str, root: str, case: str, access_log: bool
) -> None:
    """Serve ``case`` with uvicorn (uvloop, httptools) in this process."""
    pin({0})
    quiet(access_log)
    import uvicorn

    app = hello if case == "hello" else starlette_static(root)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        ssl_certfile=cert,
        ssl_keyfile=key,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=access_log,
        log_level="info" if access_log else "warning",
    )


SERVERS = {"arcology": serve_arcology, "uvicorn": serve_uvicorn}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start in {timeout_s} s")


# -- load generators -----------------------------------------------------------


def run_wrk(port: int, path: str, duration_s: float, connections: int) -> float:
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s:g}s",
        "-H",
        f"Host: {HOST}",
        f"https://127.0.0.1:{port}{path}",
    ]
    cpus = sorted(os.sched_getaffinity(0) - {0})
    if cpus and shutil.which("taskset"):
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration_s + 30
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if (
        match is None
        or "Non-2xx" in out
        or ("Socket errors" in out and "timeout 0" not in out)
    ):
        if match is None:
            raise RuntimeError(f"wrk gave no figure:\n{out}")
        print(f"  note: wrk reported errors:\n{out}", file=sys.stderr)
    return float(match.group(1))


def _client(port: int, path: str, connections: int, until: float, out: Any) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    socks = [
        ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port)), server_hostname=HOST
        )
        for _ in range(connections)
    ]
    done = 0
    while time.monotonic() < until:
        for sock in socks:
            sock.sendall(request)
        for sock in socks:
            buf = b""
            while True:
                buf += sock.recv(65536)
                head, sep, rest = buf.partition(b"\r\n\r\n")
                if not sep:
                    continue
                found = re.search(rb"content-length: (\d+)", head, re.I)
                if found is None:  # chunked
                    if rest.endswith(b"0\r\n\r\n"):
                        break
                elif len(rest) >= int(found.group(1)):
                    break
            done += 1
    out.put(done)


def run_python(port: int, path: str, duration_s: float, connections: int) -> float:
    procs = max(1, len(os.sched_getaffinity(0)) - 1)
    queue: Any = multiprocessing.Queue()
    start = time.monotonic()
    until = start + duration_s
    workers = [
        multiprocessing.Process(
            target=_client,
            args=(port, path, max(1, connections // procs), until, queue),
        )
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    total: float = sum(queue.get(timeout=duration_s + 30) for _ in workers)
    for w in workers:
        w.join(10)
    return total / (time.monotonic() - start)


# -- the run -----------------------------------------------------------------


def measure(
    server: str, case: str, files: dict[str, str], args: argparse.Namespace
) -> float:
    port = free_port()
    proc = multiprocessing.Process(
        target=SERVERS[server],
        args=(port, files["cert"], files["key"], files["root"], case, args.access_log),
        daemon=True,
    )
    proc.start()
    try:
        wait_ready(port)
        path = "/" if case == "hello" else "/small.txt"
        load = run_wrk if args.client == "wrk" else run_python
        load(port, path, 1.0, args.connections)  # warm-up
        return load(port, path, args.duration, args.connections)
    finally:
        proc.terminate()
        proc.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--client",
        choices=["wrk", "python"],
        default="wrk" if shutil.which("wrk") else "python",
    )
    parser.add_argument("--cases", default="hello,static,static-app")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="both servers write one access line per request (to /dev/null)",
    )
    args = parser.parse_args()

    import trustme

    with tempfile.TemporaryDirectory() as tmp:
        ca = trustme.CA()
        leaf = ca.issue_cert(HOST, "127.0.0.1")
        files = {
            "cert": f"{tmp}/cert.pem",
            "key": f"{tmp}/key.pem",
            "root": f"{tmp}/www",
        }
        leaf.cert_chain_pems[0].write_to_path(files["cert"])
        for pem in leaf.cert_chain_pems[1:]:
            pem.write_to_path(files["cert"], append=True)
        leaf.private_key_pem.write_to_path(files["key"])
        os.mkdir(files["root"])
        Path(files["root"], "small.txt").write_bytes(b"x" * FILE_BYTES)

        print(
            f"client={args.client} connections={args.connections} "
            f"duration={args.duration:g}s rounds={args.rounds} "
            f"access_log={args.access_log} "
            f"cpus={len(os.sched_getaffinity(0))}"
        )
        print(
            f"{'case':<12}{'arcology req/s':>16}{'uvicorn req/s':>16}{'ratio':>8}"
            "   (median of rounds; each round runs both, order alternating)"
        )
        for case in args.cases.split(","):
            ours: list[float] = []
            theirs: list[float] = []
            for round_no in range(args.rounds):
                order = ["arcology", "uvicorn"]
                if round_no % 2:
                    order.reverse()
                for server in order:
                    figure = measure(server, case, files, args)
                    (ours if server == "arcology" else theirs).append(figure)
            a, b = statistics.median(ours), statistics.median(theirs)
            pairs = zip(ours, theirs, strict=True)
            rounds = " ".join(f"{x:,.0f}/{y:,.0f}" for x, y in pairs)
            print(f"{case:<12}{a:>16,.0f}{b:>16,.0f}{a / b:>7.2f}x   rounds: {rounds}")


if __name__ == "__main__":
    main()
