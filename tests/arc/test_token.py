"""Tests for arc/token.py: the admin token file."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from arc.errors import BadInput, ConfigError, NotFound
from arc.token import ensure_token, read_token, tokens_match


def test_the_first_start_creates_a_token_file_only_its_user_can_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "admin.token"

    token = ensure_token(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 43
    assert path.read_text().strip() == token
    assert [p.name for p in tmp_path.iterdir()] == ["admin.token"]


def test_a_later_start_keeps_the_same_token(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    first = ensure_token(path)

    assert ensure_token(path) == first
    assert read_token(path) == first


def test_two_starts_at_once_agree_on_one_token(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    tokens: list[str] = []
    threads = [
        threading.Thread(target=lambda: tokens.append(ensure_token(path)))
        for _ in range(8)
    ]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert len(tokens) == 8
    assert len(set(tokens)) == 1


def test_a_token_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    ensure_token(path)
    os.chmod(path, 0o644)

    with pytest.raises(ConfigError, match=r"mode 0644.*chmod 600"):
        ensure_token(path)


def test_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create"):
        ensure_token(tmp_path / "missing" / "admin.token")


def test_reading_a_missing_token_file_names_it_and_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"admin.token: no such file.*--token-file"):
        read_token(tmp_path / "admin.token")


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    path.write_text("\n")

    with pytest.raises(BadInput, match="expected one token"):
        read_token(path)


def test_a_binary_token_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    path.write_bytes(b"\xff\xfe")

    with pytest.raises(BadInput, match="binary"):
        read_token(path)


def test_tokens_match_only_when_equal() -> None:
    assert tokens_match("abc", "abc")
    assert not tokens_match("abc", "abd")
    assert not tokens_match("", "abc")
