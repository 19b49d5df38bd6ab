"""Server discovery: where to connect for a server name, and which names TLS and Host use.

Follows the server-server API section "Resolving server names", step by step:

1. IP literal, with or without port.
2. Hostname with an explicit port.
3. ``https://<hostname>/.well-known/matrix/server``, then for the delegated name: IP
   literal, explicit port, SRV ``_matrix-fed._tcp``, deprecated SRV ``_matrix._tcp``, 8448.
4./5. SRV ``_matrix-fed._tcp.<hostname>``, then deprecated ``_matrix._tcp.<hostname>``.
6. The hostname on port 8448.

Every connection, including the ``.well-known`` request itself, goes through the address
guard.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import structlog

from gateway.matrix.identifiers import HostKind, InvalidIdentifier
from gateway.matrix.identifiers import parse_server_name as parse_matrix_server_name

from ._http import OutboundHttp
from .errors import DiscoveryError, FederationError

log = structlog.get_logger(__name__)

DEFAULT_PORT = 8448
WELL_KNOWN_PATH = "/.well-known/matrix/server"
#: The spec recommends caching ``.well-known`` answers for 24 h by default, 48 h at most.
WELL_KNOWN_DEFAULT_CACHE_MS = 24 * 3600 * 1000
WELL_KNOWN_MAX_CACHE_MS = 48 * 3600 * 1000
#: Failures are cached for up to an hour, backing off exponentially from this first period.
WELL_KNOWN_FIRST_ERROR_CACHE_MS = 2 * 60 * 1000
WELL_KNOWN_MAX_ERROR_CACHE_MS = 3600 * 1000
WELL_KNOWN_MAX_SIZE = 50 * 1024
WELL_KNOWN_MAX_REDIRECTS = 5


def parse_server_name(server_name: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` into host (IPv6 without brackets) and port, by the appendix's
    grammar (:func:`gateway.matrix.identifiers.parse_server_name`).

    Raises :class:`DiscoveryError` if it is not a valid server name.
    """
    try:
        parsed = parse_matrix_server_name(server_name)
    except InvalidIdentifier as e:
        raise DiscoveryError(f"invalid server name {server_name!r}: {e.reason}") from None
    host = parsed.host[1:-1] if parsed.kind is HostKind.IPV6 else parsed.host
    return host, parsed.port


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Endpoint:
    #: Host name or IP address to resolve and connect to.
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ResolvedServer:
    """Where and how to reach a server name."""

    #: The server name we were asked about (what X-Matrix ``destination`` names).
    server_name: str
    #: Where to connect, in order of preference (several when SRV gives several targets).
    endpoints: tuple[Endpoint, ...]
    #: The name (or IP address) the server's certificate must be valid for; also the SNI.
    tls_name: str
    #: The ``Host`` header to send.
    host_header: str


@dataclass(slots=True)
class _WellKnownEntry:
    delegated: str | None
    expires_ms: int
    failures: int


def _cache_period_ms(headers: httpx.Headers, now_ms: int) -> int | None:
    """How long a response may be cached per Cache-Control / Expires; None if unspecified."""
    cache_control = headers.get("Cache-Control", "").lower()
    directives = [d.strip() for d in cache_control.split(",") if d.strip()]
    if "no-store" in directives or "no-cache" in directives:
        return 0
    for d in directives:
        if d.startswith("max-age="):
            value = d.removeprefix("max-age=").strip('"')
            if value.isdigit():
                return int(value) * 1000
    expires = headers.get("Expires")
    if expires:
        try:
            when = email.utils.parsedate_to_datetime(expires)
        except (TypeError, ValueError):
            return 0  # An invalid Expires means "already expired" (RFC 9111).
        return max(0, int(when.timestamp() * 1000) - now_ms)
    return None


