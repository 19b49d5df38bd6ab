"""The one error type that becomes a Matrix JSON error.

Exception hierarchy::

    MatrixError            (HTTP status, errcode, human message)
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Codes(StrEnum):
    """Matrix error codes used by the gateway (client-server and server-server specs)."""

    FORBIDDEN = "M_FORBIDDEN"
    UNAUTHORIZED = "M_UNAUTHORIZED"
    MISSING_TOKEN = "M_MISSING_TOKEN"
    UNKNOWN_TOKEN = "M_UNKNOWN_TOKEN"
    GUEST_ACCESS_FORBIDDEN = "M_GUEST_ACCESS_FORBIDDEN"
    UNKNOWN = "M_UNKNOWN"
    UNRECOGNIZED = "M_UNRECOGNIZED"
    NOT_FOUND = "M_NOT_FOUND"
    BAD_JSON = "M_BAD_JSON"
    NOT_JSON = "M_NOT_JSON"
    INVALID_PARAM = "M_INVALID_PARAM"
    MISSING_PARAM = "M_MISSING_PARAM"
    TOO_LARGE = "M_TOO_LARGE"
    LIMIT_EXCEEDED = "M_LIMIT_EXCEEDED"
    INCOMPATIBLE_ROOM_VERSION = "M_INCOMPATIBLE_ROOM_VERSION"
    UNSUPPORTED_ROOM_VERSION = "M_UNSUPPORTED_ROOM_VERSION"
    UNABLE_TO_AUTHORISE_JOIN = "M_UNABLE_TO_AUTHORISE_JOIN"
    UNABLE_TO_GRANT_JOIN = "M_UNABLE_TO_GRANT_JOIN"


#: Messages longer than this are cut: many quote what the peer sent (an ID, a room version),
#: and a peer must not make the gateway answer or log megabytes of its own input.
MAX_MESSAGE_LENGTH = 500


class MatrixError(Exception):
    """An error answered to a peer or client as ``{"errcode": ..., "error": ...}``."""

    def __init__(
        self,
        status: int,
        errcode: str,
        message: str,
        *,
        retry_after_ms: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if len(message) > MAX_MESSAGE_LENGTH:
            message = message[: MAX_MESSAGE_LENGTH - 1] + "…"
        super().__init__(message)
        self.status = status
        self.errcode = str(errcode)
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.extra = dict(extra or {})

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"errcode": self.errcode, "error": self.message}
        if self.retry_after_ms is not None:
            body["retry_after_ms"] = self.retry_after_ms
        body.update(self.extra)
        return body

    def __repr__(self) -> str:
        return f"MatrixError({self.status}, {self.errcode!r}, {self.message!r})"
