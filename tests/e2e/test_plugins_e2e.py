"""End to end: plugins in a real ``arcology run``, reached with ``ai1 call``.

One process runs with the guide's plugin (installed with pip into a
folder on ``PYTHONPATH``), the metrics plugin, and three plugins that cannot
start (one does not import, one has a bad table, one raises in
``on_start``). The services and the working plugins must answer anyway.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.certs import make_chain
from tests.e2e.server import ArcologyProcess, free_port, run_ai1
from tests.plugin_helpers import Samples, install_guide_plugin, metric_samples, wait_for


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guide's plugin installed with pip into a folder of its own."""
    source = tmp_path_factory.mktemp("arcology-hello")
    target = tmp_path_factory.mktemp("site")
    install_guide_plugin(source, target)
    return target


class Server:
    """The process, its ports, and ``ai1`` against it."""

    def __init__(self, folder: Path, site: Path) -> None:
        self.folder = folder
        self.http_port, self.tls_port = free_port(), free_port()
        self.metrics_port, self.admin_port = free_port(), free_port()
        www = folder / "www"
        www.mkdir(parents=True)
        (www / "index.html").write_text("<h1>shop</h1>\n")
        (folder / "fire.py").write_text(
            "from arc.plugins import Plugin\n\n"
            "class Fire(Plugin):\n"
            "    def on_start(self):\n"
            "        raise RuntimeError('smoke in the rack')\n"
        )
        config = f"""
[arcology]
data_dir = "arc-data"
admin = "127.0.0.1:{self.admin_port}"
bind = ["127.0.0.1"]

[[services]]
name = "shop"
hosts = ["shop.example.com"]
port = {self.http_port}
tls = "optional"
tlsPort = {self.tls_port}
root = "www"

[plugins.hello]
greeting = "hey"

[plugins.metrics]
listen = "127.0.0.1:{self.metrics_port}"

[plugins.broken]
actor = "no_such_plugin_module:Thing"

[plugins.badconf]
actor = "arcology_hello:Hello"
shout = "yes"

[plugins.onfire]
actor = "fire:Fire"
"""
        self.process = ArcologyProcess(
            folder, config, env={"PYTHONPATH": str(site), "ARCOLOGY_LOG_LEVEL": "INFO"}
        )
        assert self.process.config_path is not None
        self.config = self.process.config_path

    def ai1(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_ai1(self.folder, "--config", str(self.config), *args)

    def call(self, verb: str, *args: str) -> Any:
        done = self.ai1("call", verb, *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def get(self, port: int, path: str, host: str) -> tuple[int, str]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", path, headers={"Host": host})
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def metrics(self) -> dict[str, Samples]:
        status, text = self.get(self.metrics_port, "/metrics", "127.0.0.1")
        assert status == 200
        return metric_samples(text)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, site: Path) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("arcology"), site)
    with running.process:
        yield running


def test_plugins_that_cannot_start_are_reported_and_the_rest_runs(
    server: Server,
) -> None:
    log = server.process.log()

    running = server.process.wait_for("running actors=")

    assert "actors=Cryptosaur,Esper,Hyperion,AI1,hello,metrics " in running
    assert "plugin left out name=broken reason=" in log
    assert "cannot import 'no_such_plugin_module'" in log
    assert (
        "plugin left out name=badconf reason=arcology.toml: [plugins.badconf]: "
        "shout expects bool, got 'yes' (string)"
    ) in log
    assert (
        "plugin left out name=onfire reason=raised while starting "
        "(RuntimeError: smoke in the rack)"
    ) in log


def test_the_service_answers_beside_the_plugins(server: Server) -> None:
    status, body = server.get(server.http_port, "/", "shop.example.com")

    assert status == 200
    assert "<h1>shop</h1>" in body


def test_ai1_call_reaches_a_plugin_verb(server: Server) -> None:
    answer = server.call("hello.greet", "name=Ada")
    as_json = server.call("hello.greet", '{"name": "Bo"}')
    refused = server.ai1("call", "hello.greet", "name=7")

    assert answer["text"] == "hey, Ada"
    assert as_json["text"] == "hey, Bo"
    assert refused.returncode == 1
    assert "greet: name must be a string (got 7)" in refused.stderr


def test_an_upload_reaches_the_plugin_and_the_metrics(
    server: Server, tmp_path: Path
) -> None:
    chain = make_chain("shop.example.com")
    bundle = tmp_path / "shop.pem"
    bundle.write_bytes(chain.bundle())

    uploaded = server.ai1("upload", str(bundle))
    heard = wait_for(
        lambda: "shop.example.com" in server.call("hello.greet")["changed"],
        timeout=10.0,
        interval_s=0.1,
    )
    greeting = server.call("hello.greet")
    expiry = server.metrics()["arcology_certificate_not_after_seconds"]
    tracked = server.call("metrics.status")

    assert uploaded.returncode == 0, uploaded.stderr
    assert heard
    assert greeting["certificates"] == 1
    assert expiry == {
        (("domain", "shop.example.com"),): chain.leaf.not_valid_after_utc.timestamp()
    }
    assert tracked["certificates"] == 1


def test_a_handshake_shows_in_the_metrics(server: Server, tmp_path: Path) -> None:
    chain = make_chain("tls.example")
    bundle = tmp_path / "tls.pem"
    bundle.write_bytes(chain.bundle())
    assert server.ai1("upload", str(bundle)).returncode == 0
    before = server.metrics().get("arcology_tls_handshakes_total", {}).get((), 0.0)

    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=5) as raw:
        with chain.client_context().wrap_socket(raw, server_hostname="tls.example"):
            pass
    after = server.metrics()

    assert after["arcology_tls_handshakes_total"][()] == before + 1
    assert after["arcology_scrape_source_up"] == {(("source", "Esper"),): 1.0}
    assert after["arcology_actor_restarts_total"] == {
        (("actor", name),): 0.0
        for name in ("Cryptosaur", "Esper", "Hyperion", "AI1", "hello", "metrics")
    }
