"""The metrics plugin: the exposition text, expiry from announcements, /metrics."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.metrics import (
    Family,
    MetricsOptions,
    certificate_family,
    esper_families,
    format_value,
    iso_to_unix,
    render,
    request_families,
    runtime_families,
)
from arc.errors import ConfigError
from arc.plugins import parse_options


def parse(text: str) -> dict[str, Any]:
    """Families by name, as the Prometheus client library reads them."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


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
