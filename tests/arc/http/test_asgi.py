"""The ASGI adapter: scope, streaming, lifespan, loading, and Starlette over TLS."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from arc.config import ServiceConfig
from arc.errors import ConfigError
from arc.http.asgi import Lifespan, load_app
from tests.arc.http.harness import Plane, client_context

HOST = "shop.example.com"
SEEN: list[dict[str, Any]] = []


async def record_scope(scope: Any, receive: Any, send: Any) -> None:
    """Keep the scope, answer 204."""
    SEEN.append(dict(scope))
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    yield {"greeting": "hello from startup"}


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{request.state.greeting}, {request.url.scheme}")


async def upload(request: Request) -> JSONResponse:
    total = 0
    async for piece in request.stream():
        total += len(piece)
    return JSONResponse({"received": total, "path": request.url.path})


async def numbers(request: Request) -> StreamingResponse:
    async def gen() -> AsyncIterator[bytes]:
        for n in range(5):
            yield f"{n}\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(gen(), media_type="text/plain")


STARLETTE = Starlette(
    routes=[
        Route("/", hello),
        Route("/upload/{name}", upload, methods=["POST"]),
        Route("/numbers", numbers),
    ],
    lifespan=lifespan,
)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    p = Plane(tmp_path, max_body_bytes=10_000_000)
    yield p
    p.close()


def https(port: int) -> http.client.HTTPSConnection:
    ctx = client_context()
    ctx.check_hostname = False
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)


def serve_starlette(plane: Plane) -> int:
    tls = plane.listen(tls=True)
    life = Lifespan(STARLETTE, "shop")
    plane.dataplane.run(life.startup())
    from arc.http.routing import RoutingTable

    table = RoutingTable.build(
        [
            ServiceConfig(
                "shop", (HOST,), tls="required", tls_port=tls, app="t:starlette"
            )
        ],
        plane.settings,
        apps={"t:starlette": STARLETTE},
        states={"t:starlette": life.state},
    )
    plane.dataplane.install_routes(table)
    return tls


def test_a_starlette_app_runs_unchanged_over_tls_with_lifespan_state(
    plane: Plane,
) -> None:
    tls = serve_starlette(plane)
    conn = https(tls)

    conn.request("GET", "/", headers={"Host": HOST})
    answer = conn.getresponse()
    text = answer.read()

    assert answer.status == 200
    assert text == b"hello from startup, https"
    assert answer.getheader("strict-transport-security") == "max-age=31536000"
    conn.close()


def test_starlette_reads_a_large_streamed_upload_and_streams_an_answer(
    plane: Plane,
) -> None:
    tls = serve_starlette(plane)
    conn = https(tls)
    body = b"q" * 3_000_000

    conn.request("POST", "/upload/a%20b", body=body, headers={"Host": HOST})
    uploaded = json.loads(conn.getresponse().read())
    conn.request("GET", "/numbers", headers={"Host": HOST})
    streamed = conn.getresponse()
    lines = streamed.read()
    conn.close()

    assert uploaded == {"received": 3_000_000, "path": "/upload/a b"}
    assert streamed.getheader("transfer-encoding") == "chunked"
    assert lines == b"0\n1\n2\n3\n4\n"


def test_the_http_scope_follows_the_spec(plane: Plane) -> None:
    tls = plane.listen(tls=True)
    plane.route(
        [ServiceConfig("s", (HOST,), tls="optional", tls_port=tls, app="t:rec")],
        apps={"t:rec": record_scope},
    )
    SEEN.clear()
    conn = https(tls)

    conn.request("GET", "/caf%C3%A9/x?q=1&r=%20", headers={"Host": HOST, "X-Two": "2"})
    assert conn.getresponse().status == 204
    local = conn.sock.getsockname()
    conn.close()

    scope = SEEN[0]
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "https"
    assert scope["path"] == "/café/x"
    assert scope["raw_path"] == b"/caf%C3%A9/x"
    assert scope["query_string"] == b"q=1&r=%20"
    assert scope["root_path"] == ""
    assert (b"x-two", b"2") in scope["headers"]
    assert (b"host", HOST.encode()) in scope["headers"]
    assert scope["server"] == ("127.0.0.1", tls)
    assert scope["client"] == (local[0], local[1])


def test_lifespan_startup_failure_is_reported_with_the_app_message() -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    with pytest.raises(ConfigError, match="no database"):
        asyncio.run(Lifespan(failing, "shop").startup())


def test_an_app_without_lifespan_support_still_starts() -> None:
    async def no_lifespan(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"

    life = Lifespan(no_lifespan, "plain")

    asyncio.run(life.startup())

    assert life.supported is False


def test_an_app_that_returns_at_once_for_lifespan_starts_without_waiting() -> None:
    async def plain_only(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return

    life = Lifespan(plain_only, "plain")

    async def start_and_stop() -> float:
        started = time.monotonic()
        await life.startup()
        await life.shutdown()
        return time.monotonic() - started

    took = asyncio.run(start_and_stop())

    assert life.supported is False
    assert took < 1.0


def test_lifespan_shutdown_runs_the_app_shutdown() -> None:
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            events.append(message["type"])
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def both() -> None:
        life = Lifespan(app, "s")
        await life.startup()
        await life.shutdown()

    asyncio.run(both())

    assert events == ["lifespan.startup", "lifespan.shutdown"]


def test_load_app_imports_from_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "arc_test_shopapp.py").write_text(
        "async def app(scope, receive, send):\n    pass\n"
    )

    app = load_app("arc_test_shopapp:app", tmp_path)

    assert callable(app)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("arc_test_missing_module:app", "no module named 'arc_test_missing_module'"),
        ("arc_test_shopapp2:nothing", "has no attribute 'nothing'"),
        ("arc_test_shopapp2", "expected 'module:attribute'"),
        ("arc_test_shopapp2:value", "expected an ASGI application"),
    ],
)
def test_load_app_says_clearly_what_is_missing(
    tmp_path: Path, spec: str, expected: str
) -> None:
    (tmp_path / "arc_test_shopapp2.py").write_text("value = 3\n")

    with pytest.raises(ConfigError, match=expected):
        load_app(spec, tmp_path)


def test_an_unreachable_scheme_mismatch_never_reaches_the_app(plane: Plane) -> None:
    plain = plane.listen()
    tls = plane.listen(tls=True)
    plane.route(
        [
            ServiceConfig(
                "s", (HOST,), port=plain, tls="required", tls_port=tls, app="t:rec"
            )
        ],
        apps={"t:rec": record_scope},
    )
    SEEN.clear()
    conn = http.client.HTTPConnection("127.0.0.1", plain, timeout=5)

    conn.request("GET", "/", headers={"Host": HOST})
    status = conn.getresponse().status
    conn.close()

    assert status == 301
    assert SEEN == []


def test_starlette_static_files_use_pathsend_for_small_and_large_files(
    plane: Plane, tmp_path: Path
) -> None:
    from starlette.staticfiles import StaticFiles

    files = tmp_path / "files"
    files.mkdir()
    (files / "small.txt").write_bytes(b"s" * 100)
    large = bytes(range(256)) * 2000  # 512,000 bytes: streamed in chunks
    (files / "large.bin").write_bytes(large)
    tls = plane.listen(tls=True)
    plane.route(
        [ServiceConfig("s", (HOST,), tls="optional", tls_port=tls, app="t:files")],
        apps={"t:files": StaticFiles(directory=str(files))},
    )
    conn = https(tls)

    conn.request("GET", "/small.txt", headers={"Host": HOST})
    small = conn.getresponse()
    small_body = small.read()
    conn.request("GET", "/large.bin", headers={"Host": HOST})
    big = conn.getresponse()
    big_body = big.read()
    conn.request("GET", "/large.bin", headers={"Host": HOST, "Range": "bytes=10-19"})
    part = conn.getresponse()
    part_body = part.read()
    conn.close()

    assert (small.status, small_body) == (200, b"s" * 100)
    assert big.getheader("content-length") == str(len(large))
    assert big_body == large
    assert (part.status, part_body) == (206, large[10:20])


def header_injection(name: bytes, value: bytes) -> Any:
    """An app that tries to split the response with one header."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(name, value)]}
        )
        await send({"type": "http.response.body", "body": b"never"})

    return app


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"x-evil", b"a\r\nset-cookie: stolen=1"),
        (b"x-evil", b"a\nset-cookie: stolen=1"),
        (b"x-evil", b"a\rb"),
        (b"set-cookie: stolen=1\r\nx-evil", b"a"),
    ],
)
def test_a_header_with_a_line_break_answers_500(
    plane: Plane, name: bytes, value: bytes
) -> None:
    plain = plane.listen()
    plane.route(
        [ServiceConfig("s", (HOST,), port=plain, app="t:evil")],
        apps={"t:evil": header_injection(name, value)},
    )
    conn = http.client.HTTPConnection("127.0.0.1", plain, timeout=5)

    conn.request("GET", "/", headers={"Host": HOST})
    answer = conn.getresponse()
    answer.read()
    conn.close()

    assert answer.status == 500
    assert answer.getheader("set-cookie") is None
