"""Logging through loguru: readable lines on a terminal, JSON for machines.

Levels have one meaning each. DEBUG: lifecycle and per-step traces. INFO:
what an operator should see change (a certificate installed, a listener
opened, one access line per request when enabled). WARNING: recoverable
surprises and probable misconfiguration. ERROR: failures no caller will
receive (an actor crashed and was restarted). Messages carry ``key=value``
fields and never a private key or a token.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

from loguru import logger

LogFormat = Literal["text", "json"]
TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[actor]: <10}</cyan> {message}"
)


class _ToLoguru(logging.Handler):
    """Sends the standard library's records (Pykka, asyncio) to loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.bind(actor=record.name).opt(exception=record.exc_info).log(
            level, record.getMessage()
        )


def setup_logging(fmt: LogFormat = "text", level: str = "INFO") -> None:
    """Send every log line to stderr in the chosen format."""
    logger.remove()
    logger.configure(extra={"actor": "arcology"})
    if fmt == "json":
        logger.add(sys.stderr, level=level, serialize=True, backtrace=False)
    else:
        logger.add(
            sys.stderr,
            level=level,
            format=TEXT_FORMAT,
            colorize=sys.stderr.isatty(),
            backtrace=False,
            diagnose=False,
        )
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.WARNING, force=True)
