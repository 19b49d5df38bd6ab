"""Passing requests through to the homeserver, byte for byte.

Peers sign the request target of federation requests (X-Matrix), so the raw path and query
are sent exactly as received (httpx's URL type would resolve ``.``/``..`` segments and
re-quote characters, which changes what the peer signed). Every request goes through here,
so this module speaks HTTP/1.1 to the homeserver itself, over a pool of kept-alive
connections (:class:`_UpstreamPool`): a general client's layers cost more per request than
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

import re
import socket
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
# Upstream connections kept open while idle, and for how long.
_MAX_IDLE = 256
_KEEPALIVE_EXPIRY = 30.0


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


class _UpstreamError(Exception):
    """Talking to the homeserver failed; ``kind`` labels the metric."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _Malformed(Exception):
    """The request cannot be written as HTTP/1.1 (a control character in the target or a
    header, for example)."""


_FAILURES = {
    "connect_timeout": (504, "Timed out connecting to the homeserver"),
    "read_timeout": (504, "Timed out waiting for the homeserver"),
    "write_timeout": (504, "Timed out sending to the homeserver"),
    "connect_error": (502, "The homeserver is unreachable"),
    "protocol_error": (502, "The homeserver sent an invalid response"),
    "closed_early": (502, "The homeserver closed the connection"),
}

# What must never appear inside a request target or a header (RFC 9112 §3.2, RFC 9110 §5.5).
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HTTP1_VERSION = re.compile(rb"HTTP/1\.[0-9]")
_MAX_HEAD = 64 * 1024
_READ_SIZE = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})


def _upstream_error(exc: _UpstreamError) -> UpstreamFailed:
    status, message = _FAILURES[exc.kind]
    return UpstreamFailed(status, exc.kind, message)


class _Connection:
    """One HTTP/1.1 connection to the homeserver and the bytes read ahead on it."""

    __slots__ = ("buffer", "expires", "socket", "stream")

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.socket = sock
        self.buffer = bytearray()
        self.expires = 0.0

    def reusable(self, now: float) -> bool:
        # A server that closed an idle connection (or sent something unasked) made it
        # readable; such a connection must not carry another request.
        return now < self.expires and not self.buffer and not self.socket.is_readable()

    async def receive(self, seconds: float) -> bool:
        """Reads more into ``buffer``; False at end of stream."""
        try:
            with trio.fail_after(seconds):
                data = await self.stream.receive_some(_READ_SIZE)
        except trio.TooSlowError:
            raise _UpstreamError("read_timeout") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise _UpstreamError("closed_early") from None
        if not data:
            return False
        self.buffer += data
        return True

    async def send(self, data: bytes, seconds: float) -> None:
        try:
            with trio.fail_after(seconds):
                await self.stream.send_all(data)
        except trio.TooSlowError:
            raise _UpstreamError("write_timeout") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise _UpstreamError("closed_early") from None

    def close(self) -> None:
        # Closing a socket is immediate; no need to wait for a TLS goodbye.
        self.socket.close()


