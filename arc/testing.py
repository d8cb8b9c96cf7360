"""Helpers for tests of actors: run a few real actors in a real runtime."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from arc.actor import Actor
from arc.config import Config
from arc.runtime import Runtime


@contextmanager
def running(classes: Sequence[type[Actor]], config: Config) -> Iterator[Runtime]:
    """Start ``classes`` in a new runtime; stop everything on exit."""
    runtime = Runtime(config)
    try:
        runtime.start(classes)
        yield runtime
    finally:
        runtime.stop()
