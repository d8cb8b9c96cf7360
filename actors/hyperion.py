"""Hyperion: service definitions, routing, and the listeners they need.

How this works: on start Hyperion takes the services of its ``Config``,
imports their applications and runs their ASGI lifespan startup on the data
plane loop, builds one immutable ``RoutingTable`` and installs it in the data
plane, then asks Esper to ``listen`` once per port (plain or TLS, derived
from the services). With ``local_ca`` it makes sure localhost has a
certificate. Last, it asks Cryptosaur for the certificate of every host of a
service that wants TLS and logs one ERROR line per host that has none,
saying what clients meet meanwhile: a ``tls = "optional"`` host is still
served over plain HTTP; a ``"required"`` one is not served at all (plain
HTTP redirects to HTTPS, whose handshake is refused). When Cryptosaur
announces a change that gives one of those hosts a certificate, one INFO
line says it is now served over TLS; a change (a delete) or a reload that
leaves a host without one says so in the same words at WARNING, since
someone asked for it. The ``tls_fallback`` domain is checked the same way,
at start and on a reload that changes it: with no certificate for it, one
WARNING says that handshakes without a known name are refused until one is
uploaded, and one INFO line says when it arrives.

``reload`` reads the configuration file again and reconciles: new ports are
opened, ports no service uses any more are closed, ports that stay are left
untouched (their connections too), and the new table replaces the old in one
swap. Applications keep running across a reload when their ``app`` spec is
unchanged; new ones are started and dropped ones shut down.

A reload also puts the ``[arcology]`` settings of ``LIVE_SETTINGS`` in force
(HSTS, access log, body and header limits and timeouts, the TLS fallback and
handshake timeout, the context cache's limits, the expiry warning): the
runtime's and the data plane's config are replaced, so the next connection
reads them, and Esper is told to ``applySettings``. The other settings
(ports and addresses, the store, files) and ``[plugins]`` keep their running
values until a restart; the answer and a WARNING name them.

What always holds: the data plane never waits for Hyperion; requests read the
table in force, so a reload applies to the next request.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from arc.actor import Actor, verb
from arc.config import (
    LIVE_SETTINGS,
    Config,
    ServiceConfig,
    changed_settings,
    load_config,
)
from arc.errors import ArcError, ConfigError, NotFound
from arc.http.asgi import LIFESPAN_TIMEOUT_S, ASGIApp, Lifespan, load_app
from arc.http.routing import RoutingTable, covers, derive_listeners
from arc.localca import days_left, ensure_localhost

if TYPE_CHECKING:
    from arc.runtime import Runtime

# A certificate ask is answered from Cryptosaur's store; this bounds a stall.
ASK_TIMEOUT_S = 10.0

# The configuration in force per runtime, so an instance restarted after a
# crash serves what the last reload installed, not what the process began with.
_in_force: weakref.WeakKeyDictionary[Runtime, Config] = weakref.WeakKeyDictionary()


class Hyperion(Actor):
    """Owns the service definitions and routing; asks Esper for listeners."""

    name = "Hyperion"
    needs = ("Cryptosaur", "Esper")
    hears = ("Cryptosaur.certificateChanged",)

    def __init__(self, runtime: Runtime, config: Config) -> None:
        super().__init__(runtime, _in_force.get(runtime, config))
        self._listeners: dict[int, bool] = {}
        self._apps: dict[str, ASGIApp] = {}
        self._lifespans: dict[str, Lifespan] = {}
        # Hosts wanting TLS that had no certificate when last checked.
        self._missing: set[str] = set()
        # The tls_fallback domain, if it had no certificate when last checked.
        self._fallback_missing: str | None = None

    # -- life -----------------------------------------------------------------

    def on_start(self) -> None:
        """Load the services, open their listeners, report missing certificates."""
        settings = self.config.arcology

        # Adopt the listeners an earlier instance opened (a restart after a
        # crash), so the reconcile below also closes those no longer wanted.
        status = self._ask("Esper", "status", {})
        for listener in status.get("listeners", []):
            if listener.get("owner") == self.name:
                self._listeners[int(listener["port"])] = bool(listener["tls"])
        self._apply(self.config, strict=True)
        if settings.local_ca:
            ensure_localhost(settings.data_dir, self._ask)
        self._check_certificates(self.config.services, only_new=False)
        self._check_fallback(only_new=False)

    def on_stop(self) -> None:
        """Shut down the applications' lifespans; listeners stay with Esper."""
        for spec in list(self._lifespans):
            self._stop_app(spec)

    # -- verbs ----------------------------------------------------------------

    @verb("loadServices")
    def load_services(self, payload: Any) -> dict[str, Any]:
        """Same as ``reload``: read the services again and reconcile."""
        return self.reload(payload)

    @verb("reload")
    def reload(self, payload: Any) -> dict[str, Any]:
        """Re-read the configuration file and put it in force.

        Answers ``{opened, closed, unchanged, failed, applied,
        restart_needed}``: the listener ports (``failed`` lists the ports that
        could not be opened, each with the reason), the ``[arcology]``
        settings now in force, and those (with ``plugins``) that keep their
        running values until a restart.
        """
        path = self.config.path
        loaded = load_config(path) if path is not None else self.config
        before = self.config.arcology
        changed = changed_settings(before, loaded.arcology)
        applied = [name for name in changed if name in LIVE_SETTINGS]
        later = [name for name in changed if name not in LIVE_SETTINGS]
        if loaded.plugins != self.config.plugins:
            later.append("plugins")
        # Settings that need a restart keep their running values until then.
        settings = replace(
            before, **{name: getattr(loaded.arcology, name) for name in applied}
        )
        config = replace(loaded, arcology=settings, plugins=self.config.plugins)

        summary = self._apply(config, strict=False)
        self.config = config
        _in_force[self.runtime] = config
        self.runtime.config = config
        self.runtime.dataplane.config = config
        if applied:
            self.runtime.ask("Esper", "applySettings", {})
            self.log.info("settings applied settings={}", ",".join(applied))
        if later:
            self.log.warning(
                "settings changed that apply only after a restart settings={}",
                ",".join(later),
            )
        summary["applied"] = applied
        summary["restart_needed"] = later
        self._check_certificates(config.services, only_new=True)
        self._check_fallback(only_new=True)
        self.log.info(
            "services reloaded services={} opened={} closed={} unchanged={}",
            len(config.services),
            summary["opened"],
            summary["closed"],
            summary["unchanged"],
        )
        self.runtime.announce("Hyperion.servicesReloaded", summary)
        return summary

    @verb("services")
    def services(self, payload: Any) -> list[dict[str, Any]]:
        """Every service with its hosts and their certificate status."""
        warning_days = self.config.arcology.expiry_warning_days
        out: list[dict[str, Any]] = []
        for service in self.config.services:
            hosts: list[dict[str, Any]] = []
            for host in service.hosts:
                found = self._certificate(host)
                if found is None:
                    hosts.append(
                        {"host": host, "certificate": "missing", "days_left": None}
                    )
                    continue
                left = days_left(str(found["not_after"]))
                state = "expiring" if left <= warning_days else "ok"
                hosts.append({"host": host, "certificate": state, "days_left": left})
            out.append(
                {
                    "name": service.name,
                    "hosts": hosts,
                    "tls": service.tls,
                    "port": service.port,
                    "tlsPort": service.tls_port if service.tls != "none" else None,
                }
            )
        return out

    @verb("Cryptosaur.certificateChanged")
    def certificate_changed(self, payload: Any) -> None:
        """Say which hosts, and the fallback, gained (or lost) a certificate."""
        domains = [str(d).lower() for d in (payload or {}).get("domains", [])]
        for service in self.config.services:
            if service.tls == "none":
                continue
            for host in service.hosts:
                if not any(covers(d, host) or d == host for d in domains):
                    continue
                has = self._certificate(host) is not None
                if has and host in self._missing:
                    self._missing.discard(host)
                    self.log.info(
                        "host is now served over TLS host={} service={}",
                        host,
                        service.name,
                    )
                elif not has and host not in self._missing:
                    self._missing.add(host)
                    self._report_missing(host, service, at_start=False)
        self._fallback_changed(domains)

    # -- reconciling ----------------------------------------------------------

    def _apply(self, config: Config, *, strict: bool) -> dict[str, Any]:
        # Check everything that can be refused before anything changes.
        services = config.services
        wanted = derive_listeners(services)
        specs = {s.app for s in services if s.app is not None}
        for spec in sorted(specs - set(self._apps)):
            self._apps[spec] = load_app(spec, config.base_dir)

        # Start new applications, then swap the table in one piece.
        for spec in sorted(specs - set(self._lifespans)):
            self._start_app(spec, services)
        table = RoutingTable.build(
            services,
            config.arcology,
            base_dir=config.base_dir,
            apps=self._apps,
            states={spec: life.state for spec, life in self._lifespans.items()},
        )
        self.runtime.dataplane.install_routes(table)

        # Listeners: open the new, close the unused, leave the rest alone. At
        # start a port that cannot be opened stops everything (``strict``);
        # on a reload the others go on, and the answer names the ones that
        # failed (the next reload tries them again).
        opened, closed, unchanged = [], [], []
        failed: list[dict[str, Any]] = []
        for port, tls in sorted(self._listeners.items()):
            if wanted.get(port) != tls:
                self.runtime.tell("Esper", "stopListener", {"port": port})
                del self._listeners[port]
                closed.append(port)
        for port, tls in sorted(wanted.items()):
            if port in self._listeners:
                unchanged.append(port)
                continue
            try:
                self._ask(
                    "Esper", "listen", {"port": port, "tls": tls, "owner": self.name}
                )
            except ArcError as exc:
                if strict:
                    raise
                self.log.warning(
                    "listener not opened on reload port={} reason={}", port, exc.message
                )
                failed.append({"port": port, "reason": exc.message})
                continue
            self._listeners[port] = tls
            opened.append(port)

        # Applications no service uses any more.
        for spec in sorted(set(self._lifespans) - specs):
            self._stop_app(spec)
            self._apps.pop(spec, None)
        return {
            "opened": opened,
            "closed": closed,
            "unchanged": unchanged,
            "failed": failed,
        }

    def _start_app(self, spec: str, services: tuple[ServiceConfig, ...]) -> None:
        name = next((s.name for s in services if s.app == spec), spec)
        life = Lifespan(self._apps[spec], name)
        try:
            self.runtime.dataplane.run(life.startup(), LIFESPAN_TIMEOUT_S + 1)
        except TimeoutError as exc:
            raise ConfigError(
                f"service {name!r}: application startup did not finish within "
                f"{LIFESPAN_TIMEOUT_S:g} s"
            ) from exc
        self._lifespans[spec] = life

    def _stop_app(self, spec: str) -> None:
        life = self._lifespans.pop(spec)
        dataplane = self.runtime.dataplane
        if not dataplane.loop.is_running():
            return
        try:
            dataplane.run(life.shutdown(), LIFESPAN_TIMEOUT_S + 1)
        except Exception as exc:
            self.log.warning(
                "lifespan shutdown failed service={} error={!r}", life.name, exc
            )

    # -- certificates ---------------------------------------------------------

    def _ask(self, actor: str, verb_name: str, payload: dict[str, Any]) -> Any:
        return self.runtime.ask(actor, verb_name, payload, timeout=ASK_TIMEOUT_S)

    def _certificate(self, host: str) -> dict[str, Any] | None:
        # The summary is all Hyperion needs: it never asks for a private key.
        try:
            found: dict[str, Any] = self._ask(
                "Cryptosaur", "showCertificate", {"domain": host}
            )
        except NotFound:
            return None
        return found

    def _checked(self, field: str, domain: str) -> tuple[bool, dict[str, Any] | None]:
        # A check Cryptosaur cannot answer now is skipped with a WARNING (and
        # False); the next change or reload checks again.
        try:
            return True, self._certificate(domain)
        except ArcError as exc:
            self.log.warning(
                "certificate check failed {}={} error={}", field, domain, exc
            )
            return False, None

    def _check_certificates(
        self, services: tuple[ServiceConfig, ...], *, only_new: bool
    ) -> None:
        # One ERROR per host (not per service): a host shared by two services
        # is one missing certificate.
        seen: set[str] = set()
        missing: set[str] = set()
        present: list[str] = []
        for service in services:
            if service.tls == "none":
                continue
            for host in service.hosts:
                if host in seen:
                    continue
                seen.add(host)
                checked, found = self._checked("host", host)
                if not checked:
                    continue
                if found is not None:
                    present.append(host)
                    continue
                missing.add(host)
                if not (only_new and host in self._missing):
                    self._report_missing(host, service, at_start=not only_new)
        self._missing = missing

        # Warm start: Esper builds these contexts in the background, so the
        # first handshakes find them cached; nothing here waits for it.
        if present:
            self.runtime.tell("Esper", "warm", {"domains": sorted(present)})

    def _check_fallback(self, *, only_new: bool) -> None:
        # Handshakes without a known name get the fallback's certificate; with
        # none stored they are refused, which no client will explain to anyone.
        fallback = self.config.arcology.tls_fallback
        if fallback == "reject":
            self._fallback_missing = None
            return
        checked, found = self._checked("fallback", fallback)
        if not checked:
            return
        if found is not None:
            self._fallback_missing = None
            return
        if not (only_new and self._fallback_missing == fallback):
            self._report_fallback_missing(fallback)
        self._fallback_missing = fallback

    def _fallback_changed(self, domains: list[str]) -> None:
        fallback = self.config.arcology.tls_fallback
        if fallback == "reject" or not any(covers(d, fallback) for d in domains):
            return
        has = self._certificate(fallback) is not None
        if has and self._fallback_missing == fallback:
            self._fallback_missing = None
            self.log.info(
                "fallback domain now has a certificate; handshakes without a "
                "known name get it fallback={}",
                fallback,
            )
        elif not has and self._fallback_missing != fallback:
            self._fallback_missing = fallback
            self._report_fallback_missing(fallback)

    def _report_fallback_missing(self, fallback: str) -> None:
        self.log.warning(
            "fallback domain has no certificate; handshakes without a known name "
            "are refused until one is uploaded fallback={}",
            fallback,
        )

    def _report_missing(
        self, host: str, service: ServiceConfig, *, at_start: bool
    ) -> None:
        # Say what a client meets meanwhile: "optional" still answers plain
        # HTTP; "required" redirects it to HTTPS, whose handshake is refused.
        # At start this is misconfiguration no caller hears of (ERROR); later
        # it follows a delete or a reload someone asked for (WARNING).
        if service.tls == "required":
            served = (
                "it is not served until one is uploaded (plain HTTP redirects to "
                "HTTPS, whose handshake is refused)"
            )
        else:
            served = "it is served over plain HTTP only until one is uploaded"
        self.log.log(
            "ERROR" if at_start else "WARNING",
            "host has no certificate; {} host={} service={}",
            served,
            host,
            service.name,
        )
