"""The change feed: foreign changes are heard, own ones are not, outages heal."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from loguru import logger

from arc.bundle import parse_bundle
from arc.changefeed import ChangeFeed
from arc.config import Config, Settings
from arc.store import Store, open_store
from tests.certs import make_chain
from tests.pg import ThrowawayPostgres, own_postgres

__all__ = ["own_postgres"]

HEARD_WITHIN_S = 1.0


class Heard:
    """What a feed announced, with a bounded wait."""

    def __init__(self) -> None:
        self.domains: list[str] = []
        self._changed = threading.Condition()

    def __call__(self, domains: list[str]) -> None:
        with self._changed:
            self.domains.extend(domains)
            self._changed.notify_all()

    def wait_for(self, domain: str, timeout: float) -> float:
        """Seconds until ``domain`` was announced; fail after ``timeout``."""
        start = time.monotonic()
        with self._changed:
            ok = self._changed.wait_for(lambda: domain in self.domains, timeout)
        assert ok, f"{domain} not announced within {timeout} s: {self.domains}"
        return time.monotonic() - start


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(
        lambda m: lines.append(str(m)), level="DEBUG", format="{level} {message}"
    )
    yield lines
    logger.remove(sink)


def settings_for(folder: Path, store: str = "sqlite") -> Settings:
    return Config.embedded(data_dir=folder).with_settings(store=store).arcology


def running_feed(
    settings: Settings, heard: Callable[[list[str]], None], start_seq: int | None
) -> ChangeFeed:
    feed = ChangeFeed(settings, heard, start_seq=start_seq)
    feed.start()
    return feed


def test_a_change_by_another_process_on_sqlite_is_heard_within_a_second(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path)
    other: Store = open_store(settings)
    heard = Heard()
    feed = running_feed(settings, heard, other.current_seq())
    try:
        other.put(parse_bundle(make_chain("far.example.com").bundle()))

        assert heard.wait_for("far.example.com", HEARD_WITHIN_S) < HEARD_WITHIN_S
        other.delete("far.example.com")
        heard.domains.clear()
        heard.wait_for("far.example.com", HEARD_WITHIN_S)
    finally:
        feed.stop()
        other.close()


def test_own_writes_are_not_announced_again(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    store = open_store(settings)
    heard = Heard()
    feed = running_feed(settings, heard, store.current_seq())
    try:
        bundle = parse_bundle(make_chain("mine.example.com").bundle())
        with feed.writing() as mine:
            seq, _ = store.put(bundle)
            mine([seq])
        store.put(parse_bundle(make_chain("theirs.example.com").bundle()))

        heard.wait_for("theirs.example.com", HEARD_WITHIN_S)
        assert "mine.example.com" not in heard.domains
    finally:
        feed.stop()
        store.close()


def test_a_postgres_change_is_heard_by_notification(
    own_postgres: ThrowawayPostgres, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, own_postgres.create_database())
    store = open_store(settings)
    heard = Heard()
    feed = running_feed(settings, heard, store.current_seq())
    try:
        time.sleep(0.3)  # the feed is now inside a wait for a notification
        store.put(parse_bundle(make_chain("notified.example.com").bundle()))

        # Well under the safety read interval: it was the notification.
        assert heard.wait_for("notified.example.com", HEARD_WITHIN_S) < 0.5
    finally:
        feed.stop()
        store.close()


def test_a_database_outage_is_logged_once_and_missed_changes_catch_up(
    own_postgres: ThrowawayPostgres, tmp_path: Path, log_lines: list[str]
) -> None:
    url = own_postgres.create_database()
    settings = settings_for(tmp_path, url)
    writer = open_store(settings)
    heard = Heard()
    feed = running_feed(settings, heard, writer.current_seq())
    try:
        own_postgres.stop()
        time.sleep(2.5)  # several reconnect attempts fail meanwhile
        own_postgres.start()
        # A change made while the feed has not yet reconnected.
        writer_again = open_store(settings)
        writer_again.put(parse_bundle(make_chain("missed.example.com").bundle()))

        heard.wait_for("missed.example.com", 8.0)
        deadline = time.monotonic() + 5
        while not any("reachable again" in line for line in log_lines):
            assert time.monotonic() < deadline, "recovery was never logged"
            time.sleep(0.05)
        warnings = [line for line in log_lines if line.startswith("WARNING")]
        recovered = [line for line in log_lines if "reachable again" in line]
        assert len(warnings) == 1 and "unreachable" in warnings[0]
        assert len(recovered) == 1 and recovered[0].startswith("INFO")
        writer_again.close()
    finally:
        feed.stop()
        writer.close()


def test_a_replaced_database_announces_every_domain(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    store = open_store(settings)
    store.put(parse_bundle(make_chain("kept.example.com").bundle()))
    heard = Heard()

    # The feed believes it read far more than this store ever held.
    feed = running_feed(settings, heard, store.current_seq() + 100)
    try:
        heard.wait_for("kept.example.com", HEARD_WITHIN_S)
        assert feed.last_seq == store.current_seq()
    finally:
        feed.stop()
        store.close()


def test_changes_pruned_before_a_feed_read_them_announce_every_domain(
    tmp_path: Path, log_lines: list[str]
) -> None:
    settings = settings_for(tmp_path)
    store = open_store(settings)
    position = store.current_seq()
    store.put(parse_bundle(make_chain("first.example.com").bundle()))
    store.put(parse_bundle(make_chain("second.example.com").bundle()))
    # Long after, the store prunes the first change, which this feed (away
    # since ``position``) never read; the second, the newest, stays.
    assert store.prune_changes(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)) == 1
    heard = Heard()

    feed = running_feed(settings, heard, position)
    try:
        heard.wait_for("first.example.com", HEARD_WITHIN_S)
        heard.wait_for("second.example.com", HEARD_WITHIN_S)
        assert feed.last_seq == store.current_seq()
    finally:
        feed.stop()
        store.close()
    assert any("were pruned before they were read" in line for line in log_lines)


def test_a_feed_started_again_for_the_same_owner_announces_what_came_between(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path)
    store = open_store(settings)
    owner = Heard()  # any object that can be weakly referenced, like a Runtime
    heard = Heard()
    first = ChangeFeed(settings, heard, start_seq=store.current_seq(), owner=owner)
    first.start()
    time.sleep(0.3)
    first.stop()

    # A change while no feed runs (Cryptosaur restarting after a crash); the
    # new feed is told the store's current position, as Cryptosaur does.
    store.put(parse_bundle(make_chain("between.example.com").bundle()))
    second = ChangeFeed(settings, heard, start_seq=store.current_seq(), owner=owner)
    second.start()
    try:
        heard.wait_for("between.example.com", HEARD_WITHIN_S)
    finally:
        second.stop()
        store.close()
