"""Metrics: Arcology's figures for Prometheus at ``GET /metrics``.

How this works
--------------
``Metrics`` is a plugin actor (``[plugins.metrics]``). It serves a small
ASGI application on its own plain port (``listen``, 127.0.0.1:9464 by
default) through Esper, on the data plane loop.

Two kinds of figures, fetched in two ways:

- Certificate expiry lives in Cryptosaur's store. The actor reads the whole
  list once when it starts, then only what changed: on every
  ``Cryptosaur.certificateChanged`` it asks ``showCertificate`` for each
  changed domain (``NotFound`` means deleted). The actor renders that
  family in its own thread and hands the text to the application, swapped
  whole, so a scrape reads it without a message, never sees half an update
  and never renders thousands of lines on the data plane loop. The store is
  never polled.
- Counters that live in the data plane (handshakes, the context cache,
  open connections) are asked of Esper (``status``) at scrape time with
  ``ask_async``, which never blocks the loop. Actor restarts come from
  ``runtime.status()``. Answers by status class are counted by the HTTP
  layer on the data plane and reported by Esper's ``status`` too.

The text follows the Prometheus text exposition format 0.0.4: one ``# HELP``
and one ``# TYPE`` line per family, then its samples; label values escape
backslash, double quote and newline; HELP text escapes backslash and
newline.

What always holds
-----------------
- A scrape answers even when Esper is busy or restarting: its figures are
  left out and ``arcology_scrape_source_up`` says 0 for it. Esper keeps its
  counters across its own restarts, so they go back to zero only with the
  process (Prometheus reads that as a counter reset).
- Nothing here holds a private key: only summaries are asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from arc.actor import verb
from arc.config import Config, is_loopback, parse_address
from arc.errors import ArcError, ConfigError, NotFound
from arc.plugins import Plugin
from arc.runtime import Runtime
from arc.workers import worker_index

log = logger.bind(actor="metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_LISTEN = "127.0.0.1:9464"
# A scrape asks Esper; Prometheus' default scrape timeout is 10 s, so
# answer well within it even when Esper is slow.
SOURCE_TIMEOUT_S = 2.0
# Domains of one change asked one by one; a bigger change reads the list.
MAX_SHOW_PER_CHANGE = 256
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


# -- the exposition format ----------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One metric family: name, type, help and its samples.

    ``samples`` holds ``(labels, value)`` pairs; the sample name is the
    family name (counters are named ``..._total`` here already).
    """

    name: str
    kind: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


def escape_label_value(value: str) -> str:
    """A label value as the text format writes it between double quotes."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text as the text format writes it."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a point, and NaN, +Inf, -Inf."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    """The text exposition (format 0.0.4) of ``families``."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            if labels:
                inner = ",".join(
                    f'{key}="{escape_label_value(str(val))}"'
                    for key, val in labels.items()
                )
                lines.append(f"{family.name}{{{inner}}} {format_value(value)}")
            else:
                lines.append(f"{family.name} {format_value(value)}")
    return "\n".join(lines) + "\n"


def iso_to_unix(text: str) -> float:
    """``"2027-01-01T00:00:00Z"`` to seconds since the Unix epoch."""
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


# -- the figures --------------------------------------------------------------


def certificate_family(expiry: Mapping[str, float]) -> Family:
    """``arcology_certificate_not_after_seconds`` for every stored domain."""
    return Family(
        "arcology_certificate_not_after_seconds",
        "gauge",
        "End of validity of the certificate stored for the domain (Unix time).",
        [({"domain": domain}, expiry[domain]) for domain in sorted(expiry)],
    )


def _counter(name: str, help_text: str, value: Any) -> Family | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return Family(name, "counter", help_text, [({}, float(value))])


# Esper's status keys and the counters they become.
_ESPER_COUNTERS = (
    ("handshakes", "arcology_tls_handshakes_total", "TLS handshakes completed."),
    (
        "handshake_failures",
        "arcology_tls_handshake_failures_total",
        "TLS handshakes that failed or were refused (every cause).",
    ),
    (
        "rejected",
        "arcology_tls_handshakes_refused_total",
        "TLS handshakes refused by policy: no certificate for the asked name.",
    ),
)
_CACHE_COUNTERS = (
    ("hits", "TLS context cache hits."),
    ("misses", "TLS context cache misses (a certificate was fetched)."),
    ("evictions", "TLS contexts pushed out of the cache or expired."),
    ("negative_hits", "Handshakes for a name remembered as having no certificate."),
)


def _gauge(name: str, help_text: str, value: Any) -> Family | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return Family(name, "gauge", help_text, [({}, float(value))])


