"""The metrics plugin: the exposition text, expiry from announcements, /metrics."""

from __future__ import annotations

import datetime as dt
import http.client
import math
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.cryptosaur import Cryptosaur
from actors.esper import Esper
from actors.metrics import (
    Family,
    MetricsOptions,
    certificate_family,
    esper_families,
    format_value,
    iso_to_unix,
    metrics_port,
    render,
    request_families,
    runtime_families,
)
from arc.config import Config
from arc.errors import ConfigError
from arc.plugins import parse_options, start_plugins
from arc.testing import running
from tests.certs import make_chain
from tests.e2e.server import free_port
from tests.plugin_helpers import Samples, config_in, metric_samples, wait_for


def parse(text: str) -> dict[str, Any]:
    """Families by name, as the Prometheus client library reads them."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(text: str, name: str) -> Samples:
    """The samples of the metric ``name`` (none: empty)."""
    return metric_samples(text).get(name, {})


# -- the exposition format ----------------------------------------------------


def test_label_values_with_quotes_backslashes_and_newlines_survive_a_parser() -> None:
    odd = 'a"b\\c\nd'
    text = render(
        [Family("t_value", "gauge", "Odd\\help\nsecond line.", [({"k": odd}, 1.5)])]
    )

    family = parse(text)["t_value"]

    assert family.documentation == "Odd\\help\nsecond line."
    assert family.type == "gauge"
    assert family.samples[0].labels == {"k": odd}
    assert family.samples[0].value == 1.5


def test_every_family_has_one_help_and_one_type_line_before_its_samples() -> None:
    text = render(
        [
            Family("a_total", "counter", "A.", [({}, 3)]),
            Family("b", "gauge", "B.", [({"x": "1"}, 1), ({"x": "2"}, 2)]),
        ]
    )

    assert text.splitlines() == [
        "# HELP a_total A.",
        "# TYPE a_total counter",
        "a_total 3",
        "# HELP b B.",
        "# TYPE b gauge",
        'b{x="1"} 1',
        'b{x="2"} 2',
    ]
    assert text.endswith("\n")


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (3.0, "3"),
        (0.25, "0.25"),
        (1.7e9, "1700000000"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_values_are_written_as_the_format_spells_them(
    value: float, written: str
) -> None:
    assert format_value(value) == written


def test_an_iso_time_becomes_unix_seconds() -> None:
    assert (
        iso_to_unix("2027-01-01T00:00:00Z")
        == dt.datetime(2027, 1, 1, tzinfo=dt.UTC).timestamp()
    )


def test_certificate_expiry_is_one_gauge_sample_per_domain() -> None:
    text = render([certificate_family({"b.example": 20.0, "a.example": 10.0})])

    assert samples(text, "arcology_certificate_not_after_seconds") == {
        (("domain", "a.example"),): 10.0,
        (("domain", "b.example"),): 20.0,
    }


def test_runtime_figures_give_restarts_and_states_per_actor() -> None:
    status = {
        "started_at": 1700000000.5,
        "actors": [
            {"name": "Cryptosaur", "state": "running", "restarts": 0},
            {"name": "metrics", "state": "restarting", "restarts": 2},
        ],
    }

    text = render(runtime_families(status))

    assert samples(text, "arcology_actor_restarts_total") == {
        (("actor", "Cryptosaur"),): 0.0,
        (("actor", "metrics"),): 2.0,
    }
    assert samples(text, "arcology_actor_up") == {
        (("actor", "Cryptosaur"),): 1.0,
        (("actor", "metrics"),): 0.0,
    }
    assert samples(text, "arcology_start_time_seconds") == {(): 1700000000.5}


def test_request_counts_by_status_class_are_one_counter_family() -> None:
    text = render(request_families({"2xx": 5, "4xx": 1, "other": 9}))

    assert parse(text)["arcology_http_requests"].type == "counter"
    assert samples(text, "arcology_http_requests_total") == {
        (("class", "2xx"),): 5.0,
        (("class", "4xx"),): 1.0,
    }


def test_listen_must_be_host_and_port() -> None:
    with pytest.raises(ConfigError, match=r"\[plugins.metrics\]: listen must be"):
        parse_options("metrics", MetricsOptions, {"listen": "9464"})

    assert parse_options("metrics", MetricsOptions, {}).listen == "127.0.0.1:9464"


def test_esper_figures_are_left_out_when_esper_does_not_report_them() -> None:
    assert esper_families({}) == []


# -- the plugin in a running Arcology -----------------------------------------


def get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    """Status, content type and body of one plain HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return (
            response.status,
            response.getheader("content-type", ""),
            response.read().decode(),
        )
    finally:
        connection.close()


