"""The runtime: ordering, messages, announcements, supervision, the bridge."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from arc import runtime as runtime_module
from arc.actor import Actor, verb
from arc.config import Config
from arc.errors import BadInput, Busy, ConfigError, Internal, NotFound
from arc.messages import encode_request
from arc.runtime import Runtime, start_order
from arc.testing import running

STARTED: list[str] = []


class Store(Actor):
    name = "Store"

    def __init__(self, runtime: Runtime, config: Config) -> None:
        super().__init__(runtime, config)
        self.items: dict[str, Any] = {}

    def on_start(self) -> None:
        STARTED.append(self.name)

    @verb("put")
    def put(self, payload: Any) -> Any:
        if not isinstance(payload, dict) or "key" not in payload:
            raise BadInput("put: payload must be a map with 'key'")
        self.items[payload["key"]] = payload.get("value")
        self.runtime.announce("Store.changed", {"key": payload["key"]})
        return {"stored": payload["key"]}

    @verb("get")
    def get(self, payload: Any) -> Any:
        if payload["key"] not in self.items:
            raise NotFound(f"no item {payload['key']!r}")
        return self.items[payload["key"]]

    @verb("crash")
    def crash(self, payload: Any) -> Any:
        raise RuntimeError("boom on purpose")

    @verb("slow")
    def slow(self, payload: Any) -> Any:
        time.sleep(float(payload))
        return "done"


class Watcher(Actor):
    name = "Watcher"
    needs = ("Store",)
    hears = ("Store.changed",)

    def __init__(self, runtime: Runtime, config: Config) -> None:
        super().__init__(runtime, config)
        self.seen: list[str] = []

    def on_start(self) -> None:
        STARTED.append(self.name)

    @verb("Store.changed")
    def changed(self, payload: Any) -> None:
        self.seen.append(payload["key"])

    @verb("seen")
    def report(self, payload: Any) -> Any:
        return list(self.seen)


class Flaky(Actor):
    name = "Flaky"

    @verb("crash")
    def crash(self, payload: Any) -> Any:
        raise RuntimeError("boom on purpose")

    @verb("ping")
    def ping(self, payload: Any) -> Any:
        return "pong"


class FailsToStart(Actor):
    name = "FailsToStart"

    def on_start(self) -> None:
        raise RuntimeError("cannot start on purpose")


class StoreUnreachable(Actor):
    name = "StoreUnreachable"
    opened: ClassVar[int] = 0

    def on_start(self) -> None:
        # The first instance starts; every later one finds its store gone.
        type(self).opened += 1
        if type(self).opened != 2:
            raise Busy("certificate store db:5432/arc is unreachable; retry shortly")

    @verb("crash")
    def crash(self, payload: Any) -> Any:
        raise RuntimeError("boom on purpose")


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config.embedded(data_dir=tmp_path / "data")


def test_actors_start_after_what_they_need_whatever_the_listed_order() -> None:
    ordered = start_order([Watcher, Store])

    assert [cls.name for cls in ordered] == ["Store", "Watcher"]


def test_a_missing_dependency_is_refused_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match="Watcher needs Store"):
        start_order([Watcher])


def test_an_ask_is_answered_with_what_the_handler_returns(config: Config) -> None:
    with running([Store], config) as rt:
        answer = rt.ask("Store", "put", {"key": "a", "value": [1, 2]})

        assert answer == {"stored": "a"}
        assert rt.ask("Store", "get", {"key": "a"}) == [1, 2]


def test_errors_raised_by_a_handler_reach_the_asker_with_their_kind(
    config: Config,
) -> None:
    with running([Store], config) as rt:
        with pytest.raises(NotFound, match="no item 'zz'"):
            rt.ask("Store", "get", {"key": "zz"})
        with pytest.raises(BadInput, match="must be a map"):
            rt.ask("Store", "put", "not a map")

        assert rt.status()["actors"][0]["restarts"] == 0


def test_an_error_in_a_tell_is_logged_as_a_warning_and_the_actor_goes_on(
    config: Config, logs: list[Any]
) -> None:
    with running([Store], config) as rt:
        rt.tell("Store", "put", "not a map")
        answer = rt.ask("Store", "put", {"key": "a"})

    warnings = [r["message"] for r in logs if r["level"].name == "WARNING"]
    assert warnings == [
        "message not handled actor=Store error=put: payload must be a map with 'key'"
    ]
    assert answer == {"stored": "a"}


def test_an_unknown_verb_gets_an_error_naming_it(config: Config) -> None:
    with running([Store], config) as rt:
        with pytest.raises(BadInput, match="unknown verb 'Store.fly'"):
            rt.ask("Store", "fly", {})


def test_a_malformed_message_gets_an_error_and_the_actor_keeps_running(
    config: Config,
) -> None:
    from concurrent.futures import Future

    from arc.actor import Envelope
    from arc.messages import decode_answer

    with running([Store], config) as rt:
        answers: Future[bytes] = Future()
        rt._ref("Store").tell(Envelope(b"\xc1garbage", answers.set_result))

        with pytest.raises(BadInput, match="not valid msgpack"):
            decode_answer(answers.result(5))
        assert rt.ask("Store", "put", {"key": "still", "value": 1}) == {
            "stored": "still"
        }


def test_messages_are_copies_so_no_actor_holds_another_s_objects(
    config: Config,
) -> None:
    value = {"nested": [1, 2, 3]}
    with running([Store], config) as rt:
        rt.ask("Store", "put", {"key": "k", "value": value})
        value["nested"].append(4)

        assert rt.ask("Store", "get", {"key": "k"}) == {"nested": [1, 2, 3]}


def test_announcements_reach_the_actors_that_hear_them(config: Config) -> None:
    with running([Watcher, Store], config) as rt:
        rt.ask("Store", "put", {"key": "x"})
        deadline = time.monotonic() + 5
        while rt.ask("Watcher", "seen") != ["x"] and time.monotonic() < deadline:
            time.sleep(0.01)

        assert rt.ask("Watcher", "seen") == ["x"]


def test_a_crashing_actor_is_restarted_while_the_others_keep_working(
    config: Config,
) -> None:
    with running([Store, Watcher], config) as rt:
        rt.ask("Store", "put", {"key": "before"})

        with pytest.raises(Internal, match="boom on purpose"):
            rt.ask("Store", "crash", {})
        assert rt.ask("Watcher", "seen", timeout=2) is not None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                rt.ask("Store", "put", {"key": "after"})
                break
            except Busy:
                time.sleep(0.02)

        assert rt.status()["actors"][0] == {
            "name": "Store",
            "state": "running",
            "restarts": 1,
        }
        # A restart is a fresh instance: in-memory state is gone.
        with pytest.raises(NotFound):
            rt.ask("Store", "get", {"key": "before"})


def test_an_actor_that_keeps_crashing_is_reported_failed_and_stops_the_system(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime_module, "MAX_RESTARTS", 2)
    monkeypatch.setattr(runtime_module, "FIRST_BACKOFF_S", 0.01)
    with running([Store], config) as rt:
        deadline = time.monotonic() + 10
        while not rt.stopping.is_set() and time.monotonic() < deadline:
            try:
                rt.ask("Store", "crash", {}, timeout=1)
            except (Internal, Busy):
                time.sleep(0.01)

        assert rt.stopping.is_set()
        assert rt.failed == "Store"


def test_an_actor_added_as_not_essential_is_given_up_and_the_system_goes_on(
    config: Config, monkeypatch: pytest.MonkeyPatch, logs: list[Any]
) -> None:
    monkeypatch.setattr(runtime_module, "MAX_RESTARTS", 2)
    monkeypatch.setattr(runtime_module, "FIRST_BACKOFF_S", 0.01)
    with running([Store], config) as rt:
        rt.add(Flaky, essential=False)

        def state() -> str:
            return str(
                next(a["state"] for a in rt.status()["actors"] if a["name"] == "Flaky")
            )

        deadline = time.monotonic() + 10
        while state() != "failed" and time.monotonic() < deadline:
            try:
                rt.ask("Flaky", "crash", {}, timeout=1)
            except (Internal, Busy):
                time.sleep(0.01)
        time.sleep(0.2)  # nothing restarts it any more

        final = state()
        stopping = rt.stopping.is_set()
        with pytest.raises(Busy):
            rt.ask("Flaky", "ping", {}, timeout=1)
        stored = rt.ask("Store", "put", {"key": "still", "value": 1})

    assert final == "failed"
    assert not stopping and rt.failed is None
    assert stored == {"stored": "still"}
    assert any("actor given up" in r["message"] for r in logs)


def test_an_actor_that_fails_to_start_is_refused(config: Config) -> None:
    rt = Runtime(config)
    try:
        with pytest.raises(ConfigError, match="FailsToStart failed to start"):
            rt.start([FailsToStart])
    finally:
        rt.stop()


def test_an_arcology_error_on_start_is_raised_with_its_reason_and_no_traceback(
    config: Config, logs: list[Any]
) -> None:
    StoreUnreachable.opened = 0
    rt = Runtime(config)
    try:
        with pytest.raises(Busy) as caught:
            rt.start([StoreUnreachable])
    finally:
        rt.stop()

    assert caught.value.message == (
        "certificate store db:5432/arc is unreachable; retry shortly"
    )
    assert [r for r in logs if r["level"].name == "ERROR"] == []


def test_an_arcology_error_on_restart_is_one_error_line_without_traceback(
    config: Config, logs: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    StoreUnreachable.opened = 1
    monkeypatch.setattr(runtime_module, "FIRST_BACKOFF_S", 0.01)

    with running([StoreUnreachable], config) as rt:
        with pytest.raises(Internal):
            rt.ask("StoreUnreachable", "crash", {})
        deadline = time.monotonic() + 5
        while StoreUnreachable.opened < 3 and time.monotonic() < deadline:
            time.sleep(0.02)

    restarts = [r for r in logs if "could not restart" in r["message"]]
    assert [r["message"] for r in restarts][:1] == [
        "actor could not restart actor=StoreUnreachable reason=certificate store "
        "db:5432/arc is unreachable; retry shortly"
    ]
    assert all(r["exception"] is None for r in restarts)


def test_asyncio_code_awaits_an_answer_without_blocking_its_loop(
    config: Config,
) -> None:
    async def scenario(rt: Runtime) -> tuple[Any, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        answer = await rt.ask_async("Store", "slow", 0.3)
        ticker.cancel()
        return answer, ticks

    with running([Store], config) as rt:
        answer, ticks = asyncio.run(scenario(rt))

    assert answer == "done"
    assert ticks >= 10


def test_stopping_leaves_no_actor_thread_behind(config: Config) -> None:
    before = set(threading.enumerate())

    with running([Store, Watcher], config) as rt:
        rt.ask("Store", "put", {"key": "k"})

    after = {t for t in threading.enumerate() if t.is_alive()} - before
    assert after == set()


def test_a_tell_to_an_unknown_actor_is_dropped_not_raised(config: Config) -> None:
    with running([Store], config) as rt:
        rt.tell("Nobody", "put", {})

        with pytest.raises(NotFound, match="no actor named 'Nobody'"):
            rt.ask("Nobody", "put", {})


def test_request_bytes_are_the_documented_map() -> None:
    import msgpack

    data = encode_request("Cryptosaur.setCertificate", {"bundle": b"x"}, 7)

    assert msgpack.unpackb(data) == {
        "verb": "Cryptosaur.setCertificate",
        "payload": {"bundle": b"x"},
        "reply": 7,
    }
