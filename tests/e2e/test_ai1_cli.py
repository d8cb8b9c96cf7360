"""End to end: the ``ai1`` tool against a real ``arcology run`` process.

Every command runs in both forms, one-shot and in the interactive session
(driven through a pseudo-terminal); hostile clients must leave the channel
serving; a restart of the server under an open session is survived.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from arc.messages import MAX_MESSAGE_BYTES
from arc.wire import answer_decoder, frame, request_frame
from tests.certs import make_chain
from tests.e2e.server import ArcologyProcess, free_port, run_ai1

ROOT = Path(__file__).resolve().parents[2]


def config_text(admin_port: int, folder: Path) -> str:
    return (
        "[arcology]\n"
        'data_dir = "arc-data"\n'
        f'admin = "127.0.0.1:{admin_port}"\n'
        'bind = ["127.0.0.1"]\n'
        "\n[[services]]\n"
        'name = "shop"\n'
        'hosts = ["shop.example.com", "www.shop.example.com"]\n'
        f"port = {free_port()}\n"
        'tls = "optional"\n'
        f"tlsPort = {free_port()}\n"
        f'root = "{folder}"\n'
        "\n[[services]]\n"
        'name = "docs"\n'
        'hosts = ["docs.example"]\n'
        f"port = {free_port()}\n"
        'tls = "none"\n'
        f'root = "{folder}"\n'
    )


class Arcology:
    """A running server and how to call ``ai1`` against it."""

    def __init__(self, folder: Path, admin_port: int | None = None) -> None:
        self.folder = folder
        self.admin_port = admin_port or free_port()
        self.process = ArcologyProcess(folder, config_text(self.admin_port, folder))
        assert self.process.config_path is not None
        self.config = self.process.config_path

    def start(self) -> Arcology:
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()

    @property
    def token_file(self) -> Path:
        return self.folder / "arc-data" / "admin.token"

    def ai1(self, *args: str, config: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["--config", str(self.config)] if config else []
        return run_ai1(self.folder, *prefix, *args)


@pytest.fixture(scope="module")
def arcology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arcology]:
    server = Arcology(tmp_path_factory.mktemp("arcology")).start()
    try:
        yield server
    finally:
        server.stop()


def bundle_file(folder: Path, *domains: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{domains[0]}.pem"
    path.write_bytes(make_chain(*domains).bundle())
    return path


# -- the pseudo-terminal --------------------------------------------------------


class Terminal:
    """``ai1`` with no command, on a pseudo-terminal, typed into like a person."""

    def __init__(self, args: list[str], cwd: Path, home: Path) -> None:
        master, slave = pty.openpty()
        env = {**os.environ, "TERM": "dumb", "INPUTRC": "/dev/null", "HOME": str(home)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "arc.ai1.cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.fd = master
        self.seen = ""
        self.closed = False

    def expect(self, pattern: str, timeout: float = 15.0) -> str:
        """Read until ``pattern`` (a regex) appears; return the text up to it."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            found = regex.search(self.seen)
            if found:
                before, self.seen = self.seen[: found.end()], self.seen[found.end() :]
                return before
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {pattern!r} in {self.seen!r}")
            ready, _, _ = select.select([self.fd], [], [], min(remaining, 0.2))
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"ai1 ended before {pattern!r}: {self.seen!r}")
                self.seen += data.decode("utf-8", "replace").replace("\r\n", "\n")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def command(self, line: str, timeout: float = 15.0) -> str:
        """Type a line; return what it printed (after the echo) before the prompt."""
        self.type(line + "\r")
        out = self.expect(r"ai1> ", timeout).removesuffix("ai1> ")
        return out.partition("\n")[2]

    def close(self) -> int:
        try:
            return self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)
        finally:
            if not self.closed:
                self.closed = True
                os.close(self.fd)


@pytest.fixture
def terminal_factory(tmp_path: Path) -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for terminal in opened:
        if terminal.process.poll() is None:
            terminal.process.send_signal(signal.SIGKILL)
        terminal.close()


def open_terminal(opened: list[Terminal], server: Arcology, home: Path) -> Terminal:
    terminal = Terminal(["--config", str(server.config)], server.folder, home)
    opened.append(terminal)
    terminal.expect(r"ai1> ")
    return terminal


# -- one-shot commands ----------------------------------------------------------


