"""Routing table and listeners, from service definitions."""

from __future__ import annotations

from pathlib import Path

import pytest

from arc.config import ServiceConfig
from arc.errors import ConfigError
from arc.http.routing import RoutingTable, covers, derive_listeners, normalize_host


def service(name: str, *hosts: str, **fields: object) -> ServiceConfig:
    return ServiceConfig(name=name, hosts=hosts, **fields)  # type: ignore[arg-type]


def test_lookup_lowercases_and_strips_the_port(tmp_path: Path) -> None:
    table = RoutingTable.build(
        [service("shop", "shop.example.com", port=80, root=tmp_path)]
    )

    route = table.lookup("Shop.Example.COM:8080")

    assert route is not None and route.service.name == "shop"


def test_lookup_prefers_exact_then_wildcard_one_label_up(tmp_path: Path) -> None:
    table = RoutingTable.build(
        [
            service("any", "*.example.com", port=80, root=tmp_path),
            service("www", "www.example.com", port=80, root=tmp_path),
        ]
    )

    assert table.lookup("www.example.com").service.name == "www"  # type: ignore[union-attr]
    assert table.lookup("shop.example.com").service.name == "any"  # type: ignore[union-attr]
    assert table.lookup("a.b.example.com") is None
    assert table.lookup("example.com") is None


def test_lookup_refuses_hosts_that_are_not_names(tmp_path: Path) -> None:
    table = RoutingTable.build(
        [service("any", "*.example.com", port=80, root=tmp_path)]
    )

    assert table.lookup("evil.com/x.example.com") is None
    assert table.lookup("a b.example.com") is None


def test_lookup_with_a_port_picks_the_service_listening_there(tmp_path: Path) -> None:
    table = RoutingTable.build(
        [
            service("a", "x.example", port=8001, root=tmp_path),
            service(
                "b",
                "x.example",
                port=8002,
                tls="optional",
                tls_port=8443,
                root=tmp_path,
            ),
        ]
    )

    assert table.lookup("x.example", 8002).service.name == "b"  # type: ignore[union-attr]
    assert table.lookup("x.example", 8443, tls=True).service.name == "b"  # type: ignore[union-attr]
    assert table.lookup("x.example", 8443) is None


def test_empty_table_routes_nothing() -> None:
    assert RoutingTable.empty().lookup("localhost") is None


def test_tls_allowed_is_false_only_when_every_service_of_the_host_is_none(
    tmp_path: Path,
) -> None:
    table = RoutingTable.build(
        [
            service(
                "plain", "plain.example", "*.plain.example", port=80, root=tmp_path
            ),
            service("mixed", "both.example", port=80, root=tmp_path),
            service("mixed2", "both.example", port=81, tls="optional", root=tmp_path),
        ]
    )

    assert table.tls_allowed("plain.example") is False
    assert table.tls_allowed("a.plain.example") is False
    assert table.tls_allowed("both.example") is True
    assert table.tls_allowed("unknown.example") is True


def test_listeners_take_each_port_once() -> None:
    listeners = derive_listeners(
        [
            service("a", "a.example", port=80, tls="required", tls_port=443),
            service("b", "b.example", port=80, tls="optional", tls_port=443),
            service("c", "c.example", port=8080, tls="none", tls_port=443),
        ]
    )

    assert listeners == {80: False, 443: True, 8080: False}


def test_a_port_wanted_plain_and_tls_names_both_services() -> None:
    with pytest.raises(ConfigError) as caught:
        derive_listeners(
            [
                service("shop", "shop.example", port=8443),
                service("blog", "blog.example", tls="required", tls_port=8443),
            ]
        )

    assert "'shop'" in caught.value.message
    assert "'blog'" in caught.value.message
    assert "8443" in caught.value.message


def test_covers_matches_exact_and_one_wildcard_label() -> None:
    assert covers("shop.example.com", "shop.example.com")
    assert covers("*.example.com", "shop.example.com")
    assert not covers("*.example.com", "a.shop.example.com")
    assert not covers("shop.example.com", "blog.example.com")


def test_normalize_host_keeps_ipv6_brackets() -> None:
    assert normalize_host("[::1]:8443") == "[::1]"
    assert normalize_host("LOCALHOST.") == "localhost"
