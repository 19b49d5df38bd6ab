"""HTTP/1.1 to the homeserver: request framing, response parsing, kept-alive connections.

The wire only, with nothing else of the gateway: :class:`UpstreamPool` writes a request head
(the target exactly as given, refusing what cannot be written as HTTP/1.1) and its body,
reads the response head and frames the body by RFC 9112 §6.3 (``Transfer-Encoding``
chunked or not, ``Content-Length``, or until the connection closes); :class:`UpstreamResponse`
hands out body bytes as they arrive. What to forward and how failures are answered is
:mod:`gateway.homeserver.forward`'s business.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import AsyncIterator

import trio

from gateway.http1.framing import (
    BAD_TARGET,
    BAD_VALUE,
    MAX_HEAD,
    NO_BODY_STATUS,
    READ_SIZE,
    TOKEN,
    ChunkedDecoder,
    FramingError,
    Headers,
    parse_fields,
)

__all__ = [
    "Connection",
    "Headers",
    "Malformed",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
]

# Upstream connections kept open while idle, and for how long.
_MAX_IDLE = 256
_KEEPALIVE_EXPIRY = 30.0


class UpstreamError(Exception):
    """Talking to the homeserver failed; ``kind`` labels the metric."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Malformed(Exception):
    """The request cannot be written as HTTP/1.1 (a control character in the target or a
    header, for example)."""


_HTTP1_VERSION = re.compile(rb"HTTP/1\.[0-9]")


class Connection:
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
                data = await self.stream.receive_some(READ_SIZE)
        except trio.TooSlowError:
            raise UpstreamError("read_timeout") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise UpstreamError("closed_early") from None
        if not data:
            return False
        self.buffer += data
        return True

    async def send(self, data: bytes, seconds: float) -> None:
        try:
            with trio.fail_after(seconds):
                await self.stream.send_all(data)
        except trio.TooSlowError:
            raise UpstreamError("write_timeout") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise UpstreamError("closed_early") from None

    def close(self) -> None:
        # Closing a socket is immediate; no need to wait for a TLS goodbye.
        self.socket.close()


