"""The admin token: the shared secret of the admin channel.

Arcology makes the token at first start and keeps it in a file only its
user can read (mode 0600); the ``ai1`` tool reads the same file. Whoever can
read the file can administer the server, exactly as whoever can read the
data folder can read the certificate store.

The file is written once and never rewritten: a temporary file is created
with ``O_CREAT | O_EXCL`` and mode 0600, filled, flushed, then linked to the
final name, which fails if another process got there first. So a reader
never sees a half-written token, and two servers starting at once agree on
one token.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from arc.errors import BadInput, ConfigError, NotFound

# 32 random bytes: 43 URL-safe characters.
TOKEN_BYTES = 32
# A token file is a few dozen bytes; anything far larger is not one.
MAX_TOKEN_FILE_BYTES = 4096


def new_token() -> str:
    """A fresh random token."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def ensure_token(path: Path) -> str:
    """Return the token kept in ``path``, creating the file on first start.

    Raises:
        ConfigError: the file exists but others can read it, or it cannot be
            created (its folder is missing or not writable).
    """
    path = Path(path)
    if not path.exists():
        _create(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"token file {path}: readable by group or others (mode {mode:04o}); "
            f"expected 0600, run: chmod 600 {path}"
        )
    return read_token(path)


def _create(path: Path) -> None:
    """Write a new token file atomically, unless one appears meanwhile."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"token file {path}: cannot create it ({exc.strerror or exc})"
        ) from exc
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(new_token() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        # Another process that linked first wins; its token is the one.
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def read_token(path: Path) -> str:
    """Read the token from ``path``.

    Raises:
        NotFound: there is no such file (the server has never started with
            this data folder, or another token file is meant).
        BadInput: the file cannot be read or does not hold a token.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TOKEN_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise NotFound(
            f"token file {path}: no such file; start arcology once to create it, "
            f"or name the right one with --token-file"
        ) from exc
    except OSError as exc:
        raise BadInput(
            f"token file {path}: cannot read it ({exc.strerror or exc})"
        ) from exc
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise BadInput(
            f"token file {path}: expected one short line, got over "
            f"{MAX_TOKEN_FILE_BYTES} bytes"
        )
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise BadInput(f"token file {path}: expected ASCII text, got binary") from exc
    if not token or any(c.isspace() for c in token):
        raise BadInput(f"token file {path}: expected one token on one line")
    return token


def tokens_match(given: str, expected: str) -> bool:
    """Compare two tokens in constant time."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
