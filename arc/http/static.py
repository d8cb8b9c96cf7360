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

Reading: files up to ``INLINE_MAX_BYTES`` are read inline on the loop (one
``open`` and ``read`` of a small file costs a few microseconds, less than a
thread hop) and kept in a small cache checked against ``stat`` on every
request; larger files are returned as ``FileBody`` and the server reads them
in a worker thread in ``CHUNK_BYTES`` pieces, so a large file never blocks
the loop.
"""

from __future__ import annotations

import mimetypes
import os
import stat as stat_mod
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from urllib.parse import unquote_to_bytes

# Small enough that reading inline costs less than handing off to a thread.
INLINE_MAX_BYTES = 64 * 1024
# Entries of the inline cache: at most 256 * 64 KiB = 16 MiB of file bytes.
CACHE_ENTRIES = 256
# The size of each read when a large file is streamed.
CHUNK_BYTES = 256 * 1024

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
    """What to answer: status, headers (without framing) and the body."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes | FileBody = b""

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


def safe_relative(raw_path: bytes) -> str | None:
    """The decoded path below the root, or None when it could climb out.

    The leading slash is dropped; a trailing slash is kept so the caller can
    tell a folder from a file.
    """
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


class StaticFiles:
    """The files under ``root``."""

    def __init__(self, root: Path | str) -> None:
        self.root = os.path.realpath(root)
        self._prefix = self.root.rstrip(os.sep) + os.sep
        self._cache: OrderedDict[str, tuple[tuple[int, int, int], bytes]] = (
            OrderedDict()
        )

    def _resolve(self, relative: str) -> str | None:
        # realpath follows every symlink; what lands outside the root is refused.
        real = os.path.realpath(os.path.join(self.root, relative))
        if real != self.root and not real.startswith(self._prefix):
            return None
        return real

    def respond(
        self,
        method: str,
        raw_path: bytes,
        query: bytes,
        headers: dict[bytes, bytes],
    ) -> StaticResponse:
        """Answer one request; ``headers`` has lower-cased names."""
        # Only reading methods make sense for files.
        if method not in ("GET", "HEAD"):
            return _text(405, "method not allowed", (b"allow", b"GET, HEAD"))

        relative = safe_relative(raw_path)
        if relative is None:
            return NOT_FOUND
        real = self._resolve(relative)
        if real is None:
            return NOT_FOUND
        try:
            st = os.stat(real)
        except (OSError, ValueError):
            return NOT_FOUND

        # A folder: redirect to the slash form, or serve its index.html.
        if stat_mod.S_ISDIR(st.st_mode):
            if relative and not relative.endswith("/"):
                location = raw_path + b"/" + (b"?" + query if query else b"")
                return _text(301, "moved", (b"location", location))
            real = os.path.join(real, "index.html")
            try:
                st = os.stat(real)
            except OSError:
                return NOT_FOUND
        if not stat_mod.S_ISREG(st.st_mode):
            return NOT_FOUND
        return self._file(real, st, headers)

    def _file(
        self, real: str, st: os.stat_result, headers: dict[bytes, bytes]
    ) -> StaticResponse:
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
        common = (
            (b"etag", etag.encode()),
            (b"last-modified", last_modified.encode()),
            (b"accept-ranges", b"bytes"),
        )

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
        start, end = 0, size - 1
        status = 200
        range_value = headers.get(b"range")
        if range_value is not None:
            if_range = headers.get(b"if-range")
            if if_range is None or if_range.decode("latin-1") in (etag, last_modified):
                wanted = parse_range(range_value.decode("latin-1"), size)
                if wanted is False:
                    return StaticResponse(
                        416,
                        (*common, (b"content-range", f"bytes */{size}".encode())),
                    )
                if isinstance(wanted, tuple):
                    start, end = wanted
                    status = 206
        length = end - start + 1 if size else 0
        out = [(b"content-type", content_type.encode()), *common]
        if status == 206:
            out.append((b"content-range", f"bytes {start}-{end}/{size}".encode()))

        # Small files inline (cached against stat); large ones streamed.
        if size > INLINE_MAX_BYTES:
            return StaticResponse(status, tuple(out), FileBody(real, start, length))
        data = self._read_small(real, st)
        if data is None:
            return NOT_FOUND
        if status == 206:
            data = data[start : end + 1]
        return StaticResponse(status, tuple(out), data)

    def _read_small(self, real: str, st: os.stat_result) -> bytes | None:
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._cache.get(real)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            with open(real, "rb") as f:
                data = f.read(INLINE_MAX_BYTES + 1)
        except OSError:
            return None
        if len(data) != st.st_size:
            # It changed between stat and read: serve what we read, cache nothing.
            return data
        self._cache[real] = (key, data)
        self._cache.move_to_end(real)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return data


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
