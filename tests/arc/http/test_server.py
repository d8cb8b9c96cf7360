"""HttpProtocol on a real loop and real sockets: routing, TLS modes, limits."""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import arc.http.server as server_module
import arc.tls.transport as transport_module
from arc.config import ServiceConfig
from arc.http.redirect import redirect_location
from tests.arc.http.harness import CA, Plane, client_context, raw_exchange

HOST = "shop.example.com"


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """Answer with the request body, read piece by piece."""
    body = b""
    pieces = 0
    while True:
        message = await receive()
        body += message.get("body", b"")
        pieces += 1
        if not message.get("more_body"):
            break
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"x-pieces", str(pieces).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def slow_then_fast(scope: Any, receive: Any, send: Any) -> None:
    """Sleep as long as the path says (ms), then name the path."""
    await asyncio.sleep(int(scope["path"].strip("/") or "0") / 1000)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": scope["path"].encode()})


async def broken(scope: Any, receive: Any, send: Any) -> None:
    """Fail before answering."""
    raise RuntimeError("the database is down")


async def streaming(scope: Any, receive: Any, send: Any) -> None:
    """A response in three pieces without Content-Length."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for piece in (b"one,", b"two,", b"three"):
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


APPS = {
    "t:echo": echo,
    "t:slow": slow_then_fast,
    "t:broken": broken,
    "t:streaming": streaming,
}


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("home")
    (root / "hello.txt").write_text("hello world")
    (tmp_path / "secret.txt").write_text("outside")
    return root


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    p = Plane(tmp_path, header_timeout_s=0.5, body_timeout_s=0.5, max_body_bytes=1000)
    yield p
    p.close()


def shared(plane: Plane, www: Path) -> tuple[int, int]:
    """Three services of each tls mode on one plain and one TLS port."""
    plain, tls = plane.listen(), plane.listen(tls=True)
    plane.route(
        [
            ServiceConfig(
                "req", (HOST,), port=plain, tls="required", tls_port=tls, root=www
            ),
            ServiceConfig(
                "opt",
                ("opt.example.com",),
                port=plain,
                tls="optional",
                tls_port=tls,
                root=www,
            ),
            ServiceConfig(
                "plain", ("plain.example.com",), port=plain, tls="none", root=www
            ),
            ServiceConfig(
                "apps",
                ("app.example.com",),
                port=plain,
                tls="optional",
                tls_port=tls,
                app="t:echo",
            ),
            ServiceConfig("slow", ("slow.example.com",), port=plain, app="t:slow"),
            ServiceConfig(
                "broken", ("broken.example.com",), port=plain, app="t:broken"
            ),
            ServiceConfig(
                "stream", ("stream.example.com",), port=plain, app="t:streaming"
            ),
        ],
        apps=APPS,
    )
    return plain, tls


def request(
    port: int,
    method: str = "GET",
    path: str = "/",
    host: str = HOST,
    *,
    tls: bool = False,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> http.client.HTTPResponse:
    if tls:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=5, context=client_context()
        )
        # SNI and certificate check use the Host we ask for.
        conn._context.check_hostname = False  # type: ignore[attr-defined]
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


# -- tls modes on shared ports ------------------------------------------------


def test_required_redirects_get_with_301_to_the_tls_port_keeping_path_and_query(
    plane: Plane, www: Path
) -> None:
    plain, tls = shared(plane, www)

    answer = request(plain, "GET", "/a%20b/c?x=1&y=2")

    assert answer.status == 301
    assert answer.getheader("location") == f"https://{HOST}:{tls}/a%20b/c?x=1&y=2"


def test_required_redirects_other_methods_with_308(plane: Plane, www: Path) -> None:
    plain, tls = shared(plane, www)

    answer = request(plain, "POST", "/form", body=b"a=1")

    assert answer.status == 308
    assert answer.getheader("location") == f"https://{HOST}:{tls}/form"


def test_redirect_to_port_443_leaves_the_port_out() -> None:
    assert redirect_location(HOST, 443, b"/x?y") == b"https://shop.example.com/x?y"
    assert redirect_location("::1", 8443, b"/") == b"https://[::1]:8443/"


def test_required_over_tls_is_served_with_hsts(plane: Plane, www: Path) -> None:
    _, tls = shared(plane, www)

    answer = request(tls, path="/hello.txt", tls=True)

    assert answer.status == 200
    assert answer.getheader("strict-transport-security") == "max-age=31536000"


def test_optional_is_served_over_both_with_hsts_only_over_tls(
    plane: Plane, www: Path
) -> None:
    plain, tls = shared(plane, www)

    over_plain = request(plain, host="opt.example.com")
    over_tls = request(tls, host="opt.example.com", tls=True)

    assert (over_plain.status, over_tls.status) == (200, 200)
    assert over_plain.getheader("strict-transport-security") is None
    assert over_tls.getheader("strict-transport-security") == "max-age=31536000"


def test_none_is_served_over_plain_and_misdirected_over_tls(
    plane: Plane, www: Path
) -> None:
    plain, tls = shared(plane, www)

    assert request(plain, host="plain.example.com").status == 200
    assert request(tls, host="plain.example.com", tls=True).status == 421


def test_an_empty_hsts_setting_sends_no_header(tmp_path: Path, www: Path) -> None:
    plane = Plane(tmp_path, hsts="")
    try:
        tls = plane.listen(tls=True)
        plane.route(
            [ServiceConfig("s", (HOST,), tls="required", tls_port=tls, root=www)]
        )

        answer = request(tls, tls=True)

        assert answer.status == 200
        assert answer.getheader("strict-transport-security") is None
    finally:
        plane.close()


def test_a_host_not_covered_by_the_connection_certificate_gets_421(
    plane: Plane, www: Path
) -> None:
    tls = plane.listen(tls=True, tls_domain=HOST)
    plane.route(
        [
            ServiceConfig("a", (HOST,), tls="required", tls_port=tls, root=www),
            ServiceConfig(
                "b", ("blog.example.com",), tls="required", tls_port=tls, root=www
            ),
        ]
    )

    assert request(tls, tls=True).status == 200
    assert request(tls, host="blog.example.com", tls=True).status == 421


def test_an_unknown_host_gets_404_and_keeps_the_connection(
    plane: Plane, www: Path
) -> None:
    plain, _ = shared(plane, www)

    answer = raw_exchange(
        plain,
        b"GET / HTTP/1.1\r\nHost: nobody.example\r\n\r\n"
        b"GET /hello.txt HTTP/1.1\r\nHost: opt.example.com\r\n"
        b"Connection: close\r\n\r\n",
    )

    assert answer.startswith(b"HTTP/1.1 404 ")
    assert answer.count(b"HTTP/1.1 ") == 2
    assert answer.endswith(b"hello world")


def curl(tmp_path: Path, ports: list[int], *args: str) -> str:
    """Run curl (quiet, bounded, trusting the test CA, HOST on loopback at
    ``ports``) and return what it printed."""
    ca = tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(ca))
    resolve = [arg for p in ports for arg in ("--resolve", f"{HOST}:{p}:127.0.0.1")]
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(ca), *resolve, *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout


def test_curl_follows_the_redirect_to_https(
    plane: Plane, www: Path, tmp_path: Path
) -> None:
    plain, tls = shared(plane, www)

    out = curl(
        tmp_path,
        [plain, tls],
        "-L",
        "-w",
        "%{http_code} %{url_effective}",
        f"http://{HOST}:{plain}/hello.txt",
    )

    assert out == f"hello world200 https://{HOST}:{tls}/hello.txt"


def test_curl_gets_a_text_file_gzipped_and_unpacks_it(
    plane: Plane, www: Path, tmp_path: Path
) -> None:
    _plain, tls = shared(plane, www)
    text = "Arcology serves many domains over TLS.\n" * 50
    (www / "long.txt").write_text(text)

    done = curl(
        tmp_path, [tls], "--compressed", "-D", "-", f"https://{HOST}:{tls}/long.txt"
    )

    # text=True turned the CRLFs into newlines.
    head, _, body = done.partition("\n\n")
    assert "content-encoding: gzip" in head.lower()
    assert body == text


# -- limits -------------------------------------------------------------------


def test_headers_over_16_kib_get_431_and_a_close(plane: Plane, www: Path) -> None:
    plain, _ = shared(plane, www)
    big = b"x-big: " + b"a" * 17000 + b"\r\n"

    answer = raw_exchange(
        plain, b"GET / HTTP/1.1\r\nHost: opt.example.com\r\n" + big + b"\r\n"
    )

    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"connection: close" in answer


def test_one_endless_header_line_gets_431(plane: Plane, www: Path) -> None:
    plain, _ = shared(plane, www)

    answer = raw_exchange(plain, b"GET / HTTP/1.1\r\nx-endless: " + b"a" * 200_000)

    assert answer.startswith(b"HTTP/1.1 431 ")


def test_a_body_over_the_limit_by_content_length_gets_413(
    plane: Plane, www: Path
) -> None:
    plain, _ = shared(plane, www)

    answer = raw_exchange(
        plain,
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 1001\r\n\r\n",
    )

    assert answer.startswith(b"HTTP/1.1 413 ")


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_a_client_still_uploading_reads_its_413_without_a_reset(
    plane: Plane, www: Path, tls: bool
) -> None:
    plain_port, tls_port = shared(plane, www)
    host = HOST if tls else "opt.example.com"  # a service that takes plain HTTP
    body = b"z" * 300_000
    conn = socket.create_connection(
        ("127.0.0.1", tls_port if tls else plain_port), timeout=5
    )
    if tls:
        conn = client_context().wrap_socket(conn, server_hostname=HOST)

    # The upload goes on in pieces after Arcology has answered and closed.
    with conn:
        conn.sendall(
            b"POST / HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
            % (host.encode(), len(body))
        )
        for start in range(0, len(body), 4096):
            conn.sendall(body[start : start + 4096])
            time.sleep(0.001)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk

    assert answer.startswith(b"HTTP/1.1 413 ")


def _tls_client(port: int, receive_buffer_bytes: int) -> ssl.SSLSocket:
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", port))
    return client_context().wrap_socket(raw, server_hostname=HOST)


async def _buffered_bytes(plane: Plane) -> int:
    """What Arcology's connections hold for their clients (on the loop)."""
    return sum(
        c.transport.get_write_buffer_size()
        for c in plane.dataplane.connections
        if c.transport is not None
    )


