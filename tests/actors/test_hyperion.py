"""Hyperion with real Cryptosaur and Esper: start-up, certificates, reload."""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from actors.cryptosaur import Cryptosaur
from actors.esper import Esper
from actors.hyperion import Hyperion
from arc.config import load_config
from arc.errors import ArcError, ConfigError
from arc.testing import running
from tests.arc.tls.serving import peer_common_name
from tests.certs import make_chain

SHOP = "shop.example.com"
CORE = [Cryptosaur, Esper, Hyperion]


def free_ports(count: int) -> list[int]:
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def service(name: str, hosts: list[str], port: int, **extra: Any) -> str:
    lines = [
        "[[services]]",
        f'name = "{name}"',
        "hosts = [" + ", ".join(f'"{h}"' for h in hosts) + "]",
        f"port = {port}",
    ]
    for key, value in extra.items():
        lines.append(f"{key} = {value!r}".replace("'", '"'))
    return "\n".join(lines) + "\n"


def write_config(
    tmp_path: Path, *services: str, local_ca: bool = False, settings: str = ""
) -> Path:
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text("shop home")
    path = tmp_path / "arcology.toml"
    path.write_text(
        "[arcology]\n"
        f'data_dir = "{tmp_path / "data"}"\n'
        'bind = ["127.0.0.1"]\n'
        f"local_ca = {'true' if local_ca else 'false'}\n"
        f"{settings}\n" + "\n".join(services)
    )
    return path


def shop_config(tmp_path: Path, tls: str, settings: str = "") -> tuple[int, int, Path]:
    """One service "shop" for SHOP in ``tls`` mode; its two ports and its file."""
    plain, tls_port = free_ports(2)
    shop = service("shop", [SHOP], plain, tls=tls, tlsPort=tls_port, root="www")
    return plain, tls_port, write_config(tmp_path, shop, settings=settings)


def lines(records: list[Any], level: str, text: str) -> list[str]:
    return [
        r["message"]
        for r in records
        if r["level"].name == level
        and r["extra"].get("actor") == "hyperion"
        and text in r["message"]
    ]


def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def get(
    port: int, host: str, ctx: ssl.SSLContext | None = None
) -> tuple[int, bytes, Any]:
    conn: http.client.HTTPConnection
    if ctx is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=5, context=ctx)
        conn.sock = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=5),
            server_hostname=host,
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/", headers={"Host": host})
    answer = conn.getresponse()
    body = answer.read()
    conn.close()
    return answer.status, body, answer


def test_a_host_without_certificate_is_reported_once_then_once_when_it_gets_one(
    tmp_path: Path, logs: list[Any]
) -> None:
    plain, tls = free_ports(2)
    path = write_config(
        tmp_path,
        service(
            "shop",
            [SHOP, "*.shop.example.com"],
            plain,
            tls="optional",
            tlsPort=tls,
            root="www",
        ),
        service("blog", [SHOP], plain, tls="optional", tlsPort=tls, root="www"),
    )
    chain = make_chain(SHOP)

    with running(CORE, load_config(path)) as rt:
        at_start = lines(logs, "ERROR", "has no certificate")
        plain_answer = get(plain, SHOP)
        rt.ask("Cryptosaur", "setCertificate", {"bundle": chain.bundle()})
        assert eventually(lambda: bool(lines(logs, "INFO", "now served over TLS")))
        status, body, answer = get(tls, SHOP, chain.client_context())

    assert sorted(at_start) == sorted(
        [
            "host has no certificate; it is served over plain HTTP only until one "
            f"is uploaded host={SHOP} service=shop",
            "host has no certificate; it is served over plain HTTP only until one "
            "is uploaded host=*.shop.example.com service=shop",
        ]
    )
    assert plain_answer[:2] == (200, b"shop home")
    assert lines(logs, "INFO", "now served over TLS") == [
        f"host is now served over TLS host={SHOP} service=shop"
    ]
    assert (status, body) == (200, b"shop home")
    assert answer.getheader("strict-transport-security") == "max-age=31536000"
    assert len(lines(logs, "ERROR", "has no certificate")) == 2