def metrics_config(folder: Path, port: int, extra: str = "") -> Config:
    return config_in(
        folder,
        f'bind = ["127.0.0.1"]\n{extra}\n'
        f'[plugins.metrics]\nlisten = "127.0.0.1:{port}"\n',
    )


EXPIRY = "arcology_certificate_not_after_seconds"


def test_metrics_shows_a_certificate_s_expiry_after_an_upload(tmp_path: Path) -> None:
    port = free_port()
    config = metrics_config(tmp_path, port)
    not_after = dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    chain = make_chain("shop.example.com", not_after=not_after)

    with running([Cryptosaur, Esper], config) as rt:
        started = start_plugins(rt, config)
        status, content_type, before = get(port)
        rt.ask("Cryptosaur", "setCertificate", {"bundle": chain.bundle()})
        shown = wait_for(lambda: samples(get(port)[2], EXPIRY) != {})
        after = get(port)[2]

    assert started == ["metrics"]
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert samples(before, EXPIRY) == {}
    assert parse(before)[EXPIRY].type == "gauge"
    assert shown
    assert samples(after, EXPIRY) == {
        (("domain", "shop.example.com"),): not_after.timestamp()
    }


def test_stored_certificates_are_read_at_start_and_deletions_leave_the_figures(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = metrics_config(tmp_path, port)
    first = make_chain("a.example", "b.example")

    with running([Cryptosaur, Esper], config) as rt:
        rt.ask("Cryptosaur", "setCertificate", {"bundle": first.bundle()})
        start_plugins(rt, config)
        at_start = samples(get(port)[2], EXPIRY)
        rt.ask("Cryptosaur", "deleteCertificate", {"domain": "a.example"})
        gone = wait_for(lambda: samples(get(port)[2], EXPIRY) == {})
        tracked = rt.request("metrics.status")

    expected = first.leaf.not_valid_after_utc.timestamp()
    assert at_start == {
        (("domain", "a.example"),): expected,
        (("domain", "b.example"),): expected,
    }
    assert gone
    assert tracked["certificates"] == 0
    assert tracked["port"] == port


def test_a_replaced_wildcard_certificate_shows_its_new_expiry(tmp_path: Path) -> None:
    port = free_port()
    config = metrics_config(tmp_path, port)
    first_end = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    second_end = dt.datetime(2032, 2, 2, tzinfo=dt.UTC)
    first = make_chain("*.example.com", "example.com", not_after=first_end)
    second = make_chain("*.example.com", "example.com", not_after=second_end)

    with running([Cryptosaur, Esper], config) as rt:
        start_plugins(rt, config)
        rt.ask("Cryptosaur", "setCertificate", {"bundle": first.bundle()})
        wait_for(lambda: len(samples(get(port)[2], EXPIRY)) == 2)
        rt.ask("Cryptosaur", "setCertificate", {"bundle": second.bundle()})
        updated = wait_for(
            lambda: (
                set(samples(get(port)[2], EXPIRY).values()) == {second_end.timestamp()}
            )
        )
        text = get(port)[2]

    assert updated
    assert samples(text, EXPIRY) == {
        (("domain", "*.example.com"),): second_end.timestamp(),
        (("domain", "example.com"),): second_end.timestamp(),
    }


def test_handshakes_and_cache_counters_come_from_esper_at_scrape_time(
    tmp_path: Path,
) -> None:
    port, tls_port = free_port(), free_port()
    config = metrics_config(tmp_path, port)
    chain = make_chain("shop.example.com")

    with running([Cryptosaur, Esper], config) as rt:
        start_plugins(rt, config)
        rt.ask("Cryptosaur", "setCertificate", {"bundle": chain.bundle()})
        rt.ask("Esper", "listen", {"port": tls_port, "tls": True})
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
                with chain.client_context().wrap_socket(
                    raw, server_hostname="shop.example.com"
                ):
                    pass
        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
            with pytest.raises((ssl.SSLError, OSError)):
                chain.client_context().wrap_socket(
                    raw, server_hostname="nobody.example"
                )
        text = get(port)[2]

    def one(name: str) -> float:
        return samples(text, name)[()]

    assert one("arcology_tls_handshakes_total") == 2
    assert one("arcology_tls_handshake_failures_total") >= 1
    assert one("arcology_tls_handshakes_refused_total") >= 1
    assert one("arcology_tls_context_cache_misses_total") >= 1
    assert one("arcology_tls_context_cache_hits_total") >= 1
    assert one("arcology_listeners_open") == 2
    # The scrape's own connection is open while Esper counts.
    assert one("arcology_connections_open") >= 1
    assert samples(text, "arcology_scrape_source_up") == {(("source", "Esper"),): 1}
    assert samples(text, "arcology_actor_restarts_total") == {
        (("actor", "Cryptosaur"),): 0,
        (("actor", "Esper"),): 0,
        (("actor", "metrics"),): 0,
    }


def test_only_get_and_head_of_slash_metrics_are_served(tmp_path: Path) -> None:
    port = free_port()
    config = metrics_config(tmp_path, port)

    with running([Cryptosaur, Esper], config) as rt:
        start_plugins(rt, config)
        elsewhere = get(port, "/")
        posted = get(port, "/metrics", "POST")
        head = get(port, "/metrics", "HEAD")

    assert elsewhere[0] == 404
    assert posted[0] == 405
    assert head[0] == 200
    assert head[2] == ""


def test_stopping_the_plugin_closes_its_port(tmp_path: Path) -> None:
    port = free_port()
    config = metrics_config(tmp_path, port)

    with running([Cryptosaur, Esper], config) as rt:
        start_plugins(rt, config)
        assert get(port)[0] == 200
        rt.remove("metrics")
        closed = wait_for(lambda: _refused(port))
        apps = dict(rt.dataplane.port_apps)
        listeners = [item["port"] for item in rt.ask("Esper", "status")["listeners"]]

    assert closed
    assert apps == {}
    assert listeners == []


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_a_listen_address_esper_does_not_bind_is_refused_and_reported(
    tmp_path: Path, errors: list[str]
) -> None:
    path = tmp_path / "arcology.toml"
    path.write_text(
        '[arcology]\ndata_dir = "data"\nbind = ["127.0.0.1"]\n'
        '[plugins.metrics]\nlisten = "10.9.8.7:9464"\n'
    )
    config = Config.from_toml_text(path.read_text(), path)

    with running([Cryptosaur, Esper], config) as rt:
        started = start_plugins(rt, config)
        listed = rt.ask("Cryptosaur", "listCertificates", {})

    assert started == []
    assert listed == []
    assert any(
        "name=metrics" in e and "10.9.8.7 is not among the bind addresses" in e
        for e in errors
    ), errors


def test_a_port_that_a_service_listens_on_is_not_taken_over(
    tmp_path: Path, errors: list[str]
) -> None:
    port = free_port()
    config = metrics_config(tmp_path, port)

    with running([Cryptosaur, Esper], config) as rt:
        rt.ask("Esper", "listen", {"port": port, "tls": False, "owner": "Hyperion"})
        started = start_plugins(rt, config)
        apps = dict(rt.dataplane.port_apps)

    assert started == []
    assert apps == {}
    assert any(
        f"port {port} is already a listener of Arcology (owner Hyperion)" in e
        for e in errors
    ), errors


def test_each_worker_serves_metrics_on_its_own_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ARCOLOGY_WORKER", "2")

    assert metrics_port("127.0.0.1:9464", ("127.0.0.1",)) == 9466


@pytest.mark.parametrize(
    ("listen", "bind", "served"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", "::1"), True),
        ("[::1]:9464", ("127.0.0.1", "::1"), True),
        ("localhost:9464", ("127.0.0.1",), True),
        ("10.0.0.5:9464", ("0.0.0.0",), True),
        ("10.0.0.5:9464", ("::",), False),
        ("10.0.0.5:9464", ("127.0.0.1",), False),
        ("metrics.internal:9464", ("0.0.0.0",), False),
    ],
)
def test_listen_must_be_an_address_esper_binds(
    listen: str, bind: tuple[str, ...], served: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ARCOLOGY_WORKER", raising=False)
    if served:
        assert metrics_port(listen, bind) == 9464
    else:
        with pytest.raises(ConfigError, match="is not among the bind addresses"):
            metrics_port(listen, bind)


def test_answers_are_counted_by_status_class(tmp_path: Path) -> None:
    port = free_port()
    config = metrics_config(tmp_path, port)

    with running([Cryptosaur, Esper], config) as rt:
        start_plugins(rt, config)
        get(port)
        missing = get(port, "/nothing-here")
        text = get(port)[2]

    assert missing[0] == 404
    assert samples(text, "arcology_http_requests_total") == {
        (("class", "1xx"),): 0,
        (("class", "2xx"),): 1,
        (("class", "3xx"),): 0,
        (("class", "4xx"),): 1,
        (("class", "5xx"),): 0,
    }
