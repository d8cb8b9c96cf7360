"""Read the server name and ALPN offer from the bytes of a TLS ClientHello.

How this works
--------------
A TLS connection opens with a ClientHello handshake message (RFC 8446 4.1.2,
RFC 5246 7.4.1.2) carried in one or more TLS records of content type 22
(handshake). Browsers send about 1.8 KB, which usually fits one record but may
arrive in two TCP segments; a ClientHello may also be split over several
records (RFC 8446 5.1 allows fragmenting a handshake message). The accept path
calls :func:`parse_client_hello` on whatever the connection has sent so far
(and keeps those bytes for the handshake):

- when the bytes end before the ClientHello does, the answer has
  ``complete=False`` and ``wanted`` names how many bytes from the start of the
  connection must be present before another call can make progress;
- when the ClientHello is whole, the answer has ``complete=True``, the server
  name from the ``server_name`` extension (RFC 6066 3) and the protocols of the
  ``application_layer_protocol_negotiation`` extension (RFC 7301 3.1);
- anything that is not a well-formed ClientHello raises
  :class:`ClientHelloError`, never another exception; so does the
  ClientHello of a client that offers nothing newer than TLS 1.1, which
  Arcology does not speak (its ``legacy_version`` is below 0x0303 and it
  sends no ``supported_versions`` extension, RFC 8446 4.1.2 and 4.2.1), so
  that such a client is told ``protocol_version`` instead of meeting a
  closed connection.

What always holds
-----------------
- The function is pure: bytes in, a value or ``ClientHelloError`` out (it
  remembers the names it has normalised, which changes only its speed).
- It never reads past ``MAX_CLIENT_HELLO_BYTES``: a peer that needs more is
  refused with an error rather than buffered.
- ``server_name`` is spelled as :func:`arc.names.normalise_domain` spells
  it (lower case, no trailing dot, checked labels); a name that is not a
  domain is an error, not silently dropped.
- Bytes after the ClientHello (none are expected before the server answers)
  are ignored.

Not done
--------
- SSLv2-compatible ClientHellos (first byte 0x80) are refused: they cannot
  offer TLS 1.2 extensions, so no such client could use SNI anyway.
- Encrypted Client Hello (ECH) is not decrypted: the outer, public name is
  what this function reports.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from arc.errors import BadInput
from arc.names import normalise_domain

# A handshake record carries content type 22 (RFC 8446 5.1).
RECORD_TYPE_HANDSHAKE = 22
# ClientHello is handshake message type 1 (RFC 8446 4).
HANDSHAKE_TYPE_CLIENT_HELLO = 1
# Record header: type (1), legacy version (2), length (2).
RECORD_HEADER_BYTES = 5
# A TLSPlaintext fragment is at most 2^14 bytes (RFC 8446 5.1).
MAX_RECORD_PAYLOAD_BYTES = 2**14
# How much of a connection's start we are willing to hold to find the
# ClientHello: one full record and its header. Real ClientHellos are 0.5 to
# 2 KB; post-quantum key shares add about 1.2 KB.
MAX_CLIENT_HELLO_BYTES = 16 * 1024
# Extension numbers (IANA TLS ExtensionType registry).
EXTENSION_SERVER_NAME = 0
EXTENSION_ALPN = 16
EXTENSION_SUPPORTED_VERSIONS = 43
# The oldest protocol Arcology speaks, as a ClientHello's legacy_version:
# TLS 1.2 (0x0303), which TLS 1.3 clients send too (RFC 8446 4.1.2).
TLS12_VERSION = 0x0303
# What older versions are called, for error messages.
_VERSION_NAMES = {0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1"}
# server_name list entry type for a DNS host name (RFC 6066 3).
NAME_TYPE_HOST_NAME = 0
# Server names already normalised, by their bytes: the same few names come
# back on most connections. Past this many the memo starts over. At least
# the default context cache size (10,000), so that every name whose context
# is cached skips normalising too; valid names are short (253 bytes at most),
# so the bound is about 5 MB.
MAX_REMEMBERED_NAMES = 16384
_NAMES: dict[bytes, str] = {}
# ALPN offers already read, by their bytes; only valid ones are kept.
MAX_REMEMBERED_OFFERS = 256
_OFFERS: dict[bytes, tuple[str, ...]] = {}
_TWO_U16 = struct.Struct("!HH").unpack_from
# The extensions read; the others are skipped.
_READ_EXTENSIONS = frozenset((EXTENSION_SERVER_NAME, EXTENSION_ALPN))
# Alert descriptions (RFC 8446 6.2).
ALERT_DECODE_ERROR = 50
ALERT_PROTOCOL_VERSION = 70
ALERT_INTERNAL_ERROR = 80
ALERT_UNRECOGNIZED_NAME = 112


class ClientHelloError(BadInput):
    """The peer sent bytes that are not a ClientHello this server can use.

    Attributes:
        alert: the TLS alert description to send before closing
            (RFC 8446 6.2): decode_error for broken framing, unrecognized_name
            for a server name that is not a domain, protocol_version for a
            client that offers neither TLS 1.2 nor TLS 1.3.
    """

    def __init__(self, message: str, alert: int | None = None) -> None:
        super().__init__(message)
        self.alert = ALERT_DECODE_ERROR if alert is None else alert


@dataclass(slots=True)
class ClientHello:
    """What the accept path needs from a ClientHello.

    Attributes:
        complete: False when more bytes must arrive before the ClientHello is
            whole; the other fields are then empty.
        wanted: the number of bytes from the start of the connection that must
            be present before parsing again can make progress (when
            incomplete), or the length of the records that hold the
            ClientHello (when complete).
        server_name: the SNI host name, lower case, no trailing dot; None when
            the client sent none.
        alpn: the protocols the client offered, in its order.
    """

    complete: bool
    wanted: int
    server_name: str | None = None
    alpn: tuple[str, ...] = ()


def parse_client_hello(data: bytes) -> ClientHello:
    """Parse the TLS records at the start of a connection.

    Args:
        data: the bytes received so far, from the first byte of the
            connection.

    Returns:
        A complete ClientHello, or an incomplete one saying how many bytes to
        wait for.

    Raises:
        ClientHelloError: the bytes are not a TLS handshake starting with a
            ClientHello, are malformed, or exceed ``MAX_CLIENT_HELLO_BYTES``.
    """
    # Every current client sends its whole ClientHello in the first record:
    # read it in place. Anything else takes the general path below.
    size = len(data)
    if size > 9 and data[0] == RECORD_TYPE_HANDSHAKE and data[1] == 3:
        end = 5 + ((data[3] << 8) | data[4])
        message_end = 9 + ((data[6] << 16) | (data[7] << 8) | data[8])
        if (
            data[5] == HANDSHAKE_TYPE_CLIENT_HELLO
            and message_end <= end <= size
            and end - 5 <= MAX_RECORD_PAYLOAD_BYTES
        ):
            server_name, alpn = _parse_body(data[9:message_end])
            return ClientHello(True, end, server_name, alpn)
    return _parse_records(data)


def _parse_records(data: bytes) -> ClientHello:
    """The general case: a ClientHello fragmented over several records."""
    # Gather handshake bytes record by record until the ClientHello's own
    # length says it is whole.
    view = memoryview(data)
    message = bytearray()
    offset = 0
    needed_message_bytes: int | None = None
    while needed_message_bytes is None or len(message) < needed_message_bytes:
        if offset + RECORD_HEADER_BYTES > len(view):
            return _incomplete(offset + RECORD_HEADER_BYTES)
        record_type = view[offset]
        if record_type != RECORD_TYPE_HANDSHAKE:
            raise ClientHelloError(
                f"TLS record: expected content type {RECORD_TYPE_HANDSHAKE} "
                f"(handshake) at byte {offset}, got {record_type}"
                + (" (not TLS: SSLv2 or plain text)" if offset == 0 else "")
            )
        if view[offset + 1] != 3:
            raise ClientHelloError(
                f"TLS record: expected legacy version 3.x at byte {offset}, "
                f"got {view[offset + 1]}.{view[offset + 2]}"
            )
        length = int.from_bytes(view[offset + 3 : offset + 5], "big")
        if length == 0 or length > MAX_RECORD_PAYLOAD_BYTES:
            raise ClientHelloError(
                f"TLS record: expected a length of 1 to {MAX_RECORD_PAYLOAD_BYTES} "
                f"bytes at byte {offset}, got {length}"
            )
        end = offset + RECORD_HEADER_BYTES + length
        if end > MAX_CLIENT_HELLO_BYTES:
            raise ClientHelloError(
                f"ClientHello: expected at most {MAX_CLIENT_HELLO_BYTES} bytes of "
                f"records, the records announced reach {end}"
            )
        if end > len(view):
            return _incomplete(end)
        message += view[offset + RECORD_HEADER_BYTES : end]
        offset = end
        if needed_message_bytes is None and len(message) >= 4:
            if message[0] != HANDSHAKE_TYPE_CLIENT_HELLO:
                raise ClientHelloError(
                    "handshake: expected message type 1 (ClientHello), "
                    f"got {message[0]}"
                )
            needed_message_bytes = 4 + int.from_bytes(message[1:4], "big")

    server_name, alpn = _parse_body(bytes(message[4:needed_message_bytes]))
    return ClientHello(complete=True, wanted=offset, server_name=server_name, alpn=alpn)


def _incomplete(wanted: int) -> ClientHello:
    """Answer 'wait for more bytes' after checking the bound."""
    if wanted > MAX_CLIENT_HELLO_BYTES:
        raise ClientHelloError(
            f"ClientHello: expected at most {MAX_CLIENT_HELLO_BYTES} bytes of "
            f"records, still incomplete at {wanted}"
        )
    return ClientHello(complete=False, wanted=wanted)


def _truncated(
    what: str, field: str, need: int, offset: int, size: int
) -> ClientHelloError:
    return ClientHelloError(
        f"{what}: {field} needs {need} bytes at offset {offset}, "
        f"only {max(size - offset, 0)} remain"
    )


# The parsers below walk the bytes with plain integer offsets rather than a
# cursor object: they run once per connection on the event loop, and this
# form costs a third of the time. Every read is preceded by its bound check.


def _parse_body(body: bytes) -> tuple[str | None, tuple[str, ...]]:
    """Walk the ClientHello fields (RFC 8446 4.1.2) to the extensions."""
    what = "ClientHello"
    size = len(body)
    # legacy_version (2) and random (32), then legacy_session_id<0..32>.
    pos = 34
    if pos + 1 > size:
        raise _truncated(what, "legacy_version and random", 35, 0, size)
    legacy_version = (body[0] << 8) | body[1]
    session_id = body[pos]
    pos += 1 + session_id
    if session_id > 32:
        raise ClientHelloError(
            f"ClientHello: expected a session id of at most 32 bytes, got {session_id}"
        )
    if pos + 2 > size:
        raise _truncated(what, "legacy_session_id", session_id + 2, 35, size)
    suites = (body[pos] << 8) | body[pos + 1]
    if not suites or suites % 2:
        raise ClientHelloError(
            "ClientHello: expected a non-empty, even-length cipher suite list, "
            f"got {suites} bytes"
        )
    pos += 2 + suites
    if pos + 1 > size:
        raise _truncated(what, "cipher_suites", suites + 1, pos - suites, size)
    methods = body[pos]
    if not methods:
        raise ClientHelloError(
            "ClientHello: expected at least one compression method, got none"
        )
    pos += 1 + methods
    if pos > size:
        raise _truncated(
            what, "legacy_compression_methods", methods, pos - methods, size
        )

    # A ClientHello without extensions is legal before TLS 1.3 (RFC 5246
    # 7.4.1.2): such a client offers neither SNI nor ALPN.
    if pos == size:
        if legacy_version < TLS12_VERSION:
            raise _too_old(legacy_version)
        return None, ()
    if pos + 2 > size:
        raise _truncated(what, "extensions length", 2, pos, size)
    end = pos + 2 + ((body[pos] << 8) | body[pos + 1])
    pos += 2
    if end > size:
        raise _truncated(what, "extensions", end - pos, pos, size)
    if end < size:
        raise ClientHelloError(
            f"ClientHello: expected the message to end after the extensions, "
            f"{size - end} bytes follow"
        )

    # RFC 8446 4.2 forbids two extensions of one type. OpenSSL refuses such
    # a hello during the handshake; here only the two read are checked. The
    # loop is the hot spot of the accept path (a dozen extensions on every
    # connection), so it does the least per extension: the bounds are
    # checked once, after it, except for the two extensions it reads.
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    seen_name = seen_alpn = False
    kind = length = 0
    extensions = pos
    try:
        while pos < end:
            kind, length = _TWO_U16(body, pos)
            pos += 4 + length
            if kind in _READ_EXTENSIONS:
                if pos > end:
                    break
                if kind == EXTENSION_SERVER_NAME:
                    if seen_name:
                        raise ClientHelloError(
                            f"ClientHello: extension {kind} appears twice"
                        )
                    seen_name = True
                    server_name = _parse_server_name(body[pos - length : pos])
                else:
                    if seen_alpn:
                        raise ClientHelloError(
                            f"ClientHello: extension {kind} appears twice"
                        )
                    seen_alpn = True
                    offer = body[pos - length : pos]
                    alpn = _OFFERS.get(offer) or _parse_alpn(offer)
    except struct.error:
        raise _truncated(what, "extension header", 4, pos, end) from None
    if pos > end:
        start = pos - length
        raise _truncated(what, f"extension {kind}", length, start, end)

    # Only a client older than TLS 1.2 pays for this second walk: a TLS 1.3
    # client sends 0x0303 and lists its versions in supported_versions.
    if legacy_version < TLS12_VERSION and not _sends_extension(
        body, extensions, end, EXTENSION_SUPPORTED_VERSIONS
    ):
        raise _too_old(legacy_version)
    return server_name, alpn


def _sends_extension(body: bytes, pos: int, end: int, wanted: int) -> bool:
    """Whether the extensions at ``body[pos:end]`` (already checked) hold one."""
    while pos < end:
        kind, length = _TWO_U16(body, pos)
        if kind == wanted:
            return True
        pos += 4 + length
    return False


def _too_old(legacy_version: int) -> ClientHelloError:
    name = _VERSION_NAMES.get(legacy_version, f"version 0x{legacy_version:04x}")
    return ClientHelloError(
        f"ClientHello: the client offers at most {name} (legacy_version "
        f"0x{legacy_version:04x}); Arcology speaks TLS 1.2 and 1.3",
        alert=ALERT_PROTOCOL_VERSION,
    )


def _parse_server_name(data: bytes) -> str | None:
    """Read the host_name entry of a server_name extension (RFC 6066 3)."""
    # A server echoes an empty server_name extension; a client may not send
    # one, but treating it as 'no name' costs nothing.
    if not data:
        return None
    size = len(data)
    # The usual list: one host_name entry that fills it.
    if (
        size > 5
        and data[2] == NAME_TYPE_HOST_NAME
        and ((data[0] << 8) | data[1]) == size - 2
        and ((data[3] << 8) | data[4]) == size - 5
    ):
        raw = data[5:]
        return _NAMES.get(raw) or _normalised(raw)
    what = "server_name extension"
    if size < 2:
        raise _truncated(what, "server_name_list length", 2, 0, size)
    end = 2 + ((data[0] << 8) | data[1])
    if end > size:
        raise _truncated(what, "server_name_list", end - 2, 2, size)
    if end < size:
        raise ClientHelloError(
            "server_name extension: bytes follow the server_name_list"
        )
    pos = 2
    host_name: bytes | None = None
    while pos < end:
        if pos + 3 > end:
            raise _truncated(what, "name_type and name length", 3, pos, end)
        name_type = data[pos]
        stop = pos + 3 + ((data[pos + 1] << 8) | data[pos + 2])
        if stop > end:
            raise _truncated(what, "name", stop - pos - 3, pos + 3, end)
        # RFC 6066 3: at most one name of each type.
        if name_type == NAME_TYPE_HOST_NAME:
            if host_name is not None:
                raise ClientHelloError(
                    "server_name extension: more than one host_name entry"
                )
            host_name = data[pos + 3 : stop]
        pos = stop
    if host_name is None:
        return None
    return _normalised(host_name)


def _normalised(host_name: bytes) -> str:
    """``normalise_server_name``, remembered per spelling."""
    name = _NAMES.get(host_name)
    if name is None:
        name = normalise_server_name(host_name)
        if len(_NAMES) >= MAX_REMEMBERED_NAMES:
            _NAMES.clear()
        _NAMES[host_name] = name
    return name


def normalise_server_name(raw: bytes) -> str:
    """Turn an SNI host name into the one spelling Arcology compares.

    The rules are those of :func:`arc.names.normalise_domain`; on top, an SNI
    name must already be ASCII (RFC 6066 3: A-labels) and cannot be a
    wildcard.

    Raises:
        ClientHelloError: the name is not a domain a certificate could cover.
    """
    if not raw.isascii() or raw.startswith(b"*"):
        raise ClientHelloError(
            f"server_name: expected an ASCII domain without '*', got {raw[:64]!r}",
            alert=ALERT_UNRECOGNIZED_NAME,
        )
    try:
        return normalise_domain(raw.decode("ascii"))
    except BadInput as exc:
        raise ClientHelloError(
            f"server_name: {exc.message}", alert=ALERT_UNRECOGNIZED_NAME
        ) from exc


def _parse_alpn(data: bytes) -> tuple[str, ...]:
    """Read the protocol list of an ALPN extension (RFC 7301 3.1).

    Clients of one kind send the same offer every time: answers are
    remembered per offer (the memo's bound is ``MAX_REMEMBERED_OFFERS``).
    """
    offer = _OFFERS.get(data)
    if offer is None:
        offer = _read_alpn(data)
        if len(_OFFERS) >= MAX_REMEMBERED_OFFERS:
            _OFFERS.clear()
        _OFFERS[data] = offer
    return offer


def _read_alpn(data: bytes) -> tuple[str, ...]:
    what = "ALPN extension"
    size = len(data)
    if size < 2:
        raise _truncated(what, "protocol_name_list length", 2, 0, size)
    end = 2 + ((data[0] << 8) | data[1])
    if end > size:
        raise _truncated(what, "protocol_name_list", end - 2, 2, size)
    if end < size:
        raise ClientHelloError("ALPN extension: bytes follow the protocol list")
    protocols: list[str] = []
    pos = 2
    while pos < end:
        stop = pos + 1 + data[pos]
        if stop == pos + 1:
            raise ClientHelloError("ALPN extension: empty protocol name")
        if stop > end:
            raise _truncated(what, "protocol name", stop - pos - 1, pos + 1, end)
        # Protocol names are opaque bytes; decode losslessly so that a name
        # that is not ASCII cannot match one we offer.
        protocols.append(data[pos + 1 : stop].decode("latin-1"))
        pos = stop
    if not protocols:
        raise ClientHelloError("ALPN extension: empty protocol list")
    return tuple(protocols)
