"""WebSockets for ASGI applications, with real clients on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from wsproto.connection import Connection as FrameConnection
from wsproto.connection import ConnectionType
from wsproto.events import CloseConnection

from arc.config import ServiceConfig
from arc.http import websocket as websocket_module
from tests.arc.http.harness import Plane, client_context, raw_exchange

HOST = "shop.example.com"
# What the applications below saw, for the tests to read.
SEEN: dict[str, Any] = {}


async def echo(ws: WebSocket) -> None:
    await ws.accept(subprotocol="chat" if "chat" in ws.scope["subprotocols"] else None)
    SEEN["scope"] = dict(ws.scope)
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                SEEN["disconnect"] = message.get("code")
                return
            if message.get("text") == "close please":
                await ws.close(code=4000)
                return
            if message.get("text") is not None:
                await ws.send_text("echo " + message["text"])
            else:
                await ws.send_bytes(message["bytes"][::-1])
    except WebSocketDisconnect as gone:
        SEEN["disconnect"] = gone.code


async def refuse(ws: WebSocket) -> None:
    await ws.close()


async def slow_accept(ws: WebSocket) -> None:
    await asyncio.sleep(0.5)
    await ws.accept()
    await ws.send_text("accepted")


async def broken(ws: WebSocket) -> None:
    await ws.accept()
    raise RuntimeError("this application fails after accepting")


APP = Starlette(
    routes=[
        WebSocketRoute("/echo", echo),
        WebSocketRoute("/refuse", refuse),
        WebSocketRoute("/slow", slow_accept),
        WebSocketRoute("/broken", broken),
    ]
)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    p = Plane(tmp_path, header_timeout_s=0.5, body_timeout_s=0.5)
    SEEN.clear()
    yield p
    p.close()


def serve(plane: Plane, tmp_path: Path) -> tuple[int, int]:
    plain, tls = plane.listen(), plane.listen(tls=True)
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("static home")
    plane.route(
        [
            ServiceConfig(
                "ws", (HOST,), port=plain, tls="optional", tls_port=tls, app="t:ws"
            ),
            ServiceConfig("static", ("static.example.com",), port=plain, root=site),
        ],
        apps={"t:ws": APP},
    )
    return plain, tls


def ws_url(port: int, path: str, tls: bool = False) -> str:
    return f"{'wss' if tls else 'ws'}://{HOST}:{port}{path}"


def open_ws(port: int, path: str, *, tls: bool = False, **extra: Any) -> Any:
    """A connected ``websockets`` client; SNI and Host name HOST, TCP to loopback."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    ssl_context: ssl.SSLContext | None = None
    if tls:
        ssl_context = client_context()
    return connect(
        ws_url(port, path, tls),
        sock=sock,
        ssl=ssl_context,
        server_hostname=HOST if tls else None,
        open_timeout=5,
        close_timeout=5,
        **extra,
    )


@contextmanager
def greeted(port: int) -> Iterator[Any]:
    """An echo WebSocket that has answered one message already."""
    with open_ws(port, "/echo") as ws:
        ws.send("hello")
        assert ws.recv() == "echo hello"
        yield ws


