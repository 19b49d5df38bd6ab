"""Guarded outbound HTTPS: resolve, check every address, connect by IP with the right TLS name.

httpx would resolve host names itself, after our check, so we never give it a name: the
URL holds the checked IP address, the ``sni_hostname`` request extension carries the name
the certificate must match, and the ``Host`` header is set explicitly. Keep-alive is off
because httpx pools connections by IP and port only; reusing a connection whose certificate
was checked for one server name for another name at the same address would be wrong.
Redirects are never followed here.

Streamed requests (:meth:`OutboundHttp.stream`, the homeserver's outbound traffic) do keep
connections alive, in a pool of their own per (TLS name, verification): every connection in
one pool was checked for the same name, so reusing it for another request to that name is
what a fresh connection would have been.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog
import trio

from .address_guard import AddressGuard
from .errors import (
    AddressRefused,
    RequestFailed,
    RequestTimeout,
    ResponseError,
    ResponseTooLarge,
)
from .resolver import Resolver

log = structlog.get_logger(__name__)

#: Default limit on response bodies (after decompression), in bytes.
DEFAULT_MAX_RESPONSE_SIZE = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: httpx.Headers
    body: bytes
    #: The address the response came from.
    address: str = field(default="")

    def json(self) -> Any:
        """The body parsed as JSON; :class:`ResponseError` if it is not JSON."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ResponseError(
                f"response is not JSON: {e}", status=self.status, body=self.body[:1024]
            ) from None


