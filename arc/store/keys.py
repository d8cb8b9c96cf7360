"""The master key: private keys are sealed with it before any backend sees them.

How this works: one 256-bit key lives in its own file
(``config.arcology.master_key_file``, 64 hex digits, mode 0600), outside the
store. ``MasterKey.seal`` encrypts a private key's PEM with AES-256-GCM under
a fresh 96-bit random nonce, binding the certificate's fingerprint as
associated data: a sealed key copied onto another certificate's row does not
open. A sealed value is ``version byte || nonce || ciphertext+tag``.

So a copy of the store (a backup, a stolen disk image of the database alone)
reveals no private key; the master key file is what to guard and back up
separately.

What always holds:

- The file is created only when it does not exist (``O_EXCL``) and only when
  the caller says the store has never held a sealed key; an existing key is
  never overwritten. A missing, short or malformed file is a ``ConfigError``
  naming the file and what was found.
- A key that is not the one the store was sealed with is detected at open
  through a sealed check value kept by the store (``check_value``).

Rotation. The file may hold several keys, one per line: the first seals,
the others only open what was sealed before (a sealed value does not say
which key made it; AES-GCM's tag tells a wrong key at once). To rotate:
add a new key as the *second* line on every node (they can now open what
it will seal), move it to the first line on every node, call
``Cryptosaur.resealKeys`` once (it re-seals every stored key with the first
key, and the store's check value too), then drop the old line. Each step
needs the nodes restarted (the file is read at start).
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from loguru import logger

from arc.errors import ConfigError

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce; random nonces are safe far past 2**32 seals
SEAL_VERSION = b"\x01"
_KEY_AAD_PREFIX = b"arcology private key v1\x00"
_CHECK_AAD = b"arcology master key check v1"
_CHECK_PLAINTEXT = b"this store's private keys are sealed with this master key"

log = logger.bind(actor="cryptosaur")


class UnsealError(Exception):
    """A sealed value does not open with this key and this fingerprint."""


class MasterKey:
    """The AES-256-GCM key that seals private keys at rest."""

    def __init__(
        self, key: bytes, path: Path | None = None, previous: Sequence[bytes] = ()
    ) -> None:
        for one in (key, *previous):
            if len(one) != KEY_BYTES:
                raise ValueError(
                    f"master key must be {KEY_BYTES} bytes, got {len(one)}"
                )
        self._aead = AESGCM(key)
        self._previous = [AESGCM(one) for one in previous]
        self.path = path

    def __repr__(self) -> str:
        return f"MasterKey(path={self.path!s})"

    def seal(self, plaintext: bytes, fingerprint: str) -> bytes:
        """Encrypt a private key for the certificate with ``fingerprint``."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return (
            SEAL_VERSION
            + nonce
            + self._aead.encrypt(nonce, plaintext, _aad(fingerprint))
        )

    def unseal(self, sealed: bytes, fingerprint: str) -> bytes:
        """Decrypt what ``seal`` made; ``UnsealError`` if it does not open."""
        return self._open(sealed, _aad(fingerprint))

    def check_value(self) -> bytes:
        """A sealed constant that the store keeps to recognise this key."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return (
            SEAL_VERSION
            + nonce
            + self._aead.encrypt(nonce, _CHECK_PLAINTEXT, _CHECK_AAD)
        )

    def matches(self, check_value: bytes) -> bool:
        """Whether ``check_value`` was made by one of this file's keys."""
        try:
            return self._open(check_value, _CHECK_AAD) == _CHECK_PLAINTEXT
        except UnsealError:
            return False

    def is_current(self, sealed: bytes, fingerprint: str | None = None) -> bool:
        """Whether ``sealed`` opens with the first key (the check value when
        ``fingerprint`` is None)."""
        aad = _CHECK_AAD if fingerprint is None else _aad(fingerprint)
        try:
            self._open(sealed, aad, current_only=True)
        except UnsealError:
            return False
        return True

    def _open(self, sealed: bytes, aad: bytes, current_only: bool = False) -> bytes:
        head = len(SEAL_VERSION) + NONCE_BYTES
        if len(sealed) <= head or sealed[:1] != SEAL_VERSION:
            raise UnsealError("sealed value has an unknown format")
        keys = [self._aead] if current_only else [self._aead, *self._previous]
        for aead in keys:
            try:
                return aead.decrypt(sealed[1:head], sealed[head:], aad)
            except InvalidTag:
                continue
        raise UnsealError("sealed value does not open with this key")


def _aad(fingerprint: str) -> bytes:
    return _KEY_AAD_PREFIX + fingerprint.encode("ascii")


def load_master_key(path: Path, *, may_create: bool) -> MasterKey:
    """Read the master key file, creating it first if allowed and absent.

    Args:
        path: the key file.
        may_create: True only when the store has never sealed a key, so a
            new key cannot orphan existing ones.

    The first non-empty line is the key that seals; later lines are keys
    that only open (see Rotation above).

    Raises:
        ConfigError: the file is missing (and may not be created), unreadable,
            or a line is not 64 hex digits.
    """
    if not path.exists():
        if not may_create:
            raise ConfigError(
                f"master key file {path} is missing, but the certificate store "
                "already holds keys sealed with a master key; restore the file "
                "from your backup (a new key could not open them)"
            )
        _create(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"master key file {path} cannot be read ({exc})") from exc
    keys: list[bytes] = []
    for number, line in enumerate(raw.splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        try:
            key = bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            raise ConfigError(
                f"master key file {path}: line {number}: expected "
                f"{KEY_BYTES * 2} hex digits (a 256-bit key), found "
                f"{len(text)} characters that are not; restore the file from "
                "your backup"
            )
        keys.append(key)
    if not keys:
        raise ConfigError(
            f"master key file {path}: expected {KEY_BYTES * 2} hex digits (a "
            "256-bit key), found none; restore the file from your backup"
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "master key file is readable by others path={p} mode={m:o}", p=path, m=mode
        )
    return MasterKey(keys[0], path, previous=keys[1:])


def _create(path: Path) -> None:
    """Write a new random key; never replaces a file that appeared meanwhile.

    The key is written to a temporary file and hard-linked into place, so a
    reader never sees a half-written key and ``link`` refuses to replace a
    file another process created first (theirs is then used).
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = (secrets.token_bytes(KEY_BYTES).hex() + "\n").encode("ascii")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return
        finally:
            temporary.unlink()
    except OSError as exc:
        raise ConfigError(f"master key file {path} cannot be created ({exc})") from exc
    _fsync_dir(path.parent)
    log.info("master key created path={p}", p=path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
