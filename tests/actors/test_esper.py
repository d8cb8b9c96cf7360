"""Esper in a real runtime with the real Cryptosaur: listeners and TLS."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from actors.cryptosaur import Cryptosaur
from actors.esper import LISTENER_CLOSED, LISTENER_OPENED, Esper
from arc.config import Config
from arc.errors import BadInput, NotFound
from arc.runtime import Runtime
from arc.testing import running
from tests.arc.tls.serving import request, s_client
from tests.certs import Chain, default_ca, make_chain

TIMEOUT_S = 10.0


class Heard:
    """Announcements received, thread-safely."""

    def __init__(self) -> None:
        self.payloads: list[Any] = []
        self.arrived = threading.Condition()

    def __call__(self, payload: Any) -> None:
        with self.arrived:
            self.payloads.append(payload)
            self.arrived.notify_all()

    def wait_for(self, count: int) -> list[Any]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.payloads) >= count, TIMEOUT_S)
            return list(self.payloads)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config.embedded(data_dir=tmp_path / "data").with_settings(
        bind=("127.0.0.1",), local_ca=False
    )


@pytest.fixture
def runtime(config: Config) -> Iterator[Runtime]:
    with running([Cryptosaur, Esper], config) as rt:
        yield rt


def ask(runtime: Runtime, actor: str, verb: str, payload: Any = None) -> Any:
    return runtime.ask(actor, verb, payload, timeout=TIMEOUT_S)


def upload(runtime: Runtime, chain: Chain) -> None:
    ask(runtime, "Cryptosaur", "setCertificate", {"bundle": chain.bundle()})


def connect(port: int, name: str) -> ssl.SSLSocket:
    context = ssl.create_default_context(cadata=default_ca().root_pem.decode())
    raw = socket.create_connection(("127.0.0.1", port), TIMEOUT_S)
    try:
        return context.wrap_socket(raw, server_hostname=name)
    except BaseException:
        raw.close()
        raise


def served_leaf(port: int, name: str) -> bytes | None:
    with connect(port, name) as tls:
        return tls.getpeercert(binary_form=True)


def wait_until_served(port: int, name: str, leaf: bytes) -> float:
    """Handshake until ``leaf`` is presented; return how long it took."""
    started = time.monotonic()
    while time.monotonic() - started < TIMEOUT_S:
        if served_leaf(port, name) == leaf:
            return time.monotonic() - started
        time.sleep(0.01)
    raise AssertionError(f"{name} never presented the expected certificate")


def test_listen_opens_a_tls_port_that_serves_uploaded_certificates(
    runtime: Runtime,
) -> None:
    shop, blog = make_chain("shop.example.com"), make_chain("*.blog.example")
    upload(runtime, shop)
    upload(runtime, blog)

    opened = ask(runtime, "Esper", "listen", {"port": 0, "tls": True, "owner": "t"})
    port = opened["port"]

    assert opened["already_open"] is False
    assert opened["addresses"] == [["127.0.0.1", port]]
    assert served_leaf(port, "shop.example.com") == shop.leaf.public_bytes(Encoding.DER)
    assert served_leaf(port, "News.Blog.Example") == blog.leaf.public_bytes(
        Encoding.DER
    )
    with connect(port, "shop.example.com") as tls:
        assert request(tls, "shop.example.com")[0] == "HTTP/1.1 404 Not Found"


def test_the_same_port_twice_is_opened_once_and_the_other_mode_refused(
    runtime: Runtime,
) -> None:
    port = ask(runtime, "Esper", "listen", {"port": 0, "tls": True})["port"]

    again = ask(runtime, "Esper", "listen", {"port": port, "tls": True})
    with pytest.raises(BadInput, match=rf"port {port}.*TLS.*plain HTTP"):
        ask(runtime, "Esper", "listen", {"port": port, "tls": False, "owner": "x"})

    assert again["already_open"] is True
    assert [item["port"] for item in ask(runtime, "Esper", "status")["listeners"]] == [
        port
    ]


def test_a_port_that_cannot_be_bound_is_refused_and_nothing_else_stops(
    runtime: Runtime,
) -> None:
    upload(runtime, make_chain("ok.example"))
    port = ask(runtime, "Esper", "listen", {"port": 0, "tls": True})["port"]
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(BadInput, match="in use"):
            ask(
                runtime,
                "Esper",
                "listen",
                {"port": taken.getsockname()[1], "tls": False},
            )
    finally:
        taken.close()

    assert served_leaf(port, "ok.example") is not None
    assert len(ask(runtime, "Esper", "status")["listeners"]) == 1


def test_an_upload_is_served_on_the_next_handshake_and_old_connections_finish(
    runtime: Runtime,
) -> None:
    old, new = make_chain("swap.example"), make_chain("swap.example")
    upload(runtime, old)
    port = ask(runtime, "Esper", "listen", {"port": 0, "tls": True})["port"]
    before = connect(port, "swap.example")

    upload(runtime, new)
    waited = wait_until_served(
        port, "swap.example", new.leaf.public_bytes(Encoding.DER)
    )
    status_line, _ = request(before, "swap.example")
    old_leaf = before.getpeercert(binary_form=True)
    before.close()

    assert waited < 1.0
    assert status_line == "HTTP/1.1 404 Not Found"
    assert old_leaf == old.leaf.public_bytes(Encoding.DER)


def test_a_deleted_certificate_is_refused_on_the_next_handshake(
    runtime: Runtime, tmp_path: Path
) -> None:
    upload(runtime, make_chain("gone.example"))
    port = ask(runtime, "Esper", "listen", {"port": 0, "tls": True})["port"]
    assert served_leaf(port, "gone.example") is not None

    ask(runtime, "Cryptosaur", "deleteCertificate", {"domain": "gone.example"})

    deadline = time.monotonic() + TIMEOUT_S
    printed = ""
    while time.monotonic() < deadline and "unrecognized name" not in printed:
        printed = s_client(port, "gone.example", tmp_path)
    assert "unrecognized name" in printed


def test_stop_listener_closes_the_port_and_announces_it(runtime: Runtime) -> None:
    heard = Heard()
    runtime.subscribe(LISTENER_OPENED, heard)
    runtime.subscribe(LISTENER_CLOSED, heard)
    port = ask(runtime, "Esper", "listen", {"port": 0, "tls": False})["port"]

    closed = ask(runtime, "Esper", "stopListener", {"port": port})

    assert closed == {"port": port, "tls": False, "closed": True}
    assert heard.wait_for(2) == [{"port": port, "tls": False}] * 2
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 2).close()
    with pytest.raises(NotFound, match=str(port)):
        ask(runtime, "Esper", "stopListener", {"port": port})


def test_a_plain_listener_answers_http(runtime: Runtime) -> None:
    port = ask(runtime, "Esper", "listen", {"port": 0, "tls": False})["port"]

    with socket.create_connection(("127.0.0.1", port), TIMEOUT_S) as raw:
        answer = request(raw, "localhost")

    assert answer[0] == "HTTP/1.1 404 Not Found"


def test_status_counts_handshakes_connections_and_cache(runtime: Runtime) -> None:
    upload(runtime, make_chain("count.example"))
    port = ask(runtime, "Esper", "listen", {"port": 0, "tls": True})["port"]

    held = connect(port, "count.example")
    served_leaf(port, "count.example")
    with pytest.raises(ssl.SSLError):
        connect(port, "nobody.example")
    status = ask(runtime, "Esper", "status")
    held.close()

    assert status["handshakes"] == 2
    assert status["handshake_failures"] == 1
    assert status["connections_open"] >= 1
    assert status["cache"]["misses"] == 2
    assert status["cache"]["hits"] == 1
    assert status["cache"]["size"] == 1


def test_warm_builds_contexts_without_any_handshake(runtime: Runtime) -> None:
    for name in ("w1.example", "w2.example"):
        upload(runtime, make_chain(name))

    answer = ask(
        runtime, "Esper", "warm", {"domains": ["w1.example", "W2.example.", "bad name"]}
    )

    deadline = time.monotonic() + TIMEOUT_S
    while (
        ask(runtime, "Esper", "status")["cache"]["size"] < 2
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    assert answer == {"warming": 2}
    assert ask(runtime, "Esper", "status")["cache"]["size"] == 2


@pytest.mark.parametrize(
    "payload",
    [{"port": "443", "tls": True}, {"port": 443, "tls": "yes"}, {"tls": True}, []],
)
def test_malformed_listen_requests_are_refused(runtime: Runtime, payload: Any) -> None:
    with pytest.raises(BadInput, match="listen"):
        ask(runtime, "Esper", "listen", payload)


def test_stopping_the_runtime_closes_the_listeners(config: Config) -> None:
    with running([Cryptosaur, Esper], config) as rt:
        port = ask(rt, "Esper", "listen", {"port": 0, "tls": True})["port"]

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 2).close()


def test_a_crash_of_esper_keeps_its_listeners_and_contexts(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(runtime, make_chain("steady.example"))
    port = ask(runtime, "Esper", "listen", {"port": 0, "tls": True})["port"]
    assert served_leaf(port, "steady.example") is not None

    def crash(self: Esper, payload: Any) -> Any:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(Esper, "status", crash)
    with pytest.raises(Exception, match="crashed"):
        ask(runtime, "Esper", "status")
    served_during_restart = served_leaf(port, "steady.example") is not None
    monkeypatch.undo()

    deadline = time.monotonic() + TIMEOUT_S
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status = ask(runtime, "Esper", "status")
            break
        except Exception:
            time.sleep(0.05)
    assert served_during_restart
    assert [item["port"] for item in status["listeners"]] == [port]
    assert status["cache"]["size"] == 1
    assert served_leaf(port, "steady.example") is not None


def test_publish_status_is_refused_outside_workers(runtime: Runtime) -> None:
    with pytest.raises(BadInput, match="not a worker"):
        runtime.ask("Esper", "publishStatus", {})
