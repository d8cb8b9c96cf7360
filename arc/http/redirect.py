"""Which scheme a request may use, where to send it, and what HSTS says.

A service's ``tls`` decides: ``"none"`` is served over plain HTTP only,
``"optional"`` over both, ``"required"`` over HTTPS only, with plain requests
redirected to ``https://HOST:tlsPort/PATH?QUERY`` (the port left out when it
is 443). GET and HEAD are redirected with 301; every other method with 308,
which keeps the method and body (RFC 9110 15.4.2, RFC 9110 15.4.9).
HTTPS answers carry ``Strict-Transport-Security`` unless the setting is "".
"""

from __future__ import annotations


def redirect_status(method: str) -> int:
    """301 for GET and HEAD, 308 for the rest."""
    return 301 if method in ("GET", "HEAD") else 308


def redirect_location(host: str, tls_port: int, target: bytes) -> bytes:
    """The https URL for ``host`` (already normalized) and the request target.

    ``target`` is the raw path with its query (``/a%20b?x=1``); it is kept as
    sent so nothing is decoded and re-encoded differently.
    """
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    authority = host if tls_port == 443 else f"{host}:{tls_port}"
    if not target.startswith(b"/"):
        target = b"/" + target
    return b"https://" + authority.encode("ascii") + target


def hsts_header(value: str) -> tuple[bytes, bytes] | None:
    """The HSTS header pair, or None when the setting turns it off."""
    value = value.strip()
    if not value:
        return None
    return (b"strict-transport-security", value.encode("latin-1"))
