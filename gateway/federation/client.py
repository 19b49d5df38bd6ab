"""The outbound federation HTTP client.

A request to a server name goes: discovery (which endpoint, which TLS name, which Host)
→ DNS → address guard on every address → HTTPS to the checked IP with the TLS name as SNI
→ response read up to a size limit. Redirects are never followed, and every call is bounded
in time. Requests are signed with X-Matrix when an origin and signing key are configured.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator, Callable, Generator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast

import httpx
import trio
from nacl.signing import SigningKey as NaclSigningKey
from signedjson.types import SigningKey

from gateway.matrix.xmatrix import sign_request

from ._http import DEFAULT_MAX_RESPONSE_SIZE, HttpResponse, OutboundHttp, StreamedResponse
from .address_guard import DEFAULT_IP_RANGE_BLACKLIST, AddressGuard
from .discovery import ServerDiscovery
from .errors import (
    AddressRefused,
    DiscoveryError,
    FederationError,
    RequestFailed,
    RequestTimeout,
    ResponseError,
    ResponseTooLarge,
)
from .resolver import DnspythonResolver, Resolver

__all__ = [
    "FederationClient",
    "HttpResponse",
    "StreamedResponse",
    "XMatrixAuth",
    "x_matrix_authorization",
]


def x_matrix_authorization(
    *,
    origin: str,
    destination: str,
    signing_key: SigningKey,
    method: str,
    uri: str,
    content: Any = None,
) -> str:
    """The ``Authorization`` header value for one request (server-server API, X-Matrix).

    ``signing_key`` carries ``alg`` and ``version`` attributes, as signedjson's keys do.
    ``uri`` is the raw path and query exactly as sent. ``content`` is the parsed JSON body,
    or None when the request has none.
    """
    return sign_request(
        method, uri, origin, destination, content, cast(NaclSigningKey, signing_key)
    )


class XMatrixAuth(httpx.Auth):
    """Signs each request as ``origin`` towards ``destination``."""

    requires_request_body = True

    def __init__(self, origin: str, destination: str, signing_key: SigningKey) -> None:
        self.origin = origin
        self.destination = destination
        self.signing_key = signing_key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        content = json.loads(request.content) if request.content else None
        request.headers["Authorization"] = x_matrix_authorization(
            origin=self.origin,
            destination=self.destination,
            signing_key=self.signing_key,
            method=request.method,
            uri=request.url.raw_path.decode("ascii"),
            content=content,
        )
        yield request


class FederationClient:
    """HTTPS requests to other Matrix servers by server name."""

    def __init__(
        self,
        *,
        http: OutboundHttp,
        discovery: ServerDiscovery,
        origin: str | None = None,
        signing_key: SigningKey | None = None,
    ) -> None:
        self.http = http
        self.discovery = discovery
        self.origin = origin
        self.signing_key = signing_key

    @classmethod
    def create(
        cls,
        *,
        request_timeout: float,
        ip_range_blacklist: Sequence[str] = DEFAULT_IP_RANGE_BLACKLIST,
        ip_range_whitelist: Sequence[str] = (),
        federation_certificate_verification_whitelist: Sequence[str] = (),
        ssl_context: ssl.SSLContext | None = None,
        resolver: Resolver | None = None,
        origin: str | None = None,
        signing_key: SigningKey | None = None,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        well_known_port: int = 443,
    ) -> FederationClient:
        """Build the client and its parts from configuration values (``[federation]``)."""
        http = OutboundHttp(
            resolver=resolver or DnspythonResolver(timeout=request_timeout),
            address_guard=AddressGuard(ip_range_blacklist, ip_range_whitelist),
            request_timeout=request_timeout,
            ssl_context=ssl_context,
            certificate_verification_whitelist=federation_certificate_verification_whitelist,
            max_response_size=max_response_size,
        )
        discovery = ServerDiscovery(http, clock_ms=clock_ms, well_known_port=well_known_port)
        return cls(http=http, discovery=discovery, origin=origin, signing_key=signing_key)

    async def request(
        self,
        method: str,
        destination: str,
        target: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        sign: bool = True,
        headers: Mapping[str, str] | None = None,
        time_limit: float | None = None,
        max_response_size: int | None = None,
    ) -> HttpResponse:
        """Send ``method target`` to the server ``destination``; any status is returned.

        ``target`` is the raw path and query (already percent-encoded), exactly as it will
        be signed and sent. ``content`` is a body sent as given (``json_body`` is encoded
        instead, when set). The request is signed when ``sign`` is true and the client has
        an origin and a signing key. The whole call, discovery included, is bounded by
        ``time_limit`` (default: the configured ``request_timeout``).
        """
        limit = self.http.request_timeout if time_limit is None else time_limit
        all_headers = dict(headers or {})
        if json_body is not None:
            content = json.dumps(json_body, ensure_ascii=False).encode("utf-8")
            all_headers.setdefault("Content-Type", "application/json")
        auth = None
        if sign and self.origin is not None and self.signing_key is not None:
            auth = XMatrixAuth(self.origin, destination, self.signing_key)
        with trio.move_on_after(limit):
            resolved = await self.discovery.resolve(destination)
            last_error: FederationError | None = None
            for endpoint in resolved.endpoints:
                try:
                    return await self.http.request(
                        method,
                        host=endpoint.host,
                        port=endpoint.port,
                        target=target,
                        tls_name=resolved.tls_name,
                        host_header=resolved.host_header,
                        verify_name=destination,
                        headers=all_headers,
                        content=content,
                        auth=auth,
                        time_limit=limit,
                        max_response_size=max_response_size,
                    )
                except (RequestTimeout, ResponseTooLarge):
                    raise
                except (RequestFailed, AddressRefused, DiscoveryError) as e:
                    # Nothing was answered from this endpoint; another SRV target may work.
                    last_error = e
            assert last_error is not None
            raise last_error
        raise RequestTimeout(f"{method} {destination}{target} took over {limit} s")

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        destination: str,
        target: str,
        *,
        headers: Sequence[tuple[str, str]],
        content: bytes | None,
        time_limit: float | None = None,
    ) -> AsyncIterator[StreamedResponse]:
        """Send a request exactly as given (already signed, if it is signed) to the server
        ``destination`` and yield its response with the body still to be read.

        Discovery and everything up to the response head are bounded by ``time_limit``
        (default: the configured ``request_timeout``). Endpoints are tried in turn while
        nothing could be sent to them.
        """
        limit = self.http.request_timeout if time_limit is None else time_limit
        deadline = trio.current_time() + limit
        with trio.move_on_after(limit) as scope:
            resolved = await self.discovery.resolve(destination)
        if scope.cancelled_caught:
            raise RequestTimeout(f"finding {destination} took over {limit} s")
        last_error: FederationError | None = None
        async with AsyncExitStack() as stack:
            for endpoint in resolved.endpoints:
                opened = self.http.stream(
                    method,
                    host=endpoint.host,
                    port=endpoint.port,
                    target=target,
                    tls_name=resolved.tls_name,
                    host_header=resolved.host_header,
                    verify_name=destination,
                    headers=headers,
                    content=content,
                    time_limit=max(0.001, deadline - trio.current_time()),
                )
                try:
                    response = await stack.enter_async_context(opened)
                except (RequestTimeout, ResponseTooLarge):
                    raise
                except (RequestFailed, AddressRefused, DiscoveryError) as e:
                    # Nothing was answered from this endpoint; another SRV target may work.
                    last_error = e
                    continue
                yield response
                return
        assert last_error is not None
        raise last_error

    async def get_json(self, destination: str, target: str, **kwargs: Any) -> Any:
        """GET and parse a 2xx JSON response; :class:`ResponseError` otherwise."""
        return _json_or_error(await self.request("GET", destination, target, **kwargs))

    async def post_json(self, destination: str, target: str, body: Any, **kwargs: Any) -> Any:
        """POST ``body`` as JSON and parse a 2xx JSON response."""
        response = await self.request("POST", destination, target, json_body=body, **kwargs)
        return _json_or_error(response)

    async def aclose(self) -> None:
        await self.http.aclose()


def _json_or_error(response: HttpResponse) -> Any:
    if not 200 <= response.status < 300:
        raise ResponseError(
            f"server answered {response.status}", status=response.status, body=response.body
        )
    return response.json()
