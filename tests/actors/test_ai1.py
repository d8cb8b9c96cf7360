"""Tests for actors/ai1.py: the admin channel, over real sockets."""

from __future__ import annotations

import random
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

import actors.ai1 as ai1_module
from actors.ai1 import AI1, admin_tls_context, holds_private_key
from arc.actor import Actor, verb
from arc.ai1.client import AdminClient, Unreachable, tls_client_context
from arc.config import Config
from arc.errors import BadInput, Busy, ConfigError, NotFound, Unauthorized
from arc.messages import MAX_MESSAGE_BYTES
from arc.runtime import Runtime
from arc.testing import running
from arc.token import read_token
from arc.wire import Answer, answer_decoder, frame, request_frame
from tests.certs import make_chain

KEY_PEM = b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49\n"


class Cryptosaur(Actor):
    """A small certificate keeper with the real verb names."""

    name = "Cryptosaur"

    def __init__(self, runtime: Runtime, config: Config) -> None:
        super().__init__(runtime, config)
        self.bundles: dict[str, bytes] = {}

    @verb("setCertificate")
    def set_certificate(self, payload: Any) -> Any:
        domain = payload["domains"][0]
        self.bundles[domain] = payload["bundle"]
        return {"domain": domain, "size": len(payload["bundle"])}

    @verb("listCertificates")
    def list_certificates(self, payload: Any) -> Any:
        return [{"domain": d} for d in sorted(self.bundles)]

    @verb("getCertificate")
    def get_certificate(self, payload: Any) -> Any:
        return {"domain": payload["domain"], "key_pem": KEY_PEM}

    @verb("showCertificate")
    def show_certificate(self, payload: Any) -> Any:
        if payload["domain"] == "leaky.example":
            return {"domain": "leaky.example", "chain": [KEY_PEM.decode()]}
        raise NotFound(f"domain: no certificate for {payload['domain']}")

    @verb("slow")
    def slow(self, payload: Any) -> Any:
        time.sleep(float(payload))
        return payload


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config.embedded(data_dir=tmp_path / "data").with_settings(
        admin=("127.0.0.1", 0)
    )


@pytest.fixture
def channel(config: Config) -> Iterator[tuple[Runtime, tuple[str, int], str]]:
    with running([Cryptosaur, AI1], config) as rt:
        host, _, port = rt.ask("AI1", "status", {})["admin"]["address"].rpartition(":")
        token = read_token(config.arcology.token_file)
        yield rt, (host, int(port)), token


def raw_exchange(
    address: tuple[str, int], data: bytes, *, wait_s: float = 5.0
) -> tuple[list[Answer], bool]:
    """Send bytes, read answers until the server closes (or ``wait_s``)."""
    decoder = answer_decoder()
    answers: list[Answer] = []
    with socket.create_connection(address, timeout=wait_s) as sock:
        sock.sendall(data)
        closed = False
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            answers += decoder.feed(chunk)
    return answers, closed


def connect_to(address: tuple[str, int], token: str, **kwargs: Any) -> AdminClient:
    """A client that gives up after 10 s rather than the default 90 s."""
    return AdminClient(address, token, answer_timeout_s=10.0, **kwargs)


def auth_frame(token: str, reply: int = 1) -> bytes:
    return request_frame("AI1.authenticate", {"token": token}, reply)


def test_the_first_start_creates_the_token_file_with_mode_0600(
    channel: tuple[Runtime, tuple[str, int], str], config: Config
) -> None:
    mode = stat.S_IMODE(config.arcology.token_file.stat().st_mode)

    assert mode == 0o600
    assert len(channel[2]) >= 43