def _pipelined_gets(path: bytes, count: int) -> bytes:
    one = b"GET " + path + b" HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n"
    return (one + b"\r\n") * (count - 1) + one + b"Connection: close\r\n\r\n"


def test_pipelined_answers_wait_while_the_client_takes_none(
    plane: Plane, www: Path
) -> None:
    (www / "big.bin").write_bytes(b"b" * 60_000)
    _, tls = shared(plane, www)

    with _tls_client(tls, 4096) as conn:
        conn.sendall(_pipelined_gets(b"/big.bin", 100))
        time.sleep(0.5)  # the client's buffers are full; the rest must wait
        buffered = plane.dataplane.run(_buffered_bytes(plane))
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        answers = b""
        while chunk := conn.recv(1 << 20):
            answers += chunk

    assert buffered < 512 * 1024
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 100
    assert answers.count(b"b" * 60_000) == 100


def test_a_client_that_takes_no_answer_bytes_is_dropped(
    plane: Plane, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport_module, "SEND_TIMEOUT_S", 0.3)
    (www / "big.bin").write_bytes(b"b" * 60_000)
    _, tls = shared(plane, www)

    with _tls_client(tls, 4096) as conn:
        conn.sendall(_pipelined_gets(b"/big.bin", 100))
        deadline = time.monotonic() + 5
        stalled = 0
        while time.monotonic() < deadline and not stalled:
            stalled = plane.dataplane.run(_buffered_bytes(plane))
        while time.monotonic() < deadline and plane.dataplane.connections:
            time.sleep(0.05)
        left = len(plane.dataplane.connections)

    assert stalled > 0  # answers waited for the client ...
    assert left == 0  # ... until it was dropped


