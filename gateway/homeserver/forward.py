"""Passing requests through to the homeserver, byte for byte.

Peers sign the request target of federation requests (X-Matrix), so the raw path and query
are sent exactly as received: this module talks to the homeserver with ``httpcore`` (the
engine under httpx) and hands it the target bytes directly. httpx's own URL type would
resolve ``.``/``..`` segments and re-quote characters, which changes what the peer signed.

Bodies are streamed both ways. Limits:

* A ``Content-Length`` over ``public.max_body_size`` is refused (413 ``M_TOO_LARGE``)
  before anything is sent to the homeserver.
* A body without ``Content-Length`` (chunked) is read up to :data:`BUFFERED_BODY_LIMIT`
  first. If it ends there it is sent with a ``Content-Length``; if it is over the limit it
  is refused without contacting the homeserver. A longer one is streamed up chunked; if it
  then grows over the limit the upstream request is aborted mid-body, so the homeserver
  never receives a complete request, and the client gets 413.
* The whole body must arrive within ``public.request_timeout`` (408 otherwise).
* Homeserver refusing connections: 502. Connect timeout, or the homeserver not answering
  (or pausing between chunks) for ``homeserver.read_timeout``: 504. Both ``M_UNKNOWN`` with
  ``retry_after_ms``. A failure after the response has started cuts the response short
  (the client sees an incomplete body, never a silently truncated one).

Headers: hop-by-hop headers (``Connection`` and the ones it lists, ``Keep-Alive``,
``Proxy-*``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``) are dropped both ways,
and ``Expect`` (answered by the gateway's own HTTP server) is not sent on. ``Host`` is kept
as the client sent it. ``X-Forwarded-For`` is *replaced* by the client's address and
``X-Forwarded-Proto`` by the listener's scheme, because Synapse believes the first
``X-Forwarded-For`` entry and a client could otherwise choose it. Behind a TLS terminator
(``public.x_forwarded = true``) the terminator's headers are trusted instead: the peer
address is appended to its ``X-Forwarded-For`` and its ``X-Forwarded-Proto`` kept.
"""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import httpcore
import trio

from gateway.config import GatewayConfig
from gateway.errors import Codes, MatrixError
from gateway.http import (
    ClientDisconnected,
    Headers,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    content_length,
    too_large,
)
from gateway.metrics import Metrics

__all__ = ["BUFFERED_BODY_LIMIT", "Forwarder", "ResponseCutShort", "UpstreamFailed"]

#: Bodies without Content-Length are read this far before the homeserver is contacted.
BUFFERED_BODY_LIMIT = 64 * 1024

#: Responses at least this large (or of unknown length) are watched for the client going
#: away, so an abandoned download stops pulling from the homeserver.
_WATCH_DISCONNECT_OVER = 1024 * 1024

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Not hop-by-hop, but set here (or answered by our own HTTP server) rather than copied.
_NOT_COPIED_UP = _HOP_BY_HOP | {
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
}
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
_RETRY_AFTER_MS = 5000


class UpstreamFailed(MatrixError):
    """The homeserver could not be reached or did not answer in time."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(status, Codes.UNKNOWN, message, retry_after_ms=_RETRY_AFTER_MS)
        self.kind = kind


class ResponseCutShort(Exception):
    """The homeserver failed after the response had started; it was ended early."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


def _connection_listed(headers: Headers) -> set[bytes]:
    listed: set[bytes] = set()
    for k, v in headers:
        if k == b"connection":
            listed.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return listed


def _upstream_error(exc: Exception) -> UpstreamFailed:
    if isinstance(exc, httpcore.ConnectTimeout | httpcore.PoolTimeout):
        return UpstreamFailed(504, "connect_timeout", "Timed out connecting to the homeserver")
    if isinstance(exc, httpcore.ReadTimeout):
        return UpstreamFailed(504, "read_timeout", "Timed out waiting for the homeserver")
    if isinstance(exc, httpcore.WriteTimeout):
        return UpstreamFailed(504, "write_timeout", "Timed out sending to the homeserver")
    if isinstance(exc, httpcore.ConnectError):
        return UpstreamFailed(502, "connect_error", "The homeserver is unreachable")
    if isinstance(exc, httpcore.RemoteProtocolError):
        return UpstreamFailed(502, "protocol_error", "The homeserver sent an invalid response")
    return UpstreamFailed(502, "closed_early", "The homeserver closed the connection")


