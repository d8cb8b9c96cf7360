"""The errors Arcology raises, each telling the caller its next move.

Every error has a ``kind`` that survives a trip through a message: an actor
that raises ``BadInput`` answers an ask with ``{"error": {"kind":
"bad_input", ...}}`` and the asker gets ``BadInput`` back with the same text.
"""

from __future__ import annotations


class ArcError(Exception):
    """Base of every error that crosses an actor or socket boundary."""

    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(ArcError):
    """The input is wrong: fix it and send again. Nothing was changed."""

    kind = "bad_input"


class NotFound(ArcError):
    """What was asked for does not exist."""

    kind = "not_found"


class Busy(ArcError):
    """The actor cannot answer now (restarting, overloaded): retry later."""

    kind = "busy"


class Unauthorized(ArcError):
    """The admin client has not authenticated, or its token is wrong."""

    kind = "unauthorized"


class Internal(ArcError):
    """Something failed inside Arcology; the log has the traceback."""

    kind = "internal"


class ConfigError(ArcError):
    """The configuration file is refused; the message names file and field."""

    kind = "config"


_KINDS: dict[str, type[ArcError]] = {
    cls.kind: cls
    for cls in (ArcError, BadInput, NotFound, Busy, Unauthorized, Internal, ConfigError)
}


def error_from_kind(kind: str, message: str) -> ArcError:
    """Rebuild the error that an error reply describes."""
    return _KINDS.get(kind, ArcError)(message)
