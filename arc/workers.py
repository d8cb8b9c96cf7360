"""Workers: several Arcology processes sharing each port of one machine.

How this works: ``arcology run --workers N`` (or ``auto``, one per CPU)
starts a small parent that runs no actors and opens no port. It starts N
worker processes, each ``python -m arc.cli run`` with the same configuration
and the environment variables ``ARCOLOGY_WORKER`` (its index, 0..N-1) and
``ARCOLOGY_WORKERS`` (N). Each worker is a whole Arcology process: its own
runtime, Cryptosaur, Esper (with its own context cache), Hyperion and data
plane loop. Listeners set ``SO_REUSEPORT`` (``arc.tls.listener``), so every
worker binds every port and the kernel spreads new connections across them
by a hash of the connection's addresses; no connection passes through the
parent. TLS handshakes are CPU-bound, and OpenSSL does poorly with many
threads sharing a context, so processes are how Arcology uses more cores.

Hearing changes. Every worker runs the change feed (``arc.changefeed``): on
SQLite it polls the shared file every 200 ms, on PostgreSQL it listens for
notifications, so an upload through any worker reaches every worker's cache
within a second.

The admin channel. Only worker 0 runs AI1, on ``config.arcology.admin``:
binding it in every worker would hand each ``ai1`` command to a random
worker, and answers such as ``ai1 status`` would describe whichever worker
took the connection. Uploads and deletes through worker 0 go to the shared
store and reach the others through their change feeds. ``ai1 reload``
reloads worker 0 only; a SIGHUP to the parent reloads every worker.

Start-up order. Worker 0 starts first and the others only once it reports
ready (through a pipe, ``ARCOLOGY_READY_FD``): first-start work that writes
files (the master key, the local development CA, the admin token) then
happens once, in one process.

Supervision. A worker that exits while the parent is not stopping is logged
at WARNING and started again after a back-off that doubles from
``FIRST_BACKOFF_S`` to ``MAX_BACKOFF_S``; a worker that stayed up for
``STABLE_AFTER_S`` starts the back-off afresh. SIGINT or SIGTERM to the
parent sends SIGTERM to every worker, waits up to ``STOP_TIMEOUT_S`` for
them to stop cleanly, kills what is left, and exits 0 when every worker
stopped cleanly. Each worker also gets SIGTERM if the parent itself dies
(``PR_SET_PDEATHSIG``), so a killed parent leaves no orphan serving.

CPU affinity. With ``--cpu-affinity auto`` worker I is pinned, before it
starts, to the I-th of the CPUs the parent may use (wrapping around when
there are more workers than CPUs), as front ends commonly offer: on a
machine dedicated to Arcology, a worker that stays on one core is never
moved between cores under load. The default, ``none``, leaves placement to
the kernel, which suits machines shared with other work.

Log lines of a worker end with ``worker=I`` so an operator (and a test) can
tell which process said what; they go straight to the parent's stderr.

Counters. Each worker counts its own connections, handshakes and cache. So
that ``ai1 status`` (answered by worker 0) can show them all, every worker's
Esper writes its status to ``<data_dir>/workers/I.json`` once a second
(``publish_status``; written to a temporary file and renamed, so a reader
never sees half of one) and worker 0 reads the others (``read_statuses``),
each with its age. The metrics plugin stays per worker: worker I serves it
on its own port (see ``actors/metrics.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from loguru import logger

from arc.errors import ConfigError

WORKER_ENV = "ARCOLOGY_WORKER"
WORKERS_ENV = "ARCOLOGY_WORKERS"
READY_FD_ENV = "ARCOLOGY_READY_FD"
# A worker that dies at once (a port taken, a database down) is tried again
# quickly, then less and less often, never slower than the cap.
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
STABLE_AFTER_S = 30.0
# Worker 0 starts alone (it may create the key file, the CA, the token);
# a slow first start is bounded by this.
FIRST_READY_TIMEOUT_S = 60.0
# Workers stop within the runtime's own stop bounds (10 s per actor); this
# leaves room for that before they are killed.
STOP_TIMEOUT_S = 30.0
TICK_S = 0.2
# Where workers leave their status for worker 0, below the data directory,
# and how often they renew it.
STATUS_FOLDER = "workers"
STATUS_EVERY_S = 1.0
MAX_WORKERS = 256
_PR_SET_PDEATHSIG = 1

log = logger.bind(actor="workers")


def parse_count(text: str) -> int:
    """``"auto"`` (one per CPU) or a whole number from 1 to ``MAX_WORKERS``."""
    if text == "auto":
        return max(1, os.cpu_count() or 1)
    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise ConfigError(
            f'--workers must be "auto" or a number from 1 to {MAX_WORKERS} '
            f"(got {text!r})"
        )
    return int(text)


def worker_index() -> int | None:
    """This process's worker index, or None when it is not a worker."""
    value = os.environ.get(WORKER_ENV, "")
    return int(value) if value.isdigit() else None


