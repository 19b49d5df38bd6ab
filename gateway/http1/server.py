"""An HTTP/1.1 server for ASGI applications over Trio: one task per connection.

The public listener's whole cost per passed-through request used to be mostly the general
server's (tasks and events between the protocol and the application, a cancel scope per
read): here the application runs in the connection's own task, a request head is parsed
in one pass, and a response's head goes out with its first body bytes in one write.

What it does, and what it refuses (RFC 9112):

* request heads up to :data:`~gateway.http1.framing.MAX_HEAD` (431 beyond), strictly: CRLF
  line ends, no obs-fold, no whitespace before a colon, an ASCII target, one ``Host`` in
  HTTP/1.1. Anything else is a 400 and the end of the connection;
* bodies framed by ``Content-Length`` or ``Transfer-Encoding: chunked``; both at once is a
  400 (the smuggling case), another transfer coding a 501;
* ``Expect: 100-continue`` answered when the application first asks for the body;
* keep-alive and pipelining (requests answered in order); HTTP/1.0 with ``keep-alive``;
* a connection that sends no complete head within ``keep_alive_timeout`` of falling idle
  (or of opening) is closed without an answer; a client that stops reading its answer is
  dropped after ``write_timeout``;
* on shutdown, idle connections close at once and busy ones after their answer; what still
  runs after ``graceful_timeout`` is cancelled.

No HTTP/2 (TLS offers ``http/1.1`` by ALPN) and no upgrades. Errors it answers itself are
Matrix errors (``M_UNKNOWN`` with a reason), and a connection it ends is closed lingering:
writes shut down first, unread input drained for a moment, so the client reads the answer
instead of a reset.
"""

from __future__ import annotations

import errno
import http
import json
import logging
import re
import socket
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import trio

from gateway.http1.framing import (
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

__all__ = ["ServerSettings", "serve_http1", "tls_context"]

_log = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Application = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[Message]],
        Callable[[Message], Awaitable[None]],
    ],
    Awaitable[None],
]

#: Told of each answer the server gives itself: (status, reason, client address).
OnRefused = Callable[[int, str, "tuple[str, int] | None"], None]

_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1024 * 1024
# Bytes read ahead (the next pipelined request) while waiting for a client to go away.
_READ_AHEAD_LIMIT = 64 * 1024
_ASGI = {"version": "3.0", "spec_version": "2.3"}
# A Host value (RFC 9112 §3.2, RFC 3986 §3.2.2): a bracketed IP literal or a registered
# name (IPv4 addresses included), then maybe a port. Empty is allowed.
_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|\[v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+\]"
    rb"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)
# The absolute form of a request target (RFC 9112 §3.2.2): scheme "://" authority, then
# the path and query (maybe empty). A fragment never belongs in a target.
_ABSOLUTE_TARGET = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://([^/?]*)(.*)", re.DOTALL)


@dataclass(frozen=True)
class ServerSettings:
    #: how long a connection may stay idle, or take to send a request head
    keep_alive_timeout: float = 20.0
    #: how long one write of an answer may take before the client is dropped
    write_timeout: float = 60.0
    #: on shutdown, how long requests in progress may still take
    graceful_timeout: float = 5.0
    #: connections open at once; beyond it new ones wait in the listen backlog (None: no cap)
    max_connections: int | None = None


