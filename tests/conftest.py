"""Fixtures shared by test modules in more than one package."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger


@pytest.fixture
def errors() -> Iterator[list[str]]:
    """The ERROR lines logged during the test."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip()), level="ERROR")
    yield lines
    logger.remove(sink)


@pytest.fixture
def logs() -> Iterator[list[Any]]:
    """The loguru records (DEBUG and up) logged during the test."""
    records: list[Any] = []
    sink = logger.add(lambda m: records.append(m.record), level="DEBUG")
    yield records
    logger.remove(sink)
