"""Domains: one spelling for every name, and the rules for wildcards.

How this works: every domain that enters Arcology (a SAN of an uploaded
certificate, a ``domains`` field of an upload, the server name of a
handshake, a lookup) goes through ``normalise_domain`` first, so the store,
the context cache and the routing table compare plain ASCII strings:

- lower case, one trailing dot removed (``Example.COM.`` is ``example.com``);
- internationalised labels become A-labels (``bücher.example`` is
  ``xn--bcher-kva.example``) through Python's ``idna`` codec;
- every label is 1 to 63 letters, digits or hyphens, not starting or ending
  with a hyphen, and the whole name is at most 253 characters;
- a wildcard is only the whole leftmost label of a name with at least two
  more labels (``*.example.com``); ``*.com``, ``w*.example.com`` and
  ``a.*.example.com`` are refused.

Matching follows RFC 6125 section 6.4.3 restricted to whole-label
wildcards: ``*.example.com`` covers ``shop.example.com`` but neither
``example.com`` nor ``a.shop.example.com``. A lookup therefore has exactly
two candidates, the name itself and the wildcard one label up.

LIMITATION: the codec implements IDNA 2003 (``ß`` maps to ``ss``). A name
registered under IDNA 2008 rules with such a character still works when it
is given in its A-label form (``xn--...``), which is what certificates and
TLS clients carry.
"""

from __future__ import annotations

import encodings.idna
import re
from collections.abc import Iterable

from arc.errors import BadInput

# RFC 1035 section 2.3.4: 63 octets a label, 255 a name on the wire, which is
# 253 characters in dotted text without the trailing dot.
MAX_LABEL_LENGTH = 63
MAX_DOMAIN_LENGTH = 253

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def normalise_domain(name: str) -> str:
    """Return the one spelling of ``name`` that Arcology stores and compares.

    Raises:
        BadInput: the name is not a domain; the message names it and says why.
    """
    if not isinstance(name, str):
        raise BadInput(f"domain: expected a string, got {type(name).__name__}")
    shown = name if len(name) <= 80 else name[:77] + "..."
    text = name.lower()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise BadInput(f"domain {shown!r}: empty")

    # The wildcard is checked first: its label is not a valid DNS label.
    labels = text.split(".")
    wildcard = labels[0] == "*"
    if wildcard:
        labels = labels[1:]
        if len(labels) < 2:
            raise BadInput(
                f"domain {shown!r}: a wildcard needs at least two labels after "
                "'*.' (like *.example.com)"
            )
    if any("*" in label for label in labels):
        raise BadInput(
            f"domain {shown!r}: '*' is allowed only as the whole leftmost label "
            "(like *.example.com)"
        )

    ascii_labels = [_ascii_label(label, shown) for label in labels]
    if ascii_labels[-1].isdigit():
        raise BadInput(f"domain {shown!r}: looks like an IP address, not a domain")
    result = ".".join((["*"] if wildcard else []) + ascii_labels)
    if len(result) > MAX_DOMAIN_LENGTH:
        raise BadInput(
            f"domain {shown!r}: {len(result)} characters, more than {MAX_DOMAIN_LENGTH}"
        )
    return result


def _ascii_label(label: str, shown: str) -> str:
    """Turn one label into its checked ASCII form (an A-label if needed)."""
    if not label:
        raise BadInput(f"domain {shown!r}: empty label")
    if not label.isascii():
        try:
            label = encodings.idna.ToASCII(label).decode("ascii").lower()
        except UnicodeError as exc:
            raise BadInput(
                f"domain {shown!r}: label {label!r} is not a valid "
                f"internationalised name ({exc})"
            ) from exc
    if len(label) > MAX_LABEL_LENGTH:
        raise BadInput(
            f"domain {shown!r}: label of {len(label)} characters, more than "
            f"{MAX_LABEL_LENGTH}"
        )
    if not _LABEL.match(label):
        raise BadInput(
            f"domain {shown!r}: label {label!r} must be letters, digits and "
            "hyphens, not starting or ending with a hyphen"
        )
    return label


def is_wildcard(domain: str) -> bool:
    """Whether a normalised domain is a wildcard (``*.example.com``)."""
    return domain.startswith("*.")


def candidates(name: str) -> list[str]:
    """The domains to look up for ``name``, best first.

    The name itself, then the wildcard one label up (``a.b.example.com``
    gives ``*.b.example.com``, never ``*.example.com``). A wildcard name, or
    a name whose parent is too short for a wildcard, has one candidate.

    Raises:
        BadInput: ``name`` is not a domain.
    """
    domain = normalise_domain(name)
    if is_wildcard(domain):
        return [domain]
    parent = domain.split(".", 1)[1] if "." in domain else ""
    if parent.count(".") < 1:
        return [domain]
    return [domain, "*." + parent]


def covers(cert_names: Iterable[str], domain: str) -> bool:
    """Whether a certificate naming ``cert_names`` is valid for ``domain``.

    A name in ``cert_names`` that is not a valid domain matches nothing. A
    wildcard ``domain`` is covered only by the same wildcard.

    Raises:
        BadInput: ``domain`` is not a domain.
    """
    wanted = set(candidates(domain))
    for cert_name in cert_names:
        try:
            if normalise_domain(cert_name) in wanted:
                return True
        except BadInput:
            continue
    return False