def test_every_one_shot_command_against_a_running_arcology(
    arcology: Arcology, tmp_path: Path
) -> None:
    folder = tmp_path / "bundles"
    bundle_file(folder, "shop.example.com", "www.shop.example.com")
    bundle_file(folder, "one.example")
    single = bundle_file(tmp_path, "two.example")

    check = arcology.ai1("check", str(single))
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith(f"ok    {single}  two.example")

    upload = arcology.ai1("upload", str(folder), str(single))
    assert upload.returncode == 0, upload.stderr
    assert "3 of 3 bundles uploaded" in upload.stdout

    listed = arcology.ai1("list", "--json")
    assert listed.returncode == 0
    assert [r["domain"] for r in json.loads(listed.stdout)] == [
        "one.example",
        "shop.example.com",
        "two.example",
        "www.shop.example.com",
    ]
    assert "shop.example.com" in arcology.ai1("list").stdout

    show = arcology.ai1("show", "www.shop.example.com", "--json")
    assert json.loads(show.stdout)["domains"] == [
        "shop.example.com",
        "www.shop.example.com",
    ]
    assert "chain        2 certificate(s)" in arcology.ai1("show", "one.example").stdout

    services = json.loads(arcology.ai1("services", "--json").stdout)
    assert [(s["name"], [h["certificate"] for h in s["hosts"]]) for s in services] == [
        ("shop", ["ok", "ok"]),
        ("docs", ["missing"]),
    ]
    assert "www.shop.example.com" in arcology.ai1("services").stdout

    status = json.loads(arcology.ai1("status", "--json").stdout)
    assert [a["name"] for a in status["actors"]] == [
        "Cryptosaur",
        "Esper",
        "Hyperion",
        "AI1",
    ]
    assert len(status["listeners"]) == 3
    assert status["cache"] is not None
    assert arcology.ai1("status").stdout.startswith("up ")

    reload = arcology.ai1("reload")
    assert reload.returncode == 0, reload.stderr
    assert reload.stdout.startswith("reloaded: ")

    call = arcology.ai1("call", "Cryptosaur.showCertificate", "domain=two.example")
    assert json.loads(call.stdout)["domain"] == "two.example"

    delete = arcology.ai1("delete", "two.example")
    assert (delete.returncode, delete.stdout) == (0, "deleted two.example\n")
    gone = arcology.ai1("show", "two.example")
    assert gone.returncode == 1
    assert gone.stderr.startswith("ai1: no certificate for two.example")


def test_private_keys_never_come_out_of_the_admin_channel(arcology: Arcology) -> None:
    bundle_file(arcology.folder / "keys", "secret.example")
    arcology.ai1("upload", str(arcology.folder / "keys"))

    refused = arcology.ai1("call", "Cryptosaur.getCertificate", "domain=secret.example")

    assert refused.returncode == 1
    assert "private keys never leave" in refused.stderr
    assert "PRIVATE KEY" not in refused.stdout + refused.stderr


def test_a_stopped_server_is_reported_in_one_line(tmp_path: Path) -> None:
    server = Arcology(tmp_path)

    result = server.ai1("list")

    assert result.returncode == 3
    assert result.stderr == (
        f"ai1: cannot reach the admin channel at 127.0.0.1:{server.admin_port} "
        "(connection refused); is arcology running?\n"
    )


# -- hostile clients -----------------------------------------------------------------


def exchange(port: int, data: bytes, wait_s: float = 5.0) -> list[object]:
    """Send raw bytes; collect the answers until the server closes."""
    decoder = answer_decoder()
    answers: list[object] = []
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return answers
            answers += [a.error.kind if a.error else a.ok for a in decoder.feed(chunk)]
    raise AssertionError(f"the server kept the connection open; answers {answers}")


