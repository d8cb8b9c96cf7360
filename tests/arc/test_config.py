"""Configuration: defaults, parsing, and refusals that name file, entry, field."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from arc.config import LIVE_SETTINGS, Config, Settings, changed_settings, load_config
from arc.errors import ConfigError


def parse(text: str, tmp_path: Path) -> Config:
    path = tmp_path / "arcology.toml"
    path.write_text(text)
    return load_config(path)


def run_arcology(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "arc.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_embedded_defaults_serve_localhost_on_8080_and_8443(tmp_path: Path) -> None:
    config = Config.embedded(data_dir=tmp_path / "data")

    (welcome,) = config.services
    assert config.arcology.admin == ("127.0.0.1", 7399)
    assert config.arcology.local_ca is True
    assert (welcome.hosts, welcome.port, welcome.tls, welcome.tls_port) == (
        ("localhost",),
        8080,
        "optional",
        8443,
    )
    assert welcome.root is not None and (welcome.root / "index.html").is_file()
    assert config.arcology.token_file == tmp_path / "data" / "admin.token"


def test_a_full_file_is_read_with_paths_relative_to_its_folder(
    tmp_path: Path,
) -> None:
    (tmp_path / "site").mkdir()

    config = parse(
        """
        [arcology]
        data_dir = "state"
        admin = "127.0.0.1:7400"
        tls_fallback = "Default.Example.COM."
        bind = ["127.0.0.1"]

        [[services]]
        name = "shop"
        hosts = ["Shop.Example.com", "*.shop.example.com"]
        port = 8081
        tls = "required"
        tlsPort = 8444
        root = "site"

        [[services]]
        name = "api"
        hosts = ["api.example.com"]
        tls = "optional"
        app = "app:application"

        [plugins.metrics]
        listen = "127.0.0.1:9464"
        """,
        tmp_path,
    )

    shop, api = config.services
    assert config.arcology.data_dir == tmp_path / "state"
    assert config.arcology.admin == ("127.0.0.1", 7400)
    assert config.arcology.tls_fallback == "default.example.com"
    assert config.arcology.master_key_file == tmp_path / "state" / "master.key"
    assert shop.hosts == ("shop.example.com", "*.shop.example.com")
    assert (shop.port, shop.tls, shop.tls_port) == (8081, "required", 8444)
    assert shop.root == tmp_path / "site"
    assert (api.port, api.tls_port, api.app) == (None, 443, "app:application")
    assert config.plugins == {"metrics": {"listen": "127.0.0.1:9464"}}
    assert config.base_dir == tmp_path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[services]]\nname = "a"\nhosts = ["a.test"]\nport = 80\nroot = "."\n'
            '[[services]]\nname = "b"\nhosts = ["b.test"]\nport = 81\nroot = "."\n'
            '[[services]]\nname = "shop"\nhosts = ["s.test"]\ntls = "yes"\n'
            'root = "."\n',
            'arcology.toml: services[2] "shop": tls must be one of none, optional, '
            'required (got "yes")',
        ),
        (
            '[arcology]\ntls_fallbak = "x"\n',
            'arcology.toml: [arcology]: unknown field "tls_fallbak"',
        ),
        (
            '[arcology]\nadmin = "nowhere"\n',
            'arcology.toml: [arcology]: admin must be "HOST:PORT" (got "nowhere")',
        ),
        (
            '[arcology]\nadmin = "0.0.0.0:7399"\n',
            "admin listens on 0.0.0.0, which is not loopback",
        ),
        (
            '[[services]]\nname = "s"\nhosts = ["bad host"]\nport = 80\nroot = "."\n',
            "hosts holds 'bad host', which is not a host name",
        ),
        (
            '[[services]]\nname = "s"\nhosts = ["a.test"]\nport = 99999\nroot = "."\n',
            'services[0] "s": port must be a port number 1-65535 (got 99999)',
        ),
        (
            '[[services]]\nname = "s"\nhosts = ["a.test"]\nport = 80\n',
            'services[0] "s": needs exactly one of root',
        ),
        (
            '[[services]]\nname = "s"\nhosts = ["a.test"]\nroot = "."\n',
            'needs a port (plain HTTP) when tls is "none"',
        ),
        (
            "[arcology]\ncache_size = 0\n",
            "cache_size must be an integer >= 1 (got 0)",
        ),
        (
            '[arcology]\nstore = "mysql://x"\n',
            'store must be "sqlite" or a "postgresql://..." URL (got \'mysql://x\')',
        ),
        (
            '[arcology]\ntls_fallback = "not a domain"\n',
            'arcology.toml: [arcology]: tls_fallback must be "reject" or a domain '
            "(got 'not a domain': label 'not a domain' must be letters, digits "
            "and hyphens",
        ),
        (
            '[arcology]\ntls_fallback = "*.example.com"\n',
            'tls_fallback must be "reject" or a domain, not a wildcard '
            "(got '*.example.com')",
        ),
        (
            '[arcology]\ntls_fallback = "192.0.2.1"\n',
            "tls_fallback must be \"reject\" or a domain (got '192.0.2.1': "
            "looks like an IP address",
        ),
        ("not = [toml", "arcology.toml: not valid TOML"),
    ],
)
def test_bad_files_are_refused_naming_file_entry_and_field(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, tmp_path)

    assert message in caught.value.message


def test_a_named_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "missing.toml")


def test_arcology_run_refuses_a_bad_file_before_starting(tmp_path: Path) -> None:
    path = tmp_path / "arcology.toml"
    path.write_text('[[services]]\nname = "shop"\nhosts = ["s.test"]\ntls = "yes"\n')

    done = run_arcology(path)

    assert done.returncode == 2
    assert 'tls must be one of none, optional, required (got "yes")' in done.stderr
    assert not (tmp_path / "arc-data").exists()


def test_arcology_run_refuses_a_fallback_that_is_not_a_domain(tmp_path: Path) -> None:
    path = tmp_path / "arcology.toml"
    path.write_text('[arcology]\ntls_fallback = "not a domain"\n')

    done = run_arcology(path)

    assert done.returncode == 2
    assert "tls_fallback must be \"reject\" or a domain (got 'not a domain'" in (
        done.stderr
    )
    assert not (tmp_path / "arc-data").exists()


def test_a_fallback_domain_is_normalised_and_reject_is_kept(tmp_path: Path) -> None:
    spelled = parse('[arcology]\ntls_fallback = "Bücher.Example."\n', tmp_path)
    reject = parse('[arcology]\ntls_fallback = "Reject"\n', tmp_path)

    assert spelled.arcology.tls_fallback == "xn--bcher-kva.example"
    assert reject.arcology.tls_fallback == "reject"


def test_a_port_wanted_as_plain_and_as_tls_names_both_services(
    tmp_path: Path,
) -> None:
    text = (
        '[[services]]\nname = "plain"\nhosts = ["a.test"]\nport = 9000\n'
        'root = "."\n'
        '[[services]]\nname = "secure"\nhosts = ["b.test"]\ntls = "required"\n'
        'tlsPort = 9000\nport = 9001\nroot = "."\n'
    )

    with pytest.raises(ConfigError) as caught:
        parse(text, tmp_path)

    assert caught.value.message == (
        'arcology.toml: port 9000 is wanted as plain HTTP by services[0] "plain" '
        'and as TLS by services[1] "secure"; a port is either plain or TLS'
    )


def test_services_may_share_a_port_in_the_same_mode(tmp_path: Path) -> None:
    text = (
        '[[services]]\nname = "a"\nhosts = ["a.test"]\nport = 80\ntls = "optional"\n'
        'root = "."\n'
        '[[services]]\nname = "b"\nhosts = ["b.test"]\nport = 80\ntls = "required"\n'
        'root = "."\n'
    )

    config = parse(text, tmp_path)

    assert [(s.port, s.tls_port) for s in config.services] == [(80, 443), (80, 443)]


def test_changed_settings_names_what_differs_and_live_ones_are_real_settings(
    tmp_path: Path,
) -> None:
    old = Settings(data_dir=tmp_path)
    new = replace(old, hsts="", bind=("127.0.0.1",), cache_size=5)

    assert changed_settings(old, new) == ["bind", "cache_size", "hsts"]
    assert changed_settings(old, old) == []
    assert {f.name for f in fields(Settings)} >= LIVE_SETTINGS