def esper_families(status: Mapping[str, Any]) -> list[Family]:
    """Handshakes, the context cache, connections and listeners from Esper."""
    found: list[Family | None] = []
    for key, name, text in _ESPER_COUNTERS:
        found.append(_counter(name, text, status.get(key)))
    cache = status.get("cache")
    if isinstance(cache, Mapping):
        for key, text in _CACHE_COUNTERS:
            name = f"arcology_tls_context_cache_{key}_total"
            found.append(_counter(name, text, cache.get(key)))
        found.append(
            _gauge(
                "arcology_tls_context_cache_size",
                "TLS contexts held in the cache.",
                cache.get("size"),
            )
        )
    found.append(
        _gauge(
            "arcology_connections_open",
            "Client connections open on every listener.",
            status.get("connections_open"),
        )
    )
    listeners = status.get("listeners")
    if isinstance(listeners, list):
        found.append(
            Family(
                "arcology_listeners_open",
                "gauge",
                "Listeners (ports) open.",
                [({}, float(len(listeners)))],
            )
        )
    # Esper's status carries answers by status class ({"2xx": n, ...}).
    requests = status.get("requests")
    if isinstance(requests, Mapping):
        found.extend(request_families(requests))
    return [family for family in found if family is not None]


def request_families(counts: Mapping[str, Any]) -> list[Family]:
    """``arcology_http_requests_total`` by status class."""
    samples = [
        ({"class": klass}, float(counts[klass]))
        for klass in STATUS_CLASSES
        if isinstance(counts.get(klass), int)
    ]
    if not samples:
        return []
    return [
        Family(
            "arcology_http_requests_total",
            "counter",
            "HTTP requests answered, by status class.",
            samples,
        )
    ]


def runtime_families(status: Mapping[str, Any]) -> list[Family]:
    """Actor restarts and states, and the process start time."""
    actors = [a for a in status.get("actors", []) if isinstance(a, Mapping)]
    return [
        Family(
            "arcology_actor_restarts_total",
            "counter",
            "Times the actor was restarted after a crash.",
            [({"actor": str(a["name"])}, float(a["restarts"])) for a in actors],
        ),
        Family(
            "arcology_actor_up",
            "gauge",
            "1 when the actor is running, 0 when it is restarting or failed.",
            [
                ({"actor": str(a["name"])}, 1.0 if a["state"] == "running" else 0.0)
                for a in actors
            ],
        ),
        Family(
            "arcology_start_time_seconds",
            "gauge",
            "When this Arcology process started (Unix time).",
            [({}, float(status.get("started_at", 0.0)))],
        ),
    ]


def source_family(up: Mapping[str, bool]) -> Family:
    """Whether each actor asked during the scrape answered."""
    return Family(
        "arcology_scrape_source_up",
        "gauge",
        "1 when the actor asked for its figures answered this scrape, else 0.",
        [({"source": name}, 1.0 if ok else 0.0) for name, ok in up.items()],
    )


# -- the application ----------------------------------------------------------


class MetricsApp:
    """The ASGI application behind ``listen``: ``GET /metrics`` and nothing else."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # The certificate family, rendered by the actor in its own thread on
        # each change (10,000 domains take about 15 ms to render, which the
        # loop must not pay per scrape) and swapped whole; the loop only
        # reads it.
        self.certificates_text = render([certificate_family({})]).encode()
        self.scrapes = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Answer one request."""
        if scope.get("type") != "http":
            return
        if scope.get("path") != "/metrics":
            await _answer(send, 404, b"not found: the figures are at /metrics\n")
            return
        if scope.get("method") not in ("GET", "HEAD"):
            await _answer(send, 405, b"only GET and HEAD\n", [(b"allow", b"GET, HEAD")])
            return
        body = await self.scrape()
        await _answer(send, 200, body, content_type=CONTENT_TYPE.encode())

    async def scrape(self) -> bytes:
        """The exposition text, asking Esper for its counters."""
        self.scrapes += 1
        esper = await self._ask("Esper", "status")
        return self.certificates_text + render(self.families(esper)).encode()

    async def _ask(self, actor: str, verb_name: str) -> Mapping[str, Any] | None:
        try:
            answer = await self.runtime.ask_async(
                actor, verb_name, {}, timeout=SOURCE_TIMEOUT_S
            )
        except ArcError:
            return None
        return answer if isinstance(answer, Mapping) else None

    def families(self, esper: Mapping[str, Any] | None) -> list[Family]:
        """The families besides certificates, from Esper's answer (None: none)."""
        families: list[Family] = []
        if esper is not None:
            families += esper_families(esper)
        families += runtime_families(self.runtime.status())
        families.append(source_family({"Esper": esper is not None}))
        return families