def test_hostile_clients_are_refused_and_list_still_works(
    arcology: Arcology, tmp_path: Path
) -> None:
    port = arcology.admin_port
    token = arcology.token_file.read_text().strip()
    auth = request_frame("AI1.authenticate", {"token": token}, 1)
    wrong_shape = frame(msgpack.packb({"verb": "Cryptosaur.listCertificates", "x": 1}))

    wrong_token = exchange(port, request_frame("AI1.authenticate", {"token": "no"}, 1))
    no_token = exchange(port, request_frame("Cryptosaur.listCertificates", {}, 1))
    random_bytes = exchange(port, os.urandom(64) + b"\x00\x00\x00\x03abc")
    oversized = exchange(port, auth + struct.pack(">I", MAX_MESSAGE_BYTES + 1))
    shape = exchange(port, auth + wrong_shape)
    wrong_file = tmp_path / "wrong.token"
    wrong_file.write_text("nope\n")
    by_tool = arcology.ai1(
        "--admin",
        f"127.0.0.1:{port}",
        "--token-file",
        str(wrong_file),
        "list",
        config=False,
    )
    listed = arcology.ai1("list", "--json")

    assert wrong_token == ["unauthorized"]
    assert no_token == ["unauthorized"]
    assert random_bytes and random_bytes[-1] == "bad_input"
    assert oversized == [{"authenticated": True}, "bad_input"]
    assert shape == [{"authenticated": True}, "bad_input"]
    assert by_tool.returncode == 1
    assert f"refused the token in {wrong_file}" in by_tool.stderr
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), list)
    log = arcology.process.log()
    assert "admin authentication refused" in log
    assert token not in log and "nope" not in log


# -- the interactive session ---------------------------------------------------------


def test_every_command_in_the_interactive_session(
    arcology: Arcology, tmp_path: Path, terminal_factory: list[Terminal]
) -> None:
    folder = tmp_path / "repl"
    bundle = bundle_file(folder, "repl.example")
    terminal = open_terminal(terminal_factory, arcology, tmp_path)

    assert "upload" in terminal.command("help")
    assert "--passphrase-file" in terminal.command("help upload")
    assert f"ok    {bundle}  repl.example" in terminal.command(f"upload {bundle}")
    assert "ok    " in terminal.command(f"check {bundle}")
    assert "repl.example" in terminal.command("list")
    assert json.loads(terminal.command("list --json").strip())
    assert "chain        2 certificate(s)" in terminal.command("show repl.example")
    assert json.loads(terminal.command("show repl.example --json"))["domain"] == (
        "repl.example"
    )
    assert "docs.example" in terminal.command("services")
    assert json.loads(terminal.command("services --json"))[0]["name"] == "shop"
    assert "ACTOR" in terminal.command("status")
    assert json.loads(terminal.command("status --json"))["admin"]["tls"] is False
    assert "reloaded: " in terminal.command("reload")
    assert '"domain": "repl.example"' in terminal.command(
        "call Cryptosaur.showCertificate domain=repl.example"
    )
    assert "ai1: no certificate for nowhere.example" in terminal.command(
        "show nowhere.example"
    )
    assert "invalid choice" in terminal.command("frobnicate")
    assert "deleted repl.example" in terminal.command("delete repl.example")
    terminal.type("exit\r")

    assert terminal.close() == 0
    history = (tmp_path / ".ai1_history").read_text()
    assert "upload " in history and "delete repl.example" in history


def test_tab_completes_commands_domains_and_paths(
    arcology: Arcology, tmp_path: Path, terminal_factory: list[Terminal]
) -> None:
    folder = tmp_path / "completion"
    bundle_file(folder, "tabbed.example")
    terminal = open_terminal(terminal_factory, arcology, tmp_path)
    terminal.command(f"upload {folder}")

    terminal.type("sho\t")
    terminal.expect(r"show $")
    terminal.type("tab\t")
    terminal.expect(r"tabbed\.example $")
    shown = terminal.command("")
    terminal.type(f"check {folder}/tab\t")
    terminal.expect(r"tabbed\.example\.pem $")
    checked = terminal.command("")
    terminal.type("\x04")  # Ctrl-D

    assert "CN=tabbed.example" in shown
    assert "ok    " in checked
    assert terminal.close() == 0


def test_a_restart_under_an_open_session_is_reported_then_survived(
    tmp_path: Path, terminal_factory: list[Terminal]
) -> None:
    server = Arcology(tmp_path / "server").start()
    try:
        terminal = open_terminal(terminal_factory, server, tmp_path)
        assert "no certificates stored" in terminal.command("list")

        server.stop()
        down = terminal.command("list")
        server = Arcology(tmp_path / "server", server.admin_port).start()
        back = terminal.command("list")
        terminal.type("exit\r")
        code = terminal.close()
    finally:
        server.stop()

    assert "was lost; reconnecting" in down
    assert f"cannot reach the admin channel at 127.0.0.1:{server.admin_port}" in down
    assert "no certificates stored" in back
    assert code == 0