def test_a_chunked_body_over_the_limit_gets_413(plane: Plane, www: Path) -> None:
    plain, _ = shared(plane, www)
    chunk = b"1f4\r\n" + b"z" * 500 + b"\r\n"

    answer = raw_exchange(
        plain,
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3 + b"0\r\n\r\n",
    )

    assert answer.startswith(b"HTTP/1.1 413 ")


def test_a_slow_client_gets_408_then_the_connection_closes(
    plane: Plane, www: Path
) -> None:
    plain, _ = shared(plane, www)
    started = time.monotonic()

    answer = raw_exchange(plain, b"GET / HTTP/1.1\r\nHost: opt.exa")

    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.4 < time.monotonic() - started < 3.0


def test_a_stalled_request_body_gets_408_and_the_app_hears_the_client_left(
    plane: Plane, www: Path, errors: list[str]
) -> None:
    plain, _ = shared(plane, www)
    started = time.monotonic()

    answer = raw_exchange(
        plain,
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 100\r\n\r\n"
        b"only ten b",
    )

    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in answer.lower()
    assert 0.4 < time.monotonic() - started < 3.0
    time.sleep(0.2)  # the application's task ends after the answer
    assert errors == []


def test_a_slow_but_steady_body_is_read_whole(plane: Plane, www: Path) -> None:
    plain, _ = shared(plane, www)

    # Each piece comes within the body timeout (0.5 s); all of them take
    # well over it.
    answer = post_chunked(plain, [b"one ", b"two ", b"three ", b"four"], gap_s=0.3)

    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"one two three four")


