"""The interactive ``ai1`` session: the same commands, typed one per line.

Each line is split like a shell would (``shlex``) and parsed by the same
parser as the command line, so ``upload certs/ --domain a.example`` means
the same in both. One connection serves every command; when the server
closed it meanwhile (idle timeout, restart), the next command says so and
connects again. Tab completes commands, options, file paths (for ``upload``
and ``check``) and stored domains (for ``show`` and ``delete``, fetched with
``list`` and cached briefly). History is kept in ``~/.ai1_history``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
from collections.abc import Callable
from pathlib import Path

from arc.ai1.cli import (
    COMMAND_HELP,
    COMMANDS,
    EXIT_OK,
    EXIT_USAGE,
    HelpShown,
    Session,
    UsageError,
    build_parser,
    run_command,
)
from arc.errors import ArcError

HISTORY_FILE = "~/.ai1_history"
HISTORY_LENGTH = 1000
PROMPT = "ai1> "
SESSION_WORDS = ("help", "exit", "quit")
# Verbs offered after `call`; any other NAME.VERB may be typed.
KNOWN_VERBS = (
    "AI1.status",
    "Cryptosaur.listCertificates",
    "Cryptosaur.showCertificate",
    "Cryptosaur.deleteCertificate",
    "Cryptosaur.setCertificate",
    "Hyperion.services",
    "Hyperion.reload",
    "Esper.status",
)
PATH_COMMANDS = ("upload", "check")
DOMAIN_COMMANDS = ("show", "delete")
PATH_OPTIONS = ("--passphrase-file",)
DOMAIN_OPTIONS = ("--domain",)


def help_text() -> str:
    """The list of commands, shown by ``help``."""
    lines = ["commands (help COMMAND for its options):"]
    for name, text in COMMAND_HELP.items():
        lines.append(f"  {name:<10} {text}")
    lines.append(f"  {'help':<10} this list")
    lines.append(f"  {'exit':<10} leave (or Ctrl-D)")
    return "\n".join(lines)


class Completer:
    """Tab completion of commands, options, paths and domains."""

    def __init__(self, domains: Callable[[], list[str]]) -> None:
        self.domains = domains
        self.matches: list[str] = []
        self.options = {
            name: sorted(
                option
                for action in sub._actions
                for option in action.option_strings
                if option.startswith("--")
            )
            for name, sub in build_parser().commands.items()
        }

    def candidates(self, line: str, begidx: int, text: str) -> list[str]:
        """What may replace ``text``, the word at ``begidx`` of ``line``."""
        words = line[:begidx].split()
        if not words:
            return [w + " " for w in (*COMMANDS, *SESSION_WORDS) if w.startswith(text)]
        command, previous = words[0], words[-1]
        if command == "help" and len(words) == 1:
            return [w + " " for w in COMMANDS if w.startswith(text)]
        if text.startswith("-"):
            return [
                o + " " for o in self.options.get(command, []) if o.startswith(text)
            ]
        if previous in PATH_OPTIONS or (
            command in PATH_COMMANDS and previous not in DOMAIN_OPTIONS
        ):
            return complete_path(text)
        if previous in DOMAIN_OPTIONS or (
            command in DOMAIN_COMMANDS and len(words) == 1
        ):
            try:
                names = self.domains()
            except ArcError:
                return []
            return [d + " " for d in names if d.startswith(text)]
        if command == "call" and len(words) == 1:
            return [v + " " for v in KNOWN_VERBS if v.startswith(text)]
        return []

    def complete(self, text: str, state: int) -> str | None:
        """The readline completer: the ``state``-th match for ``text``."""
        if state == 0:
            import readline

            try:
                self.matches = self.candidates(
                    readline.get_line_buffer(), readline.get_begidx(), text
                )
            except Exception:
                self.matches = []
        return self.matches[state] if state < len(self.matches) else None


def complete_path(text: str) -> list[str]:
    """Files and folders starting with ``text``; folders end with a slash."""
    expanded = os.path.expanduser(text)
    out = []
    for match in sorted(glob.glob(glob.escape(expanded) + "*"))[:200]:
        shown = text + match[len(expanded) :]
        out.append(shown + "/" if os.path.isdir(match) else shown + " ")
    return out


def _setup_readline(session: Session) -> Callable[[], None]:
    """Turn on history and completion; return what saves the history."""
    try:
        import readline
    except ImportError:  # pragma: no cover - readline is there on Linux and macOS
        return lambda: None
    history = Path(os.path.expanduser(HISTORY_FILE))
    with contextlib.suppress(OSError):
        readline.read_history_file(history)
    readline.set_history_length(HISTORY_LENGTH)
    completer = Completer(session.domains)
    readline.set_completer(completer.complete)
    readline.set_completer_delims(" \t\n")
    if "libedit" in (readline.__doc__ or ""):  # macOS
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")

    def save() -> None:
        try:
            readline.write_history_file(history)
        except OSError as exc:
            session.say_error(f"cannot save the history in {history} ({exc.strerror})")

    return save


def run_line(session: Session, line: str) -> bool:
    """Run one typed line; return False when the session should end."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        session.say_error(f"cannot split the line ({exc})")
        return True
    if not words:
        return True
    if words[0] in ("exit", "quit"):
        return False
    if words[0] == "help":
        if len(words) > 1 and words[1] in COMMANDS:
            words = [words[1], "--help"]
        else:
            session.print(help_text())
            return True
    try:
        args = build_parser().parse_args(words)
    except UsageError as exc:
        session.say_error(str(exc).removeprefix("ai1: "))
        return True
    except HelpShown:
        return True
    if args.command is None:
        session.say_error("type a command, or help")
        return True
    # The session's options (--config, --admin...) hold; a line cannot change them.
    for name in ("config", "admin", "token_file", "admin_ca", "admin_name"):
        setattr(args, name, getattr(session.args, name))
    try:
        run_command(session, args)
    except KeyboardInterrupt:
        # A half-read answer leaves the connection out of step: start afresh.
        session.close()
        session.say_error("interrupted")
    return True


def run_repl(session: Session, input_line: Callable[[str], str] = input) -> int:
    """Read commands until ``exit`` or end of input."""
    session.interactive = True
    try:
        target = session.target()
    except ArcError as exc:
        session.say_error(exc.message)
        return EXIT_USAGE
    save_history = _setup_readline(session)
    host, port = target.address
    session.print(
        f"ai1: admin session with {host}:{port}{' (TLS)' if target.tls else ''}; "
        "help lists the commands, exit or Ctrl-D leaves"
    )
    try:
        session.client()
    except ArcError as exc:
        session.say_error(" ".join(exc.message.split()))
    try:
        while True:
            try:
                line = input_line(PROMPT)
            except EOFError:
                session.print("")
                break
            except KeyboardInterrupt:
                session.print("")
                continue
            if not run_line(session, line):
                break
    finally:
        save_history()
    return EXIT_OK
