"""Tests for arc/ai1/render.py: human lines and the stable JSON shapes."""

from __future__ import annotations

from arc.ai1 import render


def test_list_json_keeps_its_fields_in_order_and_fills_what_is_missing() -> None:
    rows = [
        {"domain": "b.example", "not_after": "2999-01-01T00:00:00Z", "extra": 1},
        {"domain": "a.example", "days_left": 5, "key_type": "RSA 2048"},
    ]

    shown = render.list_json(rows)

    assert [r["domain"] for r in shown] == ["a.example", "b.example"]
    assert all(list(r) == list(render.LIST_FIELDS) for r in shown)
    assert shown[0]["domains"] == ["a.example"]
    assert shown[0]["days_left"] == 5
    assert shown[1]["days_left"] > 300_000
    assert "extra" not in shown[1]


def test_bytes_become_text_or_base64_in_json() -> None:
    assert render.plain({"a": b"text", "b": b"\xff\x00"}) == {
        "a": "text",
        "b": {"base64": "/wA="},
    }


def test_days_are_said_in_words() -> None:
    assert render.days_text(1) == "1 day"
    assert render.days_text(0) == "0 days"
    assert render.days_text(-1) == "expired 1 day ago"
    assert render.days_text(-3) == "expired 3 days ago"
    assert render.days_text(None) == "?"


def test_the_upload_summary_counts_refused_and_unsent_bundles() -> None:
    assert render.upload_summary(1, 0, 0, 0.5) == "1 of 1 bundle uploaded in 0.5 s, 2/s"
    assert render.upload_summary(3, 1, 2, 1.0) == (
        "3 of 6 bundles uploaded, 1 refused, 2 not sent in 1.0 s, 3/s"
    )


def test_tables_pad_every_column_but_the_last() -> None:
    text = render.table(["A", "BB"], [["long", "x"], ["s", "yy"]])

    assert text.splitlines() == ["A     BB", "long  x", "s     yy"]


def test_services_list_one_line_per_host() -> None:
    services = [
        {
            "name": "shop",
            "tls": "required",
            "port": 80,
            "tlsPort": 443,
            "hosts": [{"host": "a.example", "certificate": "ok", "days_left": 3}],
        },
        {"name": "docs", "tls": "none", "port": 81, "tlsPort": None, "hosts": []},
    ]

    lines = render.services_table(services).splitlines()

    assert lines[1].split() == [
        "shop",
        "a.example",
        "required",
        "80",
        "443/tls",
        "ok",
        "3",
        "days",
    ]
    assert lines[2].split() == ["docs", "-", "none", "81", "-", "-"]


def test_status_without_esper_says_why_listeners_are_unknown() -> None:
    status = {
        "started_at": "2026-01-01T00:00:00Z",
        "uptime_s": 3700,
        "actors": [{"name": "AI1", "state": "running", "restarts": 2}],
        "admin": {"address": "127.0.0.1:7399", "tls": False, "connections": 1},
        "esper": None,
        "esper_error": "no actor named 'Esper'",
    }

    text = render.status_text(status)
    shown = render.status_json(status)

    assert text.splitlines()[0] == "up 1 h 1 min (since 2026-01-01T00:00:00Z)"
    assert "listeners: unknown (no actor named 'Esper')" in text
    assert shown["listeners"] is None and shown["connections"] is None
    assert shown["actors"] == [{"name": "AI1", "state": "running", "restarts": 2}]


def test_status_of_workers_sums_those_that_reported_and_names_the_others() -> None:
    status = {
        "started_at": "2026-01-01T00:00:00Z",
        "uptime_s": 5,
        "actors": [],
        "admin": {"address": "127.0.0.1:7399", "tls": False, "connections": 1},
        "esper": None,
        "esper_error": "busy",
        "workers": [
            {
                "index": 0,
                "pid": 11,
                "age_s": 0.25,
                "connections_open": 2,
                "handshakes": 30,
                "handshake_failures": 1,
                "rejected": 0,
                "cache": {"hits": 28, "misses": 2, "size": 2},
            },
            {"index": 1, "missing": "no status written yet"},
        ],
    }

    shown = render.status_json(status)
    text = render.status_text(status).splitlines()

    assert shown["workers"]["totals"] == {
        "connections_open": 2,
        "handshakes": 30,
        "handshake_failures": 1,
        "rejected": 0,
        "hits": 28,
        "misses": 2,
        "size": 2,
    }
    assert shown["workers"]["each"][1]["missing"] == "no status written yet"
    assert text[-3].split() == ["0", "11", "0.2s", "2", "30", "1", "0", "28", "2", "2"]
    assert text[-2].split()[:3] == ["1", "-", "-"]
    assert "(no status written yet)" in text[-2]
    assert text[-1].split() == ["all", "2", "30", "1", "0", "28", "2", "2"]