def test_a_silent_connection_gets_408(plane: Plane, www: Path) -> None:
    plain, _ = shared(plane, www)

    assert raw_exchange(plain, b"").startswith(b"HTTP/1.1 408 ")


def test_an_idle_keep_alive_connection_is_closed_without_an_answer(
    plane: Plane, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "KEEP_ALIVE_IDLE_S", 0.3)
    plain, _ = shared(plane, www)
    started = time.monotonic()

    answer = raw_exchange(
        plain, b"GET /hello.txt HTTP/1.1\r\nHost: opt.example.com\r\n\r\n"
    )

    assert answer.count(b"HTTP/1.1 ") == 1
    assert answer.endswith(b"hello world")
    assert time.monotonic() - started < 2.0


def test_malformed_requests_get_400(plane: Plane, www: Path) -> None:
    plain, _ = shared(plane, www)

    assert raw_exchange(plain, b"GARBAGE\x01 / HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.1 400 "
    )
    assert raw_exchange(plain, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")


# -- keep-alive, pipelining, bodies ---------------------------------------------


def test_pipelined_requests_are_answered_in_order(plane: Plane, www: Path) -> None:
    plain, _ = shared(plane, www)
    asks = b"".join(
        b"GET /%d HTTP/1.1\r\nHost: slow.example.com\r\n\r\n" % ms
        for ms in (150, 0, 60)
    )

    answer = raw_exchange(
        plain,
        asks
        + b"GET /0 HTTP/1.1\r\nHost: slow.example.com\r\nConnection: close\r\n\r\n",
    )

    bodies = [
        part.rsplit(b"\r\n\r\n", 1)[-1] for part in answer.split(b"HTTP/1.1 200 OK")[1:]
    ]
    assert [b.split(b"H")[0] for b in bodies] == [b"/150", b"/0", b"/60", b"/0"]


def test_pipelined_static_and_app_requests_share_one_connection(
    plane: Plane, www: Path
) -> None:
    plain, _ = shared(plane, www)
    asks = (
        b"GET /hello.txt HTTP/1.1\r\nHost: opt.example.com\r\n\r\n"
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /30 HTTP/1.1\r\nHost: slow.example.com\r\n\r\n"
        b"HEAD /hello.txt HTTP/1.1\r\nHost: opt.example.com\r\n"
        b"Connection: close\r\n\r\n"
    )

    answer = raw_exchange(plain, asks)

    assert answer.count(b"HTTP/1.1 200 OK") == 4
    # Bodies are found after their heads' blank line: an etag may hold "abc".
    bodies = [answer.index(b"\r\n\r\n" + body) for body in (b"hello", b"abc")]
    assert bodies[0] < bodies[1] < answer.index(b"/30")
    assert answer.endswith(b"\r\n\r\n")  # HEAD: headers only


def test_a_chunked_request_body_streams_to_the_app(plane: Plane, www: Path) -> None:
    plain, _ = shared(plane, www)

    answer = post_chunked(plain, [b"hello", b" world"], gap_s=0.1)

    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"hello world")
    assert b"x-pieces: 2" in answer