class _Refused(Exception):
    """A request the server answers itself, then closes the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("ascii"))


_STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}


def _error_answer(status: int, reason: str) -> bytes:
    body = json.dumps({"errcode": "M_UNKNOWN", "error": reason}, separators=(",", ":")).encode()
    return (
        _STATUS_LINES[status]
        + b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % len(body)
        + body
    )


class _Request:
    """One request's framing state, its ASGI receive/send, and what the answer said."""

    __slots__ = (
        "bad_body",
        "body_left",
        "chunked",
        "connection",
        "declared",
        "delivered",
        "disconnected",
        "expect_continue",
        "head",
        "http10",
        "keep_alive",
        "more_body",
        "response_chunked",
        "response_done",
        "response_started",
        "sent",
        "writes_body",
    )

    def __init__(self, connection: _Connection, http10: bool) -> None:
        self.connection = connection
        self.http10 = http10
        self.keep_alive = True
        self.more_body = False
        self.bad_body: str | None = None
        self.delivered = False
        self.disconnected = False
        self.body_left = 0
        self.chunked: ChunkedDecoder | None = None
        self.expect_continue = False
        self.response_started = False
        self.response_done = False
        self.response_chunked = False
        self.writes_body = True
        self.declared: int | None = None
        self.sent = 0
        self.head = b""

    async def receive(self) -> Message:
        connection = self.connection
        if self.disconnected:
            return {"type": "http.disconnect"}
        if not self.more_body:
            if not self.delivered:
                # No body at all: one empty http.request, as ASGI has it.
                self.delivered = True
                return {"type": "http.request", "body": b"", "more_body": False}
            # The body is over: what is left is to learn that the client went away.
            await connection.wait_closed()
            self.disconnected = True
            return {"type": "http.disconnect"}
        if self.expect_continue:
            self.expect_continue = False
            if not self.response_started:
                await connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        buffer = connection.buffer
        while True:
            if self.chunked is not None:
                try:
                    data = self.chunked.take(buffer)
                except FramingError:
                    # Answered with a 400 once the application gives up on the body.
                    self.keep_alive = self.more_body = False
                    self.bad_body = "Malformed chunked body"
                    self.disconnected = True
                    return {"type": "http.disconnect"}
                if self.chunked.done:
                    self.more_body = False
            else:
                data = bytes(buffer[: self.body_left])
                del buffer[: len(data)]
                self.body_left -= len(data)
                if not self.body_left:
                    self.more_body = False
            if data or not self.more_body:
                self.delivered = True
                return {"type": "http.request", "body": data, "more_body": self.more_body}
            if not await connection.fill():
                # The client stopped sending in the middle of its body. Unless it broke
                # the connection, it may still read: it gets a 400.
                self.keep_alive = self.more_body = False
                self.bad_body = "Incomplete request body"
                self.disconnected = True
                return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.response_started:
                raise RuntimeError("the response has already started")
            self._start(int(message["status"]), message.get("headers", ()))
            self.response_started = True
        elif kind == "http.response.body":
            if not self.response_started or self.response_done:
                raise RuntimeError("no response to send a body for")
            body: bytes = message.get("body", b"")
            more = bool(message.get("more_body", False))
            out = self.head
            self.head = b""
            if body and self.writes_body:
                self.sent += len(body)
                if self.declared is not None and self.sent > self.declared:
                    # More than the head announced would reach the client as the start
                    # of another answer: nothing of it is written, the connection ends.
                    self.keep_alive = False
                    self.connection.broken = True
                    raise RuntimeError("a response body longer than its Content-Length")
                if self.response_chunked:
                    out += b"%x\r\n%b\r\n" % (len(body), body)
                else:
                    out += body
            if not more:
                self.response_done = True
                if self.response_chunked and self.writes_body:
                    out += b"0\r\n\r\n"
                if self.declared is not None and self.writes_body and self.sent != self.declared:
                    self.keep_alive = False
            if out:
                await self.connection.write(out)

    def _start(self, status: int, headers: Any) -> None:
        connection = self.connection
        if self.more_body or connection.closing:
            # The body is not read to its end (or the server is stopping): the connection
            # cannot carry another request.
            self.keep_alive = False
        if not 200 <= status < 600:
            raise ValueError(f"cannot answer with status {status}")
        head = bytearray(_STATUS_LINES[status])
        declared: int | None = None
        streamed = False
        for name, value in headers:
            name = bytes(name).lower()
            value = bytes(value)
            if not TOKEN.fullmatch(name) or BAD_VALUE.search(value):
                raise ValueError("a response header cannot be written as HTTP/1.1")
            # The framing headers are the server's to write, once, below.
            if name == b"content-length":
                if not value.isdigit() or (declared is not None and int(value) != declared):
                    raise ValueError("a malformed Content-Length in the response")
                declared = int(value)
            elif name == b"transfer-encoding":
                streamed = True
            elif name == b"connection":
                if b"close" in value.lower():
                    self.keep_alive = False
            else:
                head += name + b": " + value + b"\r\n"
        if streamed:
            declared = None  # a coding overrides a length (RFC 9112 §6.3)
        self.writes_body = connection.method != b"HEAD" and status not in NO_BODY_STATUS
        if declared is not None:
            self.declared = declared
            if status != 204:  # RFC 9110 §8.6: never in a 204
                head += b"content-length: %d\r\n" % declared
        elif self.writes_body:
            if self.http10:
                self.keep_alive = False  # the body ends where the connection does
            else:
                self.response_chunked = True
                head += b"transfer-encoding: chunked\r\n"
        if not self.keep_alive:
            head += b"connection: close\r\n"
        elif self.http10:
            head += b"connection: keep-alive\r\n"
        head += b"\r\n"
        self.head = bytes(head)


