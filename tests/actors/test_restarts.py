"""A crash in a core actor is logged and recovered from: the restarted actor
takes back what it owns (the store, the admin port) and serves again."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from actors.ai1 import AI1
from actors.cryptosaur import Cryptosaur
from arc.ai1.client import AdminClient, Unreachable
from arc.config import Config
from arc.errors import Busy, Internal
from arc.runtime import Runtime
from arc.testing import running
from arc.token import read_token
from tests.certs import make_chain
from tests.e2e.server import free_port


def crash_once(cls: type, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``cls.method`` raise a bug-like error on its next call only."""
    original: Callable[..., Any] = getattr(cls, method)
    calls: list[int] = []

    def crashing(self: Any, payload: Any) -> Any:
        if not calls:
            calls.append(1)
            raise RuntimeError("injected crash")
        return original(self, payload)

    crashing.__arc_verb__ = original.__arc_verb__  # type: ignore[attr-defined]
    monkeypatch.setattr(cls, method, crashing)


def wait_running(rt: Runtime, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for actor in rt.status()["actors"]:
            if actor["name"] == name and actor["state"] == "running":
                return dict(actor)
        time.sleep(0.02)
    raise AssertionError(f"{name} did not run again: {rt.status()}")


def test_cryptosaur_restarted_after_a_crash_still_has_every_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config.embedded(data_dir=tmp_path / "data")
    crash_once(Cryptosaur, "list_certificates", monkeypatch)

    with running([Cryptosaur], config) as rt:
        rt.ask(
            "Cryptosaur", "setCertificate", {"bundle": make_chain("a.test").bundle()}
        )
        with pytest.raises(Internal, match="injected crash"):
            rt.ask("Cryptosaur", "listCertificates", {})
        restarted = wait_running(rt, "Cryptosaur")
        rt.ask(
            "Cryptosaur", "setCertificate", {"bundle": make_chain("b.test").bundle()}
        )
        listed = rt.ask("Cryptosaur", "listCertificates", {})

    assert restarted["restarts"] == 1
    assert sorted(item["domain"] for item in listed) == ["a.test", "b.test"]


def test_ai1_restarted_after_a_crash_serves_the_admin_port_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    config = Config.embedded(data_dir=tmp_path / "data").with_settings(
        admin=("127.0.0.1", port)
    )
    crash_once(AI1, "status", monkeypatch)

    with running([Cryptosaur, AI1], config) as rt:
        token = read_token(config.arcology.token_file)
        with pytest.raises(Internal, match="injected crash"):
            rt.ask("AI1", "status", {})
        wait_running(rt, "AI1")
        deadline = time.monotonic() + 10
        while True:
            try:
                with AdminClient(("127.0.0.1", port), token) as client:
                    listed = client.ask("Cryptosaur.listCertificates", {})
                break
            except (Unreachable, Busy):
                assert time.monotonic() < deadline, "admin port never came back"
                time.sleep(0.05)

    assert listed == []
