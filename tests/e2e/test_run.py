"""``arcology run`` and ``scripts/run`` as a new user meets them."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from arc.config import load_config
from arc.store import open_store
from tests.e2e.server import ArcologyProcess, free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]


def plain_config(tmp_path: Path, admin_port: int, http_port: int) -> str:
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "index.html").write_text("hello from the site\n")
    return f"""
        [arcology]
        admin = "127.0.0.1:{admin_port}"
        bind = ["127.0.0.1"]

        [[services]]
        name = "site"
        hosts = ["localhost", "127.0.0.1"]
        port = {http_port}
        root = "site"
        """


def test_embedded_defaults_serve_http_https_and_admin_and_ctrl_c_exits_0(
    tmp_path: Path,
) -> None:
    server = ArcologyProcess(tmp_path)

    with server:
        wait_port(8080)
        wait_port(8443)
        wait_port(7399)
        page = urllib.request.urlopen("http://localhost:8080/", timeout=5).read()
        trust = ssl.create_default_context(cafile=str(server.data_dir / "ca.pem"))
        secure = urllib.request.urlopen(
            "https://localhost:8443/", timeout=5, context=trust
        ).read()
        status = server.stop(signal.SIGINT)

    assert b"Arcology" in page
    assert secure == page
    assert status == 0
    assert "stopped" in server.log()
    assert "threads still running" not in server.log()


def refused_start(server: ArcologyProcess) -> tuple[int, list[str]]:
    """Run a start that should be refused; its status and its ERROR lines."""
    status = server.run_to_exit()
    errors = [line for line in server.lines if "ERROR" in line]
    assert "Traceback" not in server.log(), server.log()
    assert "actor crashed" not in server.log(), server.log()
    return status, errors


def test_a_store_that_cannot_be_reached_refuses_the_start_in_one_line(
    tmp_path: Path,
) -> None:
    config = plain_config(tmp_path, free_port(), free_port())
    nowhere = free_port()
    config = config.replace(
        "[arcology]\n",
        "[arcology]\n"
        f'store = "postgresql://arcology:secret@127.0.0.1:{nowhere}/arcology"\n',
    )
    server = ArcologyProcess(tmp_path, config)

    status, errors = refused_start(server)

    assert status == 1
    assert len(errors) == 1, server.log()
    assert (
        f"cannot start: certificate store 127.0.0.1:{nowhere}/arcology is "
        "unreachable (" in errors[0]
    )
    assert "secret" not in server.log()


@pytest.mark.parametrize(
    ("key_file", "reason"),
    [
        ("0" * 64 + "\n", "does not open this certificate store"),
        (None, "is missing, but the certificate store already holds keys"),
    ],
)
def test_a_wrong_or_missing_master_key_refuses_the_start_in_one_line(
    tmp_path: Path, key_file: str | None, reason: str
) -> None:
    server = ArcologyProcess(tmp_path, plain_config(tmp_path, free_port(), free_port()))
    assert server.config_path is not None
    settings = load_config(server.config_path).arcology
    open_store(settings).close()
    if key_file is None:
        settings.master_key_file.unlink()
    else:
        settings.master_key_file.write_text(key_file)

    status, errors = refused_start(server)

    assert status == 1
    assert len(errors) == 1, server.log()
    assert f"cannot start: master key file {settings.master_key_file} " in errors[0]
    assert reason in errors[0]


def test_sigterm_stops_every_actor_and_exits_0(tmp_path: Path) -> None:
    http_port, admin_port = free_port(), free_port()
    server = ArcologyProcess(
        tmp_path, plain_config(tmp_path, admin_port, http_port)
    ).start()
    wait_port(http_port)

    status = server.stop(signal.SIGTERM)

    assert status == 0
    log = server.log()
    assert "signal=SIGTERM" in log
    assert log.index("listener closed") < log.rindex("stopped")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", http_port), timeout=1)


def test_json_logs_are_one_object_per_line_without_the_admin_token(
    tmp_path: Path,
) -> None:
    http_port, admin_port = free_port(), free_port()
    server = ArcologyProcess(
        tmp_path,
        plain_config(tmp_path, admin_port, http_port),
        extra_args=("--log-format", "json"),
    )

    with server:
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=5).read()
        server.wait_for("access")
        server.stop()

    records = [json.loads(line) for line in server.lines if line.startswith("{")]
    assert records and len(records) == len(server.lines)
    messages = [r["record"]["message"] for r in records]
    assert any(m.startswith("running actors=") for m in messages)
    token = (server.data_dir / "admin.token").read_text().strip()
    assert token not in server.log()


def test_a_fresh_clone_starts_with_scripts_run(tmp_path: Path) -> None:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.fail("the fresh-clone test needs the project's git checkout")
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120
    )
    http_port, admin_port = free_port(), free_port()
    config = tmp_path / "arcology.toml"
    config.write_text(plain_config(tmp_path, admin_port, http_port))

    process = subprocess.Popen(
        [str(clone / "scripts" / "run"), "--config", str(config)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_port(http_port, timeout=300)
        page = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=5)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)

    assert page.read() == b"hello from the site\n"
    assert process.returncode == 0, output
    assert (clone / ".venv" / "bin" / "arcology").exists()


SLOW_APP = """
import asyncio

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await asyncio.sleep(float(scope["path"].strip("/") or "0"))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"finished"})
"""


def slow_app_config(tmp_path: Path, admin_port: int, http_port: int, grace: str) -> str:
    (tmp_path / "arc_slow_app.py").write_text(SLOW_APP)
    return f"""
        [arcology]
        admin = "127.0.0.1:{admin_port}"
        bind = ["127.0.0.1"]
        shutdown_grace_s = {grace}

        [[services]]
        name = "slow"
        hosts = ["localhost"]
        port = {http_port}
        app = "arc_slow_app:app"
        """


def get_later(port: int, path: str, answers: list[Any]) -> threading.Thread:
    def ask() -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", path, headers={"Host": "localhost"})
            response = conn.getresponse()
            answers.append((response.status, response.read()))
        except OSError as exc:
            answers.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    return thread


def test_sigterm_lets_a_request_in_progress_finish_and_closes_idle_connections(
    tmp_path: Path,
) -> None:
    http_port, admin_port = free_port(), free_port()
    server = ArcologyProcess(
        tmp_path, slow_app_config(tmp_path, admin_port, http_port, "10")
    ).start()
    wait_port(http_port)
    idle = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    idle.request("GET", "/0", headers={"Host": "localhost"})
    assert idle.getresponse().read() == b"finished"  # kept alive, now idle
    answers: list[Any] = []
    busy = get_later(http_port, "/1.5", answers)
    time.sleep(0.5)  # the slow request is in progress

    started = time.monotonic()
    status = server.stop(signal.SIGTERM)
    took = time.monotonic() - started
    busy.join(10)

    assert status == 0
    assert answers == [(200, b"finished")]
    assert took < 5.0
    log = server.log()
    assert "draining connections open=2" in log
    assert "connections drained" in log
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", http_port), timeout=1)


def test_a_request_longer_than_the_grace_period_is_cut(tmp_path: Path) -> None:
    http_port, admin_port = free_port(), free_port()
    server = ArcologyProcess(
        tmp_path, slow_app_config(tmp_path, admin_port, http_port, "0.5")
    ).start()
    wait_port(http_port)
    answers: list[Any] = []
    busy = get_later(http_port, "/30", answers)
    time.sleep(0.5)

    started = time.monotonic()
    status = server.stop(signal.SIGTERM)
    took = time.monotonic() - started
    busy.join(10)

    assert status == 0
    assert took < 5.0
    assert answers == [(503, b"503 service unavailable\n")]
    assert "connections cut after the grace period count=1" in server.log()
