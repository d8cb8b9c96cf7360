"""Static files under a root folder, answered without leaving the root.

How this works: ``StaticFiles.respond`` is a plain function of the request
(method, raw path, query, headers) that returns a ``StaticResponse``: status,
headers and either the body bytes or a ``FileBody`` (path, offset, length)
for the server to stream. Nothing here touches a socket.

What always holds:

- The path is percent-decoded exactly once. A NUL, a backslash, or a ``.`` or
  ``..`` segment after decoding is answered 404, so ``%2e%2e``, ``..%2f`` and
  ``..\\`` never climb; ``%252e`` decodes to the literal name ``%2e``.
- The decoded path is joined to the root and resolved with ``realpath``; a
  result outside the root's own ``realpath`` (a symlink pointing out) is 404.
- Validators: a strong ``ETag`` from inode, size and mtime, and
  ``Last-Modified``. ``If-None-Match`` wins over ``If-Modified-Since``
  (RFC 9110 13.2.2); a match answers 304.
- ``Range``: one ``bytes=`` range answers 206 with ``Content-Range``; several
  ranges answer the whole file (200), which RFC 9110 14.2 allows; a range that
  starts past the end answers 416 with ``Content-Range: bytes */SIZE``.
  ``If-Range`` with a different validator answers the whole file.
- A folder asked for without its trailing slash is redirected (301) to the
  slash form; with the slash, its ``index.html`` is served.

Compression: a text-like file (``COMPRESSIBLE``) read inline, of at least
``GZIP_MIN_BYTES``, is also kept gzip-compressed, compressed once per file
version. A client whose ``Accept-Encoding`` accepts gzip gets that variant
(``Content-Encoding: gzip``, its own strong ``ETag`` ending ``-gz``, since it
is a different representation); both variants say ``Vary:
Accept-Encoding``. A ``Range`` request is answered from the identity bytes.

Reading: files up to ``INLINE_MAX_BYTES`` are read inline on the loop (one
``open`` and ``read`` of a small file costs a few microseconds, less than a
thread hop) and kept in a small cache checked against ``stat`` on every
request; larger files are returned as ``FileBody`` and the server reads them
in a worker thread in ``CHUNK_BYTES`` pieces, so a large file never blocks
the loop.
"""

from __future__ import annotations

import dataclasses
import gzip
import mimetypes
import os
import stat as stat_mod
from collections import OrderedDict
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from urllib.parse import unquote_to_bytes

from arc.http.errors import status_line

# Small enough that reading inline costs less than handing off to a thread.
INLINE_MAX_BYTES = 64 * 1024
# Entries of the inline cache: at most 256 * 64 KiB = 16 MiB of file bytes.
CACHE_ENTRIES = 256
# The size of each read when a large file is streamed.
CHUNK_BYTES = 256 * 1024
# Below this, gzip saves too little to be worth a header and a variant.
GZIP_MIN_BYTES = 256
# Types that compress well (the rest are compressed already, or binary).
COMPRESSIBLE = frozenset(
    {
        "application/javascript",
        "application/json",
        "application/manifest+json",
        "application/wasm",
        "application/xml",
        "image/svg+xml",
        "text/javascript",
    }
)

mimetypes.add_type("text/javascript", ".mjs")
mimetypes.add_type("application/wasm", ".wasm")


