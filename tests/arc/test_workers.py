"""The worker count and what a worker runs, without starting processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from arc.errors import ConfigError
from arc.workers import (
    STATUS_FOLDER,
    WORKER_ENV,
    parse_count,
    publish_status,
    read_statuses,
    worker_actors,
    worker_index,
)


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


def test_a_published_status_is_read_back_with_its_age_and_the_others_missing(
    tmp_path: Path,
) -> None:
    publish_status(tmp_path, 0, {"handshakes": 3})
    (tmp_path / STATUS_FOLDER / "2.json").write_text("{not json")

    found = read_statuses(tmp_path, 3)

    assert found[0]["handshakes"] == 3
    assert found[0]["pid"] == os.getpid()
    assert 0 <= found[0]["age_s"] < 5
    assert found[1] == {"index": 1, "missing": "no status written yet"}
    assert found[2]["missing"].startswith("unreadable: ")
    assert (tmp_path / STATUS_FOLDER).stat().st_mode & 0o777 == 0o700
    assert not list((tmp_path / STATUS_FOLDER).glob("*.tmp"))
