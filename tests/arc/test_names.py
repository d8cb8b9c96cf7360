"""Domain names: one spelling, wildcard rules, lookup candidates, coverage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from arc.errors import BadInput
from arc.names import candidates, covers, is_wildcard, normalise_domain


@pytest.mark.parametrize(
    ("given_name", "expected"),
    [
        ("Example.COM", "example.com"),
        ("shop.example.com.", "shop.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("*.Example.com", "*.example.com"),
        ("*.bücher.example", "*.xn--bcher-kva.example"),
        ("localhost", "localhost"),
        ("a-b.c0.example", "a-b.c0.example"),
        ("1.example.com", "1.example.com"),
    ],
)
def test_normalise_domain_gives_the_one_stored_spelling(
    given_name: str, expected: str
) -> None:
    assert normalise_domain(given_name) == expected


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("", "empty"),
        (".", "empty"),
        ("example..com", "empty label"),
        ("example.com..", "empty label"),
        ("-shop.example.com", "hyphen"),
        ("shop-.example.com", "hyphen"),
        ("shop_1.example.com", "letters, digits"),
        ("sh op.example.com", "letters, digits"),
        ("a" * 64 + ".example.com", "63"),
        (("a" * 60 + ".") * 5 + "com", "253"),
        ("*.com", "two labels"),
        ("*", "two labels"),
        ("w*.example.com", "leftmost"),
        ("a.*.example.com", "leftmost"),
        ("*.*.example.com", "leftmost"),
        ("192.168.0.1", "IP address"),
    ],
)
def test_normalise_domain_refuses_a_bad_name_and_names_it(bad: str, says: str) -> None:
    with pytest.raises(BadInput) as caught:
        normalise_domain(bad)

    assert says in caught.value.message
    assert repr(bad[:20])[:-1] in caught.value.message or bad in ("", ".")


def test_normalise_domain_refuses_what_is_not_a_string() -> None:
    with pytest.raises(BadInput, match="expected a string, got bytes"):
        normalise_domain(b"example.com")  # type: ignore[arg-type]


def test_candidates_are_the_name_then_the_wildcard_one_label_up() -> None:
    assert candidates("A.B.Example.com.") == ["a.b.example.com", "*.b.example.com"]
    assert candidates("shop.example.com") == ["shop.example.com", "*.example.com"]


def test_candidates_never_offer_a_wildcard_over_a_top_level_domain() -> None:
    assert candidates("example.com") == ["example.com"]
    assert candidates("localhost") == ["localhost"]


def test_candidates_of_a_wildcard_are_the_wildcard_alone() -> None:
    assert candidates("*.example.com") == ["*.example.com"]
    assert is_wildcard("*.example.com")
    assert not is_wildcard("example.com")


def test_a_wildcard_covers_exactly_one_label() -> None:
    names = ["*.example.com"]

    assert covers(names, "shop.example.com")
    assert covers(names, "SHOP.example.com.")
    assert not covers(names, "example.com")
    assert not covers(names, "a.shop.example.com")
    assert not covers(names, "shop.example.org")


def test_covers_matches_exact_names_in_any_spelling() -> None:
    assert covers(["Example.com", "bücher.example"], "example.com")
    assert covers(["xn--bcher-kva.example"], "bücher.example")
    assert not covers(["example.com"], "www.example.com")


def test_a_wildcard_domain_is_covered_only_by_the_same_wildcard() -> None:
    assert covers(["*.example.com"], "*.example.com")
    assert not covers(["shop.example.com"], "*.example.com")


def test_invalid_names_of_a_certificate_match_nothing() -> None:
    assert not covers(["w*.example.com", "not a name", ""], "www.example.com")


@given(st.text(max_size=300))
def test_normalise_domain_only_ever_raises_bad_input(text: str) -> None:
    try:
        result = normalise_domain(text)
    except BadInput:
        return

    assert result == normalise_domain(result)
    assert result.isascii() and result == result.lower()
