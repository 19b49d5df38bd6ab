"""The homeserver client with h11 as its HTTP/1.1 parser, to measure against the hand-written
one (``bench/passthrough.py --upstream-parser both``).

    python bench/h11_upstream.py run --config gateway.toml

runs the gateway's command line (any command; ``run`` here) with :class:`H11UpstreamPool` in
place of :class:`gateway.http1.client.UpstreamPool` in :mod:`gateway.homeserver.forward`.
The swap is made in this process, so it holds for ``public.workers = 1`` (the bench's row);
workers started with ``spawn`` would get the hand-written pool again.

:class:`H11UpstreamPool` keeps the hand-written pool's contract and connection handling:
the same constructor, ``send``/``release``/``aclose``, kept-alive connections reused most
recent first with the same expiry and readiness check, the same refusals of unwritable
requests (:class:`Malformed`) and the same :class:`UpstreamError` kinds. Only the HTTP/1.1
work is h11's: an ``h11.Connection`` per connection parses the response head and frames the
body. h11 has to see each request to frame its response (HEAD, keep-alive), so it writes the
request too; its output is the bytes the hand-written writer sends. Differences that cannot
matter for the bench's traffic: a ``Transfer-Encoding`` other than chunked is refused
(h11 supports no other coding) instead of read until close, obs-fold and bare LF in a
response head are taken (h11 joins and ends lines there), and HTTP/1.0 responses are never
kept alive.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import h11
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.http1.client import Connection, Malformed, UpstreamError, UpstreamPool
from gateway.http1.framing import BAD_TARGET, BAD_VALUE, MAX_HEAD, TOKEN

__all__ = ["H11UpstreamPool", "H11UpstreamResponse", "install", "main"]

Headers = list[tuple[bytes, bytes]]
Event = h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]

# The hand-written client's read size, so that only the parser differs (its limits, expiry
# and checks are imported; h11 allows more control characters in values, and what the
# client refuses must be refused alike).
_READ_SIZE = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})


class _Connection(Connection):
    """The client's connection (its sending, closing and reuse check), with an h11 state
    machine reading what arrives; its ``buffer`` stays empty."""

    __slots__ = ("protocol", "received")

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        super().__init__(stream, sock)
        self.protocol = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.received = 0  # bytes received for the current response

    @property
    def eof(self) -> bool:
        """The server has closed its side."""
        return self.protocol.trailing_data[1]

    def next_event(self, *, in_body: bool) -> Event:
        try:
            return self.protocol.next_event()
        except h11.RemoteProtocolError:
            if self.eof:
                # The server closed mid-message: as the hand-written client reports it.
                raise UpstreamError(
                    "closed_early" if in_body or not self.received else "protocol_error"
                ) from None
            raise UpstreamError("protocol_error") from None

    async def receive(self, seconds: float) -> bool:
        """Feeds h11 the next bytes, or the end of the stream."""
        try:
            with trio.fail_after(seconds):
                data = await self.stream.receive_some(_READ_SIZE)
        except trio.TooSlowError:
            raise UpstreamError("read_timeout") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise UpstreamError("closed_early") from None
        self.received += len(data)
        self.protocol.receive_data(data if isinstance(data, bytes) else bytes(data))
        return bool(data)


class H11UpstreamResponse:
    """What :class:`gateway.http1.client.UpstreamResponse` offers, read through h11."""

    def __init__(
        self, connection: _Connection, event: h11.Response, method: bytes, timeout: float
    ) -> None:
        self.connection = connection
        self.status = event.status_code
        self.headers: Headers = list(event.headers)
        self.timeout = timeout
        self.complete = False
        self.bodyless = method == b"HEAD" or self.status in _NO_BODY_STATUS
        chunked = any(k == b"transfer-encoding" for k, _ in self.headers)
        has_length = any(k == b"content-length" for k, _ in self.headers)
        self.has_length = has_length and not chunked and not self.bodyless
        #: final once ``complete``: whether h11 left the connection ready for another request
        self.keep_alive = event.http_version == b"1.1" and b"close" not in b",".join(
            v.lower() for k, v in self.headers if k == b"connection"
        )
        if chunked and has_length and not self.bodyless:
            # As the hand-written client: the length goes (RFC 9112 §6.3), and so does the
            # connection after such a message.
            self.headers = [(k, v) for k, v in self.headers if k != b"content-length"]
            self.keep_alive = False

    async def read(self) -> bytes:
        """The body bytes at hand (waiting only when there are none); b"" once complete."""
        connection = self.connection
        pieces: list[bytes | bytearray] = []
        while not self.complete:
            event = connection.next_event(in_body=True)
            if isinstance(event, h11.Data):
                pieces.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True
                protocol = connection.protocol
                self.keep_alive = (
                    self.keep_alive
                    and protocol.our_state is h11.DONE
                    and protocol.their_state is h11.DONE
                    and not connection.eof  # a body delimited by the connection's end
                )
            elif event is h11.NEED_DATA:
                if pieces:
                    break
                await connection.receive(self.timeout)
            else:
                raise UpstreamError("protocol_error")
        if len(pieces) == 1:
            return bytes(pieces[0])
        return b"".join(pieces)


class H11UpstreamPool(UpstreamPool):
    """:class:`gateway.http1.client.UpstreamPool` with h11 doing the HTTP/1.1: connecting,
    taking idle connections and releasing them are the client's own."""

    async def _connect(self) -> _Connection:
        plain = await super()._connect()
        return _Connection(plain.stream, plain.socket)

    async def send(  # type: ignore[override]
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        content: bytes | AsyncIterator[bytes],
    ) -> H11UpstreamResponse:
        """As ``UpstreamPool.send``: the request goes out, the response head is read."""
        request = _request(method, target, headers)
        connection = await self._take()
        assert isinstance(connection, _Connection)
        protocol = connection.protocol
        timeout = self._read_timeout
        try:
            try:
                try:
                    head = protocol.send(request) or b""
                    if isinstance(content, bytes):
                        data = protocol.send(h11.Data(data=content)) if content else b""
                        end = protocol.send(h11.EndOfMessage()) or b""
                        await connection.send(head + (data or b"") + end, timeout)
                    else:
                        await connection.send(head, timeout)
                        async for chunk in content:
                            if chunk:
                                # h11 refuses bytes past a declared length before writing.
                                await connection.send(
                                    protocol.send(h11.Data(data=chunk)) or b"", timeout
                                )
                        await connection.send(protocol.send(h11.EndOfMessage()) or b"", timeout)
                except h11.LocalProtocolError:
                    raise Malformed() from None
            except UpstreamError as e:
                if e.kind != "closed_early":
                    raise
                # The homeserver may have answered and closed before taking the whole body.
                response = await self._read_head(connection, method)
                response.keep_alive = False
                return response
            return await self._read_head(connection, method)
        except BaseException:
            connection.close()
            raise

    async def _read_head(  # type: ignore[override]
        self, connection: _Connection, method: bytes
    ) -> H11UpstreamResponse:
        connection.received = 0
        while True:
            event = connection.next_event(in_body=False)
            if event is h11.NEED_DATA:
                await connection.receive(self._read_timeout)
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Response):
                response = H11UpstreamResponse(connection, event, method, self._read_timeout)
                # h11 takes control characters in values that the client refuses.
                if any(BAD_VALUE.search(v) for _, v in response.headers):
                    raise UpstreamError("protocol_error")
                return response
            else:
                raise UpstreamError("protocol_error")

    def release(self, response: H11UpstreamResponse) -> None:  # type: ignore[override]
        protocol = response.connection.protocol
        if response.complete and response.keep_alive and not protocol.trailing_data[0]:
            protocol.start_next_cycle()
        else:
            response.keep_alive = False
        super().release(response)  # type: ignore[arg-type]


def _request(method: bytes, target: bytes, headers: Headers) -> h11.Request:
    """The request as an h11 event, refused (:class:`Malformed`) where the hand-written
    client refuses it."""
    if BAD_TARGET.search(target) or not TOKEN.fullmatch(method):
        raise Malformed()
    chunked = False
    lengths = 0
    for k, v in headers:
        if not TOKEN.fullmatch(k) or BAD_VALUE.search(v):
            raise Malformed()
        if k == b"transfer-encoding":
            chunked = True
        elif k == b"content-length":
            if lengths or not v.strip().isdigit():
                raise Malformed()
            lengths += 1
    if chunked and lengths:
        raise Malformed()
    try:
        return h11.Request(method=method, target=target, headers=headers)
    except h11.LocalProtocolError:
        raise Malformed() from None


def install() -> None:
    """Makes the gateway's forwarder build :class:`H11UpstreamPool`."""
    from gateway.homeserver import forward

    forward.UpstreamPool = H11UpstreamPool  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    install()
    from gateway.cli import main as gateway_main

    return gateway_main(argv)


if __name__ == "__main__":
    sys.exit(main())