def test_a_required_host_without_certificate_is_reported_as_not_served(
    tmp_path: Path, logs: list[Any]
) -> None:
    plain, tls, path = shop_config(tmp_path, "required")

    with running(CORE, load_config(path)):
        at_start = lines(logs, "ERROR", "has no certificate")
        redirected = get(plain, SHOP)
        with pytest.raises(ssl.SSLError):
            get(tls, SHOP, make_chain(SHOP).client_context())

    assert at_start == [
        "host has no certificate; it is not served until one is uploaded (plain "
        f"HTTP redirects to HTTPS, whose handshake is refused) host={SHOP} "
        "service=shop"
    ]
    assert redirected[0] == 301
    assert redirected[2].getheader("location") == f"https://{SHOP}:{tls}/"


def test_a_deleted_certificate_is_reported_as_a_warning_not_an_error(
    tmp_path: Path, logs: list[Any]
) -> None:
    path = shop_config(tmp_path, "optional")[2]

    with running(CORE, load_config(path)) as rt:
        rt.ask("Cryptosaur", "setCertificate", {"bundle": make_chain(SHOP).bundle()})
        assert eventually(lambda: bool(lines(logs, "INFO", "now served over TLS")))
        rt.ask("Cryptosaur", "deleteCertificate", {"domain": SHOP})
        assert eventually(lambda: bool(lines(logs, "WARNING", "has no certificate")))

    assert lines(logs, "WARNING", "has no certificate") == [
        "host has no certificate; it is served over plain HTTP only until one is "
        f"uploaded host={SHOP} service=shop"
    ]
    assert lines(logs, "ERROR", "has no certificate") == [
        "host has no certificate; it is served over plain HTTP only until one is "
        f"uploaded host={SHOP} service=shop"
    ]


def test_a_host_a_reload_adds_without_certificate_is_reported_as_a_warning(
    tmp_path: Path, logs: list[Any]
) -> None:
    plain = free_ports(1)[0]
    path = write_config(
        tmp_path, service("blog", ["blog.example.com"], plain, root="www")
    )

    with running(CORE, load_config(path)) as rt:
        shop_config(tmp_path, "required")
        rt.ask("Hyperion", "reload", {})

    assert lines(logs, "ERROR", "has no certificate") == []
    assert len(lines(logs, "WARNING", "has no certificate; it is not served")) == 1


FALLBACK = "default.example.com"
FALLBACK_MISSING = (
    "fallback domain has no certificate; handshakes without a known name are "
    f"refused until one is uploaded fallback={FALLBACK}"
)


def test_a_fallback_without_certificate_is_warned_at_start_then_told_on_upload(
    tmp_path: Path, logs: list[Any]
) -> None:
    path = shop_config(tmp_path, "none", settings=f'tls_fallback = "{FALLBACK}"')[2]
    chain = make_chain("*.example.com")

    with running(CORE, load_config(path)) as rt:
        at_start = lines(logs, "WARNING", "fallback domain")
        rt.ask("Cryptosaur", "setCertificate", {"bundle": chain.bundle()})
        assert eventually(lambda: bool(lines(logs, "INFO", "fallback domain")))

    assert at_start == [FALLBACK_MISSING]
    assert lines(logs, "INFO", "fallback domain") == [
        "fallback domain now has a certificate; handshakes without a known name "
        f"get it fallback={FALLBACK}"
    ]
    assert lines(logs, "WARNING", "fallback domain") == [FALLBACK_MISSING]


def test_a_reload_to_a_fallback_without_certificate_warns_once(
    tmp_path: Path, logs: list[Any]
) -> None:
    path = shop_config(tmp_path, "none")[2]

    with running(CORE, load_config(path)) as rt:
        at_start = lines(logs, "WARNING", "fallback domain")
        shop_config(tmp_path, "none", settings=f'tls_fallback = "{FALLBACK}"')
        rt.ask("Hyperion", "reload", {})
        rt.ask("Hyperion", "reload", {})

    assert at_start == []
    assert lines(logs, "WARNING", "fallback domain") == [FALLBACK_MISSING]