class _Connection:
    """One client connection: its stream, the bytes read ahead, its state."""

    __slots__ = (
        "broken",
        "buffer",
        "client",
        "closing",
        "idle_scope",
        "method",
        "socket",
        "stream",
        "write_timeout",
    )

    def __init__(self, stream: trio.abc.Stream, sock: Any, write_timeout: float) -> None:
        self.stream = stream
        self.socket = sock
        self.buffer = bytearray()
        self.broken = False
        self.client: tuple[str, int] | None = None
        self.closing = False
        self.idle_scope: trio.CancelScope | None = None
        self.method = b""
        self.write_timeout = write_timeout

    async def fill(self) -> bool:
        """Reads more into ``buffer``; False when the client has closed or broken it."""
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.broken = True
            return False
        if not data:
            return False
        self.buffer += data
        return True

    async def write(self, data: bytes) -> None:
        try:
            with trio.move_on_after(self.write_timeout) as scope:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self.broken = True
            raise trio.BrokenResourceError("the client has gone away") from e
        except BaseException:
            # Cancelled from outside: part of ``data`` may be out, nothing more may follow.
            self.broken = True
            raise
        if scope.cancelled_caught:
            self.broken = True
            raise trio.BrokenResourceError("the client stopped reading")

    async def wait_closed(self) -> None:
        """Returns once the client closes the connection. Bytes it sends meanwhile (the
        next pipelined request) stay in ``buffer``; past a limit they are not read."""
        while len(self.buffer) < _READ_AHEAD_LIMIT:
            if not await self.fill():
                return
        await trio.sleep_forever()

    async def linger_close(self) -> None:
        """Closes so that an answer already written is read before the connection goes:
        end our side, drain what the client still sends for a moment, then close."""
        try:
            if not self.broken:
                with trio.move_on_after(_LINGER_SECONDS):
                    if isinstance(self.stream, trio.SSLStream):
                        await self.stream.transport_stream.send_eof()
                    else:
                        await self.stream.send_eof()  # type: ignore[attr-defined]
                    drained = 0
                    while drained < _LINGER_BYTES:
                        data = await self.stream.receive_some(READ_SIZE)
                        if not data:
                            break
                        drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.socket.close()


def _skip_empty_lines(buffer: bytearray) -> bool:
    """Drops empty lines before a request line (RFC 9112 §2.2); True if there were any."""
    skipped = False
    while buffer[:2] == b"\r\n":
        del buffer[:2]
        skipped = True
    return skipped


def _head_end(buffer: bytearray, start: int) -> int:
    """Where the head in ``buffer`` ends (its CRLF CRLF, searched from ``start``), or -1
    while it is incomplete. Raises :class:`_Refused` for lines ended by a bare LF (which
    RFC 9112 lets a server refuse) and for a head over ``MAX_HEAD``."""
    end = buffer.find(b"\r\n\r\n", start)
    if end < 0 and (buffer.find(b"\n\n", start) >= 0 or buffer.find(b"\n\r\n", start) >= 0):
        raise _Refused(400, "Malformed request head")
    if end > MAX_HEAD or (end < 0 and len(buffer) > MAX_HEAD):
        raise _Refused(431, "Request head too large")
    return end


