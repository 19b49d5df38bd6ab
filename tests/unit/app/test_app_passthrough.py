"""Passthrough through a real gateway to a real (fake) homeserver, all on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpcore
import httpx
import trio

from gateway.homeserver.forward import BUFFERED_BODY_LIMIT
from tests.unit.app.conftest import FakeHomeserver, StartGateway, free_port_url, make_config


async def raw_request(
    base: str,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Sends ``target`` exactly as given (httpx would normalise it)."""
    url = httpx.URL(base)
    async with httpcore.AsyncConnectionPool() as pool:
        all_headers = [(b"host", f"{url.host}:{url.port}".encode()), *(headers or [])]
        if body:
            all_headers.append((b"content-length", str(len(body)).encode()))
        response = await pool.request(
            method,
            httpcore.URL(scheme=b"http", host=url.host.encode(), port=url.port, target=target),
            headers=all_headers,
            content=body,
        )
        return response.status, response.headers, response.content


async def test_raw_path_and_query_reach_the_homeserver_byte_for_byte(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(make_config(tmp_path, homeserver.url))
    targets = [
        b"/_matrix/federation/v1/query/profile?user_id=%40alice%3Ahs.test",
        b"/_matrix/federation/v1/state/%21room%2Fwith%2Fslash%3Ahs.test?event_id=%24e%2Bv",
        b"/_matrix/client/v3/rooms/%21a%3Ab/state/m.x/./../y?x=%7e&y=a+b&z",
        b"/_matrix/media/v3/download/hs.test/AbC%20d|e",
    ]
    for target in targets:
        status, _, _ = await raw_request(gw.public_url, b"GET", target)
        assert status == 200
        seen = homeserver.seen[-1]
        path, _, query = target.partition(b"?")
        assert seen.raw_path == path
        assert seen.query_string == query
    assert len(homeserver.seen) == len(targets)


async def test_body_and_end_to_end_headers_forwarded_hop_by_hop_dropped(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(make_config(tmp_path, homeserver.url))
    body = json.dumps({"edus": [], "pdus": [{"x": "é"}]}).encode()
    auth = b'X-Matrix origin="remote.test",destination="hs.test",key="ed25519:a",sig="abc"'
    status, headers, _ = await raw_request(
        gw.public_url,
        b"PUT",
        b"/_matrix/federation/v1/send/123",
        [
            (b"authorization", auth),
            (b"content-type", b"application/json"),
            (b"x-custom", b"kept"),
            (b"connection", b"keep-alive, x-private"),
            (b"x-private", b"dropped"),
            (b"keep-alive", b"timeout=5"),
            (b"te", b"trailers"),
            (b"proxy-authorization", b"Basic abc"),
            (b"x-forwarded-for", b"6.6.6.6"),
            (b"x-forwarded-proto", b"https"),
        ],
        body,
    )
    assert status == 200
    seen = homeserver.seen[-1]
    assert seen.method == "PUT"
    assert seen.body == body
    assert seen.header(b"authorization") == [auth]
    assert seen.header(b"content-type") == [b"application/json"]
    assert seen.header(b"x-custom") == [b"kept"]
    assert seen.header(b"content-length") == [str(len(body)).encode()]
    assert seen.header(b"host") == [httpx.URL(gw.public_url).netloc]
    for name in (b"x-private", b"keep-alive", b"te", b"proxy-authorization"):
        assert seen.header(name) == [], name
    # Not trusted by default: replaced, so a client cannot choose what Synapse believes.
    assert seen.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert seen.header(b"x-forwarded-proto") == [b"http"]
    # The homeserver's own headers come back.
    assert (b"x-upstream", b"yes") in headers


async def test_trusted_x_forwarded_appends(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    config = make_config(tmp_path, homeserver.url, public={"x_forwarded": True})
    gw = await start_gateway(config)
    await raw_request(
        gw.public_url,
        b"GET",
        b"/_matrix/key/v2/server",
        [(b"x-forwarded-for", b"203.0.113.9"), (b"x-forwarded-proto", b"https")],
    )
    seen = homeserver.seen[-1]
    assert seen.header(b"x-forwarded-for") == [b"203.0.113.9, 127.0.0.1"]
    assert seen.header(b"x-forwarded-proto") == [b"https"]


async def test_error_status_and_response_hop_by_hop(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(make_config(tmp_path, homeserver.url))
    async with httpx.AsyncClient() as client:
        r = await client.get(gw.public_url + "/_matrix/unauthorized")
    assert r.status_code == 401
    assert r.json() == {"errcode": "M_UNAUTHORIZED", "error": "no"}
    assert r.headers["x-upstream"] == "yes"
    assert "x-secret-hop" not in r.headers


async def test_large_response_is_streamed(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(make_config(tmp_path, homeserver.url))
    total = 0
    async with httpx.AsyncClient() as client:
        async with client.stream("GET", gw.public_url + "/_matrix/media/stream") as r:
            assert r.status_code == 200
            chunks = r.aiter_raw()
            with trio.fail_after(5):
                # The homeserver holds the rest back until we saw the start: a gateway that
                # buffered the whole response would never deliver these bytes.
                while total < len(homeserver.chunk):
                    total += len(await chunks.__anext__())
            homeserver.release.set()
            async for chunk in chunks:
                total += len(chunk)
    assert total == len(homeserver.chunk) * homeserver.chunks


async def test_content_length_over_limit_refused_before_upstream(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(make_config(tmp_path, homeserver.url, public={"max_body_size": 1000}))
    async with httpx.AsyncClient() as client:
        r = await client.put(gw.public_url + "/_matrix/federation/v1/send/1", content=b"x" * 1001)
        ok = await client.put(gw.public_url + "/_matrix/federation/v1/send/2", content=b"x" * 1000)
    assert r.status_code == 413
    assert r.json()["errcode"] == "M_TOO_LARGE"
    assert ok.status_code == 200
    assert [s.raw_path for s in homeserver.seen] == [b"/_matrix/federation/v1/send/2"]


async def _chunked(data: bytes, size: int = 8192) -> Any:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_chunked_body_over_limit_never_reaches_upstream(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(make_config(tmp_path, homeserver.url, public={"max_body_size": 1000}))
    async with httpx.AsyncClient() as client:
        r = await client.post(gw.public_url + "/_matrix/x", content=_chunked(b"y" * 5000, 500))
        ok = await client.post(gw.public_url + "/_matrix/y", content=_chunked(b"z" * 900, 100))
    assert r.status_code == 413
    assert r.json()["errcode"] == "M_TOO_LARGE"
    assert ok.status_code == 200
    assert len(homeserver.seen) == 1
    # A short chunked body is sent on with a Content-Length.
    assert homeserver.seen[0].body == b"z" * 900
    assert homeserver.seen[0].header(b"content-length") == [b"900"]


async def test_long_chunked_body_streams_up_and_is_cut_when_over_limit(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    limit = 4 * BUFFERED_BODY_LIMIT
    config = make_config(tmp_path, homeserver.url, public={"max_body_size": limit})
    gw = await start_gateway(config)
    fits = bytes(range(256)) * (limit // 256)
    async with httpx.AsyncClient() as client:
        ok = await client.post(gw.public_url + "/_matrix/fits", content=_chunked(fits))
        r = await client.post(gw.public_url + "/_matrix/over", content=_chunked(fits + b"!"))
    assert ok.status_code == 200
    assert r.status_code == 413
    await trio.sleep(0.2)
    complete = [s for s in homeserver.seen if s.complete]
    assert [s.raw_path for s in complete] == [b"/_matrix/fits"]
    assert complete[0].body == fits
    # The over-limit body was aborted mid-way: the homeserver never got all of it.
    assert all(len(s.body) < len(fits) + 1 for s in homeserver.seen if not s.complete)


async def test_homeserver_down_is_a_fast_502(tmp_path: Path, start_gateway: StartGateway) -> None:
    gw = await start_gateway(make_config(tmp_path, free_port_url()))
    async with httpx.AsyncClient() as client:
        start = trio.current_time()
        r = await client.get(gw.public_url + "/_matrix/federation/v1/version")
        elapsed = trio.current_time() - start
        metrics = (await client.get(gw.internal_url + "/metrics")).text
        health = await client.get(gw.internal_url + "/health")
    assert r.status_code == 502
    body = r.json()
    assert body["errcode"] == "M_UNKNOWN"
    assert body["error"]
    assert body["retry_after_ms"] > 0
    assert "retry-after" in r.headers
    assert elapsed < 2
    assert 'gateway_upstream_errors_total{kind="connect_error"} 1.0' in metrics
    assert 'gateway_requests_total{route="passthrough",status="502"} 1.0' in metrics
    assert health.status_code == 503


async def test_slow_homeserver_is_a_504_after_the_read_timeout(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    config = make_config(tmp_path, homeserver.url, homeserver={"read_timeout": 0.5})
    gw = await start_gateway(config)
    async with httpx.AsyncClient() as client:
        start = trio.current_time()
        r = await client.get(gw.public_url + "/_matrix/slow")
        elapsed = trio.current_time() - start
    assert r.status_code == 504
    assert r.json()["errcode"] == "M_UNKNOWN"
    assert 0.45 < elapsed < 3


async def test_admin_api_blocked_by_default(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(make_config(tmp_path, homeserver.url))
    blocked = [
        b"/_synapse/admin/v1/server_version",
        b"/_synapse/admin",
        b"/_synapse/%61dmin/v1/server_version",
        b"/_matrix/../_synapse/admin/v1/users",
        b"//_synapse/admin/v1/users",
        b"/_synapse/replication/foo",
        b"/_synapse/metrics",
        b"/somewhere/else",
        b"/",
    ]
    for target in blocked:
        status, _, body = await raw_request(gw.public_url, b"GET", target)
        assert status == 404, target
        assert json.loads(body)["errcode"] == "M_UNRECOGNIZED"
    status, _, _ = await raw_request(gw.public_url, b"GET", b"/_synapse/client/pick_username")
    assert status == 200
    status, _, _ = await raw_request(gw.public_url, b"GET", b"/.well-known/matrix/server")
    assert status == 200
    assert [s.raw_path for s in homeserver.seen] == [
        b"/_synapse/client/pick_username",
        b"/.well-known/matrix/server",
    ]


async def test_admin_api_exposed_when_enabled(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    config = make_config(tmp_path, homeserver.url, homeserver={"expose_admin_api": True})
    gw = await start_gateway(config)
    status, _, _ = await raw_request(gw.public_url, b"GET", b"/_synapse/admin/v1/server_version")
    assert status == 200
    assert homeserver.seen[-1].raw_path == b"/_synapse/admin/v1/server_version"
