"""The routing table: which service answers a Host, and on which listeners.

How this works: Hyperion builds one ``RoutingTable`` from the services of a
``Config`` and installs it in the data plane; every request reads the table in
force once, so a swap applies to the next request and never tears one. The
table never changes after it is built.

A host is looked up lower-cased with any ``:port`` removed, first exactly and
then as the wildcard one label up (``a.example.com`` falls back to
``*.example.com``, never to ``*.com`` and never two labels up). When several
services name the same host, the one that listens on the request's port (plain
``port`` for HTTP, ``tlsPort`` for HTTPS) wins; between equals, the service
defined first wins.

Listeners come from the services too: a service's ``port`` is plain HTTP, its
``tlsPort`` is TLS when its ``tls`` is not ``"none"``. A port is opened once
whatever the number of services on it; a port wanted as plain by one service
and as TLS by another is a configuration error naming both.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arc.errors import ConfigError

if TYPE_CHECKING:
    from arc.config import ServiceConfig, Settings
    from arc.http.static import StaticFiles

ASGIApp = Callable[..., Any]

# Host header values whose routes a table remembers, at most; past this
# many the memo starts over. Above the default context cache size (10,000),
# so one Host per cached domain fits. Longer values (no valid host is over
# 253 characters plus a port) are not remembered, which bounds the memo at
# a few MB.
MEMO_ENTRIES = 16384
MEMO_MAX_HOST_CHARS = 262

# What a host may hold once normalized: DNS labels, or an IP literal. Anything
# else (a slash, a space, an "@") could turn a redirect into an open one.
_HOST_RE = re.compile(r"[a-z0-9_\-]+(?:\.[a-z0-9_\-]+)*|\[[0-9a-f:.]+\]")


def valid_host(host: str) -> bool:
    """Whether a normalized host is a DNS name or an IP literal."""
    return _HOST_RE.fullmatch(host) is not None


def normalize_host(host: str) -> str:
    """``Shop.Example.COM:8443`` -> ``shop.example.com``; IPv6 keeps its brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    colon = host.rfind(":")
    if colon >= 0:
        host = host[:colon]
    return host.rstrip(".")


def wildcard_of(host: str) -> str | None:
    """The wildcard one label up: ``a.example.com`` -> ``*.example.com``."""
    dot = host.find(".")
    if dot <= 0 or dot == len(host) - 1:
        return None
    return "*" + host[dot:]


def covers(domain: str, host: str) -> bool:
    """Whether a certificate for ``domain`` covers ``host`` (exact or one label)."""
    if domain == host:
        return True
    return domain.startswith("*.") and wildcard_of(host) == domain


@dataclass(frozen=True, slots=True)
class Route:
    """One service as seen by a request: its definition and what answers."""

    service: ServiceConfig
    handler: StaticFiles | ASGIApp | None
    static: StaticFiles | None = None
    app: ASGIApp | None = None
    plain_ports: frozenset[int] = field(default_factory=frozenset)
    tls_ports: frozenset[int] = field(default_factory=frozenset)
    state: dict[str, Any] | None = None


def service_ports(service: ServiceConfig) -> tuple[frozenset[int], frozenset[int]]:
    """The plain and the TLS ports a service listens on."""
    plain = frozenset() if service.port is None else frozenset((service.port,))
    tls = frozenset() if service.tls == "none" else frozenset((service.tls_port,))
    return plain, tls


def derive_listeners(services: Iterable[ServiceConfig]) -> dict[int, bool]:
    """Each port once, ``port -> tls``; a port wanted both ways is refused."""
    wanted: dict[int, tuple[bool, str]] = {}
    for service in services:
        plain, tls = service_ports(service)
        for port, is_tls in [(p, False) for p in plain] + [(p, True) for p in tls]:
            seen = wanted.get(port)
            if seen is None:
                wanted[port] = (is_tls, service.name)
            elif seen[0] != is_tls:
                plain_name, tls_name = (
                    (seen[1], service.name) if is_tls else (service.name, seen[1])
                )
                raise ConfigError(
                    f"services: port {port} is wanted as plain HTTP by service "
                    f"{plain_name!r} and as TLS by service {tls_name!r}; "
                    "a port is either plain or TLS"
                )
    return {port: is_tls for port, (is_tls, _) in wanted.items()}


