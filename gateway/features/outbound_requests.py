"""What the outbound listener and outbound invites share: one proxied request, where it
goes, and the Matrix error for a destination that could not be asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from gateway.errors import Codes, MatrixError
from gateway.federation.errors import (
    AddressRefused,
    DiscoveryError,
    FederationError,
    RequestTimeout,
)
from gateway.policy.api import OutboundKind

__all__ = ["OutboundRequest", "ProxyTarget", "destination_error"]


@dataclass(frozen=True, slots=True)
class ProxyTarget:
    """Where a proxied request goes: ``matrix-federation://<destination><target>``."""

    destination: str
    #: The raw path and query, still percent-encoded, exactly as the homeserver signed it.
    target: str

    @property
    def raw_path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    @property
    def path(self) -> str:
        """The path, percent-decoded (for classification and policies only)."""
        return unquote(self.raw_path)


@dataclass(slots=True)
class OutboundRequest:
    """One proxied request, read and authenticated."""

    request_id: str
    method: str
    target: ProxyTarget
    kind: OutboundKind
    room_id: str
    #: Synapse's headers that go on (``FORWARDED_REQUEST_HEADERS``), as received.
    headers: list[tuple[str, str]]
    body: bytes
    log: Any


def destination_error(destination: str, error: FederationError) -> MatrixError:
    """The Matrix error the homeserver gets when a destination could not be asked."""
    if isinstance(error, RequestTimeout):
        return _Unreachable(504, f"{destination} did not answer in time", "timeout")
    if isinstance(error, AddressRefused):
        reason = f"{destination} resolves only to addresses this gateway may not contact"
    elif isinstance(error, DiscoveryError):
        reason = f"{destination} cannot be found: {error}"
    else:
        reason = f"{destination} cannot be reached: {error}"
    return _Unreachable(502, reason, "unreachable")


class _Unreachable(MatrixError):
    def __init__(self, status: int, message: str, outcome: str) -> None:
        super().__init__(status, Codes.UNKNOWN, message, retry_after_ms=10_000)
        self.outcome = outcome