def test_reload_opens_new_ports_closes_unused_ones_and_leaves_the_rest(
    tmp_path: Path,
) -> None:
    kept, dropped, added = free_ports(3)
    path = write_config(
        tmp_path,
        service("shop", [SHOP], kept, root="www"),
        service("blog", ["blog.example.com"], dropped, root="www"),
    )
    heard: list[Any] = []

    with running(CORE, load_config(path)) as rt:
        rt.subscribe("Hyperion.servicesReloaded", heard.append)
        kept_conn = http.client.HTTPConnection("127.0.0.1", kept, timeout=5)
        kept_conn.request("GET", "/", headers={"Host": SHOP})
        kept_conn.getresponse().read()
        write_config(
            tmp_path,
            service("shop", [SHOP], kept, root="www"),
            service("blog", ["blog.example.com"], added, root="www"),
        )

        summary = rt.ask("Hyperion", "reload", {})

        # The connection opened before the reload carries on.
        kept_conn.request("GET", "/", headers={"Host": SHOP})
        still = kept_conn.getresponse()
        still.read()
        kept_conn.close()
        new_port = get(added, "blog.example.com")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", dropped), timeout=2)

    assert summary == {
        "opened": [added],
        "closed": [dropped],
        "unchanged": [kept],
        "failed": [],
        "applied": [],
        "restart_needed": [],
    }
    assert heard == [summary]
    assert still.status == 200
    assert new_port[:2] == (200, b"shop home")


def test_a_port_in_use_fails_alone_on_reload_and_the_rest_is_applied(
    tmp_path: Path,
) -> None:
    kept, taken, free = free_ports(3)
    path = write_config(tmp_path, service("shop", [SHOP], kept, root="www"))
    squatter = socket.create_server(("127.0.0.1", taken))

    try:
        with running(CORE, load_config(path)) as rt:
            write_config(
                tmp_path,
                service("shop", [SHOP], kept, root="www"),
                service("blog", ["blog.example.com"], taken, root="www"),
                service("docs", ["docs.example.com"], free, root="www"),
            )

            summary = rt.ask("Hyperion", "reload", {})
            served = get(free, "docs.example.com")[:2]
            squatter.close()
            retried = rt.ask("Hyperion", "reload", {})
    finally:
        squatter.close()

    assert summary["opened"] == [free] and summary["unchanged"] == [kept]
    assert [f["port"] for f in summary["failed"]] == [taken]
    assert "in use" in summary["failed"][0]["reason"]
    assert served == (200, b"shop home")
    assert retried["opened"] == [taken] and retried["failed"] == []


def test_a_refused_reload_changes_nothing(tmp_path: Path) -> None:
    port, other = free_ports(2)
    path = write_config(tmp_path, service("shop", [SHOP], port, root="www"))

    with running(CORE, load_config(path)) as rt:
        path.write_text(
            path.read_text() + service("bad", ["x.example"], other, tls="maybe")
        )
        with pytest.raises(ArcError):
            rt.ask("Hyperion", "reload", {})
        after = get(port, SHOP)

    assert after[:2] == (200, b"shop home")


def test_a_reload_refuses_a_fallback_that_is_not_a_domain_and_keeps_the_old_one(
    tmp_path: Path,
) -> None:
    port = free_ports(1)[0]
    path = write_config(
        tmp_path,
        service("shop", [SHOP], port, root="www"),
        settings=f'tls_fallback = "{SHOP}"',
    )

    with running(CORE, load_config(path)) as rt:
        write_config(
            tmp_path,
            service("shop", [SHOP], port, root="www"),
            settings='tls_fallback = "not a domain"',
        )
        with pytest.raises(ConfigError) as caught:
            rt.ask("Hyperion", "reload", {})
        in_force = rt.config.arcology.tls_fallback

    assert "tls_fallback must be \"reject\" or a domain (got 'not a domain'" in (
        caught.value.message
    )
    assert in_force == SHOP