class RoutingTable:
    """Host -> routes, built once; never changed after ``build``."""

    __slots__ = ("_hosts", "_memo", "_none_only", "services")

    def __init__(
        self, hosts: Mapping[str, tuple[Route, ...]], services: tuple[Any, ...] = ()
    ) -> None:
        self._hosts: dict[str, tuple[Route, ...]] = dict(hosts)
        self.services: tuple[ServiceConfig, ...] = services
        self._none_only = frozenset(
            host
            for host, routes in self._hosts.items()
            if all(r.service.tls == "none" for r in routes)
        )
        # Host header values answered lately, with their normalized host and
        # routes: a cache only (the table itself never changes), written on
        # the data plane loop alone.
        self._memo: dict[str, tuple[str, tuple[Route, ...]]] = {}

    @classmethod
    def empty(cls) -> RoutingTable:
        """A table that routes nothing: every Host gets 404."""
        return cls({})

    @classmethod
    def build(
        cls,
        services: Iterable[ServiceConfig],
        settings: Settings | None = None,
        *,
        base_dir: Path | None = None,
        apps: Mapping[str, ASGIApp] | None = None,
        states: Mapping[str, dict[str, Any]] | None = None,
    ) -> RoutingTable:
        """Build the table for ``services``.

        ``apps`` maps an application spec (``"module:attr"``) to an already
        loaded application, so a reload keeps running the same object; specs
        not in it are imported with ``base_dir`` (the config file's folder) on
        ``sys.path``. ``states`` maps a spec to the lifespan state its
        requests see (a copy each) in ``scope["state"]``.
        """
        from arc.http.asgi import load_app
        from arc.http.static import StaticFiles

        services = tuple(services)
        derive_listeners(services)
        loaded: dict[str, ASGIApp] = dict(apps or {})
        hosts: dict[str, list[Route]] = {}
        for service in services:
            static = StaticFiles(service.root) if service.root is not None else None
            app: ASGIApp | None = None
            if service.app is not None:
                if service.app not in loaded:
                    loaded[service.app] = load_app(service.app, base_dir or Path.cwd())
                app = loaded[service.app]
            plain, tls = service_ports(service)
            route = Route(
                service=service,
                handler=app if app is not None else static,
                static=static if app is None else None,
                app=app,
                plain_ports=plain,
                tls_ports=tls,
                state=(states or {}).get(service.app) if service.app else None,
            )
            for host in service.hosts:
                hosts.setdefault(normalize_host(host), []).append(route)
        return cls({h: tuple(r) for h, r in hosts.items()}, services)

    def routes_for(self, host: str, *, normalized: bool = False) -> tuple[Route, ...]:
        """Every route of a host, exact before wildcard.

        ``normalized`` says the caller already lower-cased it and removed the
        port (the request path does, once).
        """
        if not normalized:
            host = normalize_host(host)
        routes = self._hosts.get(host)
        if routes is None and valid_host(host):
            wildcard = wildcard_of(host)
            if wildcard is not None:
                routes = self._hosts.get(wildcard)
        return routes or ()

    def routes_for_header(self, value: str) -> tuple[str, tuple[Route, ...]]:
        """The normalized host and every route of a Host header value.

        The same as ``routes_for`` after ``normalize_host``, remembered per
        value: normalizing, the wildcard's validity check and two lookups
        become one. Call it on the data plane loop only.
        """
        found = self._memo.get(value)
        if found is None:
            host = normalize_host(value)
            found = (host, self.routes_for(host, normalized=True))
            if len(value) <= MEMO_MAX_HOST_CHARS:
                if len(self._memo) >= MEMO_ENTRIES:
                    self._memo.clear()
                self._memo[value] = found
        return found

    def lookup(
        self, host: str, port: int | None = None, tls: bool = False
    ) -> Route | None:
        """The route for a Host header value, or None when no service has it.

        With ``port``, only a service listening on that port (as plain or TLS
        per ``tls``) matches.
        """
        routes = self.routes_for(host)
        if not routes:
            return None
        if port is None:
            return routes[0]
        for route in routes:
            if port in (route.tls_ports if tls else route.plain_ports):
                return route
        return None

    def tls_allowed(self, domain: str, *, normalized: bool = False) -> bool:
        """False when every service for ``domain`` is ``tls = "none"``.

        Unknown domains answer True: the certificate store decides for them.
        ``normalized`` says the caller's name is already lower-case without a
        port or trailing dot (a server name from a ClientHello is).
        """
        if not self._none_only:
            return True  # no host is plain-only: nothing to check
        host = domain if normalized else normalize_host(domain)
        if host in self._hosts:
            return host not in self._none_only
        wildcard = wildcard_of(host)
        if wildcard is not None and wildcard in self._hosts:
            return wildcard not in self._none_only
        return True

    def hosts(self) -> list[str]:
        """Every host of the table, in no particular order."""
        return list(self._hosts)
