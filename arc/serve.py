"""What ``arcology run`` does once OpenSSL is set up: load, start, wait, stop."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from types import FrameType

from loguru import logger

from arc.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from arc.config import Config, load_config
from arc.errors import ArcError
from arc.logs import setup_logging

log = logger.bind(actor="arcology")


def start(args: argparse.Namespace) -> int:
    """Carry out a parsed ``arcology`` command line; return the exit status."""
    setup_logging(
        args.log_format if args.command == "run" else "text",
        getattr(args, "log_level", "INFO"),
    )
    try:
        config = load_config(args.config)
    except ArcError as exc:
        print(f"arcology: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        source = config.path or "embedded defaults"
        print(f"{source}: ok ({len(config.services)} services)")
        return EXIT_OK
    from arc import workers

    workers.tag_worker_logs()
    try:
        count = workers.parse_count(args.workers)
    except ArcError as exc:
        print(f"arcology: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    if count > 1 and workers.worker_index() is None:
        child = ["run", "--log-format", args.log_format, "--log-level", args.log_level]
        child += ["--config", str(config.path)] if config.path else []
        return workers.run_workers(count, child, pin=args.cpu_affinity == "auto")
    return run(config)


def run(config: Config) -> int:
    """Run one Arcology process until SIGINT or SIGTERM; return the exit code."""
    from arc.runtime import Runtime
    from arc.system import core_actors
    from arc.workers import report_ready, worker_actors

    runtime = Runtime(config)

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping signal={s}", s=signal.Signals(signum).name)
        runtime.stopping.set()

    def reload(_signum: int, _frame: FrameType | None) -> None:
        log.info("reloading services signal=SIGHUP")
        runtime.tell("Hyperion", "reload", {})

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, reload)

    source = config.path or "embedded defaults"
    log.info("starting config={c} data_dir={d}", c=source, d=config.arcology.data_dir)
    try:
        runtime.start(worker_actors(core_actors()))
    except ArcError as exc:
        log.error("cannot start: {m}", m=exc.message)
        runtime.stop()
        return EXIT_FAILED
    from arc.plugins import start_plugins

    start_plugins(runtime, config)
    log.info("running actors={a} pid={p}", a=",".join(runtime.names()), p=os.getpid())
    report_ready()

    # The main thread only waits: signals land here, everything else runs
    # in the actors' threads and the data plane loop.
    while not runtime.stopping.wait(0.5):
        pass
    runtime.stop()
    leftover = [
        t.name for t in threading.enumerate() if t is not threading.main_thread()
    ]
    if leftover:
        log.warning("threads still running at exit names={n}", n=",".join(leftover))
    if runtime.failed:
        log.error("stopped because an actor failed name={n}", n=runtime.failed)
        return EXIT_FAILED
    log.info("stopped")
    return EXIT_OK