def wait_for(key: str, timeout_s: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while key not in SEEN and time.monotonic() < deadline:
        time.sleep(0.02)
    return SEEN.get(key)


@pytest.mark.parametrize("tls", [False, True])
def test_text_and_binary_messages_go_both_ways(
    plane: Plane, tmp_path: Path, tls: bool
) -> None:
    plain, secure = serve(plane, tmp_path)

    with open_ws(secure if tls else plain, "/echo?room=1", tls=tls) as ws:
        ws.send("hello")
        text = ws.recv()
        ws.send(b"\x00\x01\x02")
        data = ws.recv()
        ws.ping(b"are you there").wait(5)

    scope = wait_for("scope")
    assert text == "echo hello"
    assert data == b"\x02\x01\x00"
    assert scope["type"] == "websocket"
    assert scope["scheme"] == ("wss" if tls else "ws")
    assert scope["path"] == "/echo" and scope["query_string"] == b"room=1"
    assert wait_for("disconnect") == 1000


def test_a_subprotocol_is_chosen_by_the_application(
    plane: Plane, tmp_path: Path
) -> None:
    plain, _ = serve(plane, tmp_path)

    with open_ws(plain, "/echo", subprotocols=["other", "chat"]) as ws:
        chosen = ws.subprotocol

    assert chosen == "chat"
    assert wait_for("scope")["subprotocols"] == ["other", "chat"]


def test_the_application_closes_with_its_own_code(plane: Plane, tmp_path: Path) -> None:
    plain, _ = serve(plane, tmp_path)

    with open_ws(plain, "/echo") as ws:
        ws.send("close please")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()

    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000


def test_closing_before_accepting_refuses_the_handshake_with_403(
    plane: Plane, tmp_path: Path
) -> None:
    plain, _ = serve(plane, tmp_path)

    with pytest.raises(InvalidStatus) as refused:
        open_ws(plain, "/refuse")

    assert refused.value.response.status_code == 403


def test_an_application_failing_after_the_accept_closes_with_1011(
    plane: Plane, tmp_path: Path, errors: list[str]
) -> None:
    plain, _ = serve(plane, tmp_path)

    with open_ws(plain, "/broken") as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv()

    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert any("fails after accepting" in line for line in errors)


def test_a_message_over_the_limit_closes_with_1009(
    plane: Plane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(websocket_module, "MAX_MESSAGE_BYTES", 1000)
    plain, _ = serve(plane, tmp_path)

    with open_ws(plain, "/echo") as ws:
        ws.send("small")
        assert ws.recv() == "echo small"
        ws.send("x" * 2000)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()

    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_an_unmasked_client_frame_is_a_protocol_error(
    plane: Plane, tmp_path: Path
) -> None:
    plain, _ = serve(plane, tmp_path)
    handshake = (
        f"GET /echo HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    # A text frame "hi" without the mask clients must set (RFC 6455 5.1).
    unmasked = b"\x81\x02hi"

    answer = raw_exchange(plain, handshake + unmasked)

    head, _, frames = answer.partition(b"\r\n\r\n")
    reader = FrameConnection(ConnectionType.CLIENT)
    reader.receive_data(frames)
    events = list(reader.events())
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    assert isinstance(events[0], CloseConnection) and events[0].code == 1002


def test_a_client_that_leaves_is_a_disconnect_for_the_application(
    plane: Plane, tmp_path: Path
) -> None:
    plain, _ = serve(plane, tmp_path)

    with greeted(plain) as ws:
        # No close frame: the TCP connection just ends.
        ws.socket.shutdown(socket.SHUT_RDWR)
        code = wait_for("disconnect")

    assert code == 1006


def test_a_handshake_for_static_files_is_answered_as_http(
    plane: Plane, tmp_path: Path
) -> None:
    plain, _ = serve(plane, tmp_path)

    answer = raw_exchange(
        plain,
        b"GET / HTTP/1.1\r\nHost: static.example.com\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
    )

    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"static home")


def test_an_open_websocket_outlives_the_http_timeouts(
    plane: Plane, tmp_path: Path
) -> None:
    plain, _ = serve(plane, tmp_path)

    with open_ws(plain, "/echo") as ws:
        time.sleep(1.2)  # header and body timeouts are 0.5 s here
        ws.send("still here")
        answer = ws.recv()

    assert answer == "echo still here"


def test_many_clients_at_once_each_get_their_own_answers(
    plane: Plane, tmp_path: Path
) -> None:
    plain, _ = serve(plane, tmp_path)
    results: dict[int, list[str]] = {}

    def client(number: int) -> None:
        with open_ws(plain, "/echo") as ws:
            got = []
            for i in range(20):
                ws.send(f"{number}-{i}")
                got.append(ws.recv())
            results[number] = got

    threads = [threading.Thread(target=client, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(results) == list(range(10))
    for number, got in results.items():
        assert got == [f"echo {number}-{i}" for i in range(20)]


def test_stopping_closes_an_open_websocket_with_going_away(
    plane: Plane, tmp_path: Path
) -> None:
    plain, _ = serve(plane, tmp_path)

    with greeted(plain) as ws:
        left = plane.dataplane.drain_connections(2.0)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()

    assert left == 0
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


def test_bytes_piling_up_before_the_accept_are_bounded(
    plane: Plane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(websocket_module, "MAX_MESSAGE_BYTES", 1000)
    plain, _ = serve(plane, tmp_path)
    handshake = (
        f"GET /slow HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()

    answer = raw_exchange(plain, handshake + bytes(2000))

    assert b"101" not in answer  # closed before the application accepted