class ServerDiscovery:
    """Resolves server names, caching ``.well-known`` answers in memory."""

    def __init__(
        self,
        http: OutboundHttp,
        *,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        well_known_port: int = 443,
    ) -> None:
        """``well_known_port`` is 443 by the spec; tests serve ``.well-known`` elsewhere."""
        self._http = http
        self._clock_ms = clock_ms
        self._well_known_port = well_known_port
        self._well_known: dict[str, _WellKnownEntry] = {}

    async def resolve(self, server_name: str) -> ResolvedServer:
        host, port = parse_server_name(server_name)
        if _is_ip_literal(host):
            # Step 1: the certificate must be valid for the IP address itself.
            return ResolvedServer(
                server_name, (Endpoint(host, port or DEFAULT_PORT),), host, server_name
            )
        if port is not None:
            # Step 2.
            return ResolvedServer(server_name, (Endpoint(host, port),), host, server_name)

        delegated = await self.well_known(host)
        if delegated is not None:
            return await self._resolve_delegated(server_name, delegated)

        # Steps 4 to 6: SRV records may move the connection, but TLS and Host still name
        # the original hostname, because DNS alone cannot prove the delegation.
        endpoints = await self._srv_endpoints(host)
        return ResolvedServer(server_name, endpoints or (Endpoint(host, DEFAULT_PORT),), host, host)

    async def _resolve_delegated(self, server_name: str, delegated: str) -> ResolvedServer:
        d_host, d_port = parse_server_name(delegated)
        if _is_ip_literal(d_host):
            # Step 3.1.
            return ResolvedServer(
                server_name, (Endpoint(d_host, d_port or DEFAULT_PORT),), d_host, delegated
            )
        if d_port is not None:
            # Step 3.2.
            return ResolvedServer(server_name, (Endpoint(d_host, d_port),), d_host, delegated)
        # Steps 3.3 to 3.5.
        endpoints = await self._srv_endpoints(d_host)
        return ResolvedServer(
            server_name, endpoints or (Endpoint(d_host, DEFAULT_PORT),), d_host, d_host
        )

    async def _srv_endpoints(self, host: str) -> tuple[Endpoint, ...]:
        for service in ("_matrix-fed._tcp", "_matrix._tcp"):
            records = await self._http.resolver.resolve_srv(f"{service}.{host}")
            if records:
                # A target of "." means the service is decidedly not available (RFC 2782).
                endpoints = tuple(Endpoint(r.target, r.port) for r in records if r.target)
                if not endpoints:
                    raise DiscoveryError(f"SRV {service}.{host} says there is no service")
                return endpoints
        return ()

    # -- .well-known ----------------------------------------------------------------------

    async def well_known(self, hostname: str) -> str | None:
        """The delegated server name from ``.well-known``, or None if there is none.

        Answers, including failures, are cached as the spec recommends.
        """
        key = hostname.lower()
        now = self._clock_ms()
        entry = self._well_known.get(key)
        if entry is not None and entry.expires_ms > now:
            return entry.delegated
        failures = entry.failures if entry is not None and entry.delegated is None else 0
        try:
            delegated, period = await self._fetch_well_known(hostname)
        except FederationError as e:
            period = min(
                WELL_KNOWN_MAX_ERROR_CACHE_MS, WELL_KNOWN_FIRST_ERROR_CACHE_MS * 2**failures
            )
            log.info("well_known_failed", hostname=hostname, error=str(e), cache_ms=period)
            self._well_known[key] = _WellKnownEntry(None, self._clock_ms() + period, failures + 1)
            return None
        self._well_known[key] = _WellKnownEntry(delegated, self._clock_ms() + period, 0)
        return delegated

    async def _fetch_well_known(self, hostname: str) -> tuple[str, int]:
        host, port, target = hostname, self._well_known_port, WELL_KNOWN_PATH
        seen: set[tuple[str, int, str]] = set()
        for _ in range(WELL_KNOWN_MAX_REDIRECTS + 1):
            seen.add((host, port, target))
            host_header = host if port == 443 else f"{host}:{port}"
            response = await self._http.request(
                "GET",
                host=host,
                port=port,
                target=target,
                tls_name=host,
                host_header=host_header,
                verify_name=host,
                max_response_size=WELL_KNOWN_MAX_SIZE,
            )
            if response.status in (301, 302, 303, 307, 308):
                # The spec says to follow redirects. We do so one hop at a time, so that each
                # new address passes the address guard, and only to https URLs.
                location = response.headers.get("Location")
                if not location:
                    raise DiscoveryError(f"redirect without Location from {hostname}")
                base = httpx.URL(f"https://{host_header}{target}")
                url = base.join(location)
                if url.scheme != "https" or not url.host:
                    raise DiscoveryError(f"refusing non-https redirect to {url}")
                host, port = url.host, url.port or 443
                target = url.raw_path.decode("ascii")
                if (host, port, target) in seen:
                    raise DiscoveryError(f"redirect loop at {url}")
                continue
            delegated = self._parse_well_known(hostname, response.status, response.body)
            period = _cache_period_ms(response.headers, self._clock_ms())
            if period is None:
                period = WELL_KNOWN_DEFAULT_CACHE_MS
            return delegated, min(WELL_KNOWN_MAX_CACHE_MS, period)
        raise DiscoveryError(f"too many redirects fetching .well-known of {hostname}")

    @staticmethod
    def _parse_well_known(hostname: str, status: int, body: bytes) -> str:
        if status != 200:
            raise DiscoveryError(f".well-known of {hostname} answered {status}")
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise DiscoveryError(f".well-known of {hostname} is not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("m.server"), str):
            raise DiscoveryError(f".well-known of {hostname} has no m.server string")
        delegated: str = document["m.server"]
        parse_server_name(delegated)
        return delegated