def post_chunked(port: int, pieces: list[bytes], gap_s: float) -> bytes:
    """POST ``pieces`` as a chunked body to the echo app, ``gap_s`` apart.

    The first piece goes with the head, the end of the body with the last.
    """
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces]
    chunks[0] = (
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + chunks[0]
    )
    chunks[-1] += b"0\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    for number, chunk in enumerate(chunks):
        if number:
            time.sleep(gap_s)
        sock.sendall(chunk)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    return answer


def test_a_streamed_response_without_length_is_chunked(plane: Plane, www: Path) -> None:
    plain, _ = shared(plane, www)

    answer = request(plain, host="stream.example.com")

    assert answer.getheader("transfer-encoding") == "chunked"


def test_an_app_error_answers_500_and_logs_the_traceback(
    plane: Plane, www: Path, logs: list[Any]
) -> None:
    plain, _ = shared(plane, www)

    answer = request(plain, host="broken.example.com")

    assert answer.status == 500
    errors = [r for r in logs if r["level"].name == "ERROR"]
    assert len(errors) == 1
    assert errors[0]["extra"]["actor"] == "hyperion"
    assert errors[0]["exception"] is not None
    assert "the database is down" in str(errors[0]["exception"].value)


def test_each_request_writes_one_access_line(
    plane: Plane, www: Path, logs: list[Any]
) -> None:
    plain, _ = shared(plane, www)

    request(plain, path="/hello.txt", host="opt.example.com")
    # The line is written once the answer has left, so it may trail the
    # client's read by a moment.
    deadline = time.monotonic() + 5
    while not any(r["message"].startswith("access ") for r in logs):
        assert time.monotonic() < deadline, "no access line within 5 s"
        time.sleep(0.01)
    time.sleep(0.05)

    lines = [r for r in logs if r["message"].startswith("access ")]
    assert len(lines) == 1
    assert lines[0]["level"].name == "INFO"
    assert lines[0]["extra"]["actor"] == "hyperion"
    for field in (
        "method=GET",
        "host=opt.example.com",
        "path=/hello.txt",
        "status=200",
        "bytes=11",
        "ms=",
        "scheme=http",
    ):
        assert field in lines[0]["message"]


def test_no_access_line_when_the_setting_is_off(
    tmp_path: Path, www: Path, logs: list[Any]
) -> None:
    plane = Plane(tmp_path, access_log=False)
    try:
        plain = plane.listen()
        plane.route([ServiceConfig("s", (HOST,), port=plain, root=www)])

        request(plain)

        assert not [r for r in logs if r["message"].startswith("access ")]
    finally:
        plane.close()


def test_a_plugin_port_hands_every_request_to_its_app(plane: Plane, www: Path) -> None:
    plain = plane.listen()
    plane.dataplane.port_apps[plain] = echo

    answer = request(plain, "POST", host="anything.invalid", body=b"ping")

    assert answer.status == 200


# -- static files over the wire -------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        b"/../secret.txt",
        b"/%2e%2e/secret.txt",
        b"/..%2fsecret.txt",
        b"/%252e%252e/secret.txt",
        b"/..\\secret.txt",
        b"/%00/../secret.txt",
    ],
)
def test_traversal_attempts_over_the_wire_get_404(
    plane: Plane, www: Path, target: bytes
) -> None:
    plain, _ = shared(plane, www)

    answer = raw_exchange(
        plain,
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: opt.example.com\r\nConnection: close\r\n\r\n",
    )

    assert answer.startswith((b"HTTP/1.1 404 ", b"HTTP/1.1 400 "))
    assert b"outside" not in answer


