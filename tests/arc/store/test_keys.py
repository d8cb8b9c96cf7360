"""The master key file and sealing private keys with it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from arc.errors import ConfigError
from arc.store.keys import MasterKey, UnsealError, load_master_key


def test_a_missing_key_file_is_created_with_mode_0600_when_allowed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys" / "master.key"

    key = load_master_key(path, may_create=True)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(bytes.fromhex(path.read_text().strip())) == 32
    assert key.path == path


def test_an_existing_key_file_is_read_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    first = load_master_key(path, may_create=True)
    text = path.read_bytes()

    second = load_master_key(path, may_create=True)

    assert path.read_bytes() == text
    assert second.unseal(first.seal(b"secret", "ab"), "ab") == b"secret"


def test_a_missing_key_file_is_an_error_when_the_store_holds_keys(
    tmp_path: Path,
) -> None:
    path = tmp_path / "master.key"

    with pytest.raises(ConfigError, match="is missing, but the certificate store"):
        load_master_key(path, may_create=False)

    assert not path.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"abcd\n",
        b"zz" * 32,
        ("00" * 31).encode(),
        ("00" * 33).encode(),
        b"\xff" * 64,
    ],
    ids=["empty", "short", "not-hex", "31-bytes", "33-bytes", "binary"],
)
def test_a_short_or_corrupt_key_file_is_a_clear_error(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "master.key"
    path.write_bytes(content)

    with pytest.raises(ConfigError) as caught:
        load_master_key(path, may_create=True)

    assert str(path) in caught.value.message
    assert "expected 64 hex digits" in caught.value.message
    assert path.read_bytes() == content


def test_a_sealed_key_opens_only_for_its_fingerprint_and_key() -> None:
    key, other = MasterKey(b"\x01" * 32), MasterKey(b"\x02" * 32)
    sealed = key.seal(b"-----BEGIN PRIVATE KEY-----", "aa" * 32)

    assert key.unseal(sealed, "aa" * 32) == b"-----BEGIN PRIVATE KEY-----"
    with pytest.raises(UnsealError):
        key.unseal(sealed, "bb" * 32)
    with pytest.raises(UnsealError):
        other.unseal(sealed, "aa" * 32)
    with pytest.raises(UnsealError):
        key.unseal(sealed[:-1] + bytes([sealed[-1] ^ 1]), "aa" * 32)
    with pytest.raises(UnsealError, match="unknown format"):
        key.unseal(b"\x09" + sealed[1:], "aa" * 32)


def test_sealing_twice_gives_different_bytes() -> None:
    key = MasterKey(b"\x01" * 32)

    assert key.seal(b"same", "f") != key.seal(b"same", "f")


def test_a_check_value_recognises_its_own_key_only() -> None:
    key, other = MasterKey(b"\x01" * 32), MasterKey(b"\x02" * 32)

    check = key.check_value()

    assert key.matches(check)
    assert not other.matches(check)
    assert not key.matches(b"")


def test_the_master_key_never_shows_in_its_repr() -> None:
    key = MasterKey(bytes(range(32)), Path("/x/master.key"))

    assert bytes(range(32)).hex() not in repr(key)
    assert repr(key) == "MasterKey(path=/x/master.key)"


def test_a_file_of_two_keys_seals_with_the_first_and_opens_with_both(
    tmp_path: Path,
) -> None:
    old, new = os.urandom(32), os.urandom(32)
    sealed_before = MasterKey(old).seal(b"private", "ab12")
    check_before = MasterKey(old).check_value()
    path = tmp_path / "master.key"
    path.write_text(f"{new.hex()}\n\n{old.hex()}\n")

    key = load_master_key(path, may_create=False)
    sealed_now = key.seal(b"private", "ab12")

    assert key.unseal(sealed_before, "ab12") == b"private"
    assert key.matches(check_before)
    assert not key.is_current(sealed_before, "ab12")
    assert key.is_current(sealed_now, "ab12")
    assert MasterKey(new).unseal(sealed_now, "ab12") == b"private"
    with pytest.raises(UnsealError):
        MasterKey(old).unseal(sealed_now, "ab12")


def test_a_bad_second_key_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text(f"{os.urandom(32).hex()}\nnot-a-key\n")

    with pytest.raises(ConfigError, match="line 2: expected 64 hex digits"):
        load_master_key(path, may_create=False)
