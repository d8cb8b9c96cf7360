"""The ``ai1`` command: administer a running Arcology over its admin channel.

``ai1 COMMAND ...`` runs one command and exits: 0 on success, 1 when the
server (or the local check) refused it, 2 for a wrong command line or
configuration, 3 when the admin channel cannot be reached. Errors are one
line on stderr, starting with ``ai1:``. ``ai1`` with no command opens the
interactive session (``arc.ai1.repl``) with the same commands.

The server is found the way ``arcology run`` finds its configuration:
``--config FILE``, else ``./arcology.toml`` if it exists, else the embedded
defaults (admin channel 127.0.0.1:7399, token ``./arc-data/admin.token``).
``--admin HOST:PORT`` and ``--token-file FILE`` override what the
configuration says.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

from arc.ai1 import render
from arc.ai1.client import DEFAULT_WINDOW, AdminClient, Unreachable, tls_client_context
from arc.errors import ArcError, BadInput, ConfigError, Unauthorized
from arc.messages import MAX_MESSAGE_BYTES

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

# A bundle must leave room for its envelope inside one request frame.
FRAME_ENVELOPE_BYTES = 4096
# Completion in the interactive session reuses the domain list this long.
DOMAIN_CACHE_S = 30.0


class UsageError(Exception):
    """The command line is wrong; the message says how."""


class HelpShown(Exception):
    """``--help`` was printed; nothing else to do."""


class Parser(argparse.ArgumentParser):
    """An argument parser that raises instead of exiting (the REPL lives on)."""

    # The parser of each command, by name (set on the top-level parser).
    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._print_message(message, sys.stderr)
        raise HelpShown()


# -- the command line ---------------------------------------------------------


def build_parser() -> Parser:
    """Every command, its arguments and the options that find the server."""
    top = Parser(
        prog="ai1",
        description="Administer a running Arcology: certificates, services, status. "
        "With no command: an interactive session.",
    )
    top.add_argument("--config", type=Path, help="arcology configuration file")
    top.add_argument("--admin", metavar="HOST:PORT", help="admin channel address")
    top.add_argument("--token-file", type=Path, metavar="FILE", help="admin token")
    top.add_argument(
        "--admin-ca",
        type=Path,
        metavar="FILE",
        help="speak TLS to the admin channel, trusting the certificates in FILE",
    )
    top.add_argument(
        "--admin-name", metavar="NAME", help="the name the admin certificate is for"
    )
    commands = top.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=Parser
    )

    upload = commands.add_parser("upload", help=COMMAND_HELP["upload"])
    upload.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    upload.add_argument(
        "--domain",
        action="append",
        dest="domains",
        metavar="NAME",
        help="store for this domain only (repeatable; default: every name)",
    )
    upload.add_argument("--passphrase-file", type=Path, metavar="FILE")
    upload.add_argument(
        "--window", type=int, default=DEFAULT_WINDOW, help=argparse.SUPPRESS
    )

    check = commands.add_parser("check", help=COMMAND_HELP["check"])
    check.add_argument("path", type=Path, metavar="FILE")
    check.add_argument("--domain", action="append", dest="domains", metavar="NAME")
    check.add_argument("--passphrase-file", type=Path, metavar="FILE")
    check.add_argument("--json", action="store_true", help="print the summary as JSON")

    delete = commands.add_parser("delete", help=COMMAND_HELP["delete"])
    delete.add_argument("domain")

    listing = commands.add_parser("list", help=COMMAND_HELP["list"])
    listing.add_argument("--json", action="store_true")

    show = commands.add_parser("show", help=COMMAND_HELP["show"])
    show.add_argument("domain")
    show.add_argument("--json", action="store_true")

    services = commands.add_parser("services", help=COMMAND_HELP["services"])
    services.add_argument("--json", action="store_true")

    status = commands.add_parser("status", help=COMMAND_HELP["status"])
    status.add_argument("--json", action="store_true")

    commands.add_parser("reload", help=COMMAND_HELP["reload"])

    call = commands.add_parser("call", help=COMMAND_HELP["call"])
    call.add_argument("verb", metavar="NAME.VERB")
    call.add_argument("args", nargs="*", metavar="ARG")
    top.commands = dict(commands.choices)
    return top


COMMAND_HELP = {
    "upload": "upload bundles (files, or every *.pem in a folder)",
    "check": "validate a bundle here, no server needed",
    "delete": "delete the certificate of a domain",
    "list": "the stored certificates",
    "show": "one certificate and its chain",
    "services": "services, hosts and TLS status",
    "status": "uptime, actors, listeners, cache",
    "reload": "reload the service definitions",
    "call": "ask any actor: call NAME.VERB [JSON | key=value ...]",
}


# -- finding the server -------------------------------------------------------


@dataclass
class Target:
    """Where the admin channel is and how to talk to it."""

    address: tuple[str, int]
    token_file: Path
    tls: Any = None  # ssl.SSLContext | None
    server_name: str | None = None


def resolve_target(args: argparse.Namespace) -> Target:
    """Work out the admin address, token file and TLS from options and config."""
    from arc.config import is_loopback, load_config, parse_address

    config = load_config(args.config)
    settings = config.arcology
    host, port = settings.admin
    if args.admin:
        try:
            host, port = parse_address(args.admin, "--admin")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    # A server bound to every address is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    token_file = args.token_file or settings.token_file

    tls = None
    server_name = args.admin_name or host
    cert = settings.admin_tls_cert
    if args.admin_ca is not None:
        tls = tls_client_context(args.admin_ca)
    elif cert is not None and cert.is_file():
        # On the server's own machine: trust exactly its admin certificate.
        tls = tls_client_context(cert)
        tls.check_hostname = False
    elif cert is not None or not is_loopback(host):
        tls = tls_client_context(None)
    return Target((host, port), Path(token_file), tls, server_name)


# -- a session: one server, one connection, many commands -------------------


@dataclass
class Session:
    """The state commands share: options, the connection, output streams."""

    args: argparse.Namespace
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    interactive: bool = False
    _target: Target | None = None
    _client: AdminClient | None = None
    _domains: tuple[float, list[str]] | None = None

    def target(self) -> Target:
        """The resolved server (resolved once)."""
        if self._target is None:
            self._target = resolve_target(self.args)
        return self._target

    def client(self) -> AdminClient:
        """A connected, authenticated client; reconnects if the link was lost."""
        client = self._client
        if client is not None and client.connected:
            if client.alive():
                return client
            self.say_error(
                f"the connection to the admin channel at {client.where} was lost; "
                "reconnecting"
            )
        from arc.token import read_token

        target = self.target()
        if client is None:
            client = AdminClient(
                target.address, "", tls=target.tls, server_name=target.server_name
            )
            self._client = client
        # Reach the server first: "is arcology running?" beats "no token file".
        client.open()
        try:
            client.token = read_token(target.token_file)
        except ArcError:
            client.close()
            raise
        try:
            client.authenticate()
        except Unauthorized as exc:
            raise Unauthorized(
                f"the admin channel at {client.where} refused the token in "
                f"{target.token_file} ({exc.message}); name the running server's "
                "token with --token-file"
            ) from exc
        return client

    def ask(self, verb: str, payload: Any = None) -> Any:
        """Ask over the admin channel."""
        return self.client().ask(verb, payload)

    def close(self) -> None:
        """Close the connection if one is open."""
        if self._client is not None:
            self._client.close()

    def print(self, text: str) -> None:
        """A line of output."""
        print(text, file=self.out, flush=self.interactive)

    def say_error(self, message: str) -> None:
        """One error line on stderr."""
        print(f"ai1: {message}", file=self.err, flush=True)

    def domains(self) -> list[str]:
        """The stored domains, cached briefly (for completion)."""
        now = time.monotonic()
        if self._domains is None or now - self._domains[0] > DOMAIN_CACHE_S:
            rows = self.ask("Cryptosaur.listCertificates", {})
            names = sorted({str(r.get("domain")) for r in rows if isinstance(r, dict)})
            self._domains = (now, names)
        return self._domains[1]

    def forget_domains(self) -> None:
        """Drop the cached domain list after a change."""
        self._domains = None


# -- commands -------------------------------------------------------------------


def _read_passphrase(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(
            f"--passphrase-file {path}: cannot read it ({exc.strerror or exc})"
        ) from exc
    return data.rstrip(b"\r\n")


def bundle_files(paths: list[Path]) -> Iterator[tuple[Path, str | None]]:
    """Each file to upload, or a path with the reason it has no file."""
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.glob("*.pem") if p.is_file())
            if not found:
                yield path, f"{path}: no *.pem files in this folder"
            for file in found:
                yield file, None
        elif path.is_file():
            yield path, None
        else:
            yield path, f"{path}: no such file or folder"


def _read_bundle(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    limit = MAX_MESSAGE_BYTES - FRAME_ENVELOPE_BYTES
    if len(data) > limit:
        raise BadInput(f"bundle: {len(data)} bytes is over the limit of {limit}")
    return data


def cmd_upload(session: Session, args: argparse.Namespace) -> int:
    """Upload bundles with many requests in flight; one line per file."""
    passphrase = _read_passphrase(args.passphrase_file)
    started = time.monotonic()
    failed = skipped = ok = 0
    names: list[str] = []
    payloads: list[tuple[str, Any]] = []
    for path, problem in bundle_files(args.paths):
        if problem is None:
            try:
                data = _read_bundle(path)
            except BadInput as exc:
                problem = exc.message
        if problem is not None:
            session.print(render.failure_line(str(path), problem))
            failed += 1
            continue
        payload: dict[str, Any] = {"bundle": data}
        if args.domains:
            payload["domains"] = list(args.domains)
        if passphrase is not None:
            payload["passphrase"] = passphrase
        names.append(str(path))
        payloads.append(("Cryptosaur.setCertificate", payload))

    # Many requests in flight on one connection: the server stays busy.
    answered = 0
    try:
        if payloads:
            client = session.client()
            for index, answer in client.pipeline(payloads, window=max(1, args.window)):
                answered += 1
                if answer.error is None and isinstance(answer.ok, dict):
                    ok += 1
                    session.print(render.bundle_line(names[index], answer.ok))
                else:
                    failed += 1
                    message = answer.error.message if answer.error else "no summary"
                    session.print(render.failure_line(names[index], message))
    except Unreachable:
        skipped = len(payloads) - answered
        session.print(
            render.upload_summary(ok, failed, skipped, time.monotonic() - started)
        )
        raise
    finally:
        session.forget_domains()
    session.print(
        render.upload_summary(ok, failed, skipped, time.monotonic() - started)
    )
    if failed:
        total = ok + failed
        session.say_error(f"upload: {failed} of {total} bundles refused")
        return EXIT_FAILED
    return EXIT_OK


def cmd_check(session: Session, args: argparse.Namespace) -> int:
    """Validate a bundle locally with the checks an upload runs."""
    from arc.bundle import parse_bundle

    passphrase = _read_passphrase(args.passphrase_file)
    data = _read_bundle(args.path)
    bundle = parse_bundle(data, domains=args.domains, passphrase=passphrase)
    summary = bundle.summary()
    summary["chain"] = [
        {
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "not_after": render.iso(cert.not_valid_after_utc),
        }
        for cert in bundle.chain
    ]
    if args.json:
        session.print(render.dumps(render.show_json(summary)))
    else:
        session.print(render.bundle_line(str(args.path), summary))
    return EXIT_OK


def cmd_delete(session: Session, args: argparse.Namespace) -> int:
    """Delete the certificate stored for a domain."""
    result = session.ask("Cryptosaur.deleteCertificate", {"domain": args.domain})
    session.forget_domains()
    deleted = result.get("deleted") if isinstance(result, dict) else None
    session.print(f"deleted {', '.join(deleted or [args.domain])}")
    return EXIT_OK


def cmd_list(session: Session, args: argparse.Namespace) -> int:
    """List the stored certificates."""
    rows = session.ask("Cryptosaur.listCertificates", {})
    rows = [r for r in rows if isinstance(r, dict)]
    if args.json:
        session.print(render.dumps(render.list_json(rows)))
    else:
        session.print(render.certificate_table(rows))
    return EXIT_OK


def cmd_show(session: Session, args: argparse.Namespace) -> int:
    """Show one certificate: summary and chain, never the key."""
    detail = session.ask("Cryptosaur.showCertificate", {"domain": args.domain})
    if args.json:
        session.print(render.dumps(render.show_json(detail)))
    else:
        session.print(render.certificate_detail(detail))
    return EXIT_OK


def cmd_services(session: Session, args: argparse.Namespace) -> int:
    """The services, their hosts and TLS status."""
    services = session.ask("Hyperion.services", {})
    if args.json:
        session.print(render.dumps(render.services_json(services)))
    else:
        session.print(render.services_table(services))
    return EXIT_OK


def cmd_status(session: Session, args: argparse.Namespace) -> int:
    """Uptime, actors and restarts, listeners and cache counters."""
    status = session.ask("AI1.status", {})
    if args.json:
        session.print(render.dumps(render.status_json(status)))
    else:
        session.print(render.status_text(status))
    return EXIT_OK


def cmd_reload(session: Session, args: argparse.Namespace) -> int:
    """Reload the service definitions."""
    result = session.ask("Hyperion.reload", {})
    session.print(f"reloaded: {render.cells(result)}")
    return EXIT_OK


def call_payload(args: list[str]) -> Any:
    """``[]`` -> ``{}``; one JSON value as is; else ``key=value`` pairs.

    A value is read as JSON when it is valid JSON, else as text; ``key=@FILE``
    sends the bytes of FILE.
    """
    if not args:
        return {}
    if len(args) == 1 and "=" not in args[0]:
        try:
            return json.loads(args[0])
        except json.JSONDecodeError as exc:
            raise BadInput(
                f"call: expected one JSON value or key=value pairs, got {args[0]!r} "
                f"({exc.msg})"
            ) from exc
    payload: dict[str, Any] = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep or not key:
            raise BadInput(f"call: expected key=value, got {arg!r}")
        if text.startswith("@"):
            payload[key] = _read_bundle(Path(text[1:]))
            continue
        try:
            payload[key] = json.loads(text)
        except json.JSONDecodeError:
            payload[key] = text
    return payload


def cmd_call(session: Session, args: argparse.Namespace) -> int:
    """Ask any actor's verb and print the answer as JSON."""
    if args.verb.count(".") != 1:
        raise BadInput(
            f'call: expected NAME.VERB such as "Hyperion.services", got {args.verb!r}'
        )
    result = session.ask(args.verb, call_payload(args.args))
    session.print(render.dumps(result))
    return EXIT_OK


Command = Callable[[Session, argparse.Namespace], int]
COMMANDS: dict[str, Command] = {
    "upload": cmd_upload,
    "check": cmd_check,
    "delete": cmd_delete,
    "list": cmd_list,
    "show": cmd_show,
    "services": cmd_services,
    "status": cmd_status,
    "reload": cmd_reload,
    "call": cmd_call,
}


def run_command(session: Session, args: argparse.Namespace) -> int:
    """Run one parsed command; print any error as one line; return the exit code."""
    try:
        return COMMANDS[args.command](session, args)
    except Unreachable as exc:
        session.say_error(exc.message)
        return EXIT_UNREACHABLE
    except ConfigError as exc:
        session.say_error(exc.message)
        return EXIT_USAGE
    except ArcError as exc:
        session.say_error(_one_line(exc.message))
        return EXIT_FAILED
    except BrokenPipeError:
        return EXIT_FAILED


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ai1`` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except HelpShown:
        return EXIT_OK
    session = Session(args)
    try:
        if args.command is None:
            from arc.ai1.repl import run_repl

            return run_repl(session)
        return run_command(session, args)
    except KeyboardInterrupt:
        session.say_error("interrupted")
        return EXIT_INTERRUPTED
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main())
