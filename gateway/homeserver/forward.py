"""Passing requests through to the homeserver, byte for byte.

Peers sign the request target of federation requests (X-Matrix), so the raw path and query
are sent exactly as received (httpx's URL type would resolve ``.``/``..`` segments and
re-quote characters, which changes what the peer signed). Every request goes through here,
so the gateway speaks HTTP/1.1 to the homeserver itself (:mod:`gateway.http1.client`,
a pool of kept-alive connections): a general client's layers cost more per request than
the rest of the passthrough together (see ``bench/passthrough.py``). A response that has
fully arrived by the time its head is read is passed on in one piece with a
``Content-Length``; anything longer is streamed as it comes.

Bodies are streamed both ways. Limits:

* A ``Content-Length`` over ``public.max_body_size`` (:class:`ForwardSettings` has the
  limits) is refused (413 ``M_TOO_LARGE``) before anything is sent to the homeserver.
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
from dataclasses import dataclass
from typing import Any

import trio

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
from gateway.http1.client import Malformed, UpstreamError, UpstreamPool, UpstreamResponse
from gateway.metrics import Metrics

__all__ = [
    "BUFFERED_BODY_LIMIT",
    "ForwardSettings",
    "Forwarder",
    "ResponseCutShort",
    "UpstreamFailed",
]

#: Bodies without Content-Length are read this far before the homeserver is contacted.
BUFFERED_BODY_LIMIT = 64 * 1024

#: Once this much of a response is relayed, the client going away is watched for, so an
#: abandoned download stops pulling from the homeserver.
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


_FAILURES = {
    "connect_timeout": (504, "Timed out connecting to the homeserver"),
    "read_timeout": (504, "Timed out waiting for the homeserver"),
    "write_timeout": (504, "Timed out sending to the homeserver"),
    "connect_error": (502, "The homeserver is unreachable"),
    "protocol_error": (502, "The homeserver sent an invalid response"),
    "closed_early": (502, "The homeserver closed the connection"),
}


def _upstream_error(exc: UpstreamError) -> UpstreamFailed:
    status, message = _FAILURES[exc.kind]
    return UpstreamFailed(status, exc.kind, message)


@dataclass(frozen=True)
class ForwardSettings:
    """What the forwarder takes from the configuration (``gateway.services`` fills it in)."""

    #: ``homeserver.url``
    url: str
    #: ``homeserver.connect_timeout`` and ``homeserver.read_timeout``, seconds
    connect_timeout: float
    read_timeout: float
    #: ``public.max_body_size``, bytes
    max_body_size: int
    #: ``public.request_timeout``: the whole request body must arrive within it, seconds
    request_timeout: float
    #: ``public.x_forwarded``: trust the X-Forwarded-* headers of a TLS terminator
    x_forwarded: bool = False


class Forwarder:
    """Sends requests to the homeserver over a pool of kept-alive connections."""

    def __init__(self, settings: ForwardSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        url = urllib.parse.urlsplit(settings.url)
        self._netloc = url.netloc.encode("idna")
        self._max_body = settings.max_body_size
        self._pool = UpstreamPool(
            url.hostname or "",
            url.port or (443 if url.scheme == "https" else 80),
            ssl.create_default_context() if url.scheme == "https" else None,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()

    def upstream_headers(self, scope: Scope) -> Headers:
        """End-to-end request headers plus X-Forwarded-*, Host kept (or filled in)."""
        incoming: Headers = scope.get("headers", [])
        listed = _connection_listed(incoming)
        drop = _NOT_COPIED_UP | listed if listed else _NOT_COPIED_UP
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
        out += self._forwarded(scope, forwarded_for, forwarded_proto)
        return out

    def forwarded_headers(self, scope: Scope) -> Headers:
        """Only the X-Forwarded-For and X-Forwarded-Proto that :meth:`upstream_headers`
        would send: for requests the gateway writes itself (a translated invite), so the
        homeserver still learns the client's address."""
        forwarded_for = [v for k, v in scope.get("headers", []) if k == b"x-forwarded-for"]
        proto = [v for k, v in scope.get("headers", []) if k == b"x-forwarded-proto"]
        return self._forwarded(scope, forwarded_for, proto[0] if proto else None)

    def _forwarded(
        self, scope: Scope, forwarded_for: list[bytes], forwarded_proto: bytes | None
    ) -> Headers:
        client = scope.get("client")
        peer = str(client[0]).encode() if client else b"unknown"
        scheme = str(scope.get("scheme", "http")).encode()
        if self.settings.x_forwarded:
            return [
                (b"x-forwarded-for", b", ".join([*forwarded_for, peer])),
                (b"x-forwarded-proto", forwarded_proto or scheme),
            ]
        return [(b"x-forwarded-for", peer), (b"x-forwarded-proto", scheme)]

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
        if any(k == b"transfer-encoding" for k, _ in incoming) and any(
            k == b"content-length" for k, _ in incoming
        ):
            # RFC 9112 6.1: such a request "ought to be handled as an error"; passing either
            # length on is how requests get smuggled past the gateway.
            raise MatrixError(
                400, Codes.UNKNOWN, "Request has both Content-Length and Transfer-Encoding"
            )
        length = content_length(incoming, self._max_body)
        deadline = trio.current_time() + self.settings.request_timeout
        content: bytes | AsyncIterator[bytes]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
            content = self._stream_body(receive, b"", deadline) if length else b""
        else:
            chunked = any(k == b"transfer-encoding" for k, _ in incoming)
            if not chunked and scope.get("http_version") in ("1.0", "1.1"):
                # HTTP/1 framing: neither header means no body; nothing to wait for.
                first, finished = b"", True
            else:
                first, finished = await self._buffer_body(receive, deadline)
            if finished:
                if first or chunked or method not in _BODYLESS_METHODS:
                    headers.append((b"content-length", str(len(first)).encode()))
                content = first
            else:
                headers.append((b"transfer-encoding", b"chunked"))
                content = self._stream_body(receive, first, deadline)

        try:
            response = await self._pool.send(method.encode(), target, headers, content)
        except _BodyTooLarge:
            raise too_large(self._max_body) from None
        except _BodyTimeout:
            raise MatrixError(408, Codes.UNKNOWN, "Timed out reading the request body") from None
        except Malformed:
            raise MatrixError(400, Codes.UNKNOWN, "Malformed request") from None
        except UpstreamError as e:
            raise self._failed(e) from None
        try:
            await self._relay_response(scope, receive, send, response)
        finally:
            self._pool.release(response)

    def _failed(self, exc: UpstreamError) -> UpstreamFailed:
        failure = _upstream_error(exc)
        self.metrics.upstream_error(failure.kind)
        return failure

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
        self, scope: Scope, receive: Receive, send: Send, response: UpstreamResponse
    ) -> None:
        listed = _connection_listed(response.headers)
        drop = _HOP_BY_HOP | listed if listed else _HOP_BY_HOP
        headers = [(k, v) for k, v in response.headers if k not in drop]
        start = {"type": "http.response.start", "status": response.status, "headers": headers}
        try:
            first = await response.read()
        except UpstreamError as e:
            raise self._failed(e) from None  # nothing is sent yet: still a clean 502/504
        if response.complete:
            # The whole answer is at hand: one body with a length, rather than a chunked
            # body and its terminator, saves the client side a write.
            if not response.bodyless and not response.has_length:
                headers.append((b"content-length", str(len(first)).encode()))
            await send(start)
            await send({"type": "http.response.body", "body": first})
            return
        await send(start)
        await send({"type": "http.response.body", "body": first, "more_body": True})
        # The client's going away is only watched for once a response proves large: the
        # watcher costs a task per request, and a small answer is over before it matters.
        if await self._relay_body(send, response, _WATCH_DISCONNECT_OVER - len(first)):
            return
        # How the relay ended, raised once the nursery is closed: raised inside it, the
        # exception would come out wrapped in an exception group, past the app's handlers.
        ended: list[Exception] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope, ended)
            try:
                await self._relay_body(send, response, None)
            except (ClientDisconnected, ResponseCutShort) as e:
                ended.append(e)
            nursery.cancel_scope.cancel()
        if ended:
            raise ended[0]

    async def _relay_body(self, send: Send, response: UpstreamResponse, up_to: int | None) -> bool:
        """Relays the body to its end (True) or until ``up_to`` bytes (False)."""
        sent = 0
        try:
            while True:
                chunk = await response.read()
                if response.complete:
                    await send({"type": "http.response.body", "body": chunk})
                    return True
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
                if up_to is not None and sent >= up_to:
                    return False
        except UpstreamError as e:
            # Headers are out: the only honest signal left is an incomplete response.
            raise ResponseCutShort(self._failed(e).kind) from None

    # --- buffered forwarding for owned handlers -------------------------------------------

    async def forward(
        self,
        request: Request[Any],
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
        if not any(k == b"host" for k, _ in up_headers):
            up_headers.insert(0, (b"host", self._netloc))
        try:
            response = await self._pool.send(
                (method or request.method).encode(),
                target if target is not None else request.target,
                up_headers,
                body,
            )
            try:
                chunks: list[bytes] = []
                size = 0
                while not response.complete:
                    chunk = await response.read()
                    size += len(chunk)
                    if size > max_response_size:
                        raise UpstreamFailed(
                            502, "protocol_error", "The homeserver's response is too large"
                        )
                    chunks.append(chunk)
            finally:
                self._pool.release(response)
        except Malformed:
            raise MatrixError(400, Codes.UNKNOWN, "Malformed request") from None
        except UpstreamError as e:
            raise self._failed(e) from None
        listed = _connection_listed(response.headers)
        drop = _HOP_BY_HOP | listed | {b"content-length", b"date"}
        out = [(k, v) for k, v in response.headers if k not in drop]
        return Response(response.status, b"".join(chunks), out)


async def _cancel_on_disconnect(
    receive: Receive, scope: trio.CancelScope, ended: list[Exception]
) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            ended.append(ClientDisconnected())
            scope.cancel()
            return