class Forwarder:
    """Sends requests to ``homeserver.url`` over a pool of kept-alive connections."""

    def __init__(self, config: GatewayConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        hs = config.homeserver
        url = urllib.parse.urlsplit(hs.url)
        self._scheme = url.scheme.encode()
        self._host = (url.hostname or "").encode("idna")
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._netloc = url.netloc.encode("idna")
        self._timeouts = {
            "connect": hs.connect_timeout,
            # Waiting for a free connection is part of connecting.
            "pool": hs.connect_timeout,
            "read": hs.read_timeout,
            "write": hs.read_timeout,
        }
        self._max_body = config.public.max_body_size
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl.create_default_context() if url.scheme == "https" else None,
            # Each client request holds at most one upstream connection, so the client side
            # (Hypercorn) already bounds this.
            max_connections=None,
            max_keepalive_connections=256,
            keepalive_expiry=30.0,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()

    def _url(self, target: bytes) -> httpcore.URL:
        return httpcore.URL(scheme=self._scheme, host=self._host, port=self._port, target=target)

    def upstream_headers(self, scope: Scope) -> Headers:
        """End-to-end request headers plus X-Forwarded-*, Host kept (or filled in)."""
        incoming: Headers = scope.get("headers", [])
        drop = _NOT_COPIED_UP | _connection_listed(incoming)
        out: Headers = []
        has_host = False
        forwarded_for: list[bytes] = []
        forwarded_proto: bytes | None = None
        for k, v in incoming:
            if k == b"host":
                if not v or has_host:
                    continue
                has_host = True
            elif k in drop:
                if k == b"x-forwarded-for":
                    forwarded_for.append(v)
                elif k == b"x-forwarded-proto" and forwarded_proto is None:
                    forwarded_proto = v
                continue
            out.append((k, v))
        if not has_host:
            out.insert(0, (b"host", self._netloc))
        client = scope.get("client")
        peer = str(client[0]).encode() if client else b"unknown"
        scheme = str(scope.get("scheme", "http")).encode()
        if self.config.public.x_forwarded:
            out.append((b"x-forwarded-for", b", ".join([*forwarded_for, peer])))
            out.append((b"x-forwarded-proto", forwarded_proto or scheme))
        else:
            out.append((b"x-forwarded-for", peer))
            out.append((b"x-forwarded-proto", scheme))
        return out

    # --- streaming passthrough -------------------------------------------------------------

    async def passthrough(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forwards one ASGI request and streams the answer back.

        Raises :class:`MatrixError` (413, 408, 502, 504) only before the response has
        started; afterwards a failure ends the response early. Raises
        :class:`ClientDisconnected` if the client leaves while sending its body.
        """
        method: str = scope["method"]
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target = target + b"?" + scope["query_string"]
        headers = self.upstream_headers(scope)
        incoming: Headers = scope.get("headers", [])
        length = content_length(incoming, self._max_body)
        deadline = trio.current_time() + self.config.public.request_timeout
        content: bytes | AsyncIterator[bytes]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
            content = self._stream_body(receive, b"", deadline) if length else b""
        else:
            chunked = any(k == b"transfer-encoding" for k, _ in incoming)
            first, finished = await self._buffer_body(receive, deadline)
            if finished:
                if first or chunked or method not in _BODYLESS_METHODS:
                    headers.append((b"content-length", str(len(first)).encode()))
                content = first
            else:
                headers.append((b"transfer-encoding", b"chunked"))
                content = self._stream_body(receive, first, deadline)

        request = httpcore.Request(
            method.encode(),
            self._url(target),
            headers=headers,
            content=content,
            extensions={"timeout": self._timeouts},
        )
        try:
            response = await self._pool.handle_async_request(request)
        except _BodyTooLarge:
            raise too_large(self._max_body) from None
        except _BodyTimeout:
            raise MatrixError(408, Codes.UNKNOWN, "Timed out reading the request body") from None
        except httpcore.LocalProtocolError:
            raise MatrixError(400, Codes.UNKNOWN, "Malformed request") from None
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as e:
            failure = _upstream_error(e)
            self.metrics.upstream_error(failure.kind)
            raise failure from None
        try:
            await self._relay_response(scope, receive, send, response)
        finally:
            await response.aclose()

    async def _buffer_body(self, receive: Receive, deadline: float) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
        limit = min(BUFFERED_BODY_LIMIT, self._max_body)
        with trio.move_on_at(deadline):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected()
                chunk = message.get("body", b"")
                size += len(chunk)
                chunks.append(chunk)
                if size > self._max_body:
                    raise too_large(self._max_body)
                if not message.get("more_body", False):
                    return b"".join(chunks), True
                if size > limit:
                    return b"".join(chunks), False
        raise MatrixError(408, Codes.UNKNOWN, "Timed out reading the request body")

    async def _stream_body(
        self, receive: Receive, first: bytes, deadline: float
    ) -> AsyncIterator[bytes]:
        size = len(first)
        if first:
            yield first
        while True:
            message = None
            with trio.move_on_at(deadline):
                message = await receive()
            if message is None:
                raise _BodyTimeout()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise _BodyTooLarge()
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    async def _relay_response(
        self, scope: Scope, receive: Receive, send: Send, response: httpcore.Response
    ) -> None:
        drop = _HOP_BY_HOP | _connection_listed(response.headers)
        headers = [(k.lower(), v) for k, v in response.headers if k.lower() not in drop]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        length = next((v for k, v in headers if k == b"content-length"), None)
        big = length is None or not length.isdigit() or int(length) >= _WATCH_DISCONNECT_OVER
        if big and scope["method"] != "HEAD":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                await self._relay_body(send, response)
                nursery.cancel_scope.cancel()
        else:
            await self._relay_body(send, response)

    async def _relay_body(self, send: Send, response: httpcore.Response) -> None:
        stream: Any = response.stream
        try:
            async for chunk in stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as e:
            # Headers are out: the only honest signal left is an incomplete response.
            failure = _upstream_error(e)
            self.metrics.upstream_error(failure.kind)
            raise ResponseCutShort(failure.kind) from None
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # --- buffered forwarding for owned handlers -------------------------------------------

    async def forward(
        self,
        request: Request,
        *,
        method: str | None = None,
        target: bytes | None = None,
        headers: Headers | None = None,
        body: bytes | None = None,
        max_response_size: int = 16 * 1024 * 1024,
    ) -> Response:
        """Sends ``request`` (or a translated version of it) to the homeserver and returns
        the whole answer. Anything not given is taken from ``request`` unchanged."""
        if body is None:
            body = await request.body()
        up_headers = headers if headers is not None else self.upstream_headers(request.scope)
        up_headers = [(k, v) for k, v in up_headers if k not in (b"content-length",)]
        if body or (method or request.method) not in _BODYLESS_METHODS:
            up_headers.append((b"content-length", str(len(body)).encode()))
        http_request = httpcore.Request(
            (method or request.method).encode(),
            self._url(target if target is not None else request.target),
            headers=up_headers,
            content=body,
            extensions={"timeout": self._timeouts},
        )
        try:
            response = await self._pool.handle_async_request(http_request)
            try:
                chunks: list[bytes] = []
                size = 0
                stream: Any = response.stream
                async for chunk in stream:
                    size += len(chunk)
                    if size > max_response_size:
                        raise UpstreamFailed(
                            502, "protocol_error", "The homeserver's response is too large"
                        )
                    chunks.append(chunk)
            finally:
                await response.aclose()
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as e:
            failure = _upstream_error(e)
            self.metrics.upstream_error(failure.kind)
            raise failure from None
        drop = _HOP_BY_HOP | _connection_listed(response.headers) | {b"content-length", b"date"}
        out = [(k.lower(), v) for k, v in response.headers if k.lower() not in drop]
        return Response(response.status, b"".join(chunks), out)


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
