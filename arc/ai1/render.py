"""What ``ai1`` prints: human lines and tables, and the stable ``--json`` shapes.

Human output may change between versions; the JSON shapes may not: each
``*_json`` function names its fields explicitly (missing ones are ``null``),
and docs/ai1.md documents them.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

# The fields every certificate shape opens with, in order.
CERTIFICATE_FIELDS = (
    "domain",
    "domains",
    "fingerprint",
    "not_before",
    "not_after",
    "issuer",
    "subject",
    "key_type",
)
# The stable fields of `ai1 list --json`, in order.
LIST_FIELDS = (
    *CERTIFICATE_FIELDS[:2],
    "domains_total",
    *CERTIFICATE_FIELDS[2:],
    "days_left",
)
# The stable fields of `ai1 show --json`; "chain" holds CHAIN_FIELDS each.
SHOW_FIELDS = (
    *CERTIFICATE_FIELDS,
    "chain_length",
    "reordered",
    "days_left",
    "stored_at",
    "chain",
)
CHAIN_FIELDS = ("subject", "issuer", "not_after")
# `ai1 services --json`: each service, and each of its hosts.
SERVICE_FIELDS = ("name", "tls", "port", "tlsPort", "hosts")
HOST_FIELDS = ("host", "certificate", "days_left")
# `ai1 status --json`: each listener, and Esper's connection counters.
LISTENER_FIELDS = ("port", "tls", "owner", "addresses")
CONNECTION_FIELDS = ("connections_open", "handshakes", "handshake_failures", "rejected")
# A fingerprint is shown shortened in tables; --json and `show` give it whole.
SHORT_FINGERPRINT = 16


# -- JSON ---------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A value JSON can hold: bytes become text (or base64 when not UTF-8)."""
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dt.datetime):
        return iso(value)
    return value


