"""Benchmark of the metrics plugin: scrape cost against stored domains.

Runs Cryptosaur, Esper and the metrics plugin in one process (loopback
only), stores bundles with many domains each, and measures: the plugin's
start (it reads the whole list once), the latency of ``GET /metrics``, and
how long an upload takes to show in the figures. The baseline is the same
scrape with no certificate stored.

    .venv/bin/python scripts/bench_metrics.py [DOMAINS ...]
"""

from __future__ import annotations

import http.client
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loguru import logger

from actors.cryptosaur import Cryptosaur
from actors.esper import Esper
from arc.config import Config
from arc.plugins import start_plugins
from arc.testing import running
from tests.certs import make_chain

SCRAPES = 200
# One bundle carries this many domains; a store of N domains is N/this uploads.
# listCertificates repeats a bundle's whole domain list in the summary of
# each of its domains, so its answer grows with the square of this number
# (1,000 domains in one bundle answer 200 MB, over the 64 MiB answer limit).
DOMAINS_PER_BUNDLE = 50
CHANGE_TIMEOUT_S = 10.0


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> bytes:
    """One ``GET /metrics``; the body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        return connection.getresponse().read()
    finally:
        connection.close()


def latency_ms(port: int) -> tuple[float, float, int]:
    """Median and 95th percentile of ``SCRAPES`` scrapes, and the body size."""
    times = []
    size = 0
    for _ in range(SCRAPES):
        started = time.perf_counter()
        size = len(scrape(port))
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95)], size


def run(domains: int) -> None:
    """Measure with ``domains`` stored domains."""
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        path = Path(folder) / "arcology.toml"
        path.write_text(
            '[arcology]\ndata_dir = "data"\nbind = ["127.0.0.1"]\n'
            f'[plugins.metrics]\nlisten = "127.0.0.1:{port}"\n'
        )
        config = Config.from_toml_text(path.read_text(), path)
        with running([Cryptosaur, Esper], config) as rt:
            for first in range(0, domains, DOMAINS_PER_BUNDLE):
                names = [
                    f"d{i}.bench.example"
                    for i in range(first, min(domains, first + DOMAINS_PER_BUNDLE))
                ]
                rt.ask(
                    "Cryptosaur",
                    "setCertificate",
                    {"bundle": make_chain(*names).bundle()},
                )
            started = time.perf_counter()
            if start_plugins(rt, config) != ["metrics"]:
                raise SystemExit("the metrics plugin did not start; see the log")
            start_ms = (time.perf_counter() - started) * 1000
            median, p95, size = latency_ms(port)

            chain = make_chain("fresh.bench.example")
            started = time.perf_counter()
            rt.ask("Cryptosaur", "setCertificate", {"bundle": chain.bundle()})
            deadline = started + CHANGE_TIMEOUT_S
            while b"fresh.bench.example" not in scrape(port):
                if time.perf_counter() > deadline:
                    raise SystemExit("the upload never showed in /metrics")
                time.sleep(0.001)
            shown_ms = (time.perf_counter() - started) * 1000
    print(
        f"domains={domains:>6}  start={start_ms:8.1f} ms  "
        f"scrape p50={median:6.2f} ms p95={p95:6.2f} ms  "
        f"body={size / 1024:8.1f} KiB  upload->shown={shown_ms:6.1f} ms"
    )


def main() -> None:
    """Baseline (no certificate), then each size asked for."""
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    sizes = [int(a) for a in sys.argv[1:]] or [1000, 10000]
    run(0)
    for size in sizes:
        run(size)


if __name__ == "__main__":
    main()