def _parse_head(data: bytes) -> tuple[bytes, bytes, bool, Headers]:
    """(method, target, HTTP/1.0, headers) of a request head without its final
    CRLF CRLF. Raises :class:`_Refused`."""
    lines = data.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise _Refused(400, "Malformed request line")
    method, target, version = parts
    if not TOKEN.fullmatch(method):
        raise _Refused(400, "Malformed request method")
    if not target or not target.isascii() or any(c <= 0x20 or c == 0x7F for c in target):
        raise _Refused(400, "Malformed request target")
    if version == b"HTTP/1.1":
        http10 = False
    elif version == b"HTTP/1.0":
        http10 = True
    else:
        raise _Refused(400, "Unsupported HTTP version")
    try:
        headers = parse_fields(lines[1:])
    except FramingError:
        raise _Refused(400, "Malformed header field") from None
    return method, target, http10, headers


def _origin_form(method: bytes, target: bytes, headers: Headers) -> tuple[bytes, Headers]:
    """The target in origin form (a path, maybe a query) and the fields to go with it.
    An absolute-form target's authority stands for the Host field (RFC 9112 §3.2.2); the
    asterisk form is left to an OPTIONS request. Raises :class:`_Refused`."""
    if b"#" in target:
        raise _Refused(400, "Malformed request target")
    if target.startswith(b"/") or (target == b"*" and method == b"OPTIONS"):
        return target, headers
    absolute = _ABSOLUTE_TARGET.fullmatch(target)
    if absolute is None or not _HOST.fullmatch(absolute[1]):
        raise _Refused(400, "Malformed request target")
    authority, rest = absolute[1], absolute[2]
    fields = [(b"host", authority), *((k, v) for k, v in headers if k != b"host")]
    return (rest if rest.startswith(b"/") else b"/" + rest), fields


def _frame_request(request: _Request, headers: Headers) -> None:
    """Decides how the request body is delimited (RFC 9112 §6.3) and what else the head
    asks for. Raises :class:`_Refused`."""
    hosts = 0
    coding: list[bytes] = []
    lengths: list[bytes] = []
    for name, value in headers:
        if name == b"host":
            hosts += 1
            if not _HOST.fullmatch(value):
                raise _Refused(400, "Malformed Host header")
        elif name == b"content-length":
            lengths.extend(v.strip(b" \t") for v in value.split(b","))
        elif name == b"transfer-encoding":
            coding.extend(v.strip(b" \t").lower() for v in value.split(b","))
        elif name == b"connection":
            tokens = {v.strip(b" \t").lower() for v in value.split(b",")}
            if b"close" in tokens:
                request.keep_alive = False
            elif request.http10 and b"keep-alive" not in tokens:
                request.keep_alive = False
        elif name == b"expect":
            # RFC 9110 §10.1.1: ignored in an HTTP/1.0 request.
            if value.lower() == b"100-continue" and not request.http10:
                request.expect_continue = True
    if request.http10 and not any(k == b"connection" for k, _ in headers):
        request.keep_alive = False
    if hosts > 1 or (hosts == 0 and not request.http10):
        raise _Refused(400, "A request needs exactly one Host header")
    if coding:
        if lengths:
            raise _Refused(400, "Request has both Content-Length and Transfer-Encoding")
        if request.http10:
            raise _Refused(400, "Transfer-Encoding in an HTTP/1.0 request")
        if coding != [b"chunked"]:
            raise _Refused(501, "Transfer coding not implemented")
        request.chunked = ChunkedDecoder()
        request.more_body = True
    elif lengths:
        if not all(v.isdigit() for v in lengths) or len(set(lengths)) != 1 or len(lengths[0]) > 18:
            raise _Refused(400, "Malformed Content-Length")
        request.body_left = int(lengths[0])
        request.more_body = request.body_left > 0
    if not request.more_body:
        request.expect_continue = False


