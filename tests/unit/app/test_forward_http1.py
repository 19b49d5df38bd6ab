"""The gateway's own HTTP/1.1 client, against a homeserver that sends exact bytes.

The fake homeserver here is a raw TCP server on loopback: each test chooses the bytes of
every response (framing, interim answers, odd headers, early closes) and counts the
connections the gateway opens, so keep-alive reuse is observed rather than assumed. The
gateway runs in-process in front of it and is driven by httpx (or by a raw socket where a
well-behaved client library would refuse to send what is being tested).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from gateway.config import GatewayConfig
from gateway.errors import MatrixError
from gateway.homeserver.forward import Forwarder
from gateway.http import Request
from gateway.metrics import Metrics
from gateway.services import forward_settings
from tests.unit.app.conftest import StartGateway, make_config
from tests.unit.app.test_app_passthrough import raw_request


@dataclass
class Exchange:
    """One request as the homeserver received it."""

    connection: int  # which accepted connection (0, 1, ...) carried it
    head: bytes  # request line and header lines, without the blank line
    body: bytes

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    def header(self, name: bytes) -> list[bytes]:
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.lower() == name:
                out.append(value.strip())
        return out


# Answers one request: writes whatever bytes it likes, returns whether to keep reading.
Respond = Callable[[trio.SocketStream, Exchange], Awaitable[bool]]


@dataclass
class RawHomeserver:
    respond: Respond
    url: str = ""
    accepted: int = 0
    exchanges: list[Exchange] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        number = self.accepted
        self.accepted += 1
        buffer = bytearray()
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                while len(rest) < length:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    rest += data
                buffer = bytearray(rest[length:])
                exchange = Exchange(number, head, rest[:length])
                self.exchanges.append(exchange)
                if not await self.respond(stream, exchange):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()


StartRaw = Callable[[Respond], Awaitable[RawHomeserver]]


@pytest.fixture
def raw_homeserver(nursery: trio.Nursery) -> StartRaw:
    async def start(respond: Respond) -> RawHomeserver:
        fake = RawHomeserver(respond)
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, fake.handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        fake.url = f"http://127.0.0.1:{port}"
        return fake

    return start


def fixed(*responses: bytes, keep: bool = True) -> Respond:
    """Answers the n-th request with ``responses[n]`` (the last one repeats)."""
    count = 0

    async def respond(stream: trio.SocketStream, exchange: Exchange) -> bool:
        nonlocal count
        await stream.send_all(responses[min(count, len(responses) - 1)])
        count += 1
        return keep

    return respond


async def dribble(stream: trio.SocketStream, data: bytes, piece: int = 1) -> None:
    """Sends ``data`` a few bytes at a time, pausing between, so it arrives in many reads."""
    for i in range(0, len(data), piece):
        await stream.send_all(data[i : i + piece])
        await trio.sleep(0.001)


OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


async def gateway_for(
    tmp_path: Path, fake: RawHomeserver, start_gateway: StartGateway, read_timeout: float = 5.0
) -> str:
    config = make_config(tmp_path, fake.url, homeserver={"read_timeout": read_timeout})
    gw = await start_gateway(config)
    return cast(str, gw.public_url)


def assert_upstream_failure(response: httpx.Response, status: int = 502) -> None:
    assert response.status_code == status
    body = response.json()
    assert body["errcode"] == "M_UNKNOWN"
    assert body["error"]
    assert body["retry_after_ms"] > 0


# --- framing -------------------------------------------------------------------------------


async def test_chunked_response_in_small_reads_with_extensions_and_trailers(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"Trailer: X-Checksum\r\n"
        b"\r\n"
        b'5;name=value\r\n{"a":\r\n'
        b'A; quoted="x;y" ;flag\r\n"0123456",\r\n'
        b'0007\r\n"b":[1]\r\n'
        b"1\r\n}\r\n"
        b"0;last=1\r\n"
        b"X-Checksum: abc\r\n"
        b"X-Other: def\r\n"
        b"\r\n"
    )

    async def respond(stream: trio.SocketStream, exchange: Exchange) -> bool:
        if exchange.request_line.startswith(b"GET /_matrix/first "):
            await dribble(stream, chunked)
        else:
            await stream.send_all(OK)
        return True

    fake = await raw_homeserver(respond)
    base = await gateway_for(tmp_path, fake, start_gateway)
    async with httpx.AsyncClient() as client:
        r = await client.get(base + "/_matrix/first")
        again = await client.get(base + "/_matrix/second")
    assert r.status_code == 200
    assert r.content == b'{"a":"0123456","b":[1]}'
    assert r.json() == {"a": "0123456", "b": [1]}
    assert r.headers["content-type"] == "application/json"
    # Trailers are not turned into headers, and the hop-by-hop Trailer header is dropped.
    for name in ("x-checksum", "x-other", "trailer"):
        assert name not in r.headers
    # The trailers were consumed exactly: the connection carries the next request.
    assert again.status_code == 200
    assert again.content == b"ok"
    assert fake.accepted == 1
    assert [e.connection for e in fake.exchanges] == [0, 0]


async def test_interim_responses_are_skipped(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    answer = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\nX-Final: yes\r\n\r\ncreated"
    )

    async def respond(stream: trio.SocketStream, exchange: Exchange) -> bool:
        await dribble(stream, answer, piece=7)
        return True

    fake = await raw_homeserver(respond)
    base = await gateway_for(tmp_path, fake, start_gateway)
    async with httpx.AsyncClient() as client:
        r = await client.put(base + "/_matrix/client/v3/x", content=b"{}")
        again = await client.get(base + "/_matrix/client/v3/y")
    assert r.status_code == 201
    assert r.content == b"created"
    assert r.headers["x-final"] == "yes"
    assert "link" not in r.headers  # the 103's fields belong to the 103 only
    assert again.status_code == 201
    assert fake.accepted == 1


async def test_http10_close_delimited_body(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    body = bytes(range(256)) * 40

    async def respond(stream: trio.SocketStream, exchange: Exchange) -> bool:
        await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        await dribble(stream, body, piece=1000)
        return False  # closing the connection ends the body

    fake = await raw_homeserver(respond)
    base = await gateway_for(tmp_path, fake, start_gateway)
    async with httpx.AsyncClient() as client:
        first = await client.get(base + "/_matrix/media/v3/download/a/b")
        second = await client.get(base + "/_matrix/media/v3/download/a/c")
    for r in (first, second):
        assert r.status_code == 200
        assert r.content == body
    assert fake.accepted == 2


async def test_http11_response_without_length_is_close_delimited(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    async def respond(stream: trio.SocketStream, exchange: Exchange) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\nuntil")
        await trio.sleep(0.01)
        await stream.send_all(b" the end")
        return False

    fake = await raw_homeserver(respond)
    base = await gateway_for(tmp_path, fake, start_gateway)
    async with httpx.AsyncClient() as client:
        r = await client.get(base + "/_matrix/x")
    assert r.status_code == 200
    assert r.content == b"until the end"


async def test_connection_close_response_is_not_reused(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    # The homeserver announces the close but leaves the socket open: the gateway must not
    # send another request on it anyway.
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbye!"
    fake = await raw_homeserver(fixed(closing, keep=True))
    base = await gateway_for(tmp_path, fake, start_gateway)
    async with httpx.AsyncClient() as client:
        first = await client.get(base + "/_matrix/a")
        second = await client.get(base + "/_matrix/b")
    for r in (first, second):
        assert r.status_code == 200
        assert r.content == b"bye!"
    assert fake.accepted == 2
    assert [e.connection for e in fake.exchanges] == [0, 1]


async def test_head_204_304_have_no_body_and_keep_the_connection(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    async def respond(stream: trio.SocketStream, exchange: Exchange) -> bool:
        line = exchange.request_line
        if line.startswith(b"HEAD "):
            # The length of the body a GET would have had; no body follows.
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1234\r\n\r\n"
            )
        elif b"/nocontent" in line:
            await stream.send_all(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
        elif b"/notmodified" in line:
            await stream.send_all(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n')
        else:
            await stream.send_all(OK)
        return True

    fake = await raw_homeserver(respond)
    base = await gateway_for(tmp_path, fake, start_gateway)
    async with httpx.AsyncClient() as client:
        with trio.fail_after(5):
            head = await client.head(base + "/_matrix/media/v3/download/a/b")
            nocontent = await client.get(base + "/_matrix/nocontent")
            notmodified = await client.get(
                base + "/_matrix/notmodified", headers={"if-none-match": '"v1"'}
            )
            # The gateway hands the upstream connection back just after its last write to
            # us; give it that moment so the next request can find it idle.
            await trio.sleep(0.1)
            after = await client.get(base + "/_matrix/after")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == "1234"
    assert head.headers["content-type"] == "image/png"
    assert nocontent.status_code == 204
    assert nocontent.content == b""
    assert nocontent.headers["x-a"] == "1"
    assert notmodified.status_code == 304
    assert notmodified.content == b""
    assert notmodified.headers["etag"] == '"v1"'
    assert after.content == b"ok"
    # No phantom body was waited for or left behind: all four went over one connection.
    assert fake.accepted == 1
    assert len(fake.exchanges) == 4


# --- malformed answers ---------------------------------------------------------------------


BAD_STATUS_LINES = [
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 OK",
    b"HTTP/1.1 20x OK",
    b"HTTP/1.1  200 OK",
    b"HTTP/2 200 OK",
    b"ICY 200 OK",
    b"garbage",
    # RFC 9110 §15: valid status codes are 100 to 599.
    b"HTTP/1.1 099 Too Small",
    # RFC 9112 §2.3: HTTP-version is "HTTP/" DIGIT "." DIGIT.
    b"HTTP/1.x 200 OK",
]

MALFORMED_HEADERS = [
    b"X-Folded: first\r\n second\r\n",  # obs-fold
    b"X-Folded: first\r\n\tsecond\r\n",  # obs-fold with a tab
    b"X-Bad: a\x00b\r\n",  # NUL
    b"X-Bad: a\rb\r\n",  # bare CR
    b"X-Bad: a\x1bb\r\n",  # other control character
    b"X Bad: v\r\n",  # space in a name
    b"X-Bad : v\r\n",  # space before the colon (RFC 9112 §5.1: must be rejected)
    b"NoColon\r\n",
    b": empty-name\r\n",
]


def by_case(responses: list[bytes]) -> Respond:
    """``/_matrix/case/<i>`` gets ``responses[i]``; anything else gets :data:`OK`."""

    async def respond(stream: trio.SocketStream, exchange: Exchange) -> bool:
        target = exchange.request_line.split(b" ")[1]
        if target.startswith(b"/_matrix/case/"):
            await stream.send_all(responses[int(target.rsplit(b"/", 1)[1])])
        else:
            await stream.send_all(OK)
        return True

    return respond


async def check_each_is_502(base: str, labels: list[bytes]) -> list[str]:
    """Requests every case, then a good request after each; returns what went wrong."""
    wrong = []
    async with httpx.AsyncClient() as client:
        for i, label in enumerate(labels):
            r = await client.get(base + f"/_matrix/case/{i}")
            try:
                assert_upstream_failure(r)
            except (AssertionError, ValueError):
                wrong.append(f"{label!r}: {r.status_code} {r.content[:80]!r}")
            after = await client.get(base + "/_matrix/ok")
            if (after.status_code, after.content) != (200, b"ok"):
                wrong.append(f"after {label!r}: {after.status_code} {after.content[:80]!r}")
    return wrong


async def test_bad_status_line_is_502(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    responses = [line + b"\r\nContent-Length: 2\r\n\r\nok" for line in BAD_STATUS_LINES]
    fake = await raw_homeserver(by_case(responses))
    base = await gateway_for(tmp_path, fake, start_gateway)
    wrong = await check_each_is_502(base, BAD_STATUS_LINES)
    assert wrong == []
    # Each broken connection was thrown away; the good request after it used a fresh one.
    assert fake.accepted == len(responses) + 1


async def test_malformed_response_header_is_502(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    # RFC 9112 §5.2 lets a proxy either reject obs-fold with 502 or unfold it; this client
    # rejects, and must never pass the folded line on as a header of its own.
    responses = [
        b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\n\r\nok"
        for lines in MALFORMED_HEADERS
    ]
    fake = await raw_homeserver(by_case(responses))
    base = await gateway_for(tmp_path, fake, start_gateway)
    wrong = await check_each_is_502(base, MALFORMED_HEADERS)
    assert wrong == []
    assert fake.accepted == len(responses) + 1


async def test_obs_text_in_header_value_is_passed_on(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    # Bytes over 0x7f (obs-text) are allowed in field values; tabs inside a value too.
    response = b"HTTP/1.1 200 OK\r\nX-Name: caf\xc3\xa9\tbar\r\nContent-Length: 2\r\n\r\nok"
    fake = await raw_homeserver(fixed(response))
    base = await gateway_for(tmp_path, fake, start_gateway)
    async with httpx.AsyncClient() as client:
        r = await client.get(base + "/_matrix/x")
    assert r.status_code == 200
    assert r.headers.raw[[k.lower() for k, _ in r.headers.raw].index(b"x-name")][1] == (
        b"caf\xc3\xa9\tbar"
    )


async def test_conflicting_content_lengths_are_502(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk"
    fake = await raw_homeserver(fixed(response))
    base = await gateway_for(tmp_path, fake, start_gateway)
    async with httpx.AsyncClient() as client:
        r = await client.get(base + "/_matrix/x")
    assert_upstream_failure(r)


@pytest.mark.parametrize("split", [False, True], ids=["one-piece", "streamed"])
async def test_transfer_encoding_overrides_content_length(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway, split: bool
) -> None:
    # RFC 9112 §6.3: Transfer-Encoding wins, and an intermediary forwarding such a message
    # MUST first remove the received Content-Length.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"b\r\nhello world\r\n0\r\n\r\n"

    async def respond(stream: trio.SocketStream, exchange: Exchange) -> bool:
        if split:
            await stream.send_all(head + body[:8])
            await trio.sleep(0.05)
            await stream.send_all(body[8:])
        else:
            await stream.send_all(head + body)
        return True

    fake = await raw_homeserver(respond)
    base = await gateway_for(tmp_path, fake, start_gateway)
    async with httpx.AsyncClient() as client:
        with trio.fail_after(5):
            r = await client.get(base + "/_matrix/x")
    assert r.status_code == 200
    assert r.content == b"hello world"
    assert r.headers.get_list("content-length") in ([], ["11"])


async def test_close_before_any_body_byte_is_502(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    # Nothing has been sent to the client yet, so a clean error is still possible.
    fake = await raw_homeserver(
        fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", keep=False)
    )
    base = await gateway_for(tmp_path, fake, start_gateway)
    async with httpx.AsyncClient() as client:
        r = await client.get(base + "/_matrix/x")
    assert_upstream_failure(r)


async def test_close_before_any_response_is_502(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    fake = await raw_homeserver(fixed(b"", keep=False))
    base = await gateway_for(tmp_path, fake, start_gateway)
    async with httpx.AsyncClient() as client:
        r = await client.get(base + "/_matrix/x")
    assert_upstream_failure(r)


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 40,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n28\r\n" + b"x" * 40 + b"\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_body_cut_short_upstream_is_cut_short_downstream(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway, response: bytes
) -> None:
    # The documented behaviour: once the response has started, a homeserver failure ends
    # the client's response early, so the client sees an incomplete body, never a short
    # body that looks complete.
    async def respond(stream: trio.SocketStream, exchange: Exchange) -> bool:
        await stream.send_all(response)
        await trio.sleep(0.05)  # the head and the first bytes go out before the close
        return False

    fake = await raw_homeserver(respond)
    base = await gateway_for(tmp_path, fake, start_gateway)
    async with httpx.AsyncClient() as client:
        with trio.fail_after(5), pytest.raises(httpx.RemoteProtocolError):
            r = await client.get(base + "/_matrix/x")
            # Only reached if the gateway completed the response: show what it sent.
            raise AssertionError(f"complete response: {r.status_code} {r.content!r}")


CHUNK = b"x" * 32768
#: Past the size from which the forwarder watches for the client's going away.
LARGE = 64


def _chunked(count: int) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK) for _ in range(count))


async def _request_line(events: list[dict[str, object]]) -> dict[str, object]:
    """The request's log line, which comes once the gateway is done with it."""
    with trio.fail_after(10):
        while not (lines := [e for e in events if e.get("event") == "request"]):  # noqa: ASYNC110 (no event)
            await trio.sleep(0.01)
    [line] = lines
    return line