class _UpstreamResponse:
    """Status, headers (names lower-case) and a body read on demand.

    :meth:`read` returns whatever body bytes are already at hand (waiting only when there
    are none), so a response that arrived in one piece is seen as complete at once:
    ``complete`` is True once the whole body has been read.
    """

    def __init__(
        self, connection: _Connection, status: int, headers: Headers, timeout: float
    ) -> None:
        self.connection = connection
        self.status = status
        self.headers = headers
        self.timeout = timeout
        self.complete = False
        self.keep_alive = True
        #: no body by the rules of HTTP (HEAD, 204, 304): headers are passed on as they are
        self.bodyless = False
        self.has_length = False
        self._remaining = 0  # bytes left: of the body, or of the current chunk
        self._chunked = False
        self._until_close = False
        self._chunk_end = False  # the CRLF after a chunk's data is still due

    async def read(self) -> bytes:
        """The next body bytes; b"" once ``complete``."""
        connection = self.connection
        while not self.complete:
            if self._chunked:
                data = self._take_chunked()
            elif self._until_close:
                data = bytes(connection.buffer)
                connection.buffer.clear()
            else:
                data = bytes(connection.buffer[: self._remaining])
                del connection.buffer[: self._remaining]
                self._remaining -= len(data)
                if not self._remaining:
                    self.complete = True
            if data or self.complete:
                return data
            if not await connection.receive(self.timeout):
                if self._until_close:
                    self.complete = True
                    return b""
                raise _UpstreamError("closed_early")
        return b""

    def _take_chunked(self) -> bytes:
        buffer = self.connection.buffer
        out = bytearray()
        while True:
            if self._remaining:
                piece = buffer[: self._remaining]
                out += piece
                del buffer[: len(piece)]
                self._remaining -= len(piece)
                if self._remaining:
                    return bytes(out)
                self._chunk_end = True
            if self._chunk_end:
                if len(buffer) < 2:
                    return bytes(out)
                if buffer[:2] != b"\r\n":
                    raise _UpstreamError("protocol_error")
                del buffer[:2]
                self._chunk_end = False
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > 1024:
                    raise _UpstreamError("protocol_error")
                return bytes(out)
            size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _UpstreamError("protocol_error") from None
            if size == 0:
                # The last chunk; trailer fields (rarely sent) end with an empty line.
                trailers_end = buffer.find(b"\r\n\r\n", end)
                if buffer[end : end + 4] == b"\r\n\r\n":
                    del buffer[: end + 4]
                elif trailers_end >= 0:
                    del buffer[: trailers_end + 4]
                else:
                    return bytes(out)
                self.complete = True
                return bytes(out)
            del buffer[: end + 2]
            self._remaining = size

    def _frame(self, method: bytes) -> None:
        """Decides how the body is delimited (RFC 9112 §6.3)."""
        if method == b"HEAD" or self.status in _NO_BODY_STATUS:
            self.complete = self.bodyless = True
            return
        coding = b""
        lengths: set[bytes] = set()
        for k, v in self.headers:
            if k == b"transfer-encoding":
                coding = v
            elif k == b"content-length":
                lengths.add(v.strip())
            elif k == b"connection" and b"close" in v.lower():
                self.keep_alive = False
        if coding:
            # RFC 9112 6.3: Transfer-Encoding overrides Content-Length, which an
            # intermediary must remove; such a message also ends the connection.
            if lengths:
                self.headers = [(k, v) for k, v in self.headers if k != b"content-length"]
                self.keep_alive = False
            if coding.lower().rsplit(b",", 1)[-1].strip() == b"chunked":
                self._chunked = True
            else:
                self._until_close = True
                self.keep_alive = False
        elif lengths:
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise _UpstreamError("protocol_error")
            self.has_length = True
            self._remaining = int(next(iter(lengths)))
            self.complete = self._remaining == 0
        else:
            self._until_close = True
            self.keep_alive = False


