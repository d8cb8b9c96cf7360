"""The context cache: hits, single flight, aliases, negatives, bounds."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from arc.errors import BadInput, NotFound
from arc.tls.cache import ContextCache
from tests.arc.tls.stores import CryptosaurSource, cryptosaur_source
from tests.certs import make_chain, make_key


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CryptosaurSource]:
    with cryptosaur_source(tmp_path) as source:
        yield source


class Clock:
    """Monotonic seconds that a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_miss_fetches_once_then_hits(store: CryptosaurSource) -> None:
    store.add("shop.example.com")
    cache = ContextCache(store.fetch)

    async def scenario() -> None:
        first = await cache.get("shop.example.com")
        second = await cache.get("shop.example.com")
        assert first is second
        assert first.domain == "shop.example.com"

    asyncio.run(scenario())

    assert store.calls == ["shop.example.com"]
    assert cache.counters() == {
        "hits": 1,
        "misses": 1,
        "evictions": 0,
        "negative_hits": 0,
        "size": 1,
    }


def test_concurrent_misses_for_one_name_share_one_fetch(
    store: CryptosaurSource,
) -> None:
    store.add("busy.example.com")
    store.delay_s = 0.05
    cache = ContextCache(store.fetch)

    async def scenario() -> list[object]:
        entries = await asyncio.gather(
            *(cache.get("busy.example.com") for _ in range(50))
        )
        return [entry.context for entry in entries]

    contexts = asyncio.run(scenario())

    assert store.calls == ["busy.example.com"]
    assert len(set(map(id, contexts))) == 1


def test_names_under_one_wildcard_share_a_context_and_drop_together(
    store: CryptosaurSource,
) -> None:
    store.add("*.example.com")
    cache = ContextCache(store.fetch)

    async def scenario() -> None:
        a = await cache.get("a.example.com")
        b = await cache.get("b.example.com")
        assert a.domain == b.domain == "*.example.com"
        assert a.context is b.context

        assert cache.invalidate(["*.example.com"]) == 2
        assert cache.lookup("a.example.com") is None
        assert cache.lookup("b.example.com") is None

    asyncio.run(scenario())


def test_an_exact_certificate_replaces_the_wildcard_for_its_name(
    store: CryptosaurSource,
) -> None:
    store.add("*.example.com")
    cache = ContextCache(store.fetch)

    async def scenario() -> str:
        await cache.get("a.example.com")
        store.add("a.example.com")
        cache.invalidate(["a.example.com"])
        return (await cache.get("a.example.com")).domain

    assert asyncio.run(scenario()) == "a.example.com"


def test_a_name_without_certificate_is_remembered_for_the_negative_ttl(
    store: CryptosaurSource,
) -> None:
    clock = Clock()
    cache = ContextCache(store.fetch, negative_ttl_s=5.0, clock=clock)

    async def attempt() -> None:
        with pytest.raises(NotFound, match="nothing.example.com"):
            await cache.get("nothing.example.com")

    asyncio.run(attempt())
    asyncio.run(attempt())
    clock.now += 5.1
    asyncio.run(attempt())

    assert store.calls == ["nothing.example.com"] * 2
    assert cache.negative_hits == 1


def test_a_new_wildcard_clears_negative_entries_one_label_below(
    store: CryptosaurSource,
) -> None:
    cache = ContextCache(store.fetch)

    async def scenario() -> str:
        with pytest.raises(NotFound):
            await cache.get("late.example.com")
        store.add("*.example.com")
        cache.invalidate(["*.example.com"])
        return (await cache.get("late.example.com")).domain

    assert asyncio.run(scenario()) == "*.example.com"


def test_the_least_recently_used_entry_is_evicted_at_the_bound(
    store: CryptosaurSource,
) -> None:
    for name in ("one.example", "two.example", "three.example"):
        store.add(name)
    cache = ContextCache(store.fetch, size=2)

    async def scenario() -> None:
        await cache.get("one.example")
        await cache.get("two.example")
        await cache.get("one.example")
        await cache.get("three.example")

    asyncio.run(scenario())

    assert cache.lookup("two.example") is None
    assert cache.lookup("one.example") is not None
    assert cache.counters()["evictions"] == 1
    assert len(cache) == 2


def test_a_smaller_size_from_a_reload_evicts_the_least_recently_used_at_once(
    store: CryptosaurSource,
) -> None:
    for name in ("one.example", "two.example", "three.example"):
        store.add(name)
    cache = ContextCache(store.fetch, size=10)

    async def scenario() -> None:
        await cache.get("one.example")
        await cache.get("two.example")
        await cache.get("three.example")
        await cache.get("one.example")

    asyncio.run(scenario())
    cache.configure(size=1, ttl_s=60.0, negative_ttl_s=1.0)

    assert len(cache) == 1
    assert cache.lookup("one.example") is not None
    assert cache.counters()["evictions"] == 2


def test_an_entry_is_fetched_again_after_its_ttl(store: CryptosaurSource) -> None:
    store.add("ttl.example")
    clock = Clock()
    cache = ContextCache(store.fetch, ttl_s=60.0, clock=clock)

    async def scenario() -> None:
        await cache.get("ttl.example")
        clock.now += 59
        await cache.get("ttl.example")
        clock.now += 2
        await cache.get("ttl.example")

    asyncio.run(scenario())

    assert store.calls == ["ttl.example"] * 2


def test_a_fetch_in_flight_during_invalidation_is_not_cached(
    store: CryptosaurSource,
) -> None:
    old = store.add("race.example")
    new = old
    store.delay_s = 0.1
    cache = ContextCache(store.fetch)

    async def scenario() -> tuple[str | None, str | None]:
        nonlocal new
        waiting = asyncio.ensure_future(cache.get("race.example"))
        await asyncio.sleep(0.01)
        new = await asyncio.to_thread(store.add, "race.example")
        cache.invalidate(["race.example"])
        stale = await waiting
        fresh = await cache.get("race.example")
        assert fresh.fingerprint == new.fingerprint
        return stale.fingerprint, fresh.fingerprint

    stale, fresh = asyncio.run(scenario())

    assert stale == old.fingerprint
    assert fresh != old.fingerprint


def test_a_key_that_does_not_match_is_refused_and_remembered() -> None:
    # Cryptosaur refuses such bundles at upload; this answer stands for a
    # store damaged behind its back.
    chain = make_chain("broken.example")
    calls: list[str] = []

    async def damaged(name: str) -> Mapping[str, Any]:
        calls.append(name)
        return {
            "domain": name,
            "chain_pem": chain.chain_pem,
            "key_pem": dataclasses.replace(chain, key=make_key()).key_pem,
        }

    cache = ContextCache(damaged)

    async def scenario() -> None:
        with pytest.raises(BadInput, match="does not match"):
            await cache.get("broken.example")
        with pytest.raises(NotFound):
            await cache.get("broken.example")

    asyncio.run(scenario())

    assert calls == ["broken.example"]


def test_contexts_can_be_built_in_a_worker_thread(store: CryptosaurSource) -> None:
    store.add("thread.example")
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        cache = ContextCache(store.fetch, executor=executor)

        entry = asyncio.run(cache.get("thread.example"))

    assert entry.domain == "thread.example"


def test_warm_builds_what_it_can_and_skips_the_rest(store: CryptosaurSource) -> None:
    for index in range(6):
        store.add(f"w{index}.example")
    cache = ContextCache(store.fetch)

    ready = asyncio.run(
        cache.warm([*(f"w{i}.example" for i in range(6)), "no.example"])
    )

    assert ready == 6
    assert len(cache) == 6
