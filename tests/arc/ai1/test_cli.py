"""Tests for arc/ai1/cli.py: one-shot commands against a real admin channel."""

from __future__ import annotations

import datetime as dt
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from actors.ai1 import AI1
from actors.cryptosaur import Cryptosaur
from arc.ai1 import render
from arc.ai1.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    call_payload,
    main,
)
from arc.config import Config
from arc.errors import BadInput
from arc.testing import running
from tests.certs import make_chain


@dataclass
class Server:
    port: int
    token_file: Path
    config: Config

    def args(self, *more: str) -> list[str]:
        return [
            "--admin",
            f"127.0.0.1:{self.port}",
            "--token-file",
            str(self.token_file),
            *more,
        ]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    config = Config.embedded(data_dir=tmp_path / "data").with_settings(
        admin=("127.0.0.1", 0)
    )
    with running([Cryptosaur, AI1], config) as rt:
        port = int(rt.ask("AI1", "status", {})["admin"]["address"].rpartition(":")[2])
        yield Server(port, config.arcology.token_file, config)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_bundle(folder: Path, *domains: str, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{domains[0].replace('*', 'star')}.pem")
    path.write_bytes(make_chain(*domains).bundle())
    return path


def test_upload_list_show_and_delete_round_trip(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = write_bundle(tmp_path / "in", "shop.example.com", "www.shop.example.com")

    code, out, err = run(capsys, *server.args("upload", str(bundle)))
    assert (code, err) == (EXIT_OK, "")
    assert out.startswith(f"ok    {bundle}  shop.example.com (+1)  EC P-256  until ")
    assert "1 of 1 bundle uploaded in" in out

    code, out, _ = run(capsys, *server.args("list"))
    assert code == EXIT_OK
    assert out.splitlines()[0].split() == [
        "DOMAIN",
        "LEFT",
        "NOT",
        "AFTER",
        "KEY",
        "FINGERPRINT",
        "ISSUER",
    ]
    assert "shop.example.com" in out and "www.shop.example.com" in out

    code, out, _ = run(capsys, *server.args("show", "www.shop.example.com"))
    assert code == EXIT_OK
    assert "chain        2 certificate(s)" in out
    assert "Arcology Test Intermediate 1" in out
    assert "PRIVATE KEY" not in out

    code, out, _ = run(capsys, *server.args("delete", "shop.example.com"))
    assert code == EXIT_OK
    assert out.strip() == "deleted shop.example.com, www.shop.example.com"

    code, out, _ = run(capsys, *server.args("list", "--json"))
    assert (code, json.loads(out)) == (EXIT_OK, [])


def test_list_json_has_the_documented_stable_fields(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = make_chain("a.example")
    path = tmp_path / "a.pem"
    path.write_bytes(chain.bundle())
    run(capsys, *server.args("upload", str(path)))

    code, out, _ = run(capsys, *server.args("list", "--json"))

    (row,) = json.loads(out)
    assert code == EXIT_OK
    assert list(row) == list(render.LIST_FIELDS)
    assert row["domain"] == "a.example"
    assert row["fingerprint"] == chain.fingerprint
    assert row["key_type"] == "EC P-256"
    assert row["issuer"] == "CN=Arcology Test Intermediate 1"
    assert row["days_left"] in (88, 89)
    assert dt.datetime.strptime(row["not_after"], "%Y-%m-%dT%H:%M:%SZ")


def test_show_json_has_the_chain_and_never_a_key(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, *server.args("upload", str(write_bundle(tmp_path, "b.example"))))

    code, out, _ = run(capsys, *server.args("show", "b.example", "--json"))

    shown = json.loads(out)
    assert code == EXIT_OK
    assert list(shown) == list(render.SHOW_FIELDS)
    assert [c["subject"] for c in shown["chain"]] == [
        "CN=b.example",
        "CN=Arcology Test Intermediate 1",
    ]
    assert "PRIVATE" not in out


def test_a_folder_uploads_every_pem_and_reports_each_refusal(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "bundles"
    for i in range(5):
        write_bundle(folder, f"d{i}.example")
    (folder / "broken.pem").write_text("not a bundle\n")
    (folder / "notes.txt").write_text("ignored")

    code, out, err = run(capsys, *server.args("upload", str(folder)))

    lines = out.splitlines()
    assert code == EXIT_FAILED
    assert sum(line.startswith("ok    ") for line in lines) == 5
    assert [line for line in lines if line.startswith("FAIL")] == [
        f"FAIL  {folder / 'broken.pem'}  bundle: not PEM; expected "
        "-----BEGIN CERTIFICATE----- blocks and one private key"
    ]
    assert lines[-1].startswith("5 of 6 bundles uploaded, 1 refused in ")
    assert err == "ai1: upload: 1 of 6 bundles refused\n"


def test_upload_for_a_domain_the_leaf_does_not_cover_is_refused(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_bundle(tmp_path, "c.example")

    code, out, err = run(
        capsys, *server.args("upload", str(path), "--domain", "other.example")
    )

    assert code == EXIT_FAILED
    assert "FAIL" in out and "other.example" in out
    assert err.count("\n") == 1


def test_an_encrypted_key_uploads_with_its_passphrase_file(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = make_chain("locked.example")
    path = tmp_path / "locked.pem"
    path.write_bytes(chain.chain_pem + chain.key_pem_encrypted(b"s3cret"))
    secret = tmp_path / "pass.txt"
    secret.write_text("s3cret\n")

    refused, _, _ = run(capsys, *server.args("upload", str(path)))
    code, out, _ = run(
        capsys, *server.args("upload", str(path), "--passphrase-file", str(secret))
    )

    assert refused == EXIT_FAILED
    assert code == EXIT_OK
    assert "locked.example" in out


def test_a_missing_path_is_reported_and_the_rest_still_uploads(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_bundle(tmp_path, "e.example")

    code, out, err = run(
        capsys, *server.args("upload", str(tmp_path / "nope.pem"), str(good))
    )

    assert code == EXIT_FAILED
    assert f"FAIL  {tmp_path / 'nope.pem'}  " in out
    assert "ok    " in out
    assert err == "ai1: upload: 1 of 2 bundles refused\n"


def test_check_validates_locally_with_the_upload_messages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_bundle(tmp_path, "f.example")
    bad = tmp_path / "bad.pem"
    bad.write_bytes(make_chain("g.example").chain_pem)

    ok_code, ok_out, _ = run(capsys, "--admin", "127.0.0.1:1", "check", str(good))
    bad_code, bad_out, bad_err = run(capsys, "check", str(bad))
    json_code, json_out, _ = run(capsys, "check", str(good), "--json")

    assert ok_code == EXIT_OK
    assert ok_out.startswith(f"ok    {good}  f.example  EC P-256")
    assert bad_code == EXIT_FAILED
    assert bad_out == ""
    assert bad_err.startswith("ai1: bundle: ")
    assert bad_err.count("\n") == 1
    assert json_code == EXIT_OK
    checked = json.loads(json_out)
    assert checked["domain"] == "f.example"
    assert checked["stored_at"] is None
    assert [c["subject"] for c in checked["chain"]] == [
        "CN=f.example",
        "CN=Arcology Test Intermediate 1",
    ]


def test_status_reports_uptime_actors_and_the_admin_channel(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, *server.args("status", "--json"))
    human_code, human, _ = run(capsys, *server.args("status"))

    status = json.loads(out)
    assert code == human_code == EXIT_OK
    assert [a["name"] for a in status["actors"]] == ["Cryptosaur", "AI1"]
    assert status["admin"]["address"] == f"127.0.0.1:{server.port}"
    assert status["listeners"] is None
    assert "Esper" in status["esper_error"]
    assert human.startswith("up ")
    assert "Cryptosaur  running" in human


def test_call_forwards_any_verb_and_prints_json(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_bundle(tmp_path, "h.example")

    code, out, _ = run(
        capsys, *server.args("call", "Cryptosaur.setCertificate", f"bundle=@{path}")
    )
    list_code, list_out, _ = run(
        capsys, *server.args("call", "Cryptosaur.listCertificates")
    )

    assert code == list_code == EXIT_OK
    assert json.loads(out)["domain"] == "h.example"
    assert [r["domain"] for r in json.loads(list_out)] == ["h.example"]


def test_call_of_get_certificate_is_refused_in_one_line(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, *server.args("call", "Cryptosaur.getCertificate", "domain=h.example")
    )

    assert code == EXIT_FAILED
    assert out == ""
    assert err.startswith("ai1: Cryptosaur.getCertificate is not served")
    assert err.count("\n") == 1


def test_an_unknown_domain_is_one_line_and_exit_1(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, *server.args("show", "nowhere.example"))

    assert (code, out) == (EXIT_FAILED, "")
    assert err.startswith("ai1: no certificate for nowhere.example")


def test_nothing_listening_is_exit_3_with_the_documented_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    code, out, err = run(capsys, "--admin", f"127.0.0.1:{port}", "list")

    assert (code, out) == (EXIT_UNREACHABLE, "")
    assert err == (
        f"ai1: cannot reach the admin channel at 127.0.0.1:{port} "
        "(connection refused); is arcology running?\n"
    )


def test_a_wrong_token_names_the_token_file(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token\n")

    code, _, err = run(
        capsys,
        "--admin",
        f"127.0.0.1:{server.port}",
        "--token-file",
        str(wrong),
        "list",
    )

    assert code == EXIT_FAILED
    assert f"refused the token in {wrong}" in err
    assert "not-the-token" not in err
    assert err.count("\n") == 1


def test_a_missing_token_file_is_named(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys,
        "--admin",
        f"127.0.0.1:{server.port}",
        "--token-file",
        str(tmp_path / "none"),
        "list",
    )

    assert code == EXIT_FAILED
    assert f"token file {tmp_path / 'none'}: no such file" in err


def test_the_config_file_finds_the_server_and_its_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    toml = tmp_path / "arcology.toml"
    toml.write_text(f'[arcology]\ndata_dir = "state"\nadmin = "127.0.0.1:{port}"\n')
    from arc.config import load_config

    with running([Cryptosaur, AI1], load_config(toml)):
        code, out, _ = run(capsys, "--config", str(toml), "list", "--json")

    assert (code, json.loads(out)) == (EXIT_OK, [])


def test_tls_to_the_admin_channel_trusts_the_configured_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    chain = make_chain("admin.example")
    (tmp_path / "admin.pem").write_bytes(chain.bundle())
    (tmp_path / "root.pem").write_bytes(chain.root_pem)
    toml = tmp_path / "arcology.toml"
    toml.write_text(
        f'[arcology]\ndata_dir = "state"\nadmin = "127.0.0.1:{port}"\n'
        'admin_tls_cert = "admin.pem"\n'
    )
    from arc.config import load_config

    with running([Cryptosaur, AI1], load_config(toml)):
        pinned, _, _ = run(capsys, "--config", str(toml), "list")
        token = str(tmp_path / "state" / "admin.token")
        by_ca, _, _ = run(
            capsys,
            "--admin",
            f"127.0.0.1:{port}",
            "--token-file",
            token,
            "--admin-ca",
            str(tmp_path / "root.pem"),
            "--admin-name",
            "admin.example",
            "list",
        )
        plain_code, _, plain_err = run(
            capsys, "--admin", f"127.0.0.1:{port}", "--token-file", token, "list"
        )

    assert pinned == by_ca == EXIT_OK
    assert plain_code == EXIT_UNREACHABLE
    assert plain_err.count("\n") == 1


def test_a_wrong_command_line_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "upload")

    assert code == EXIT_USAGE
    assert err.startswith("ai1 upload: the following arguments are required")


def test_a_broken_config_file_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "arcology.toml"
    toml.write_text("[arcology]\nadmin = 'nowhere'\n")

    code, _, err = run(capsys, "--config", str(toml), "list")

    assert code == EXIT_USAGE
    assert "admin must be" in err


def test_call_arguments_are_json_or_key_value_pairs(tmp_path: Path) -> None:
    file = tmp_path / "x.pem"
    file.write_bytes(b"PEM")

    assert call_payload([]) == {}
    assert call_payload(['{"domain": "a.example"}']) == {"domain": "a.example"}
    assert call_payload(["domain=a.example", "n=3", f"b=@{file}"]) == {
        "domain": "a.example",
        "n": 3,
        "b": b"PEM",
    }
    with pytest.raises(BadInput, match="key=value"):
        call_payload(["a=1", "b"])
