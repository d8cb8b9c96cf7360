"""Static files: validators, ranges, folders, and no way out of the root."""

from __future__ import annotations

import gzip
import os
from email.utils import formatdate
from pathlib import Path

import pytest

from arc.http.static import INLINE_MAX_BYTES, FileBody, StaticFiles, StaticResponse


@pytest.fixture
def root(tmp_path: Path) -> Path:
    www = tmp_path / "www"
    (www / "docs").mkdir(parents=True)
    (www / "index.html").write_text("<h1>home</h1>")
    (www / "docs" / "index.html").write_text("docs")
    (www / "app.js").write_text("let a = 1;")
    (www / "data.bin").write_bytes(bytes(range(256)) * 4)
    (www / "%2e%2e").write_text("a file with an odd name")
    (tmp_path / "secret.txt").write_text("outside the root")
    os.symlink(tmp_path / "secret.txt", www / "escape.txt")
    os.symlink(www / "app.js", www / "inside-link.js")
    return www


def get(files: StaticFiles, path: bytes, **headers: str) -> StaticResponse:
    named = {k.replace("_", "-").encode(): v.encode() for k, v in headers.items()}
    return files.respond("GET", path, b"", named)


def header(answer: StaticResponse, name: bytes) -> bytes | None:
    return dict(answer.headers).get(name)


def test_a_file_is_served_with_its_content_type_and_validators(root: Path) -> None:
    answer = get(StaticFiles(root), b"/app.js")

    assert answer.status == 200
    assert answer.body == b"let a = 1;"
    assert header(answer, b"content-type") == b"text/javascript; charset=utf-8"
    assert header(answer, b"etag") is not None
    assert header(answer, b"last-modified") is not None


@pytest.mark.parametrize(
    "path",
    [
        b"/../secret.txt",
        b"/%2e%2e/secret.txt",
        b"/%2E%2E/secret.txt",
        b"/docs/..%2f..%2fsecret.txt",
        b"/docs/%2e%2e%2f%2e%2e%2fsecret.txt",
        b"/..%5csecret.txt",
        b"/docs\\..\\..\\secret.txt",
        b"/index.html%00.js",
        b"/./index.html",
        b"/%c0%ae%c0%ae/secret.txt",
        b"/escape.txt",
    ],
)
def test_no_path_leaves_the_root(root: Path, path: bytes) -> None:
    answer = get(StaticFiles(root), path)

    assert answer.status == 404
    assert b"outside" not in bytes(answer.body)  # type: ignore[arg-type]


def test_double_encoding_is_decoded_once_into_a_literal_name(root: Path) -> None:
    answer = get(StaticFiles(root), b"/%252e%252e")

    assert answer.status == 200
    assert answer.body == b"a file with an odd name"


def test_a_symlink_that_stays_inside_the_root_is_served(root: Path) -> None:
    assert get(StaticFiles(root), b"/inside-link.js").status == 200


def test_matching_etag_answers_304(root: Path) -> None:
    files = StaticFiles(root)
    etag = header(get(files, b"/app.js"), b"etag")
    assert etag is not None

    answer = get(files, b"/app.js", if_none_match=etag.decode())

    assert answer.status == 304
    assert answer.body == b""


def test_if_modified_since_at_or_after_mtime_answers_304(root: Path) -> None:
    mtime = (root / "app.js").stat().st_mtime
    files = StaticFiles(root)

    fresh = get(files, b"/app.js", if_modified_since=formatdate(mtime + 5, usegmt=True))
    stale = get(
        files, b"/app.js", if_modified_since=formatdate(mtime - 60, usegmt=True)
    )

    assert fresh.status == 304
    assert stale.status == 200


def test_if_none_match_wins_over_if_modified_since(root: Path) -> None:
    mtime = (root / "app.js").stat().st_mtime

    answer = get(
        StaticFiles(root),
        b"/app.js",
        if_none_match='"other"',
        if_modified_since=formatdate(mtime + 5, usegmt=True),
    )

    assert answer.status == 200


@pytest.mark.parametrize(
    ("value", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=1000-", 1000, 1023),
        ("bytes=-4", 1020, 1023),
        ("bytes=1020-5000", 1020, 1023),
    ],
)
def test_a_single_range_answers_206(
    root: Path, value: str, start: int, end: int
) -> None:
    answer = get(StaticFiles(root), b"/data.bin", range=value)

    assert answer.status == 206
    assert answer.body == (bytes(range(256)) * 4)[start : end + 1]
    assert header(answer, b"content-range") == f"bytes {start}-{end}/1024".encode()


def test_a_range_past_the_end_answers_416(root: Path) -> None:
    answer = get(StaticFiles(root), b"/data.bin", range="bytes=5000-6000")

    assert answer.status == 416
    assert header(answer, b"content-range") == b"bytes */1024"


def test_several_ranges_answer_the_whole_file(root: Path) -> None:
    answer = get(StaticFiles(root), b"/data.bin", range="bytes=0-1,5-6")

    assert answer.status == 200
    assert answer.length == 1024