def test_static_304_206_416_and_head_over_tls(plane: Plane, www: Path) -> None:
    _, tls = shared(plane, www)
    first = request(tls, path="/hello.txt", host="opt.example.com", tls=True)
    etag = first.getheader("etag") or ""

    cached = request(
        tls,
        path="/hello.txt",
        host="opt.example.com",
        tls=True,
        headers={"If-None-Match": etag},
    )
    part = request(
        tls,
        path="/hello.txt",
        host="opt.example.com",
        tls=True,
        headers={"Range": "bytes=6-"},
    )
    beyond = request(
        tls,
        path="/hello.txt",
        host="opt.example.com",
        tls=True,
        headers={"Range": "bytes=99-"},
    )
    head = request(tls, "HEAD", "/hello.txt", host="opt.example.com", tls=True)

    assert (cached.status, part.status, beyond.status, head.status) == (
        304,
        206,
        416,
        200,
    )
    assert part.getheader("content-range") == "bytes 6-10/11"
    assert head.getheader("content-length") == "11"


def test_a_large_file_is_streamed_whole(plane: Plane, www: Path) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    (www / "big.bin").write_bytes(data)
    plain, _ = shared(plane, www)
    conn = http.client.HTTPConnection("127.0.0.1", plain, timeout=10)

    conn.request("GET", "/big.bin", headers={"Host": "opt.example.com"})
    body = conn.getresponse().read()
    conn.request("GET", "/hello.txt", headers={"Host": "opt.example.com"})
    after = conn.getresponse().read()
    conn.close()

    assert body == data
    assert after == b"hello world"


def test_expect_100_continue_is_answered_when_the_app_reads_the_body(
    plane: Plane, www: Path, tmp_path: Path
) -> None:
    plain, _ = shared(plane, www)
    body = tmp_path / "body.bin"
    body.write_bytes(b"b" * 900)
    started = time.monotonic()

    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--expect100-timeout",
            "5",
            "-H",
            "Expect: 100-continue",
            "-H",
            "Host: app.example.com",
            "--data-binary",
            f"@{body}",
            f"http://127.0.0.1:{plain}/",
        ],
        capture_output=True,
        timeout=20,
        check=True,
    ).stdout

    assert out == b"b" * 900
    assert time.monotonic() - started < 3.0


def test_a_final_answer_without_100_continue_closes_the_connection(
    plane: Plane, www: Path
) -> None:
    plain, _ = shared(plane, www)

    answer = raw_exchange(
        plain,
        b"POST /hello.txt HTTP/1.1\r\nHost: opt.example.com\r\nContent-Length: 10\r\n"
        b"Expect: 100-continue\r\n\r\n",
    )

    assert answer.startswith(b"HTTP/1.1 405 ")
    assert b"100 Continue" not in answer
    assert b"connection: close" in answer


def test_two_host_headers_get_400(plane: Plane, www: Path) -> None:
    plain, _ = shared(plane, www)

    answer = raw_exchange(
        plain,
        b"GET / HTTP/1.1\r\nHost: opt.example.com\r\nHost: evil.example\r\n\r\n",
    )

    assert answer.startswith(b"HTTP/1.1 400 ")


def test_an_upgrade_request_is_answered_as_http_then_closed(
    plane: Plane, www: Path
) -> None:
    plain, _ = shared(plane, www)
    started = time.monotonic()

    answer = raw_exchange(
        plain,
        b"GET /hello.txt HTTP/1.1\r\nHost: opt.example.com\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )

    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in answer
    assert time.monotonic() - started < 2.0


def test_a_client_that_reads_late_gets_every_pipelined_answer_whole_and_in_order(
    plane: Plane, www: Path
) -> None:
    data = [bytes([65 + n]) * 300_000 for n in range(8)]
    for n, blob in enumerate(data):
        (www / f"f{n}.bin").write_bytes(blob)
    plain, _ = shared(plane, www)
    sock = socket.create_connection(("127.0.0.1", plain), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    asks = b"".join(
        b"GET /f%d.bin HTTP/1.1\r\nHost: opt.example.com\r\n\r\n" % n for n in range(8)
    )
    sock.sendall(
        asks + b"GET /hello.txt HTTP/1.1\r\nHost: opt.example.com\r\n"
        b"Connection: close\r\n\r\n"
    )
    time.sleep(0.3)

    received = b""
    while chunk := sock.recv(1 << 20):
        received += chunk
    sock.close()

    bodies = [
        part.split(b"\r\n\r\n", 1)[1] for part in received.split(b"HTTP/1.1 200 OK")[1:]
    ]
    assert [b[:300_000] for b in bodies[:8]] == data
    assert bodies[8] == b"hello world"