def test_services_lists_hosts_with_their_certificate_status(tmp_path: Path) -> None:
    plain, tls = free_ports(2)
    path = write_config(
        tmp_path,
        service(
            "shop",
            [SHOP, "new.example.com"],
            plain,
            tls="required",
            tlsPort=tls,
            root="www",
        ),
    )

    with running(CORE, load_config(path)) as rt:
        rt.ask("Cryptosaur", "setCertificate", {"bundle": make_chain(SHOP).bundle()})
        listed = rt.ask("Hyperion", "services", {})

    assert len(listed) == 1
    entry = listed[0]
    assert (entry["name"], entry["tls"], entry["port"], entry["tlsPort"]) == (
        "shop",
        "required",
        plain,
        tls,
    )
    shop, new = entry["hosts"]
    assert (
        shop["host"] == SHOP and shop["certificate"] == "ok" and shop["days_left"] > 30
    )
    assert new == {
        "host": "new.example.com",
        "certificate": "missing",
        "days_left": None,
    }


def test_local_ca_serves_localhost_over_tls_trusted_by_the_ca_file(
    tmp_path: Path, logs: list[Any]
) -> None:
    plain, tls = free_ports(2)
    path = write_config(
        tmp_path,
        service(
            "welcome", ["localhost"], plain, tls="optional", tlsPort=tls, root="www"
        ),
        local_ca=True,
    )

    with running(CORE, load_config(path)):
        ctx = ssl.create_default_context(cafile=str(tmp_path / "data" / "ca.pem"))
        status, body, _ = get(tls, "localhost", ctx)

    assert (status, body) == (200, b"shop home")
    assert lines(logs, "ERROR", "has no certificate") == []
    assert lines(logs, "INFO", "for development only")


def test_an_app_service_runs_its_lifespan_and_is_served(tmp_path: Path) -> None:
    (tmp_path / "arc_hyperion_testapp.py").write_text(
        "from contextlib import asynccontextmanager\n"
        "from starlette.applications import Starlette\n"
        "from starlette.responses import PlainTextResponse\n"
        "from starlette.routing import Route\n\n"
        "@asynccontextmanager\n"
        "async def lifespan(app):\n"
        "    yield {'word': 'started'}\n\n"
        "async def home(request):\n"
        "    return PlainTextResponse(request.state.word)\n\n"
        "app = Starlette(routes=[Route('/', home)], lifespan=lifespan)\n"
    )
    (port,) = free_ports(1)
    path = write_config(
        tmp_path, service("app", [SHOP], port, app="arc_hyperion_testapp:app")
    )

    with running(CORE, load_config(path)):
        status, body, _ = get(port, SHOP)

    assert (status, body) == (200, b"started")


def test_a_restart_after_a_crash_keeps_what_the_last_reload_installed(
    tmp_path: Path,
) -> None:
    first, second = free_ports(2)
    path = write_config(tmp_path, service("shop", [SHOP], first, root="www"))

    with running(CORE, load_config(path)) as rt:
        write_config(
            tmp_path, service("blog", ["blog.example.com"], second, root="www")
        )
        rt.ask("Hyperion", "reload", {})
        restarts = rt.status()["actors"]
        before = next(a["restarts"] for a in restarts if a["name"] == "Hyperion")
        # A malformed announcement crashes the handler; the runtime restarts it.
        rt.announce("Cryptosaur.certificateChanged", ["not", "a", "map"])

        def restarted() -> bool:
            actors = rt.status()["actors"]
            entry = next(a for a in actors if a["name"] == "Hyperion")
            return bool(entry["restarts"] > before and entry["state"] == "running")

        assert eventually(restarted, 10.0)
        names = [s["name"] for s in rt.ask("Hyperion", "services", {})]
        answer = get(second, "blog.example.com")

    assert names == ["blog"]
    assert answer[:2] == (200, b"shop home")