def test_if_range_with_another_validator_answers_the_whole_file(root: Path) -> None:
    answer = get(StaticFiles(root), b"/data.bin", range="bytes=0-9", if_range='"old"')

    assert answer.status == 200


def test_a_folder_without_slash_redirects_and_with_slash_serves_its_index(
    root: Path,
) -> None:
    files = StaticFiles(root)

    redirect = files.respond("GET", b"/docs", b"x=1", {})
    index = get(files, b"/docs/")

    assert redirect.status == 301
    assert header(redirect, b"location") == b"/docs/?x=1"
    assert index.body == b"docs"


def test_a_folder_without_index_is_404(root: Path) -> None:
    (root / "empty").mkdir()

    assert get(StaticFiles(root), b"/empty/").status == 404


def test_other_methods_than_get_and_head_answer_405(root: Path) -> None:
    answer = StaticFiles(root).respond("POST", b"/app.js", b"", {})

    assert answer.status == 405
    assert header(answer, b"allow") == b"GET, HEAD"


def test_large_files_are_streamed_not_read_inline(root: Path) -> None:
    (root / "big.bin").write_bytes(b"x" * (INLINE_MAX_BYTES + 1))

    answer = get(StaticFiles(root), b"/big.bin", range="bytes=10-")

    assert isinstance(answer.body, FileBody)
    assert (answer.body.offset, answer.body.length) == (10, INLINE_MAX_BYTES + 1 - 10)


def test_a_changed_file_is_read_again(root: Path) -> None:
    files = StaticFiles(root)
    assert get(files, b"/app.js").body == b"let a = 1;"
    os.utime(root / "app.js", ns=(1, 1))
    (root / "app.js").write_text("let b = 22;")

    assert get(files, b"/app.js").body == b"let b = 22;"


# -- gzip ------------------------------------------------------------------------


@pytest.fixture
def text_root(tmp_path: Path) -> Path:
    www = tmp_path / "text"
    www.mkdir()
    (www / "page.html").write_text("<p>Arcology serves this page.</p>\n" * 40)
    (www / "tiny.css").write_text("p{}")
    (www / "photo.png").write_bytes(b"\x89PNG" + bytes(2000))
    return www


def test_a_text_file_is_served_gzipped_to_a_client_that_accepts_it(
    text_root: Path,
) -> None:
    files = StaticFiles(text_root)
    original = (text_root / "page.html").read_bytes()

    packed = get(files, b"/page.html", accept_encoding="br, gzip;q=0.8")
    plain = get(files, b"/page.html")

    assert header(packed, b"content-encoding") == b"gzip"
    assert isinstance(packed.body, bytes)
    assert gzip.decompress(packed.body) == original
    assert len(packed.body) < len(original) // 4
    assert plain.body == original and header(plain, b"content-encoding") is None
    assert header(packed, b"vary") == header(plain, b"vary") == b"accept-encoding"
    etags = header(packed, b"etag"), header(plain, b"etag")
    assert etags[0] is not None and etags[0].endswith(b'-gz"')
    assert etags[0] != etags[1]


@pytest.mark.parametrize("value", ["identity", "gzip;q=0", "deflate", "br"])
def test_gzip_is_not_used_unless_accepted(text_root: Path, value: str) -> None:
    answer = get(StaticFiles(text_root), b"/page.html", accept_encoding=value)

    assert header(answer, b"content-encoding") is None


@pytest.mark.parametrize("path", [b"/tiny.css", b"/photo.png"])
def test_tiny_and_binary_files_are_never_gzipped(text_root: Path, path: bytes) -> None:
    answer = get(StaticFiles(text_root), path, accept_encoding="gzip")

    assert header(answer, b"content-encoding") is None
    assert header(answer, b"vary") is None


def test_each_variant_revalidates_against_its_own_etag(text_root: Path) -> None:
    files = StaticFiles(text_root)
    packed_tag = header(get(files, b"/page.html", accept_encoding="gzip"), b"etag")
    plain_tag = header(get(files, b"/page.html"), b"etag")
    assert packed_tag is not None and plain_tag is not None

    same = get(
        files, b"/page.html", accept_encoding="gzip", if_none_match=packed_tag.decode()
    )
    other = get(
        files, b"/page.html", accept_encoding="gzip", if_none_match=plain_tag.decode()
    )

    assert same.status == 304 and header(same, b"etag") == packed_tag
    assert other.status == 200 and header(other, b"content-encoding") == b"gzip"


def test_a_range_is_cut_from_the_identity_bytes(text_root: Path) -> None:
    original = (text_root / "page.html").read_bytes()

    answer = get(
        StaticFiles(text_root), b"/page.html", accept_encoding="gzip", range="bytes=0-9"
    )

    assert answer.status == 206
    assert answer.body == original[:10]
    assert header(answer, b"content-encoding") is None