class UpstreamResponse:
    """Status, headers (names lower-case) and a body read on demand.

    :meth:`read` returns whatever body bytes are already at hand (waiting only when there
    are none), so a response that arrived in one piece is seen as complete at once:
    ``complete`` is True once the whole body has been read.
    """

    def __init__(
        self, connection: Connection, status: int, headers: Headers, timeout: float
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
        self._remaining = 0  # body bytes left (Content-Length)
        self._chunked: ChunkedDecoder | None = None
        self._until_close = False

    async def read(self) -> bytes:
        """The next body bytes; b"" once ``complete``."""
        connection = self.connection
        while not self.complete:
            if self._chunked is not None:
                try:
                    data = self._chunked.take(connection.buffer)
                except FramingError:
                    raise UpstreamError("protocol_error") from None
                self.complete = self._chunked.done
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
                raise UpstreamError("closed_early")
        return b""

    def _frame(self, method: bytes) -> None:
        """Decides how the body is delimited (RFC 9112 §6.3)."""
        coding = b""
        lengths: set[bytes] = set()
        for k, v in self.headers:
            if k == b"transfer-encoding":
                coding = v
            elif k == b"content-length":
                lengths.add(v.strip())
            elif k == b"connection" and b"close" in v.lower():
                self.keep_alive = False
        if method == b"HEAD" or self.status in NO_BODY_STATUS:
            self.complete = self.bodyless = True
            return
        if coding:
            # RFC 9112 6.3: Transfer-Encoding overrides Content-Length, which an
            # intermediary must remove; such a message also ends the connection.
            if lengths:
                self.headers = [(k, v) for k, v in self.headers if k != b"content-length"]
                self.keep_alive = False
            if coding.lower().rsplit(b",", 1)[-1].strip() == b"chunked":
                self._chunked = ChunkedDecoder()
            else:
                self._until_close = True
                self.keep_alive = False
        elif lengths:
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise UpstreamError("protocol_error")
            self.has_length = True
            self._remaining = int(next(iter(lengths)))
            self.complete = self._remaining == 0
        else:
            self._until_close = True
            self.keep_alive = False


class UpstreamPool:
    """Kept-alive HTTP/1.1 connections to the homeserver, reused most recent first.

    The request target goes out exactly as given. A request takes the most recently used
    idle connection and checks only that one; one more check per request retires the oldest
    idle connection once it has expired, so idle connections do not pile up. (httpcore's
    pool examines every connection it holds on each request and response, with a
    readiness syscall for each idle one: with 32 clients that alone was most of the
    gateway's time.)

    There is no upper bound on open connections: each client request holds at most one,
    so the server side (the public listener's connections) already bounds them.
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
        self._idle: list[Connection] = []

    async def _connect(self) -> Connection:
        try:
            with trio.fail_after(self._connect_timeout):
                tcp = await trio.open_tcp_stream(self._host, self._port)
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._ssl_context is None:
                    return Connection(tcp, tcp.socket)
                tls = trio.SSLStream(
                    tcp, self._ssl_context, server_hostname=self._host, https_compatible=True
                )
                try:
                    await tls.do_handshake()
                except BaseException:
                    tcp.socket.close()
                    raise
                return Connection(tls, tcp.socket)
        except trio.TooSlowError:
            raise UpstreamError("connect_timeout") from None
        except (OSError, trio.BrokenResourceError):
            raise UpstreamError("connect_error") from None

    async def _take(self) -> Connection:
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
    ) -> UpstreamResponse:
        """Sends a request and reads the response head. ``headers`` must frame ``content``
        (Content-Length, or Transfer-Encoding: chunked for an iterator without one).
        Hand the response to :meth:`release` when done with it."""
        if BAD_TARGET.search(target) or not TOKEN.fullmatch(method):
            raise Malformed()
        head = bytearray(method + b" " + target + b" HTTP/1.1\r\n")
        chunked = False
        declared: int | None = None
        for k, v in headers:
            if not TOKEN.fullmatch(k) or BAD_VALUE.search(v):
                raise Malformed()
            if k == b"transfer-encoding":
                chunked = True
            elif k == b"content-length":
                if declared is not None or not v.strip().isdigit():
                    raise Malformed()
                declared = int(v)
            head += k + b": " + v + b"\r\n"
        if chunked and declared is not None:
            raise Malformed()
        head += b"\r\n"
        connection = await self._take()
        try:
            try:
                if isinstance(content, bytes):
                    if declared is not None and declared != len(content):
                        raise Malformed()
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
                            raise Malformed()
                        if chunked:
                            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
                        await connection.send(chunk, self._read_timeout)
                    if declared is not None and sent != declared:
                        raise Malformed()
                    if chunked:
                        await connection.send(b"0\r\n\r\n", self._read_timeout)
            except UpstreamError as e:
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

    async def _read_head(self, connection: Connection, method: bytes) -> UpstreamResponse:
        buffer = connection.buffer
        while True:
            end = buffer.find(b"\r\n\r\n")
            while end < 0:
                if len(buffer) > MAX_HEAD:
                    raise UpstreamError("protocol_error")
                if not await connection.receive(self._read_timeout):
                    raise UpstreamError("protocol_error" if buffer else "closed_early")
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
                or (len(status_line) == 3 and BAD_VALUE.search(status_line[2]))
            ):
                raise UpstreamError("protocol_error")
            status = int(status_line[1])
            try:
                headers = parse_fields(lines[1:])
            except FramingError:
                raise UpstreamError("protocol_error") from None
            if 100 <= status < 200:
                continue  # an interim answer (we never ask for 100-continue)
            response = UpstreamResponse(connection, status, headers, self._read_timeout)
            if status_line[0] == b"HTTP/1.0":
                response.keep_alive = any(
                    k == b"connection" and b"keep-alive" in v.lower() for k, v in headers
                )
            response._frame(method)
            return response

    def release(self, response: UpstreamResponse) -> None:
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