def worker_count() -> int:
    """How many workers this process is one of (1 when it is not a worker)."""
    value = os.environ.get(WORKERS_ENV, "")
    return int(value) if value.isdigit() and worker_index() is not None else 1


def publish_status(data_dir: Path, index: int, status: dict[str, Any]) -> None:
    """Write worker ``index``'s status where ``read_statuses`` finds it."""
    folder = data_dir / STATUS_FOLDER
    folder.mkdir(mode=0o700, exist_ok=True)
    record = {**status, "index": index, "pid": os.getpid(), "written_at": time.time()}
    temporary = folder / f"{index}.json.tmp"
    temporary.write_text(json.dumps(record))
    os.replace(temporary, folder / f"{index}.json")


def read_statuses(data_dir: Path, count: int) -> list[dict[str, Any]]:
    """The last status each of ``count`` workers wrote, with ``age_s``.

    A worker that wrote nothing yet (or whose file cannot be read) is
    ``{"index": I, "missing": reason}``.
    """
    now = time.time()
    found: list[dict[str, Any]] = []
    for index in range(count):
        path = data_dir / STATUS_FOLDER / f"{index}.json"
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            found.append({"index": index, "missing": "no status written yet"})
            continue
        except (OSError, ValueError) as exc:
            found.append({"index": index, "missing": f"unreadable: {exc}"})
            continue
        written = record.get("written_at")
        record["age_s"] = (
            round(now - written, 3) if isinstance(written, float) else None
        )
        found.append(record)
    return found


def tag_worker_logs() -> None:
    """In a worker, end every log line with ``worker=I`` (no-op elsewhere)."""
    index = worker_index()
    if index is None:
        return
    suffix = f" worker={index}"

    def patch(record: Any) -> None:
        record["message"] += suffix
        record["extra"]["worker"] = index

    logger.configure(patcher=patch)


def worker_actors(actors: list[Any]) -> list[Any]:
    """The actors a worker runs: all of them in worker 0, all but AI1 after."""
    index = worker_index()
    if index is None or index == 0:
        return actors
    return [cls for cls in actors if getattr(cls, "name", "") != "AI1"]


def report_ready() -> None:
    """Tell the parent (if any) that this worker runs; call once, when ready."""
    value = os.environ.pop(READY_FD_ENV, "")
    if not value.isdigit():
        return
    with contextlib.suppress(OSError):
        os.write(int(value), b"R")
        os.close(int(value))