@dataclass(frozen=True, slots=True)
class FileBody:
    """A byte range of a file that the server streams."""

    path: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class StaticResponse:
    """What to answer: status, headers (without framing) and the body.

    ``head`` is the start of the answer as bytes: the status line, the
    headers (``name: value\r\n`` each) and ``content-length``, built once so
    that a cached answer costs no formatting per request; the server adds
    the connection's own lines and the blank line.
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes | FileBody = b""
    head: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        body = self.body
        length = body.length if isinstance(body, FileBody) else len(body)
        head = b"".join(
            (
                status_line(self.status),
                *(name + b": " + value + b"\r\n" for name, value in self.headers),
                b"content-length: %d\r\n" % length,
            )
        )
        object.__setattr__(self, "head", head)

    @property
    def length(self) -> int:
        """The number of body bytes (what Content-Length says)."""
        body = self.body
        return body.length if isinstance(body, FileBody) else len(body)


def _text(status: int, message: str, *extra: tuple[bytes, bytes]) -> StaticResponse:
    return StaticResponse(
        status,
        ((b"content-type", b"text/plain; charset=utf-8"), *extra),
        message.encode() + b"\n",
    )


NOT_FOUND = _text(404, "not found")
_INDEX = os.sep + "index.html"


def safe_relative(raw_path: bytes) -> str | None:
    """The decoded path below the root, or None when it could climb out.

    The leading slash is dropped; a trailing slash is kept so the caller can
    tell a folder from a file.
    """
    if b"%" not in raw_path and raw_path.isascii():
        # Nothing to decode (the common case): skip unquote's copy.
        decoded = raw_path.decode("ascii")
    else:
        try:
            decoded = unquote_to_bytes(raw_path).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if "\x00" in decoded or "\\" in decoded or not decoded.startswith("/"):
        return None
    for segment in decoded.split("/"):
        if segment in (".", ".."):
            return None
    return decoded.lstrip("/")


def parse_range(value: str, size: int) -> tuple[int, int] | bool | None:
    """One ``bytes=`` range as (start, end inclusive).

    None: ignore the header (malformed or several ranges: answer the whole
    file); False: not satisfiable (416).
    """
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                return False
            return (max(size - suffix, 0), size - 1) if size else False
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size:
        return False
    if start < 0 or end < start:
        return None
    return start, min(end, size - 1)


@dataclass(frozen=True, slots=True)
class _Entry:
    """What is known about one file version: validators and the 200 answer."""

    key: tuple[int, int, int]
    path: str
    etag: str
    last_modified: str
    common: tuple[tuple[bytes, bytes], ...]
    content_type: bytes
    data: bytes | None
    full: StaticResponse
    # The gzip variant and its validators (see the module docstring).
    gzip_full: StaticResponse | None = None
    gzip_etag: str = ""
    gzip_common: tuple[tuple[bytes, bytes], ...] = ()


class StaticFiles:
    """The files under ``root``."""

    def __init__(self, root: Path | str) -> None:
        self.root = os.path.realpath(root)
        self._prefix = self.root.rstrip(os.sep) + os.sep
        # The root's index.html, spelled as respond() spells it for "/".
        self._index = self.root + (_INDEX if self.root[-1:] != os.sep else "index.html")
        self._cache: OrderedDict[str, _Entry] = OrderedDict()

    def _resolve(self, relative: str) -> tuple[str, os.stat_result] | None:
        # Walk below the root with lstat: with no symlink on the way, the
        # path is inside by construction and the last lstat is the file's
        # stat. A symlink anywhere sends the path through realpath, and what
        # lands outside the root is refused.
        path = self.root
        st: os.stat_result | None = None
        try:
            for part in relative.split("/"):
                if not part:
                    continue
                path = path + os.sep + part
                st = os.lstat(path)
                if stat_mod.S_ISLNK(st.st_mode):
                    return self._resolve_links(relative)
            if st is None:
                st = os.stat(path)
        except (OSError, ValueError):
            return None
        return path, st

    def _root_index(self) -> tuple[str, os.stat_result] | None:
        # A request for the root ("/", the most common one) with one stat
        # instead of two: a regular index.html below the root means the root
        # is a folder, which is what the general path would stat first. Any
        # other outcome goes the general way.
        try:
            st = os.stat(self._index)
        except (OSError, ValueError):
            return None
        return (self._index, st) if stat_mod.S_ISREG(st.st_mode) else None

    def _resolve_links(self, relative: str) -> tuple[str, os.stat_result] | None:
        real = os.path.realpath(os.path.join(self.root, relative))
        if real != self.root and not real.startswith(self._prefix):
            return None
        try:
            return real, os.stat(real)
        except (OSError, ValueError):
            return None

    def respond(
        self,
        method: str,
        raw_path: bytes,
        query: bytes,
        headers: dict[bytes, bytes],
    ) -> StaticResponse:
        """Answer one request; ``headers`` has lower-cased names."""
        # Only reading methods make sense for files.
        if method != "GET" and method != "HEAD":
            return _text(405, "method not allowed", (b"allow", b"GET, HEAD"))

        # The root, the most common request, needs no decoding or checks.
        relative = "" if raw_path == b"/" else safe_relative(raw_path)
        if relative is None:
            return NOT_FOUND
        found = self._root_index() if not relative else None
        if found is None:
            found = self._resolve(relative)
        if found is None:
            return NOT_FOUND
        real, st = found

        # A folder: redirect to the slash form, or serve its index.html.
        if stat_mod.S_ISDIR(st.st_mode):
            if relative and not relative.endswith("/"):
                location = raw_path + b"/" + (b"?" + query if query else b"")
                return _text(301, "moved", (b"location", location))
            # Plain concatenation: real never ends with a separator here
            # unless it is the file system root (os.path.join costs ~1 us).
            real = real + _INDEX if real[-1:] != os.sep else real + "index.html"
            try:
                st = os.stat(real)
            except OSError:
                return NOT_FOUND
        if not stat_mod.S_ISREG(st.st_mode):
            return NOT_FOUND
        entry = self._entry(real, st)
        if entry is None:
            return NOT_FOUND
        gzip_ok = entry.gzip_full is not None and accepts_gzip(
            headers.get(b"accept-encoding")
        )
        if not headers or not (
            b"if-none-match" in headers
            or b"if-modified-since" in headers
            or b"range" in headers
        ):
            return entry.gzip_full if gzip_ok and entry.gzip_full else entry.full
        return self._conditional(entry, st, headers, gzip_ok)

    def _entry(self, real: str, st: os.stat_result) -> _Entry | None:
        # One cached entry per file version (inode, size, mtime).
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        entry = self._cache.get(real)
        if entry is not None and entry.key == key:
            self._cache.move_to_end(real)
            return entry
        size = st.st_size
        etag = f'"{st.st_ino:x}-{size:x}-{st.st_mtime_ns:x}"'
        last_modified = formatdate(st.st_mtime, usegmt=True)
        content_type, encoding = mimetypes.guess_type(real)
        if content_type is None or encoding is not None:
            content_type = "application/octet-stream"
        elif content_type.startswith("text/") or content_type in (
            "application/javascript",
            "application/json",
            "image/svg+xml",
        ):
            content_type += "; charset=utf-8"
        common: tuple[tuple[bytes, bytes], ...] = (
            (b"etag", etag.encode()),
            (b"last-modified", last_modified.encode()),
            (b"accept-ranges", b"bytes"),
        )
        ctype = content_type.encode()
        data: bytes | None = None
        if size <= INLINE_MAX_BYTES:
            try:
                with open(real, "rb") as f:
                    data = f.read(INLINE_MAX_BYTES + 1)
            except OSError:
                return None
            body: bytes | FileBody = data
        else:
            body = FileBody(real, 0, size)
        gzip_body = _gzipped(data, content_type) if data is not None else None
        if gzip_body is not None:
            common = (*common, (b"vary", b"accept-encoding"))
        full = StaticResponse(200, ((b"content-type", ctype), *common), body)
        entry = _Entry(key, real, etag, last_modified, common, ctype, data, full)
        if gzip_body is not None:
            gzip_etag = etag[:-1] + '-gz"'
            gzip_common = (
                (b"etag", gzip_etag.encode()),
                (b"last-modified", last_modified.encode()),
                (b"vary", b"accept-encoding"),
            )
            gzip_full = StaticResponse(
                200,
                (
                    (b"content-type", ctype),
                    (b"content-encoding", b"gzip"),
                    *gzip_common,
                ),
                gzip_body,
            )
            entry = dataclasses.replace(
                entry, gzip_full=gzip_full, gzip_etag=gzip_etag, gzip_common=gzip_common
            )
        if data is not None and len(data) != size:
            # It changed between stat and read: answer what was read, keep nothing.
            return entry
        self._cache[real] = entry
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return entry

    def _conditional(
        self,
        entry: _Entry,
        st: os.stat_result,
        headers: dict[bytes, bytes],
        gzip_ok: bool = False,
    ) -> StaticResponse:
        # A range is cut from the identity bytes; otherwise the variant the
        # client accepts is the one its validators are compared with.
        range_value = headers.get(b"range")
        variant = gzip_ok and range_value is None and entry.gzip_full is not None
        full = entry.gzip_full if variant and entry.gzip_full else entry.full
        etag = entry.gzip_etag if variant else entry.etag
        common = entry.gzip_common if variant else entry.common
        size = st.st_size

        # Conditional requests (RFC 9110 13.1): If-None-Match wins.
        if_none_match = headers.get(b"if-none-match")
        if if_none_match is not None:
            tags = [t.strip() for t in if_none_match.decode("latin-1").split(",")]
            if "*" in tags or etag in tags or ("W/" + etag) in tags:
                return StaticResponse(304, common)
        else:
            since = headers.get(b"if-modified-since")
            if since is not None and _not_modified_since(since, st.st_mtime):
                return StaticResponse(304, common)

        # Range (RFC 9110 14.2), unless If-Range names another version.
        if range_value is None:
            return full
        if_range = headers.get(b"if-range")
        if if_range is not None and if_range.decode("latin-1") not in (
            etag,
            entry.last_modified,
        ):
            return entry.full
        wanted = parse_range(range_value.decode("latin-1"), size)
        if wanted is False:
            return StaticResponse(
                416, (*common, (b"content-range", f"bytes */{size}".encode()))
            )
        if not isinstance(wanted, tuple):
            return entry.full
        start, end = wanted
        out = (
            (b"content-type", entry.content_type),
            *common,
            (b"content-range", f"bytes {start}-{end}/{size}".encode()),
        )
        if entry.data is None:
            return StaticResponse(
                206, out, FileBody(entry.path, start, end - start + 1)
            )
        return StaticResponse(206, out, entry.data[start : end + 1])


def accepts_gzip(value: bytes | None) -> bool:
    """Whether an ``Accept-Encoding`` value accepts gzip (RFC 9110 12.5.3)."""
    if not value:
        return False
    for item in value.lower().split(b","):
        coding, _, params = item.partition(b";")
        if coding.strip() not in (b"gzip", b"x-gzip", b"*"):
            continue
        quality = params.strip()
        if quality.startswith(b"q="):
            try:
                return float(quality[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def _gzipped(data: bytes, content_type: str) -> bytes | None:
    """``data`` gzip-compressed when its type compresses and it pays off."""
    base = content_type.split(";", 1)[0].strip()
    if len(data) < GZIP_MIN_BYTES or not (
        base.startswith("text/") or base in COMPRESSIBLE
    ):
        return None
    packed = gzip.compress(data, compresslevel=6, mtime=0)
    return packed if len(packed) < len(data) * 0.9 else None


def _not_modified_since(value: bytes, mtime: float) -> bool:
    try:
        since = parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError):
        return False
    return int(mtime) <= since


def read_chunk(path: str, offset: int, size: int) -> bytes:
    """Read ``size`` bytes at ``offset`` (run in a worker thread)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)