class _UpstreamPool:
    """Kept-alive HTTP/1.1 connections to the homeserver, reused most recent first.

    The request target goes out exactly as given. A request takes the most recently used
    idle connection and checks only that one; one more check per request retires the oldest
    idle connection once it has expired, so idle connections do not pile up. (httpcore's
    pool examines every connection it holds on each request and response, with a
    readiness syscall for each idle one: with 32 clients that alone was most of the
    gateway's time.)

    There is no upper bound on open connections: each client request holds at most one,
    so the client side (Hypercorn) already bounds them.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self._host = host
        self._port = port
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        try:
            with trio.fail_after(self._connect_timeout):
                tcp = await trio.open_tcp_stream(self._host, self._port)
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._ssl_context is None:
                    return _Connection(tcp, tcp.socket)
                tls = trio.SSLStream(
                    tcp, self._ssl_context, server_hostname=self._host, https_compatible=True
                )
                try:
                    await tls.do_handshake()
                except BaseException:
                    tcp.socket.close()
                    raise
                return _Connection(tls, tcp.socket)
        except trio.TooSlowError:
            raise _UpstreamError("connect_timeout") from None
        except (OSError, trio.BrokenResourceError):
            raise _UpstreamError("connect_error") from None

    async def _take(self) -> _Connection:
        idle = self._idle
        now = trio.current_time()
        while idle:
            connection = idle.pop()
            if connection.reusable(now):
                return connection
            connection.close()
        return await self._connect()

    async def send(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        content: bytes | AsyncIterator[bytes],
    ) -> _UpstreamResponse:
        """Sends a request and reads the response head. ``headers`` must frame ``content``
        (Content-Length, or Transfer-Encoding: chunked for an iterator without one).
        Hand the response to :meth:`release` when done with it."""
        if _BAD_TARGET.search(target) or not _TOKEN.fullmatch(method):
            raise _Malformed()
        head = bytearray(method + b" " + target + b" HTTP/1.1\r\n")
        chunked = False
        declared: int | None = None
        for k, v in headers:
            if not _TOKEN.fullmatch(k) or _BAD_VALUE.search(v):
                raise _Malformed()
            if k == b"transfer-encoding":
                chunked = True
            elif k == b"content-length":
                if declared is not None or not v.strip().isdigit():
                    raise _Malformed()
                declared = int(v)
            head += k + b": " + v + b"\r\n"
        if chunked and declared is not None:
            raise _Malformed()
        head += b"\r\n"
        connection = await self._take()
        try:
            try:
                if isinstance(content, bytes):
                    if declared is not None and declared != len(content):
                        raise _Malformed()
                    await connection.send(bytes(head + content), self._read_timeout)
                else:
                    await connection.send(bytes(head), self._read_timeout)
                    sent = 0
                    async for chunk in content:
                        if not chunk:
                            continue
                        sent += len(chunk)
                        if declared is not None and sent > declared:
                            # Bytes past the declared length would reach the homeserver as
                            # the start of another request: never send them.
                            raise _Malformed()
                        if chunked:
                            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
                        await connection.send(chunk, self._read_timeout)
                    if declared is not None and sent != declared:
                        raise _Malformed()
                    if chunked:
                        await connection.send(b"0\r\n\r\n", self._read_timeout)
            except _UpstreamError as e:
                if e.kind != "closed_early":
                    raise
                # The homeserver may have answered (413, say) and closed before taking the
                # whole body: that answer is the one to pass on, if it is there.
                response = await self._read_head(connection, method)
                response.keep_alive = False
                return response
            return await self._read_head(connection, method)
        except BaseException:
            connection.close()
            raise

    async def _read_head(self, connection: _Connection, method: bytes) -> _UpstreamResponse:
        buffer = connection.buffer
        while True:
            end = buffer.find(b"\r\n\r\n")
            while end < 0:
                if len(buffer) > _MAX_HEAD:
                    raise _UpstreamError("protocol_error")
                if not await connection.receive(self._read_timeout):
                    raise _UpstreamError("protocol_error" if buffer else "closed_early")
                end = buffer.find(b"\r\n\r\n")
            lines = bytes(buffer[:end]).split(b"\r\n")
            del buffer[: end + 4]
            status_line = lines[0].split(b" ", 2)
            if (
                len(status_line) < 2
                or not _HTTP1_VERSION.fullmatch(status_line[0])
                or len(status_line[1]) != 3
                or not status_line[1].isdigit()
                or status_line[1] < b"100"
            ):
                raise _UpstreamError("protocol_error")
            status = int(status_line[1])
            headers: Headers = []
            for line in lines[1:]:
                name, colon, value = line.partition(b":")
                value = value.strip(b" \t")
                if not colon or not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
                    raise _UpstreamError("protocol_error")
                headers.append((name.lower(), value))
            if 100 <= status < 200:
                continue  # an interim answer (we never ask for 100-continue)
            response = _UpstreamResponse(connection, status, headers, self._read_timeout)
            if status_line[0] == b"HTTP/1.0":
                response.keep_alive = any(
                    k == b"connection" and b"keep-alive" in v.lower() for k, v in headers
                )
            response._frame(method)
            return response

    def release(self, response: _UpstreamResponse) -> None:
        connection = response.connection
        idle = self._idle
        now = trio.current_time()
        if idle and not idle[0].reusable(now):
            idle.pop(0).close()
        if response.complete and response.keep_alive and len(idle) < _MAX_IDLE:
            connection.expires = now + _KEEPALIVE_EXPIRY
            idle.append(connection)
        else:
            connection.close()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


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
        self._pool = _UpstreamPool(
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
        client = scope.get("client")
        peer = str(client[0]).encode() if client else b"unknown"
        scheme = str(scope.get("scheme", "http")).encode()
        if self.settings.x_forwarded:
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
        except _Malformed:
            raise MatrixError(400, Codes.UNKNOWN, "Malformed request") from None
        except _UpstreamError as e:
            raise self._failed(e) from None
        try:
            await self._relay_response(scope, receive, send, response)
        finally:
            self._pool.release(response)

    def _failed(self, exc: _UpstreamError) -> UpstreamFailed:
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
        self, scope: Scope, receive: Receive, send: Send, response: _UpstreamResponse
    ) -> None:
        listed = _connection_listed(response.headers)
        drop = _HOP_BY_HOP | listed if listed else _HOP_BY_HOP
        headers = [(k, v) for k, v in response.headers if k not in drop]
        start = {"type": "http.response.start", "status": response.status, "headers": headers}
        try:
            first = await response.read()
        except _UpstreamError as e:
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
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await self._relay_body(send, response, None)
            nursery.cancel_scope.cancel()

    async def _relay_body(self, send: Send, response: _UpstreamResponse, up_to: int | None) -> bool:
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
        except _UpstreamError as e:
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
        except _Malformed:
            raise MatrixError(400, Codes.UNKNOWN, "Malformed request") from None
        except _UpstreamError as e:
            raise self._failed(e) from None
        listed = _connection_listed(response.headers)
        drop = _HOP_BY_HOP | listed | {b"content-length", b"date"}
        out = [(k, v) for k, v in response.headers if k not in drop]
        return Response(response.status, b"".join(chunks), out)


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