@dataclass
class _Worker:
    """One worker slot: its process, its ready pipe and its restart record."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None
    ready: bool = False
    started_at: float = 0.0
    backoff_s: float = FIRST_BACKOFF_S
    restart_at: float | None = None
    starts: int = 0


class Supervisor:
    """The parent of ``--workers N``: starts, watches and stops the workers."""

    def __init__(self, count: int, args: list[str], *, pin: bool = False) -> None:
        """Prepare ``count`` workers, each run as ``arc.cli`` with ``args``.

        With ``pin``, worker I runs on one CPU (see the module docstring).
        """
        self.count = count
        self.args = args
        self.cpus = sorted(os.sched_getaffinity(0)) if pin else []
        self.workers = [_Worker(index) for index in range(count)]
        self.stopping = False
        self._announced = False

    # -- the loop -----------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGINT or SIGTERM; return the exit status."""
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        log.info(
            "starting workers count={n} pid={p} cpu_affinity={a}",
            n=self.count,
            p=os.getpid(),
            a="auto" if self.cpus else "none",
        )

        # Worker 0 first; the others once it is ready (or gave up).
        self._spawn(self.workers[0])
        deadline = time.monotonic() + FIRST_READY_TIMEOUT_S
        while not self.stopping and time.monotonic() < deadline:
            self._tick()
            if self.workers[0].ready or self.workers[0].process is None:
                break
        for worker in self.workers[1:]:
            if not self.stopping:
                self._spawn(worker)

        while not self.stopping:
            self._tick()
        return self._stop_all()

    def _tick(self) -> None:
        self._read_ready(TICK_S)
        now = time.monotonic()
        for worker in self.workers:
            process = worker.process
            if process is not None and process.poll() is not None:
                self._exited(worker, process.returncode, now)
            elif (
                process is None
                and worker.restart_at is not None
                and now >= worker.restart_at
                and not self.stopping
            ):
                self._spawn(worker)
        if not self._announced and all(w.ready for w in self.workers):
            self._announced = True
            log.info(
                "running workers={n} pids={p}",
                n=self.count,
                p=",".join(str(w.process.pid) for w in self.workers if w.process),
            )

    def _read_ready(self, timeout_s: float) -> None:
        fds = [w.ready_fd for w in self.workers if w.ready_fd is not None]
        if not fds:
            time.sleep(timeout_s)
            return
        try:
            readable, _w, _x = select.select(fds, [], [], timeout_s)
        except InterruptedError:
            return
        for worker in self.workers:
            if worker.ready_fd in readable:
                data = b""
                with contextlib.suppress(OSError):
                    data = os.read(worker.ready_fd, 1)
                self._close_ready(worker)
                if data:
                    worker.ready = True
                    log.debug("worker ready index={i}", i=worker.index)

    def _exited(self, worker: _Worker, code: int, now: float) -> None:
        worker.process = None
        worker.ready = False
        self._close_ready(worker)
        if self.stopping:
            return
        if now - worker.started_at >= STABLE_AFTER_S:
            worker.backoff_s = FIRST_BACKOFF_S
        worker.restart_at = now + worker.backoff_s
        log.warning(
            "worker exited; starting it again index={i} code={c} backoff_s={b}",
            i=worker.index,
            c=_describe_exit(code),
            b=worker.backoff_s,
        )
        worker.backoff_s = min(MAX_BACKOFF_S, worker.backoff_s * 2)

    # -- one worker -------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        read_fd, write_fd = os.pipe()
        env = {
            **os.environ,
            WORKER_ENV: str(worker.index),
            WORKERS_ENV: str(self.count),
            READY_FD_ENV: str(write_fd),
        }
        cpu = self.cpus[worker.index % len(self.cpus)] if self.cpus else None

        def before_exec() -> None:
            # In the child between fork and exec: every thread the worker
            # starts later inherits the affinity set here.
            _die_with_parent()
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        try:
            worker.process = subprocess.Popen(
                [sys.executable, "-m", "arc.cli", *self.args],
                env=env,
                pass_fds=(write_fd,),
                preexec_fn=before_exec,
            )
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            worker.restart_at = time.monotonic() + worker.backoff_s
            worker.backoff_s = min(MAX_BACKOFF_S, worker.backoff_s * 2)
            log.error("worker cannot start index={i} reason={r}", i=worker.index, r=exc)
            return
        os.close(write_fd)
        worker.ready_fd = read_fd
        worker.ready = False
        worker.restart_at = None
        worker.started_at = time.monotonic()
        worker.starts += 1
        log.info(
            "worker started index={i} pid={p} start={s} cpu={c}",
            i=worker.index,
            p=worker.process.pid,
            s=worker.starts,
            c="any" if cpu is None else cpu,
        )

    def _close_ready(self, worker: _Worker) -> None:
        if worker.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.close(worker.ready_fd)
            worker.ready_fd = None

    # -- signals and the end ------------------------------------------------------

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("stopping workers signal={s}", s=signal.Signals(signum).name)
        self.stopping = True

    def _reload(self, _signum: int, _frame: FrameType | None) -> None:
        log.info("reloading services in every worker signal=SIGHUP")
        self._signal_all(signal.SIGHUP)

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    def _stop_all(self) -> int:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        clean = True
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            try:
                code = process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "worker did not stop in time; killing it index={i} pid={p}",
                    i=worker.index,
                    p=process.pid,
                )
                process.kill()
                code = process.wait()
            if code != 0:
                clean = False
                log.warning(
                    "worker stopped uncleanly index={i} code={c}",
                    i=worker.index,
                    c=_describe_exit(code),
                )
            self._close_ready(worker)
        log.info("stopped workers count={n}", n=self.count)
        return 0 if clean else 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask Linux to send SIGTERM
    # when the parent dies, so a killed parent leaves no worker behind.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return str(code)


def run_workers(count: int, args: list[str], *, pin: bool = False) -> int:
    """Supervise ``count`` workers, each ``arcology`` with ``args``.

    With ``pin``, worker I runs on one CPU (see the module docstring).
    """
    return Supervisor(count, args, pin=pin).run()
