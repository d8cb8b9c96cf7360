"""The TLS port against Mozilla's "intermediate" profile, checked by sslyze.

sslyze connects as an auditor does: every protocol version, every cipher
suite, the key-exchange groups, compression, renegotiation, and the served
chain against the test root. ``scripts/test`` installs it in a venv of its
own (``ARC_SSLYZE`` names the program); without it the test is skipped, and
in CI it fails instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.certs import make_chain
from tests.e2e.server import ArcologyProcess, free_port, run_ai1, wait_port

SSLYZE_TIMEOUT_S = 300
REFUSED_VERSIONS = ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1")
SERVED_VERSIONS = ("tls_1_2", "tls_1_3")


def sslyze_program() -> str:
    program = os.environ.get("ARC_SSLYZE", "")
    if program and Path(program).is_file():
        return program
    reason = f"sslyze not installed (ARC_SSLYZE={program!r}); scripts/test installs it"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the TLS profile check: {reason}")
    pytest.skip(reason)


@pytest.mark.parametrize("key_type", ["EC P-256", "RSA 2048"])
def test_tls_port_complies_with_mozilla_intermediate_profile(
    tmp_path: Path, key_type: str
) -> None:
    sslyze = sslyze_program()
    admin_port, tls_port = free_port(), free_port()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("hello\n")
    server = ArcologyProcess(
        tmp_path,
        f"""
        [arcology]
        admin = "127.0.0.1:{admin_port}"
        bind = ["127.0.0.1"]

        [[services]]
        name = "shop"
        hosts = ["shop.example.com"]
        tls = "required"
        tlsPort = {tls_port}
        root = "site"
        """,
    )
    chain = make_chain("shop.example.com", key_type=key_type)
    (tmp_path / "shop.pem").write_bytes(chain.bundle())
    (tmp_path / "root.pem").write_bytes(chain.root_pem)
    report_file = tmp_path / "sslyze.json"

    with server:
        wait_port(tls_port)
        upload = run_ai1(tmp_path, "--config", "arcology.toml", "upload", "shop.pem")
        assert upload.returncode == 0, upload.stdout + upload.stderr
        scan = subprocess.run(
            [
                sslyze,
                "--mozilla_config=intermediate",
                "--certinfo_ca_file",
                str(tmp_path / "root.pem"),
                "--json_out",
                str(report_file),
                f"shop.example.com:{tls_port}{{127.0.0.1}}",
            ],
            capture_output=True,
            text=True,
            timeout=SSLYZE_TIMEOUT_S,
            check=False,
        )

    assert scan.returncode == 0, scan.stdout[-3000:] + scan.stderr[-3000:]
    assert f"shop.example.com:{tls_port}: OK - Compliant" in scan.stdout
    result = json.loads(report_file.read_text())["server_scan_results"][0]
    scans = result["scan_result"]
    accepted = {
        version: scans[f"{version}_cipher_suites"]["result"]["accepted_cipher_suites"]
        for version in REFUSED_VERSIONS + SERVED_VERSIONS
    }
    assert not any(accepted[version] for version in REFUSED_VERSIONS)
    assert all(accepted[version] for version in SERVED_VERSIONS)
    assert scans["tls_compression"]["result"]["supports_compression"] is False
    curves = scans["elliptic_curves"]["result"]["supported_curves"]
    assert sorted(c["name"] for c in curves) == ["X25519", "secp256r1", "secp384r1"]