class _Server:
    def __init__(
        self,
        app: Application,
        settings: ServerSettings,
        scheme: str,
        ssl_context: ssl.SSLContext | None,
        on_refused: OnRefused | None = None,
    ) -> None:
        self.on_refused = on_refused
        self.app = app
        self.settings = settings
        self.scheme = scheme
        self.ssl_context = ssl_context
        self.connections: set[_Connection] = set()
        self.stopping = False
        self.all_closed = trio.Event()

    async def handle(self, tcp: trio.SocketStream) -> None:
        sock = tcp.socket
        connection = _Connection(tcp, sock, self.settings.write_timeout)
        self.connections.add(connection)
        try:
            try:
                client = _address(sock.getpeername())
                server = _address(sock.getsockname())
            except OSError:
                return
            connection.client = client
            if self.ssl_context is not None:
                tls = trio.SSLStream(tcp, self.ssl_context, server_side=True, https_compatible=True)
                handshaken = False
                with trio.move_on_after(self.settings.keep_alive_timeout):
                    try:
                        await tls.do_handshake()
                    except (trio.BrokenResourceError, OSError):
                        return
                    handshaken = True
                if not handshaken:
                    return
                connection.stream = tls
            await self._serve(connection, client, server)
        except Exception:
            # A bug here must cost one connection, never the listener.
            _log.exception("HTTP/1.1 connection failed")
        finally:
            self.connections.discard(connection)
            if self.stopping and not self.connections:
                self.all_closed.set()
            sock.close()

    async def _serve(self, connection: _Connection, client: Any, server: Any) -> None:
        while True:
            try:
                head = await self._next_head(connection)
                if head is None:
                    # Closed by the client, idle too long, a head that never completes, or
                    # the server stopping: closed unanswered.
                    connection.socket.close()
                    return
                method, target, http10, headers = _parse_head(head)
                target, headers = _origin_form(method, target, headers)
                request = _Request(connection, http10)
                _frame_request(request, headers)
            except _Refused as refused:
                await self._refuse(connection, refused)
                return
            connection.method = method
            path, _, query = target.partition(b"?")
            scope: dict[str, Any] = {
                "type": "http",
                "asgi": _ASGI,
                "http_version": "1.0" if http10 else "1.1",
                "method": method.decode("ascii"),
                "scheme": self.scheme,
                "path": urllib.parse.unquote(path.decode("ascii")),
                "raw_path": path,
                "query_string": query,
                "root_path": "",
                "headers": headers,
                "client": client,
                "server": server,
            }
            try:
                await self.app(scope, request.receive, request.send)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                connection.broken = True
            except Exception:
                _log.exception("the application failed")
                request.keep_alive = False
            if connection.broken:
                connection.socket.close()
                return
            if not request.response_started or request.head:
                # No answer yet, or only a head the application never followed with a body.
                if request.bad_body is not None:
                    answer = _Refused(400, request.bad_body)
                else:
                    # The application ended without an answer: a bug, not the client's.
                    answer = _Refused(500, "Internal server error")
                await self._refuse(connection, answer)
                return
            if not request.response_done or request.more_body:
                request.keep_alive = False
            if not request.keep_alive or self.stopping:
                await connection.linger_close()
                return

    async def _next_head(self, connection: _Connection) -> bytes | None:
        """The next request head, read (from what is already here first) up to its CRLF
        CRLF within the keep-alive timeout; None when the connection is to end unanswered.
        Raises :class:`_Refused`."""
        buffer = connection.buffer
        _skip_empty_lines(buffer)
        end = _head_end(buffer, 0)
        if end < 0:
            if self.stopping:
                return None
            try:
                with trio.move_on_after(self.settings.keep_alive_timeout) as idle:
                    connection.idle_scope = idle
                    while end < 0:
                        start = max(0, len(buffer) - 3)
                        if not await connection.fill():
                            if buffer.strip(b"\r\n") and not connection.broken:
                                raise _Refused(400, "Incomplete request")
                            return None
                        if _skip_empty_lines(buffer):
                            start = 0
                        end = _head_end(buffer, start)
            finally:
                connection.idle_scope = None
            if idle.cancelled_caught:
                return None
        head = bytes(buffer[:end])
        del buffer[: end + 4]
        return head

    async def _refuse(self, connection: _Connection, refused: _Refused) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(refused.status, refused.reason, connection.client)
            except Exception:
                _log.exception("on_refused failed")
        try:
            await connection.write(_error_answer(refused.status, refused.reason))
        except trio.BrokenResourceError:
            connection.socket.close()
            return
        await connection.linger_close()

    def stop(self) -> None:
        """No new requests: idle connections close now, busy ones after their answer."""
        self.stopping = True
        for connection in list(self.connections):
            connection.closing = True
            if connection.idle_scope is not None:
                connection.idle_scope.cancel()


