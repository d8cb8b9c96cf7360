"""The worker count and what a worker runs, without starting processes."""

from __future__ import annotations

import os

import pytest

from arc.errors import ConfigError
from arc.workers import WORKER_ENV, parse_count, worker_actors, worker_index


def test_auto_is_one_worker_per_cpu_and_numbers_are_taken_as_given() -> None:
    assert parse_count("auto") == (os.cpu_count() or 1)
    assert parse_count("1") == 1
    assert parse_count("3") == 3


@pytest.mark.parametrize("text", ["0", "-2", "two", "", "1.5", "257"])
def test_a_worker_count_that_is_not_a_whole_number_in_range_is_refused(
    text: str,
) -> None:
    with pytest.raises(ConfigError, match="--workers must be"):
        parse_count(text)


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


def test_only_worker_zero_runs_the_admin_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    actors = [_Named("Cryptosaur"), _Named("Esper"), _Named("AI1")]

    monkeypatch.delenv(WORKER_ENV, raising=False)
    assert worker_index() is None
    assert worker_actors(actors) == actors
    monkeypatch.setenv(WORKER_ENV, "0")
    assert worker_actors(actors) == actors
    monkeypatch.setenv(WORKER_ENV, "1")
    assert [a.name for a in worker_actors(actors)] == ["Cryptosaur", "Esper"]
