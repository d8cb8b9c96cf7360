#!/usr/bin/env python3
"""Time ``ai1 upload`` of a folder of many ECDSA bundles into a running Arcology.

Run by hand from the repository root::

    .venv/bin/python scripts/bench_upload.py [--count 10000] [--in-process]

Steps, each timed and printed:

1. Make ``--count`` bundles in a temporary folder. To make them fast, one
   CA key (EC P-256, an intermediate under a root) signs every leaf, and
   every leaf carries the same EC P-256 key: the bundles differ in their
   domain (``dNNNNN.bench.example``), serial number and signature, which is
   all the upload path looks at (the key is parsed, checked against the
   leaf and sealed for each bundle anyway).
2. Start ``arcology run`` with a temporary configuration (data in the temp
   folder, SQLite store, admin channel and listeners on free loopback
   ports). ``--in-process`` runs only Cryptosaur and AI1 in this process
   instead (no listeners), for when the full server is not wanted.
3. Baselines in the same run: ``ai1 check`` over the same bundles in this
   process (``parse_bundle``: the validation floor, no store, no network)
   and an upload of ``--baseline`` bundles with one request in flight.
4. ``ai1 upload FOLDER`` as a subprocess (pipelined: 32 in flight), then
   ``ai1 list --json`` to check that every domain is stored.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_S = 60.0


def free_port() -> int:
    """A TCP port nothing listens on right now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_bundles(folder: Path, count: int) -> float:
    """Write ``count`` bundles into ``folder``; return the seconds it took."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    started = time.perf_counter()
    now = dt.datetime.now(dt.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    root_key = ec.generate_private_key(ec.SECP256R1())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("Bench Intermediate"))
        .issuer_name(name("Bench Root"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = leaf_key.public_key()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        domain = f"d{i:05d}.bench.example"
        leaf = (
            x509.CertificateBuilder()
            .subject_name(name(domain))
            .issuer_name(ca.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        pem = leaf.public_bytes(serialization.Encoding.PEM) + ca_pem + key_pem
        (folder / f"{domain}.pem").write_bytes(pem)
    return time.perf_counter() - started


def check_floor(folder: Path) -> float:
    """Seconds for parse_bundle over every bundle in this process."""
    from arc.bundle import parse_bundle

    started = time.perf_counter()
    for path in sorted(folder.glob("*.pem")):
        parse_bundle(path.read_bytes())
    return time.perf_counter() - started


def ai1(args: list[str], *, capture: bool = True) -> tuple[int, str, str, float]:
    """Run the ai1 command; return exit code, stdout, stderr and seconds."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "arc.ai1.cli", *args],
        capture_output=capture,
        text=True,
        cwd=ROOT,
        check=False,
    )
    return (
        done.returncode,
        done.stdout or "",
        done.stderr or "",
        (time.perf_counter() - started),
    )


class Server:
    """``arcology run`` in a subprocess, or Cryptosaur and AI1 in this process."""

    def __init__(self, folder: Path, in_process: bool) -> None:
        self.folder = folder
        self.in_process = in_process
        self.admin_port = free_port()
        self.config = folder / "arcology.toml"
        self.config.write_text(
            "[arcology]\n"
            'data_dir = "arc-data"\n'
            f'admin = "127.0.0.1:{self.admin_port}"\n'
            'bind = ["127.0.0.1"]\n'
            "access_log = false\n"
            "\n[[services]]\n"
            'name = "bench"\n'
            'hosts = ["*.bench.example"]\n'
            f"port = {free_port()}\n"
            'tls = "optional"\n'
            f"tlsPort = {free_port()}\n"
            f'root = "{folder}"\n'
        )
        self.process: subprocess.Popen[str] | None = None
        self.runtime: Any = None

    def start(self) -> None:
        if self.in_process:
            from actors.ai1 import AI1
            from actors.cryptosaur import Cryptosaur
            from arc.config import load_config
            from arc.logs import setup_logging
            from arc.runtime import Runtime

            setup_logging("text", "WARNING")
            self.runtime = Runtime(load_config(self.config))
            self.runtime.start([Cryptosaur, AI1])
            return
        self.process = subprocess.Popen(
            [sys.executable, "-m", "arc.cli", "run", "--config", str(self.config)],
            cwd=self.folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "ARCOLOGY_LOG_LEVEL": "WARNING"},
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"arcology exited:\n{self.process.stderr.read()}")  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", self.admin_port), 1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("arcology did not open its admin channel in 60 s")

    def stop(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def args(self) -> list[str]:
        return ["--config", str(self.config)]


def main() -> int:
    """Make the bundles, run the baselines and the upload, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--baseline", type=int, default=500)
    parser.add_argument("--in-process", action="store_true")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="arc-bench-upload-") as temp:
        folder = Path(temp)
        bundles = folder / "bundles"
        single = folder / "single"
        made_s = make_bundles(bundles, options.count)
        print(f"made {options.count} bundles in {made_s:.1f} s (one CA, one leaf key)")
        single.mkdir()
        for path in sorted(bundles.glob("*.pem"))[: options.baseline]:
            (single / path.name).write_bytes(path.read_bytes())

        floor_s = check_floor(bundles)
        print(
            f"baseline: parse_bundle of {options.count} in this process "
            f"{floor_s:.1f} s ({options.count / floor_s:.0f}/s)"
        )

        server = Server(folder, options.in_process)
        server.start()
        try:
            code, _, err, one_s = ai1(
                [*server.args(), "upload", str(single), "--window", "1"]
            )
            if code != 0:
                print(f"baseline upload failed: {err.strip()}")
                return 1
            print(
                f"baseline: ai1 upload of {options.baseline}, one request in flight "
                f"{one_s:.1f} s ({options.baseline / one_s:.0f}/s)"
            )

            code, out, err, upload_s = ai1([*server.args(), "upload", str(bundles)])
            summary = out.strip().splitlines()[-1] if out.strip() else ""
            print(
                f"ai1 upload of {options.count} bundles: {upload_s:.1f} s "
                f"({options.count / upload_s:.0f}/s), exit {code}: {summary}"
            )
            if code != 0:
                print(err.strip())

            code, out, err, list_s = ai1([*server.args(), "list", "--json"])
            stored = len(json.loads(out)) if code == 0 else -1
            print(f"ai1 list --json: {stored} domains in {list_s:.1f} s (exit {code})")
            if code != 0:
                print(err.strip())
        finally:
            server.stop()
    verdict = "within" if upload_s < TARGET_S else "OVER"
    print(f"target: {options.count} in under {TARGET_S:.0f} s: {verdict}")
    return 0 if upload_s < TARGET_S and stored == options.count else 1


if __name__ == "__main__":
    sys.exit(main())
