"""Errors raised while talking to other servers.

Exception hierarchy::

    FederationError
    ├── AddressRefused        the address guard refused every address of the destination
    ├── DiscoveryError        the server name is invalid or resolves to nothing
    ├── RequestFailed         connection, TLS or HTTP protocol failure
    │   ├── RequestTimeout    the request (including discovery) took too long
    │   ├── ResponseTooLarge  the response body exceeded the limit
    │   └── ResponseError     the server answered with a non-2xx status or invalid JSON
    └── KeyFetchError         a key response was missing, malformed or wrongly signed
"""

from __future__ import annotations


class FederationError(Exception):
    """Talking to another server failed."""


class AddressRefused(FederationError):
    """An outbound connection would reach an address the configuration forbids."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"refusing to connect to {address}: {reason}")
        self.address = address


class DiscoveryError(FederationError):
    """The server name is invalid or does not resolve to any address."""


class RequestFailed(FederationError):
    """The request could not be completed."""


class RequestTimeout(RequestFailed):
    """The request (including discovery and connecting) exceeded its time limit."""


class ResponseTooLarge(RequestFailed):
    """The response body exceeded the configured limit."""


class ResponseError(RequestFailed):
    """The server answered, but not with a usable success response."""

    def __init__(self, message: str, *, status: int, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class KeyFetchError(FederationError):
    """A key response was missing, malformed or did not verify."""
