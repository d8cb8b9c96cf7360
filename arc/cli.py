"""The ``arcology`` command: ``arcology run [--config PATH] ...``.

This module imports nothing that loads OpenSSL: ``arcology run`` must point
OpenSSL at Arcology's configuration before the first ``ssl`` import (see
``arc.tls.opensslconf``), so everything else is imported after that.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def parser() -> argparse.ArgumentParser:
    """The command line of ``arcology``."""
    top = argparse.ArgumentParser(
        prog="arcology", description="HTTPS for many domains, one server."
    )
    commands = top.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="start Arcology in the foreground")
    run.add_argument(
        "--config",
        type=Path,
        default=None,
        help="configuration file (default ./arcology.toml, else embedded defaults)",
    )
    run.add_argument("--log-format", choices=("text", "json"), default="text")
    run.add_argument(
        "--log-level",
        default=os.environ.get("ARCOLOGY_LOG_LEVEL", "INFO"),
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    )
    run.add_argument(
        "--workers",
        default="1",
        help='processes sharing every port: a number or "auto" (one per CPU); '
        "see arc/workers.py (default 1: no parent process)",
    )
    run.add_argument(
        "--cpu-affinity",
        choices=("none", "auto"),
        default="none",
        help='with workers, "auto" pins worker I to the I-th CPU this process '
        'may use (wrapping around); "none" (default) lets the kernel move them',
    )
    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("--config", type=Path, default=None)
    return top


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``arcology`` console script."""
    args = parser().parse_args(argv)
    if args.command == "run":
        # First, before anything loads OpenSSL: restrict its key-exchange
        # groups (this re-executes the process only if OpenSSL was loaded).
        from arc.tls.opensslconf import ensure_openssl_conf

        ensure_openssl_conf()
    from arc.serve import start

    return start(args)


if __name__ == "__main__":
    sys.exit(main())
