"""Run a real ``arcology run`` process for end-to-end tests.

``ArcologyProcess`` writes a configuration into a temporary folder (free
loopback ports), starts ``python -m arc.cli run``, waits for the line that
says it is running, and collects its log lines so tests can read them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

READY_LINE = "running actors="
START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port nothing listens on right now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ai1(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``ai1 ARGS`` in ``folder`` and return its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "arc.ai1.cli", *args],
        capture_output=True,
        text=True,
        cwd=folder,
        timeout=60,
        check=False,
    )


class ArcologyProcess:
    """One Arcology process with its configuration file and log."""

    def __init__(
        self,
        folder: Path,
        config_text: str | None = None,
        *,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.admin_port = free_port()
        self.config_path: Path | None = None
        if config_text is not None:
            self.config_path = folder / "arcology.toml"
            self.config_path.write_text(config_text)
        self.extra_args = extra_args
        self.env = {**os.environ, **(env or {})}
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def data_dir(self) -> Path:
        return self.folder / "arc-data"

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "arc.cli", "run", *self.extra_args]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        return args

    def _how(self) -> dict[str, Any]:
        # The log is on stderr; stdout carries nothing the tests read.
        return {
            "cwd": self.folder,
            "stdout": subprocess.DEVNULL,
            "stderr": subprocess.PIPE,
            "text": True,
            "env": self.env,
        }

    def start(self) -> ArcologyProcess:
        self.process = subprocess.Popen(self.command(), **self._how())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for(READY_LINE, START_TIMEOUT_S)
        return self

    def run_to_exit(self, timeout: float = START_TIMEOUT_S) -> int:
        """Run a process that should stop by itself (a refused start).

        Returns its exit status; its log lines are kept as ``start`` keeps them.
        """
        done = subprocess.run(
            self.command(), **self._how(), timeout=timeout, check=False
        )
        with self._lock:
            self.lines.extend(done.stderr.splitlines())
        return done.returncode

    def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        """Wait until a log line contains ``text``; return that line."""
        return self.wait_until(lambda line: text in line, timeout, text)

    def wait_until(
        self, match: Callable[[str], bool], timeout: float, what: str = "a line"
    ) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for line in self.lines:
                    if match(line):
                        return line
            if self.process is not None and self.process.poll() is not None:
                time.sleep(0.2)
                raise AssertionError(
                    f"arcology exited with {self.process.returncode} before "
                    f"{what!r}:\n{self.log()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"no log line with {what!r} in {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        """Signal the process and return its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise AssertionError(f"arcology did not stop:\n{self.log()}") from None
        if self._reader is not None:
            self._reader.join(5)
        return self.process.returncode

    def __enter__(self) -> ArcologyProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {host}:{port} after {timeout} s")
