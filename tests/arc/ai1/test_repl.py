"""Tests for arc/ai1/repl.py: lines, completion, reconnection."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.ai1 import AI1
from actors.cryptosaur import Cryptosaur
from arc.ai1.cli import Session, build_parser
from arc.ai1.repl import Completer, complete_path, run_line, run_repl
from arc.config import Config
from arc.errors import Unauthorized
from arc.testing import running
from tests.certs import make_chain


def session_for(
    port: int, token_file: Path
) -> tuple[Session, io.StringIO, io.StringIO]:
    args = build_parser().parse_args(
        ["--admin", f"127.0.0.1:{port}", "--token-file", str(token_file)]
    )
    out, err = io.StringIO(), io.StringIO()
    return Session(args, out=out, err=err, interactive=True), out, err


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config.embedded(data_dir=tmp_path / "data").with_settings(
        admin=("127.0.0.1", 0)
    )


@pytest.fixture
def served(config: Config) -> Iterator[int]:
    with running([Cryptosaur, AI1], config) as rt:
        yield int(rt.ask("AI1", "status", {})["admin"]["address"].rpartition(":")[2])


def test_commands_and_session_words_complete_at_the_start(tmp_path: Path) -> None:
    completer = Completer(lambda: [])

    assert completer.candidates("", 0, "")[:3] == ["upload ", "check ", "delete "]
    assert completer.candidates("s", 0, "s") == ["show ", "services ", "status "]
    assert completer.candidates("ex", 0, "ex") == ["exit "]
    assert completer.candidates("help de", 5, "de") == ["delete "]


def test_options_complete_for_their_command() -> None:
    completer = Completer(lambda: [])

    assert completer.candidates("upload --p", 7, "--p") == ["--passphrase-file "]
    assert completer.candidates("list --", 5, "--") == ["--help ", "--json "]


def test_domains_complete_after_show_delete_and_domain() -> None:
    completer = Completer(lambda: ["a.example", "b.example", "*.a.example"])

    assert completer.candidates("show a", 5, "a") == ["a.example "]
    assert completer.candidates("delete ", 7, "") == [
        "a.example ",
        "b.example ",
        "*.a.example ",
    ]
    assert completer.candidates("upload x.pem --domain b", 22, "b") == ["b.example "]
    assert completer.candidates("show a.example a", 15, "a") == []


def test_an_unreachable_server_means_no_domain_completions() -> None:
    def refuse() -> list[str]:
        raise Unauthorized("no")

    assert Completer(refuse).candidates("show ", 5, "") == []


def test_paths_complete_after_upload_check_and_the_passphrase_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "cert.pem").write_text("x")
    completer = Completer(lambda: [])
    prefix = f"{tmp_path}/cer"

    assert completer.candidates(f"upload {prefix}", 7, prefix) == [
        f"{tmp_path}/cert.pem ",
        f"{tmp_path}/certs/",
    ]
    assert completer.candidates(f"upload x --passphrase-file {prefix}", 27, prefix)
    assert complete_path(f"{tmp_path}/none") == []


def test_a_line_runs_its_command_and_errors_keep_the_session(
    served: int, config: Config, tmp_path: Path
) -> None:
    session, out, err = session_for(served, config.arcology.token_file)
    bundle = tmp_path / "r.pem"
    bundle.write_bytes(make_chain("r.example").bundle())

    assert run_line(session, f"upload '{bundle}'")
    assert run_line(session, "show nowhere.example")
    assert run_line(session, "list --bogus")
    assert run_line(session, 'call "unbalanced')
    assert run_line(session, "")
    assert run_line(session, "help")
    assert not run_line(session, "exit")
    session.close()

    assert "ok    " in out.getvalue()
    assert "r.example" in session.domains()
    assert "commands (help COMMAND for its options):" in out.getvalue()
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("ai1: no certificate for nowhere.example")
    assert lines[1] == "ai1: unrecognized arguments: --bogus"
    assert lines[2].startswith("ai1: cannot split the line")


def test_a_line_cannot_change_where_the_session_points(
    served: int, config: Config
) -> None:
    session, out, err = session_for(served, config.arcology.token_file)

    run_line(session, "--admin 127.0.0.1:1 list")
    session.close()

    assert err.getvalue() == ""
    assert "no certificates stored" in out.getvalue()


def test_the_session_reconnects_after_the_server_closed_the_connection(
    served: int, config: Config
) -> None:
    session, out, err = session_for(served, config.arcology.token_file)
    run_line(session, "list")
    client = session.client()
    assert client._sock is not None
    client._sock.shutdown(2)  # as if the server had closed it

    run_line(session, "list")
    session.close()

    assert "was lost; reconnecting" in err.getvalue()
    assert out.getvalue().count("no certificates stored") == 2


def test_the_session_ends_at_end_of_input_and_saves_history(
    served: int, config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    session, out, _ = session_for(served, config.arcology.token_file)
    lines = iter(["list"])

    def read(prompt: str) -> str:
        import readline

        line = next(lines, None)
        if line is None:
            raise EOFError
        readline.add_history(line)
        return line

    code = run_repl(session, read)
    session.close()

    assert code == 0
    assert "admin session with 127.0.0.1" in out.getvalue()
    assert (tmp_path / ".ai1_history").read_text().splitlines()[-1] == "list"
