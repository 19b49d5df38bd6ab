"""The guard against a request with both Content-Length and Transfer-Encoding (RFC 9112 6.1).

The public listener's built-in HTTP/1.1 server refuses such a request itself; Hypercorn's
(h11, ``public.http_server = "hypercorn"``) reads the body as chunked and hands both headers
to the gateway. Passing either length on is how a second request gets smuggled past the
gateway's routing, so passthrough refuses the request with 400 too, before it opens a
connection to the homeserver. The bodies here are
exactly as long as Content-Length says, so a passthrough without the guard would forward
them cleanly and get the homeserver's 200: only the guard turns them into a 400.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.errors import MatrixError
from gateway.http import Message
from tests.robustness.harness import watching_logs
from tests.unit.app.conftest import StartGateway, make_config
from tests.unit.app.test_forward_http1 import (
    OK,
    StartRaw,
    direct_forwarder,
    fixed,
    gateway_for,
    raw_exchange,
    raw_homeserver,  # noqa: F401 (a fixture)
)

GUARD_MESSAGE = "Request has both Content-Length and Transfer-Encoding"


def _scope(headers: list[tuple[bytes, bytes]], http_version: str) -> dict[str, Any]:
    return {
        "type": "http",
        "http_version": http_version,
        "method": "PUT",
        "scheme": "http",
        "path": "/_matrix/client/v3/x",
        "raw_path": b"/_matrix/client/v3/x",
        "query_string": b"",
        "headers": [(b"host", b"hs.test"), *headers],
        "client": ("127.0.0.1", 50000),
    }


@pytest.mark.parametrize("http_version", ["1.0", "1.1", "2"])
@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
        [(b"transfer-encoding", b"chunked"), (b"content-length", b"5")],
        [(b"transfer-encoding", b"gzip, chunked"), (b"content-length", b"5")],
        [(b"transfer-encoding", b"identity"), (b"content-length", b"5")],
        [(b"content-length", b"5"), (b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
    ],
    ids=["cl-te", "te-cl", "te-list", "te-identity", "cl-twice"],
)
async def test_passthrough_refuses_both_lengths_before_reading_or_connecting(
    raw_homeserver: StartRaw,  # noqa: F811
    headers: list[tuple[bytes, bytes]],
    http_version: str,
) -> None:
    fake = await raw_homeserver(fixed(OK))
    forwarder = direct_forwarder(fake.url)
    received = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b"{}   ", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    try:
        with pytest.raises(MatrixError) as caught:
            await forwarder.passthrough(_scope(headers, http_version), receive, send)
    finally:
        await forwarder.aclose()
    assert (caught.value.status, caught.value.errcode) == (400, "M_UNKNOWN")
    assert caught.value.message == GUARD_MESSAGE
    assert received == 0  # refused on the headers alone
    assert sent == []
    assert fake.accepted == 0


async def test_listener_refuses_both_lengths_even_when_they_agree(
    tmp_path: Path,
    raw_homeserver: StartRaw,  # noqa: F811
    start_gateway: StartGateway,
) -> None:
    # The listener refuses it before any application code runs; the guard in passthrough
    # (tested above with the scope alone) is the second line behind it.
    fake = await raw_homeserver(fixed(OK))
    base = await gateway_for(tmp_path, fake, start_gateway)
    answer = await raw_exchange(
        base,
        b"PUT /_matrix/client/v3/x HTTP/1.1\r\nHost: hs.test\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\n{}   \r\n0\r\n\r\n",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0].startswith(b"HTTP/1.1 400"), answer
    assert b"connection: close" in head.lower()
    assert body == b'{"errcode":"M_UNKNOWN","error":"%s"}' % GUARD_MESSAGE.encode()
    assert fake.accepted == 0


async def test_listener_never_sends_the_head_of_a_smuggling_attempt(
    tmp_path: Path,
    raw_homeserver: StartRaw,  # noqa: F811
    start_gateway: StartGateway,
) -> None:
    # The chunked body is longer than Content-Length: the pool would stop at the declared
    # length, but only after the request head went out on a homeserver connection.
    fake = await raw_homeserver(fixed(OK))
    base = await gateway_for(tmp_path, fake, start_gateway)
    body = b"{}   GET /_synapse/admin/v1/server_version HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = await raw_exchange(
        base,
        b"PUT /_matrix/client/v3/x HTTP/1.1\r\nHost: hs.test\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body),
    )
    assert GUARD_MESSAGE.encode() in answer, answer
    assert fake.accepted == 0


async def test_what_the_listener_refuses_itself_is_logged_and_counted(
    tmp_path: Path,
    raw_homeserver: StartRaw,  # noqa: F811
    start_gateway: StartGateway,
) -> None:
    fake = await raw_homeserver(fixed(OK))
    gw = await start_gateway(make_config(tmp_path, fake.url))
    with watching_logs() as watch:
        answer = await raw_exchange(gw.public_url, b"GET /_matrix/client/versions HTTP/1.1\n\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer
    [line] = [e for e in watch.events if e.get("event") == "request refused"]
    assert line["status"] == 400 and line["route"] == "http_refused"
    assert line["reason"] == "Malformed request head" and line["client"] == "127.0.0.1"
    assert line["request_id"]
    async with httpx.AsyncClient(verify=False) as client:
        metrics = (await client.get(gw.internal_url + "/metrics")).text
    assert 'route="http_refused",status="400"' in metrics
    assert fake.accepted == 0