def _address(address: Any) -> tuple[str, int] | None:
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


def tls_context(certificate: str, private_key: str) -> ssl.SSLContext:
    """A server TLS context offering HTTP/1.1 only (ALPN)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    context.set_alpn_protocols(["http/1.1"])
    return context


# Accepting fails with these when the process or the system is out of descriptors or memory:
# wait a little and try again rather than give up listening.
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


async def _accept_loop(
    listener: trio.SocketListener,
    handle: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
    max_connections: int | None,
) -> None:
    limiter = trio.CapacityLimiter(max_connections) if max_connections else None

    async def handle_then_release(stream: trio.SocketStream, token: object) -> None:
        try:
            await handle(stream)
        finally:
            if limiter is not None:
                limiter.release_on_behalf_of(token)

    while True:
        token = object()
        if limiter is not None:
            await limiter.acquire_on_behalf_of(token)
        while True:
            try:
                stream = await listener.accept()
                break
            except OSError as e:
                if e.errno not in _ACCEPT_RETRY:
                    raise
                _log.warning("cannot accept a connection (%s); retrying in 0.1 s", e.strerror)
                await trio.sleep(0.1)
            except BaseException:
                if limiter is not None:
                    limiter.release_on_behalf_of(token)
                raise
        nursery.start_soon(handle_then_release, stream, token)


async def serve_http1(
    app: Application,
    sock: socket.socket,
    *,
    settings: ServerSettings = ServerSettings(),
    ssl_context: ssl.SSLContext | None = None,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    on_refused: OnRefused | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves ``app`` on the listening socket ``sock`` until ``shutdown_trigger`` returns
    (then gracefully, see :class:`ServerSettings`) or the caller cancels. ``on_refused`` is
    told of every answer the server gives itself (status, reason, client address), since
    the application never sees those requests."""
    scheme = "https" if ssl_context is not None else "http"
    server = _Server(app, settings, scheme, ssl_context, on_refused)
    # A duplicate, so that the caller's socket stays theirs; it is closed here however this
    # ends (a cancelled serve must not leave a socket listening behind it).
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup()))
    try:
        await _serve_until_stopped(server, listener, settings, shutdown_trigger, task_status)
    finally:
        listener.socket.close()


async def _serve_until_stopped(
    server: _Server,
    listener: trio.SocketListener,
    settings: ServerSettings,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None,
    task_status: trio.TaskStatus[None],
) -> None:
    async with trio.open_nursery() as connections:
        accepting = trio.CancelScope()

        async def accept() -> None:
            with accepting:
                await _accept_loop(listener, server.handle, connections, settings.max_connections)

        connections.start_soon(accept)
        task_status.started()
        if shutdown_trigger is None:
            await trio.sleep_forever()
        await shutdown_trigger()
        accepting.cancel()
        await listener.aclose()
        server.stop()
        if server.connections:
            with trio.move_on_after(settings.graceful_timeout):
                await server.all_closed.wait()
        connections.cancel_scope.cancel()