async def _answer(
    send: Any,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = b"text/plain; charset=utf-8",
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# -- the actor ----------------------------------------------------------------


@dataclass(frozen=True)
class MetricsOptions:
    """``[plugins.metrics]``: where ``/metrics`` is served."""

    listen: str = DEFAULT_LISTEN

    def __post_init__(self) -> None:
        parse_address(self.listen, "listen")


def metrics_port(listen: str, bind: Sequence[str]) -> int:
    """The port to serve ``/metrics`` on, given ``listen`` and the bind addresses.

    LIMITATION: Esper opens every port, plugin ports too, on the addresses
    of ``[arcology] bind``; it cannot bind one port to other addresses. So
    the HOST of ``listen`` must be one of them (or be covered by a wildcard
    bind address), otherwise the plugin is refused; and when ``bind`` has
    more addresses, ``/metrics`` answers on those too (a WARNING says so).

    Under ``arcology run --workers N``, worker I serves ``PORT + I``: each
    worker has its own counters, and one port shared by all of them would
    hand each scrape to a random worker. Scrape every worker's port.
    """
    host, port = parse_address(listen, "listen")
    if not _bind_covers(host, bind):
        raise ConfigError(
            f"listen: {host} is not among the bind addresses "
            f"({', '.join(bind)}); Esper opens plugin ports on [arcology] bind"
        )
    # Loopback beside loopback exposes nothing more; anything else might.
    others = [
        a for a in bind if a != host and not (is_loopback(a) and is_loopback(host))
    ]
    if others:
        log.warning(
            "metrics also answer on the other bind addresses listen={l} also={a}",
            l=listen,
            a=",".join(others),
        )
    index = worker_index()
    return port + index if index else port


def _same_host(address: str, host: str) -> bool:
    return host == "localhost" and address in ("127.0.0.1", "::1")


def _bind_covers(host: str, bind: Sequence[str]) -> bool:
    if host in bind or any(_same_host(a, host) for a in bind):
        return True
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return False
    wildcard = "0.0.0.0" if version == 4 else "::"
    return wildcard in bind


class Metrics(Plugin):
    """Serves ``/metrics`` and keeps certificate expiry up to date."""

    name = "metrics"
    needs = ("Cryptosaur", "Esper")
    hears = ("Cryptosaur.certificateChanged",)
    Options = MetricsOptions

    def __init__(self, runtime: Runtime, config: Config, options: Any = None) -> None:
        super().__init__(runtime, config, options)
        self.app = MetricsApp(runtime)
        self.expiry: dict[str, float] = {}
        self.port = metrics_port(self.options.listen, config.arcology.bind)

    def on_start(self) -> None:
        """Read the stored certificates once, then open the listener."""
        self.read_all()
        self.serve(self.port, self.app)

    def read_all(self) -> None:
        """Replace the expiry table with Cryptosaur's whole list."""
        summaries = self.runtime.ask("Cryptosaur", "listCertificates", {})
        expiry: dict[str, float] = {}
        for summary in summaries or []:
            expiry.update(_expiry_of(summary))
        self.expiry = expiry
        self._publish()

    def _publish(self) -> None:
        self.app.certificates_text = render([certificate_family(self.expiry)]).encode()

    @verb("Cryptosaur.certificateChanged")
    def certificate_changed(self, payload: Any) -> None:
        """Ask for the changed domains only; a deleted one leaves the table."""
        domains = payload.get("domains") if isinstance(payload, Mapping) else None
        if not isinstance(domains, list) or len(domains) > MAX_SHOW_PER_CHANGE:
            self.read_all()
            return
        # One showCertificate answers for every domain of its certificate
        # (they share one not_after), so a bundle with many domains costs
        # one ask; a deleted domain costs one NotFound.
        done: set[str] = set()
        for domain in domains:
            if not isinstance(domain, str) or domain in done:
                continue
            try:
                summary = self.runtime.ask(
                    "Cryptosaur", "showCertificate", {"domain": domain}
                )
            except NotFound:
                self.expiry.pop(domain, None)
                continue
            if summary.get("domain") != domain:
                # Answered by a wildcard one label up: this domain itself
                # has no certificate of its own any more.
                self.expiry.pop(domain, None)
                continue
            not_after = iso_to_unix(summary["not_after"])
            for name in summary.get("domains") or [domain]:
                self.expiry[name] = not_after
                done.add(name)
        self._publish()
        self.log.debug("certificate expiry updated domains={d}", d=",".join(domains))

    @verb("status")
    def status(self, payload: Any) -> Any:
        """Where ``/metrics`` is served and what it holds."""
        return {
            "listen": self.options.listen,
            "port": self.port,
            "certificates": len(self.expiry),
            "scrapes": self.app.scrapes,
        }

    @verb("certificates")
    def certificates(self, payload: Any) -> Any:
        """The expiry table: domain -> not_after (Unix time)."""
        return dict(self.expiry)


def _expiry_of(summary: Any) -> dict[str, float]:
    if not isinstance(summary, Mapping):
        return {}
    domain = summary.get("domain")
    not_after = summary.get("not_after")
    if not isinstance(domain, str) or not isinstance(not_after, str):
        return {}
    return {domain: iso_to_unix(not_after)}