def test_contexts_of_tls_hosts_are_built_at_start_before_any_handshake(
    tmp_path: Path,
) -> None:
    plain, tls = free_ports(2)
    path = write_config(
        tmp_path,
        service("shop", [SHOP], plain, tls="required", tlsPort=tls, root="www"),
    )
    config = load_config(path)
    chain = make_chain(SHOP)
    with running([Cryptosaur], config) as rt:
        rt.ask("Cryptosaur", "setCertificate", {"bundle": chain.bundle()})

    with running(CORE, config) as rt:

        def cache() -> dict[str, int]:
            counters: dict[str, int] = rt.ask("Esper", "status", {})["cache"]
            return counters

        warmed = eventually(lambda: cache()["size"] == 1)
        before = cache()
        status, body, _answer = get(tls, SHOP, chain.client_context())
        after = cache()

    assert warmed
    assert (status, body) == (200, b"shop home")
    assert after["misses"] == before["misses"]
    assert after["hits"] == before["hits"] + 1


def test_reload_puts_live_settings_in_force_and_names_those_needing_a_restart(
    tmp_path: Path, logs: list[Any]
) -> None:
    plain, tls = free_ports(2)
    shop = service("shop", [SHOP], plain, tls="optional", tlsPort=tls, root="www")
    path = write_config(tmp_path, shop)
    chain = make_chain(SHOP)
    ctx = ssl.create_default_context(cadata=chain.root_pem.decode())
    unknown = ssl.create_default_context(cadata=chain.root_pem.decode())
    unknown.check_hostname = False

    with running(CORE, load_config(path)) as rt:
        rt.ask("Cryptosaur", "setCertificate", {"bundle": chain.bundle()})
        before = (get(tls, SHOP, ctx)[2].getheader("strict-transport-security"),)
        write_config(
            tmp_path,
            shop,
            settings='hsts = "max-age=60"\n'
            f'tls_fallback = "{SHOP}"\n'
            "max_body_bytes = 1000\n"
            'admin = "127.0.0.1:17399"\n',
        )

        summary = rt.ask("Hyperion", "reload", {})

        hsts = get(tls, SHOP, ctx)[2].getheader("strict-transport-security")
        # An unknown name now gets the fallback's certificate.
        with socket.create_connection(("127.0.0.1", tls), timeout=5) as raw:
            with unknown.wrap_socket(raw, server_hostname="other.example") as conn:
                fallback_cn = peer_common_name(conn)
        big = http.client.HTTPConnection("127.0.0.1", plain, timeout=5)
        big.request("POST", "/", body=b"x" * 2000, headers={"Host": SHOP})
        too_big = big.getresponse().status
        big.close()

    assert before == ("max-age=31536000",)
    assert summary["applied"] == ["tls_fallback", "hsts", "max_body_bytes"]
    assert summary["restart_needed"] == ["admin"]
    assert hsts == "max-age=60"
    assert fallback_cn == SHOP
    assert too_big == 413
    assert any(
        r["level"].name == "WARNING"
        and "after a restart settings=admin" in r["message"]
        for r in logs
    )


def test_a_websocket_over_tls_passes_through_esper_to_the_app(tmp_path: Path) -> None:
    (tmp_path / "arc_hyperion_wsapp.py").write_text(
        "from starlette.applications import Starlette\n"
        "from starlette.routing import WebSocketRoute\n\n"
        "async def shout(ws):\n"
        "    await ws.accept()\n"
        "    await ws.send_text((await ws.receive_text()).upper())\n"
        "    await ws.close()\n\n"
        "app = Starlette(routes=[WebSocketRoute('/shout', shout)])\n"
    )
    plain, tls = free_ports(2)
    path = write_config(
        tmp_path,
        service(
            "ws",
            [SHOP],
            plain,
            tls="optional",
            tlsPort=tls,
            app="arc_hyperion_wsapp:app",
        ),
    )
    chain = make_chain(SHOP)
    ctx = ssl.create_default_context(cadata=chain.root_pem.decode())

    with running(CORE, load_config(path)) as rt:
        rt.ask("Cryptosaur", "setCertificate", {"bundle": chain.bundle()})
        sock = socket.create_connection(("127.0.0.1", tls), timeout=5)
        with connect(
            f"wss://{SHOP}:{tls}/shout", sock=sock, ssl=ctx, open_timeout=5
        ) as ws:
            ws.send("quiet please")
            answer = ws.recv()

    assert answer == "QUIET PLEASE"