def test_an_authenticated_client_reaches_the_owning_actor(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, token = channel

    with connect_to(address, token) as client:
        client.ask(
            "Cryptosaur.setCertificate", {"bundle": b"PEM", "domains": ["a.example"]}
        )
        listed = client.ask("Cryptosaur.listCertificates", {})

    assert listed == [{"domain": "a.example"}]


def test_get_certificate_is_refused_and_the_connection_stays_open(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, token = channel

    with connect_to(address, token) as client:
        with pytest.raises(Unauthorized, match="private keys never leave"):
            client.ask("Cryptosaur.getCertificate", {"domain": "a.example"})
        still = client.ask("Cryptosaur.listCertificates", {})

    assert still == []


def test_an_answer_holding_a_private_key_is_withheld(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, token = channel

    with connect_to(address, token) as client:
        with pytest.raises(Exception, match="withheld") as caught:
            client.ask("Cryptosaur.showCertificate", {"domain": "leaky.example"})

    assert "PRIVATE KEY" not in str(caught.value)


def test_errors_of_the_owning_actor_come_back_with_their_kind(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, token = channel

    with connect_to(address, token) as client:
        with pytest.raises(NotFound, match="no certificate for b.example"):
            client.ask("Cryptosaur.showCertificate", {"domain": "b.example"})
        with pytest.raises(NotFound, match="no actor named 'Nobody'"):
            client.ask("Nobody.anything", {})
        with pytest.raises(BadInput, match="Actor.verb"):
            client.ask("listCertificates", {})
        with pytest.raises(BadInput, match="unknown verb"):
            client.ask("Cryptosaur.frobnicate", {})
        assert client.ask("Cryptosaur.listCertificates", {}) == []


def test_a_wrong_token_is_answered_late_then_the_connection_closes(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, _ = channel

    started = time.monotonic()
    first, closed = raw_exchange(
        address,
        auth_frame("wrong") + request_frame("Cryptosaur.listCertificates", {}, 2),
    )
    first_s = time.monotonic() - started
    started = time.monotonic()
    raw_exchange(address, auth_frame("wrong again"))
    second_s = time.monotonic() - started

    assert closed
    assert len(first) == 1
    assert first[0].reply == 1
    assert isinstance(first[0].error, Unauthorized)
    assert first_s >= 0.45
    assert second_s >= 0.95


def test_the_client_reports_a_wrong_token_as_unauthorized(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, _ = channel

    with pytest.raises(Unauthorized, match="wrong admin token"):
        connect_to(address, "not-the-token").connect()


def test_a_request_before_authentication_is_refused_and_closed(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, _ = channel

    answers, closed = raw_exchange(
        address, request_frame("Cryptosaur.listCertificates", {}, 1)
    )

    assert closed
    assert [a.reply for a in answers] == [1]
    assert isinstance(answers[0].error, Unauthorized)
    assert "first request must be AI1.authenticate" in answers[0].error.message


def test_random_bytes_get_an_error_frame_and_a_close(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, _ = channel

    answers, closed = raw_exchange(address, b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1junk")

    assert closed
    assert len(answers) == 1
    assert isinstance(answers[0].error, BadInput)
    assert "not valid msgpack" in answers[0].error.message


def test_an_oversized_frame_is_refused_before_its_body_is_sent(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, token = channel

    answers, closed = raw_exchange(
        address, auth_frame(token) + struct.pack(">I", MAX_MESSAGE_BYTES + 1)
    )

    assert closed
    assert answers[0].ok == {"authenticated": True}
    assert isinstance(answers[1].error, BadInput)
    assert "over the limit" in answers[1].error.message


def test_a_frame_of_the_wrong_shape_is_refused_and_closed(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, token = channel
    wrong = frame(msgpack.packb({"verb": "Cryptosaur.listCertificates", "evil": 1}))

    answers, closed = raw_exchange(address, auth_frame(token) + wrong)

    assert closed
    assert isinstance(answers[1].error, BadInput)
    assert "unexpected field(s) evil" in answers[1].error.message


def test_the_channel_still_serves_after_hostile_clients(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, token = channel
    for data in (b"\xff" * 100, struct.pack(">I", 2**32 - 1), b"", auth_frame("x")):
        raw_exchange(address, data, wait_s=2.0)

    with connect_to(address, token) as client:
        assert client.ask("Cryptosaur.listCertificates", {}) == []


def test_thirty_random_streams_leave_the_channel_serving(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, token = channel
    rng = random.Random(7399)

    for _ in range(30):
        prefix = auth_frame(token) if rng.random() < 0.5 else b""
        noise = rng.randbytes(rng.randint(4, 300))
        answers, _closed = raw_exchange(address, prefix + noise, wait_s=1.0)
        assert all(a.error is None or a.error.kind for a in answers)

    with connect_to(address, token) as client:
        assert client.ask("Cryptosaur.listCertificates", {}) == []


def test_pipelined_requests_are_all_answered_and_matched(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, token = channel
    requests = [
        (
            "Cryptosaur.setCertificate",
            {"bundle": b"x" * i, "domains": [f"d{i}.example"]},
        )
        for i in range(300)
    ]

    with connect_to(address, token) as client:
        answers = dict(client.pipeline(requests, window=40))
        listed = client.ask("Cryptosaur.listCertificates", {})

    assert sorted(answers) == list(range(300))
    assert all(answers[i].result()["size"] == i for i in range(300))
    assert len(listed) == 300


def test_status_lists_actors_and_tolerates_a_missing_esper(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, token = channel

    with connect_to(address, token) as client:
        status = client.ask("AI1.status", {})

    assert [a["name"] for a in status["actors"]] == ["Cryptosaur", "AI1"]
    assert status["esper"] is None
    assert "Esper" in status["esper_error"]
    assert status["admin"]["tls"] is False
    assert status["admin"]["connections"] == 1
    assert status["started_at"].endswith("Z")


def test_a_silent_client_is_closed_after_the_authentication_timeout(
    channel: tuple[Runtime, tuple[str, int], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, address, _ = channel
    monkeypatch.setattr(ai1_module, "AUTH_TIMEOUT_S", 0.3)

    started = time.monotonic()
    answers, closed = raw_exchange(address, b"", wait_s=5.0)

    assert closed
    assert time.monotonic() - started < 3.0
    assert isinstance(answers[0].error, Unauthorized)


def test_connections_over_the_cap_are_told_busy(
    channel: tuple[Runtime, tuple[str, int], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, address, token = channel
    monkeypatch.setattr(ai1_module, "MAX_CONNECTIONS", 3)
    held = [connect_to(address, token) for _ in range(3)]
    for client in held:
        client.connect()

    try:
        with pytest.raises(Busy, match="connections are open"):
            connect_to(address, token).connect()
    finally:
        for client in held:
            client.close()

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with connect_to(address, token) as client:
                assert client.ask("Cryptosaur.listCertificates", {}) == []
                break
        except Busy:
            time.sleep(0.05)
    else:
        pytest.fail("the channel stayed busy after the clients closed")


def test_stopping_the_runtime_closes_open_admin_connections(config: Config) -> None:
    with running([Cryptosaur, AI1], config) as rt:
        host, _, port = rt.ask("AI1", "status", {})["admin"]["address"].rpartition(":")
        client = connect_to((host, int(port)), read_token(config.arcology.token_file))
        client.connect()

    with pytest.raises(Unreachable):
        client.ask("Cryptosaur.listCertificates", {})


def test_a_non_loopback_admin_address_without_tls_refuses_to_start(
    config: Config,
) -> None:
    exposed = config.with_settings(admin=("0.0.0.0", 0))

    with pytest.raises(ConfigError, match="needs TLS there; set admin_tls_cert"):
        admin_tls_context(exposed)
    with (
        pytest.raises(ConfigError, match="needs TLS there; set admin_tls_cert"),
        running([AI1], exposed),
    ):
        pass


def test_an_unreadable_admin_tls_bundle_is_named(
    config: Config, tmp_path: Path
) -> None:
    broken = config.with_settings(admin_tls_cert=tmp_path / "missing.pem")

    with pytest.raises(ConfigError, match=r"admin_tls_cert = .*missing\.pem"):
        admin_tls_context(broken)


def test_the_channel_speaks_tls_when_a_bundle_is_configured(
    config: Config, tmp_path: Path
) -> None:
    chain = make_chain("localhost")
    bundle = tmp_path / "admin.pem"
    bundle.write_bytes(chain.bundle())
    root = tmp_path / "root.pem"
    root.write_bytes(chain.root_pem)
    secured = config.with_settings(admin_tls_cert=bundle)

    with running([Cryptosaur, AI1], secured) as rt:
        status = rt.ask("AI1", "status", {})
        port = int(status["admin"]["address"].rpartition(":")[2])
        token = read_token(config.arcology.token_file)
        tls = tls_client_context(root)
        with connect_to(
            ("127.0.0.1", port), token, tls=tls, server_name="localhost"
        ) as c:
            listed = c.ask("Cryptosaur.listCertificates", {})
        with pytest.raises(Unreachable, match="not trusted"):
            connect_to(
                ("127.0.0.1", port),
                token,
                tls=tls_client_context(None),
                server_name="localhost",
            ).connect()
        with pytest.raises(Unreachable):
            connect_to(("127.0.0.1", port), token).connect()

    assert status["admin"]["tls"] is True
    assert listed == []


def test_a_busy_admin_port_is_a_clear_start_error(config: Config) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        clash = config.with_settings(admin=("127.0.0.1", port))

        with (
            pytest.raises(
                ConfigError, match=f"admin = 127.0.0.1:{port}: cannot listen there"
            ),
            running([AI1], clash),
        ):
            pass


def test_a_slow_actor_does_not_hold_up_other_requests(
    channel: tuple[Runtime, tuple[str, int], str],
) -> None:
    _, address, token = channel
    result: list[Any] = []
    slow = connect_to(address, token)
    slow.connect()
    thread = threading.Thread(
        target=lambda: result.append(slow.ask("Cryptosaur.slow", 2.0))
    )

    thread.start()
    time.sleep(0.1)
    started = time.monotonic()
    with connect_to(address, token) as other:
        other.ask("AI1.status", {})
    elapsed = time.monotonic() - started
    thread.join(timeout=5)
    slow.close()

    assert result == [2.0]
    assert elapsed < 1.5


def test_key_material_is_found_anywhere_in_an_answer() -> None:
    assert holds_private_key({"a": [{"b": KEY_PEM}]})
    assert holds_private_key({"key_pem": None})
    assert holds_private_key([[[[KEY_PEM.decode()]]]])
    assert not holds_private_key({"domain": "a.example", "key_type": "EC P-256"})
    assert not holds_private_key([{"issuer": "CN=x"}] * 100)