async def test_a_large_answer_the_homeserver_cuts_short_is_logged_as_such(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    async def respond(stream: trio.SocketStream, exchange: Exchange) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await stream.send_all(_chunked(LARGE))
        await trio.sleep(0.05)
        return False  # closed before the last chunk

    fake = await raw_homeserver(respond)
    base = await gateway_for(tmp_path, fake, start_gateway)
    with capture_logs() as events:
        async with httpx.AsyncClient() as client:
            with trio.fail_after(10), pytest.raises(httpx.RemoteProtocolError):
                await client.get(base + "/_matrix/x")
        line = await _request_line(events)
    assert line["outcome"] == "cut_short:closed_early"
    assert [e for e in events if e.get("event") == "unhandled error"] == []


async def test_a_client_leaving_a_large_answer_is_logged_as_such(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    async def respond(stream: trio.SocketStream, exchange: Exchange) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(1000):  # far more than the client will read, slowly
            await stream.send_all(_chunked(4))
            await trio.sleep(0.01)
        return False

    fake = await raw_homeserver(respond)
    base = await gateway_for(tmp_path, fake, start_gateway)
    port = int(base.rsplit(":", 1)[1])
    with capture_logs() as events:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /_matrix/x HTTP/1.1\r\nHost: hs\r\n\r\n")
        read = 0
        with trio.fail_after(10):
            while read < 3 * len(CHUNK) * LARGE // 2:
                read += len(await stream.receive_some(65536))
        await stream.aclose()
        line = await _request_line(events)
    assert line["outcome"] == "client_disconnected"
    assert [e for e in events if e.get("event") == "unhandled error"] == []


# --- connection reuse ----------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    fake = await raw_homeserver(fixed(OK))
    base = await gateway_for(tmp_path, fake, start_gateway)
    async with httpx.AsyncClient() as client:
        for i in range(3):
            r = await client.get(base + f"/_matrix/x/{i}")
            assert r.content == b"ok"
        posted = await client.post(base + "/_matrix/y", content=b'{"k":1}')
    assert posted.status_code == 200
    assert fake.accepted == 1
    assert [e.connection for e in fake.exchanges] == [0, 0, 0, 0]
    assert fake.exchanges[-1].body == b'{"k":1}'


@pytest.mark.parametrize(
    "goodbye",
    [b"", b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"],
    ids=["silent-close", "408-then-close"],
)
async def test_idle_connection_closed_by_upstream_is_not_reused(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway, goodbye: bytes
) -> None:
    answered = trio.Event()

    async def respond(stream: trio.SocketStream, exchange: Exchange) -> bool:
        await stream.send_all(OK)
        if exchange.connection == 0:
            # The homeserver's idle timer fires: it says goodbye and closes.
            await trio.sleep(0.05)
            if goodbye:
                await stream.send_all(goodbye)
            answered.set()
            return False
        return True

    fake = await raw_homeserver(respond)
    base = await gateway_for(tmp_path, fake, start_gateway)
    async with httpx.AsyncClient() as client:
        first = await client.get(base + "/_matrix/a")
        await answered.wait()
        await trio.sleep(0.05)  # let the FIN reach the gateway's socket
        second = await client.get(base + "/_matrix/b")
    assert first.content == b"ok"
    assert second.status_code == 200
    assert second.content == b"ok"
    assert fake.accepted == 2
    assert [e.connection for e in fake.exchanges] == [0, 1]


# --- what goes up ----------------------------------------------------------------------------


async def test_request_target_arrives_byte_for_byte(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    fake = await raw_homeserver(fixed(OK))
    base = await gateway_for(tmp_path, fake, start_gateway)
    targets = [
        b"/_matrix/federation/v1/state/%21r%2Fs%3Ahs.test?event_id=%24a%2Fb%40c",
        b"/_matrix/federation/v1/query/profile?user_id=%40alice%3Ahs.test&field=a|b",
        b"/_matrix/media/v3/download/hs.test/a|b%7Cc%2f%2F..%2e?x=%2F%40|&y=",
        b"/_matrix/client/v3/a//b/./c/../d%00e?q=~!*'();:@&=+$,",
    ]
    for target in targets:
        status, _, body = await raw_request(base, b"GET", target)
        assert status == 200
        assert body == b"ok"
        assert fake.exchanges[-1].request_line == b"GET " + target + b" HTTP/1.1"
    assert len(fake.exchanges) == len(targets)


async def raw_exchange(base: str, request: bytes) -> bytes:
    """Sends bytes no client library would send and reads the answer until the gateway
    closes the connection."""
    url = httpx.URL(base)
    answer = b""
    stream = await trio.open_tcp_stream(url.host, url.port or 80)
    async with stream:
        await stream.send_all(request)
        with trio.fail_after(5):
            while data := await stream.receive_some(65536):
                answer += data
    return answer


@pytest.mark.parametrize(
    "header_line",
    [b"X-Evil: a\rX-Injected: 1", b"X-Evil: a\x00X-Injected: 1", b"X-Evil: a\x0bX-Injected: 1"],
    ids=["cr", "nul", "vt"],
)
async def test_header_injection_from_the_client_is_refused(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway, header_line: bytes
) -> None:
    fake = await raw_homeserver(fixed(OK))
    base = await gateway_for(tmp_path, fake, start_gateway)
    # A client library refuses to send such a header; a raw socket does not.
    answer = await raw_exchange(
        base,
        b"GET /_matrix/client/v3/x HTTP/1.1\r\nHost: hs.test\r\n"
        + header_line
        + b"\r\nConnection: close\r\n\r\n",
    )
    status = answer.split(b"\r\n", 1)[0]
    assert status.startswith(b"HTTP/1.1 4"), answer
    assert fake.exchanges == []


async def test_content_length_with_transfer_encoding_is_refused_not_smuggled(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    # The chunked body decodes to more than Content-Length says: forwarding it with that
    # length would make its tail a second request at the homeserver, one the gateway never
    # routed (here, to the admin API it blocks).
    fake = await raw_homeserver(fixed(OK))
    base = await gateway_for(tmp_path, fake, start_gateway)
    smuggled = b"GET /_synapse/admin/v1/server_version HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"{}   " + smuggled
    answer = await raw_exchange(
        base,
        b"PUT /_matrix/client/v3/x HTTP/1.1\r\nHost: hs.test\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body),
    )
    status = answer.split(b"\r\n", 1)[0]
    assert status.startswith(b"HTTP/1.1 400"), answer
    assert fake.exchanges == []


async def test_folded_client_header_stays_one_header(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway
) -> None:
    # A bare LF ends a line (RFC 9112 §2.2 allows that), so "a\nX-Injected: 1" is simply two
    # headers; obs-fold, though, continues a value: whatever the listener makes of it, the
    # continuation must never reach the homeserver as a header line of its own.
    fake = await raw_homeserver(fixed(OK))
    base = await gateway_for(tmp_path, fake, start_gateway)
    await raw_exchange(
        base,
        b"GET /_matrix/client/v3/x HTTP/1.1\r\nHost: hs.test\r\n"
        b"X-Evil: a\r\n X-Injected: 1\r\nConnection: close\r\n\r\n",
    )
    for exchange in fake.exchanges:
        assert exchange.header(b"x-injected") == []
        assert b"\r\n X-Injected" not in exchange.head


def direct_forwarder(url: str) -> Forwarder:
    config: GatewayConfig = make_config(Path("."), url)
    return Forwarder(forward_settings(config), Metrics())


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        (b"/_matrix/x", [(b"x-evil", b"a\r\nx-injected: 1")]),
        (b"/_matrix/x", [(b"x-evil", b"a\nx-injected: 1")]),
        (b"/_matrix/x", [(b"x-evil\r\nx-injected", b"1")]),
        (b"/_matrix/x", [(b"x evil", b"1")]),
        (b"/_matrix/x HTTP/1.1\r\nx-injected: 1\r\n\r\nGET /y", []),
        (b"/_matrix/x\r\n", []),
        (b"/_matrix/\x00x", []),
    ],
)
async def test_forward_refuses_unwritable_requests(
    raw_homeserver: StartRaw, target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    fake = await raw_homeserver(fixed(OK))
    forwarder = direct_forwarder(fake.url)
    # With method, target, headers and body all given, the request object is not consulted.
    request = cast(Request, None)
    try:
        with pytest.raises(MatrixError) as caught:
            await forwarder.forward(request, method="GET", target=target, headers=headers, body=b"")
        assert caught.value.status == 400
        # The same forwarder still works for a well-formed request.
        response = await forwarder.forward(
            request, method="GET", target=b"/_matrix/ok", headers=[], body=b""
        )
        assert response.status == 200
        assert response.body == b"ok"
    finally:
        await forwarder.aclose()
    assert [e.request_line for e in fake.exchanges] == [b"GET /_matrix/ok HTTP/1.1"]


async def test_forward_reads_a_chunked_answer_and_reuses_the_connection(
    raw_homeserver: StartRaw,
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
        b"2;x=y\r\n{}\r\n0\r\nX-T: 1\r\n\r\n"
    )

    async def respond(stream: trio.SocketStream, exchange: Exchange) -> bool:
        await dribble(stream, chunked, piece=3)
        return True

    fake = await raw_homeserver(respond)
    forwarder = direct_forwarder(fake.url)
    request = cast(Request, None)
    try:
        for _ in range(2):
            response = await forwarder.forward(
                request, method="POST", target=b"/_matrix/z", headers=[], body=b"{}"
            )
            assert response.status == 200
            assert response.body == b"{}"
            names = [k for k, _ in response.headers]
            assert b"transfer-encoding" not in names
            assert b"x-t" not in names
    finally:
        await forwarder.aclose()
    assert fake.accepted == 1
    assert [e.body for e in fake.exchanges] == [b"{}", b"{}"]
    assert fake.exchanges[0].header(b"content-length") == [b"2"]


# --- volume --------------------------------------------------------------------------------


def _pattern(size: int) -> bytes:
    """Distinct, position-dependent bytes: a reordered or repeated piece changes the hash."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest() * 32
        counter += 1
    return bytes(out[:size])


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_streamed_response_arrives_intact_and_in_order(
    tmp_path: Path, raw_homeserver: StartRaw, start_gateway: StartGateway, framing: str
) -> None:
    size = 20 * 1024 * 1024
    payload = _pattern(size)

    async def respond(stream: trio.SocketStream, exchange: Exchange) -> bool:
        if b"/after" in exchange.request_line:
            await stream.send_all(OK)
        elif framing == "content-length":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            for i in range(0, size, 1 << 20):
                await stream.send_all(payload[i : i + (1 << 20)])
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            i, step = 0, 1000
            while i < size:
                piece = payload[i : i + step]
                await stream.send_all(b"%x\r\n%b\r\n" % (len(piece), piece))
                i += len(piece)
                step = step * 3 % 300_007 + 1  # odd sizes, none aligned with reads
            await stream.send_all(b"0\r\n\r\n")
        return True

    fake = await raw_homeserver(respond)
    base = await gateway_for(tmp_path, fake, start_gateway)
    digest = hashlib.sha256()
    received = 0
    async with httpx.AsyncClient(timeout=20) as client:
        with trio.fail_after(15):
            async with client.stream("GET", base + "/_matrix/media/v3/download/a/big") as r:
                assert r.status_code == 200
                async for chunk in r.aiter_raw():
                    digest.update(chunk)
                    received += len(chunk)
            # The gateway hands the upstream connection back just after its last write to
            # us; give it that moment so the next request can find it idle.
            await trio.sleep(0.1)
            after = await client.get(base + "/_matrix/after")
    assert received == size
    assert digest.digest() == hashlib.sha256(payload).digest()
    # The whole body was consumed upstream too: the connection carried the next request.
    assert after.status_code == 200
    assert fake.accepted == 1