@dataclass(slots=True)
class StreamedResponse:
    """A response whose body is still on the wire: read it with :meth:`aiter_raw`."""

    status: int
    headers: httpx.Headers
    #: The address the response came from.
    address: str
    _response: httpx.Response

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body exactly as sent (no content decoding). A pause longer than the read
        timeout raises :class:`RequestTimeout`; a broken connection :class:`RequestFailed`."""
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.TimeoutException as e:
            raise RequestTimeout(f"response body stalled: {e!r}") from e
        except httpx.HTTPError as e:
            raise RequestFailed(f"response body cut short: {e!r}") from e


#: Keep-alive pools kept for streamed requests (one per TLS name); the oldest is closed.
MAX_STREAM_POOLS = 256


def _host_of(server_name: str) -> str:
    """The hostname part of ``host[:port]`` / ``[v6]:port``, lower-cased, without brackets."""
    if server_name.startswith("["):
        return server_name[1:].split("]", 1)[0].lower()
    return server_name.rsplit(":", 1)[0].lower() if ":" in server_name else server_name.lower()


class OutboundHttp:
    """Makes one HTTPS request to a host and port, through the address guard."""

    def __init__(
        self,
        *,
        resolver: Resolver,
        address_guard: AddressGuard,
        request_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        certificate_verification_whitelist: Sequence[str] = (),
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        user_agent: str = "matrix-gateway",
    ) -> None:
        self.resolver = resolver
        self.address_guard = address_guard
        self.request_timeout = request_timeout
        self.max_response_size = max_response_size
        self._whitelist = tuple(g.lower() for g in certificate_verification_whitelist)
        self._user_agent = user_agent
        verified = ssl_context if ssl_context is not None else ssl.create_default_context()
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        self._clients = {
            verify: httpx.AsyncClient(
                verify=ctx,
                follow_redirects=False,
                trust_env=False,
                limits=httpx.Limits(max_keepalive_connections=0),
                timeout=httpx.Timeout(request_timeout),
            )
            for verify, ctx in ((True, verified), (False, unverified))
        }
        self._contexts = {True: verified, False: unverified}
        self._stream_pools: OrderedDict[tuple[bool, str], httpx.AsyncClient] = OrderedDict()

    def verifies_certificate_of(self, server_name: str) -> bool:
        """False when ``federation_certificate_verification_whitelist`` covers the name."""
        host = _host_of(server_name)
        return not any(fnmatch.fnmatchcase(host, glob) for glob in self._whitelist)

    async def allowed_addresses(self, host: str) -> list[str]:
        """Resolve ``host`` and keep the addresses the guard allows (raises if none)."""
        addresses = await self.resolver.resolve_addresses(host)
        allowed: list[str] = []
        refused: AddressRefused | None = None
        for address in addresses:
            try:
                allowed.append(str(self.address_guard.check(address)))
            except AddressRefused as e:
                refused = e
        if not allowed:
            assert refused is not None
            raise refused
        return allowed

    async def request(
        self,
        method: str,
        *,
        host: str,
        port: int,
        target: str,
        tls_name: str,
        host_header: str,
        verify_name: str,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        auth: httpx.Auth | None = None,
        time_limit: float | None = None,
        max_response_size: int | None = None,
    ) -> HttpResponse:
        """Send ``method target`` to ``host:port`` and read the whole response.

        ``tls_name`` is the name (or IP) the certificate must be valid for; ``verify_name``
        is the server name looked up in the certificate verification whitelist. Each
        allowed address is tried in turn until one connects. The whole call, DNS included,
        is bounded by ``time_limit`` (default: ``request_timeout``).
        """
        limit = self.request_timeout if time_limit is None else time_limit
        with trio.move_on_after(limit) as scope:
            return await self._request(
                method,
                host=host,
                port=port,
                target=target,
                tls_name=tls_name,
                host_header=host_header,
                verify=self.verifies_certificate_of(verify_name),
                headers=headers or {},
                content=content,
                auth=auth,
                max_size=self.max_response_size if max_response_size is None else max_response_size,
            )
        assert scope.cancelled_caught
        raise RequestTimeout(f"{method} https://{host_header}{target} took over {limit} s")

    async def _request(
        self,
        method: str,
        *,
        host: str,
        port: int,
        target: str,
        tls_name: str,
        host_header: str,
        verify: bool,
        headers: Mapping[str, str],
        content: bytes | None,
        auth: httpx.Auth | None,
        max_size: int,
    ) -> HttpResponse:
        addresses = await self.allowed_addresses(host)
        client = self._clients[verify]
        last_error: Exception | None = None
        for address in addresses:
            ip = ipaddress.ip_address(address)
            url = httpx.URL(scheme="https", host=str(ip), port=port, raw_path=target.encode())
            request = client.build_request(
                method,
                url,
                headers={"Host": host_header, "User-Agent": self._user_agent, **headers},
                content=content,
                extensions={"sni_hostname": tls_name},
            )
            try:
                return await self._send(client, request, auth, max_size, address)
            except httpx.ConnectError as e:
                # Nothing was sent: another address of the same host may work.
                log.debug("connect_failed", address=address, port=port, error=str(e))
                last_error = e
            except httpx.TimeoutException as e:
                raise RequestTimeout(f"{method} https://{host_header}{target}: {e!r}") from e
            except httpx.HTTPError as e:
                raise RequestFailed(f"{method} https://{host_header}{target}: {e!r}") from e
        raise RequestFailed(f"cannot connect to {host_header} ({host}:{port}): {last_error!r}")

    async def _send(
        self,
        client: httpx.AsyncClient,
        request: httpx.Request,
        auth: httpx.Auth | None,
        max_size: int,
        address: str,
    ) -> HttpResponse:
        response = await client.send(request, auth=auth, stream=True, follow_redirects=False)
        try:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_size:
                raise ResponseTooLarge(f"response of {declared} bytes exceeds {max_size}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_size:
                    raise ResponseTooLarge(f"response exceeds {max_size} bytes")
                chunks.append(chunk)
        finally:
            await response.aclose()
        return HttpResponse(response.status_code, response.headers, b"".join(chunks), address)

    def _stream_pool(self, verify: bool, tls_name: str) -> httpx.AsyncClient:
        key = (verify, tls_name.lower())
        pool = self._stream_pools.get(key)
        if pool is not None:
            self._stream_pools.move_to_end(key)
            return pool
        pool = httpx.AsyncClient(
            verify=self._contexts[verify],
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
            timeout=httpx.Timeout(self.request_timeout),
        )
        self._stream_pools[key] = pool
        return pool

    async def _trim_stream_pools(self) -> None:
        while len(self._stream_pools) > MAX_STREAM_POOLS:
            _, oldest = self._stream_pools.popitem(last=False)
            await oldest.aclose()

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        *,
        host: str,
        port: int,
        target: str,
        tls_name: str,
        host_header: str,
        verify_name: str,
        headers: Sequence[tuple[str, str]],
        content: bytes | None,
        time_limit: float | None = None,
    ) -> AsyncIterator[StreamedResponse]:
        """Send ``method target`` to ``host:port`` with exactly ``headers`` (plus ``Host``)
        and yield the response once its head arrived; the body is read by the caller.

        ``time_limit`` bounds everything up to the response head; each later pause in the
        body is bounded by the request timeout.
        """
        limit = self.request_timeout if time_limit is None else time_limit
        verify = self.verifies_certificate_of(verify_name)
        await self._trim_stream_pools()
        client = self._stream_pool(verify, tls_name)
        response: httpx.Response | None = None
        address = ""
        with trio.move_on_after(limit) as scope:
            addresses = await self.allowed_addresses(host)
            last_error: Exception | None = None
            for address in addresses:
                ip = ipaddress.ip_address(address)
                url = httpx.URL(scheme="https", host=str(ip), port=port, raw_path=target.encode())
                request = client.build_request(
                    method,
                    url,
                    headers=[("Host", host_header), *headers],
                    content=content,
                    extensions={"sni_hostname": tls_name},
                )
                try:
                    response = await client.send(request, stream=True, follow_redirects=False)
                    break
                except httpx.ConnectError as e:
                    log.debug("connect_failed", address=address, port=port, error=str(e))
                    last_error = e
                except httpx.TimeoutException as e:
                    raise RequestTimeout(f"{method} https://{host_header}{target}: {e!r}") from e
                except httpx.HTTPError as e:
                    raise RequestFailed(f"{method} https://{host_header}{target}: {e!r}") from e
            if response is None:
                raise RequestFailed(
                    f"cannot connect to {host_header} ({host}:{port}): {last_error!r}"
                )
        if scope.cancelled_caught:
            if response is not None:
                await response.aclose()
            raise RequestTimeout(f"{method} https://{host_header}{target} took over {limit} s")
        assert response is not None
        try:
            yield StreamedResponse(response.status_code, response.headers, address, response)
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        while self._stream_pools:
            await self._stream_pools.popitem()[1].aclose()
