"""The client side of the admin channel: connect, authenticate, ask.

``AdminClient`` speaks the frames of ``arc.wire`` over one blocking socket
(TLS when the channel has it). ``ask`` sends one request and waits for its
answer. ``pipeline`` keeps up to ``window`` requests in flight on the same
connection and yields the answers as they arrive, so a folder of bundles is
uploaded at the speed of the server rather than of the round trip.

Every failure to reach the server, or a connection lost midway, is
``Unreachable`` with one line saying where and why.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import select
import socket
import ssl
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from arc.errors import ArcError, BadInput
from arc.wire import Answer, FrameDecoder, answer_decoder, request_frame

CONNECT_TIMEOUT_S = 5.0
# A forwarded request may wait on the actor up to a minute; allow a bit more.
ANSWER_TIMEOUT_S = 90.0
# Requests in flight on one connection: enough to hide the round trip and
# keep the server busy, well under the server's cap per connection.
DEFAULT_WINDOW = 32
RECV_BYTES = 256 * 1024


class Unreachable(ArcError):
    """The admin channel cannot be reached, or the connection was lost."""

    kind = "unreachable"


def tls_client_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client context trusting ``ca_file`` (or the system's roots).

    The file may be a bundle (chain and key, as ``admin_tls_cert`` is): only
    its certificates are read. Any certificate in it is trusted as an anchor,
    so the admin certificate itself can be pinned.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise BadInput(
                f"--admin-ca {ca_file}: cannot read certificates from it ({exc})"
            ) from exc
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


class AdminClient:
    """One authenticated connection to the admin channel."""

    def __init__(
        self,
        address: tuple[str, int],
        token: str,
        *,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        answer_timeout_s: float = ANSWER_TIMEOUT_S,
    ) -> None:
        self.address = address
        self.token = token
        self.tls = tls
        self.server_name = server_name or address[0]
        self.connect_timeout_s = connect_timeout_s
        self.answer_timeout_s = answer_timeout_s
        self._sock: socket.socket | None = None
        self._decoder: FrameDecoder[Answer] = answer_decoder()
        self._ready: dict[int | None, Answer] = {}
        self._inbox: collections.deque[Answer] = collections.deque()
        self._numbers = itertools.count(1)

    @property
    def where(self) -> str:
        """``host:port`` for messages."""
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def connected(self) -> bool:
        """Whether a connection is open (it may still have been closed remotely)."""
        return self._sock is not None

    def __enter__(self) -> AdminClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connecting -----------------------------------------------------------

    def connect(self) -> None:
        """Open the connection and authenticate.

        Raises:
            Unreachable: nothing listens there, or TLS failed.
            Unauthorized: the server refused the token.
        """
        self.open()
        self.authenticate()

    def open(self) -> None:
        """Open the connection (and TLS), without authenticating yet."""
        self.close()
        try:
            sock = socket.create_connection(
                self.address, timeout=self.connect_timeout_s
            )
        except OSError as exc:
            raise self._unreachable("cannot reach", exc) from exc
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.server_name)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise Unreachable(
                f"the admin channel at {self.where} presented a certificate that is "
                f"not trusted ({exc.verify_message}); name its CA with --admin-ca"
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise self._unreachable("cannot start TLS with", exc) from exc
        sock.settimeout(self.answer_timeout_s)
        self._sock = sock
        self._decoder = answer_decoder()
        self._ready.clear()
        self._inbox.clear()

    def authenticate(self) -> None:
        """Send the token as the first request; close the connection if refused."""
        try:
            self.ask("AI1.authenticate", {"token": self.token})
        except ArcError:
            self.close()
            raise

    def close(self) -> None:
        """Close the connection (no error if it is not open)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def alive(self) -> bool:
        """Whether the open connection is still usable, checked without waiting.

        With no request in flight the server sends nothing, so a readable
        socket means it closed the connection (idle, restart) or is about to.
        """
        if self._sock is None:
            return False
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            readable = [self._sock]
        if readable:
            self.close()
            return False
        return True

    def _unreachable(self, doing: str, exc: BaseException) -> Unreachable:
        reason = _reason(exc)
        hint = "; is arcology running?" if doing == "cannot reach" else ""
        return Unreachable(
            f"{doing} the admin channel at {self.where} ({reason}){hint}"
        )

    # -- asking ---------------------------------------------------------------

    def ask(self, verb: str, payload: Any = None) -> Any:
        """Send one request and return its answer's payload, or raise its error."""
        number = next(self._numbers)
        self._send(request_frame(verb, payload, number))
        return self._answer(number).result()

    def pipeline(
        self, requests: Iterable[tuple[str, Any]], window: int = DEFAULT_WINDOW
    ) -> Iterator[tuple[int, Answer]]:
        """Send requests with up to ``window`` in flight; yield answers as they come.

        Yields ``(index, answer)`` where ``index`` is the request's position in
        ``requests``; answers may arrive out of order.
        """
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        numbers: dict[int, int] = {}
        source = iter(enumerate(requests))
        exhausted = False
        while True:
            while not exhausted and len(numbers) < window:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                index, (verb, payload) = item
                number = next(self._numbers)
                numbers[number] = index
                self._send(request_frame(verb, payload, number))
            if not numbers:
                return
            answer = self._next_answer()
            if answer.reply in numbers:
                yield numbers.pop(answer.reply), answer
            else:
                self._unexpected(answer)

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise Unreachable(f"not connected to the admin channel at {self.where}")
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self.close()
            raise self._lost(exc) from exc

    def _answer(self, number: int) -> Answer:
        if number in self._ready:
            return self._ready.pop(number)
        while True:
            answer = self._next_answer()
            if answer.reply == number:
                return answer
            if answer.reply is None:
                self._unexpected(answer)
            self._ready[answer.reply] = answer

    def _next_answer(self) -> Answer:
        """Read until one more answer is decoded."""
        while True:
            if self._inbox:
                return self._inbox.popleft()
            sock = self._sock
            if sock is None:
                raise Unreachable(f"not connected to the admin channel at {self.where}")
            try:
                data = sock.recv(RECV_BYTES)
            except TimeoutError as exc:
                self.close()
                raise Unreachable(
                    f"no answer from the admin channel at {self.where} within "
                    f"{self.answer_timeout_s:g} s"
                ) from exc
            except OSError as exc:
                self.close()
                raise self._lost(exc) from exc
            if not data:
                self.close()
                raise Unreachable(
                    f"the admin channel at {self.where} closed the connection"
                )
            try:
                self._inbox.extend(self._decoder.feed(data))
            except BadInput as exc:
                self.close()
                raise Unreachable(
                    f"the admin channel at {self.where} sent a bad frame "
                    f"({exc.message})"
                ) from exc

    def _unexpected(self, answer: Answer) -> None:
        # An answer to no request: the server is closing the connection and
        # says why (idle, wrong token, refused frame).
        self.close()
        if answer.error is not None:
            raise answer.error
        raise Unreachable(
            f"the admin channel at {self.where} answered reply={answer.reply} "
            "that was never asked"
        )

    def _lost(self, exc: BaseException) -> Unreachable:
        return Unreachable(
            f"lost the connection to the admin channel at {self.where} ({_reason(exc)})"
        )


def _reason(exc: BaseException) -> str:
    """A short reason for a socket error: "connection refused", "timed out"."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"unknown host: {exc.strerror}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