def _pick(source: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """``names`` from ``source``, in that order and ``plain``; missing ones None."""
    return {name: plain(source.get(name)) for name in names}


def dumps(value: Any) -> str:
    """Indented JSON with keys in the order given."""
    return json.dumps(plain(value), indent=2, ensure_ascii=False)


def iso(moment: dt.datetime) -> str:
    """An aware datetime as ``2027-01-01T00:00:00Z``."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _days_left(row: dict[str, Any]) -> int | None:
    value = row.get("days_left")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    not_after = row.get("not_after")
    if isinstance(not_after, str):
        try:
            moment = dt.datetime.fromisoformat(not_after.replace("Z", "+00:00"))
        except ValueError:
            return None
        return int((moment - dt.datetime.now(dt.UTC)).total_seconds() // 86400)
    return None


def certificate_json(row: dict[str, Any]) -> dict[str, Any]:
    """One certificate in the stable shape of ``ai1 list --json``."""
    out = _pick(row, LIST_FIELDS)
    if out["domains"] is None and out["domain"] is not None:
        out["domains"] = [out["domain"]]
    if out["domains_total"] is None and out["domains"] is not None:
        out["domains_total"] = len(out["domains"])
    out["days_left"] = _days_left(row)
    return out


def list_json(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stable shape of ``ai1 list --json``: sorted by domain."""
    return sorted(
        (certificate_json(r) for r in rows), key=lambda r: str(r.get("domain"))
    )


def show_json(detail: dict[str, Any]) -> dict[str, Any]:
    """The stable shape of ``ai1 show --json``."""
    out = _pick(detail, SHOW_FIELDS)
    out["days_left"] = _days_left(detail)
    chain = detail.get("chain") or []
    out["chain"] = [_pick(c, CHAIN_FIELDS) for c in chain if isinstance(c, dict)]
    return out


def status_json(status: dict[str, Any]) -> dict[str, Any]:
    """The stable shape of ``ai1 status --json``."""
    esper = status.get("esper")
    esper = esper if isinstance(esper, dict) else None
    return {
        "started_at": status.get("started_at"),
        "uptime_s": status.get("uptime_s"),
        "failed": status.get("failed"),
        "actors": [
            {
                "name": a.get("name"),
                "state": a.get("state"),
                "restarts": a.get("restarts"),
            }
            for a in status.get("actors") or []
            if isinstance(a, dict)
        ],
        "admin": plain(status.get("admin")),
        "listeners": [
            _pick(listener, LISTENER_FIELDS)
            for listener in (esper.get("listeners") or [])
            if isinstance(listener, dict)
        ]
        if esper
        else None,
        "cache": plain(esper.get("cache")) if esper else None,
        "connections": {name: esper.get(name) for name in CONNECTION_FIELDS}
        if esper
        else None,
        "esper_error": status.get("esper_error"),
        "workers": _workers_json(status.get("workers")),
    }


# What ``ai1 status`` shows of each worker, and adds up over them.
WORKER_COUNTERS = (*CONNECTION_FIELDS, "hits", "misses", "size")


def _workers_json(workers: Any) -> dict[str, Any] | None:
    """Each worker's last report and the totals, or None without workers."""
    if not isinstance(workers, list):
        return None
    each: list[dict[str, Any]] = []
    totals = dict.fromkeys(WORKER_COUNTERS, 0)
    for record in workers:
        if not isinstance(record, dict):
            continue
        entry: dict[str, Any] = {
            "index": record.get("index"),
            "pid": record.get("pid"),
            "age_s": record.get("age_s"),
            "missing": record.get("missing"),
        }
        found = record.get("cache")
        cache: dict[str, Any] = found if isinstance(found, dict) else {}
        for name in WORKER_COUNTERS:
            value = record.get(name, cache.get(name))
            entry[name] = value
            if isinstance(value, int) and not isinstance(value, bool):
                totals[name] += value
        each.append(entry)
    return {"each": each, "totals": totals}


def services_json(services: Any) -> list[dict[str, Any]]:
    """The stable shape of ``ai1 services --json``."""
    out = []
    for service in services if isinstance(services, list) else []:
        if not isinstance(service, dict):
            continue
        entry = _pick(service, SERVICE_FIELDS)
        entry["hosts"] = [
            _pick(host, HOST_FIELDS)
            if isinstance(host, dict)
            else {"host": plain(host), "certificate": None, "days_left": None}
            for host in service.get("hosts") or []
        ]
        out.append(entry)
    return out


# -- human ------------------------------------------------------------------


def short(fingerprint: Any) -> str:
    """A fingerprint's first characters, for tables."""
    text = str(fingerprint or "")
    return text[:SHORT_FINGERPRINT]


def days_text(days: int | None) -> str:
    """``89 days``, ``expired 3 days ago``."""
    if days is None:
        return "?"
    if days < 0:
        return f"expired {-days} day{'s' if days != -1 else ''} ago"
    return f"{days} day{'s' if days != 1 else ''}"


def bundle_line(name: str, summary: dict[str, Any]) -> str:
    """One accepted bundle: ``ok  shop.pem  shop.example.com (+1) ...``."""
    domains = summary.get("domains") or [summary.get("domain")]
    extra = f" (+{len(domains) - 1})" if len(domains) > 1 else ""
    replaced = summary.get("replaced")
    tail = f", replaced {short(replaced)}" if replaced else ""
    not_after = str(summary.get("not_after") or "?")[:10]
    return (
        f"ok    {name}  {summary.get('domain')}{extra}  {summary.get('key_type')}  "
        f"until {not_after} ({days_text(_days_left(summary))})  "
        f"{short(summary.get('fingerprint'))}{tail}"
    )


def failure_line(name: str, message: str) -> str:
    """One refused bundle: ``FAIL  shop.pem  bundle: ...``."""
    return f"FAIL  {name}  {message}"


def upload_summary(ok: int, failed: int, skipped: int, seconds: float) -> str:
    """The last line of an upload."""
    total = ok + failed + skipped
    rate = f", {ok / seconds:.0f}/s" if seconds > 0 and ok else ""
    parts = [f"{ok} of {total} bundle{'s' if total != 1 else ''} uploaded"]
    if failed:
        parts.append(f"{failed} refused")
    if skipped:
        parts.append(f"{skipped} not sent")
    return f"{', '.join(parts)} in {seconds:.1f} s{rate}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in (headers, *rows):
        cells = [c.ljust(widths[i]) for i, c in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def certificate_table(rows: Sequence[dict[str, Any]]) -> str:
    """``ai1 list``: one line per domain."""
    if not rows:
        return "no certificates stored"
    body = [
        [
            str(r.get("domain")),
            days_text(r.get("days_left")),
            str(r.get("not_after") or "?"),
            str(r.get("key_type") or "?"),
            short(r.get("fingerprint")),
            str(r.get("issuer") or "?"),
        ]
        for r in list_json(rows)
    ]
    headers = ["DOMAIN", "LEFT", "NOT AFTER", "KEY", "FINGERPRINT", "ISSUER"]
    return table(headers, body)


def certificate_detail(detail: dict[str, Any]) -> str:
    """``ai1 show``: the summary, then the chain; never a key."""
    shown = show_json(detail)
    lines = [
        f"domain       {shown['domain']}",
        f"domains      {', '.join(shown['domains'] or [])}",
        f"subject      {shown['subject']}",
        f"issuer       {shown['issuer']}",
        f"key          {shown['key_type']}",
        f"valid        {shown['not_before']} to {shown['not_after']} "
        f"({days_text(shown['days_left'])} left)",
        f"fingerprint  {shown['fingerprint']}",
    ]
    if shown["stored_at"]:
        lines.append(f"stored       {shown['stored_at']}")
    if shown["reordered"]:
        lines.append("reordered    yes (the chain was uploaded out of order)")
    lines.append(f"chain        {len(shown['chain'])} certificate(s)")
    for i, cert in enumerate(shown["chain"]):
        lines.append(f"  [{i}] subject  {cert['subject']}")
        lines.append(f"      issuer   {cert['issuer']}")
        if cert["not_after"]:
            lines.append(f"      until    {cert['not_after']}")
    return "\n".join(lines)


def cells(value: Any) -> str:
    """A value on one line: ``opened=[8443] closed=[] unchanged=[8080]``."""
    return _cell(value)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def services_table(services: Any) -> str:
    """``ai1 services``: one line per host of each service."""
    shown = services_json(services)
    if not shown:
        return "no services"
    rows = []
    for service in shown:
        ports = [str(service["port"]) if service["port"] else "-"]
        if service["tlsPort"]:
            ports.append(f"{service['tlsPort']}/tls")
        for host in service["hosts"] or [{"host": "-"}]:
            certificate = host.get("certificate")
            rows.append(
                [
                    str(service["name"]),
                    str(host.get("host")),
                    str(service["tls"]),
                    " ".join(ports),
                    "-" if service["tls"] == "none" else str(certificate or "-"),
                    days_text(host.get("days_left"))
                    if host.get("days_left") is not None
                    else "-",
                ]
            )
    headers = ["SERVICE", "HOST", "TLS", "PORTS", "CERTIFICATE", "LEFT"]
    return table(headers, rows)


def _addresses(value: Any) -> str:
    """``[["127.0.0.1", 8443], ["::1", 8443]]`` as ``127.0.0.1:8443 [::1]:8443``."""
    if not isinstance(value, list):
        return _cell(value)
    out = []
    for item in value:
        if isinstance(item, list | tuple) and len(item) >= 2:
            host = str(item[0])
            out.append(f"[{host}]:{item[1]}" if ":" in host else f"{host}:{item[1]}")
        else:
            out.append(_cell(item))
    return " ".join(out) or "-"


def duration(seconds: float) -> str:
    """``3 d 4 h``, ``12 min 5 s``."""
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def status_text(status: dict[str, Any]) -> str:
    """``ai1 status``: uptime, actors, the admin channel, listeners, cache."""
    shown = status_json(status)
    uptime = shown["uptime_s"] if isinstance(shown["uptime_s"], int | float) else 0
    lines = [f"up {duration(uptime)} (since {shown['started_at']})"]
    if shown["failed"]:
        lines.append(f"FAILED actor: {shown['failed']}")
    actors = [
        [str(a["name"]), str(a["state"]), str(a["restarts"])] for a in shown["actors"]
    ]
    lines.append(table(["ACTOR", "STATE", "RESTARTS"], actors))
    admin = shown["admin"] or {}
    lines.append(
        f"admin channel {admin.get('address')} tls={_cell(admin.get('tls'))} "
        f"connections={admin.get('connections')}"
    )
    if shown["esper_error"]:
        lines.append(f"listeners: unknown ({shown['esper_error']})")
    else:
        listeners = shown["listeners"] or []
        lines.append(f"listeners: {len(listeners)}")
        for listener in listeners:
            kind = "tls" if listener["tls"] else "plain"
            lines.append(
                f"  {listener['port']} {kind} on {_addresses(listener['addresses'])}"
                f" (owner {_cell(listener['owner'])})"
            )
        if shown["cache"] is not None:
            lines.append(f"cache: {_cell(shown['cache'])}")
        if shown["connections"] is not None:
            lines.append(f"connections: {_cell(shown['connections'])}")
    workers = shown["workers"]
    if workers is not None:
        lines.append(
            f"workers: {len(workers['each'])} (the counters above are worker 0's; "
            "each worker as of its last report)"
        )
        rows = [
            [
                _cell(w["index"]),
                _cell(w["pid"]),
                "-" if w["age_s"] is None else f"{w['age_s']:.1f}s",
                *(_cell(w[name]) for name in WORKER_COUNTERS),
            ]
            if not w["missing"]
            else [_cell(w["index"]), "-", "-", f"({w['missing']})"]
            + [""] * (len(WORKER_COUNTERS) - 1)
            for w in workers["each"]
        ]
        rows.append(
            ["all", "", ""] + [str(workers["totals"][n]) for n in WORKER_COUNTERS]
        )
        headers = ["WORKER", "PID", "AGE", "OPEN", "HANDSHAKES", "FAILURES"]
        headers += ["REJECTED", "HITS", "MISSES", "CACHED"]
        lines.append(table(headers, rows))
    return "\n".join(lines)
