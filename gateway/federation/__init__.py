"""Talking to other servers: discovery, the guarded signing HTTP client, the keyring."""

from .address_guard import DEFAULT_IP_RANGE_BLACKLIST, AddressGuard
from .client import FederationClient, XMatrixAuth, x_matrix_authorization
from .discovery import Endpoint, ResolvedServer, ServerDiscovery, parse_server_name
from .errors import (
    AddressRefused,
    DiscoveryError,
    FederationError,
    KeyFetchError,
    RequestFailed,
    RequestTimeout,
    ResponseError,
    ResponseTooLarge,
)
from .keys import (
    Keyring,
    KeyUnavailableError,
    TrustedKeyServer,
    VerifyKeyWithExpiry,
    verify_server_keys_response,
)
from .resolver import DnspythonResolver, Resolver, SrvRecord

__all__ = [
    "DEFAULT_IP_RANGE_BLACKLIST",
    "AddressGuard",
    "AddressRefused",
    "DiscoveryError",
    "DnspythonResolver",
    "Endpoint",
    "FederationClient",
    "FederationError",
    "KeyFetchError",
    "KeyUnavailableError",
    "Keyring",
    "RequestFailed",
    "RequestTimeout",
    "ResolvedServer",
    "Resolver",
    "ResponseError",
    "ResponseTooLarge",
    "ServerDiscovery",
    "SrvRecord",
    "TrustedKeyServer",
    "VerifyKeyWithExpiry",
    "XMatrixAuth",
    "parse_server_name",
    "verify_server_keys_response",
    "x_matrix_authorization",
]
