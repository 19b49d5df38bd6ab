"""Owned routes, the router, route classes, the internal listener, logs and TLS."""

from __future__ import annotations

import io
import json
import ssl
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from gateway.app import route_path
from gateway.errors import Codes, MatrixError
from gateway.http import Request, Response, Router
from gateway.logging import configure_logging, loggable_query
from gateway.services import Services
from tests.unit.app.conftest import FakeHomeserver, StartGateway, make_config


async def _noop(request: Request) -> Response:
    return Response()


def test_router_matches_raw_segments_and_decodes_params() -> None:
    router = Router()
    router.add("PUT", "/_matrix/federation/v3/invite/{roomId}/{eventId}", _noop, name="invite")
    m = router.match("PUT", b"/_matrix/federation/v3/invite/%21a%2Fb%3Ahs.test/%24ev")
    assert m is not None
    assert m.route.name == "invite"
    assert m.params == {"roomId": "!a/b:hs.test", "eventId": "$ev"}
    # An encoded letter in a literal segment still matches: no way around an owned route.
    assert router.match("PUT", b"/_matrix/federation/v3/%69nvite/x/y") is not None
    # Other methods, other shapes: passthrough.
    assert router.match("GET", b"/_matrix/federation/v3/invite/x/y") is None
    assert router.match("PUT", b"/_matrix/federation/v3/invite/x") is None
    assert router.match("PUT", b"/_matrix/federation/v3/invite/x/y/z") is None
    with pytest.raises(MatrixError) as e:
        router.match("PUT", b"/_matrix/federation/v3/invite/%ff/y")
    assert e.value.errcode == Codes.INVALID_PARAM
    # The homeserver answers HEAD like GET: a HEAD to an owned GET endpoint must not pass
    # through unchecked, it is refused.
    router.add("GET", "/_matrix/federation/v1/make_join/{roomId}/{userId}", _noop)
    assert router.match("GET", b"/_matrix/federation/v1/make_join/!r:hs/@u:hs") is not None
    with pytest.raises(MatrixError) as head:
        router.match("HEAD", b"/_matrix/federation/v1/make_join/!r:hs/@u:hs")
    assert head.value.status == 405
    with pytest.raises(ValueError):
        router.add("PUT", "/_matrix/federation/v3/invite/{a}/{b}", _noop)
    with pytest.raises(ValueError):
        router.add("GET", "/x/pre{a}", _noop)


def test_route_path_resolves_what_the_homeserver_would() -> None:
    assert route_path(b"/_matrix/../_synapse/admin/v1") == b"/_synapse/admin/v1"
    assert route_path(b"/_synapse/%61dmin") == b"/_synapse/admin"
    assert route_path(b"//_synapse//admin/") == b"/_synapse/admin/"
    assert route_path(b"/_matrix/client/v3/rooms/!r/state/.m.x") == (
        b"/_matrix/client/v3/rooms/!r/state/.m.x"
    )


def test_loggable_query_strips_access_tokens() -> None:
    assert loggable_query(b"a=1&access_token=secret&b=2") == "a=1&b=2"
    assert loggable_query(b"access%5Ftoken=secret") == ""
    assert loggable_query(b"user_id=%40a%3Ab") == "user_id=%40a%3Ab"


async def test_owned_handler_sees_the_request_and_can_forward(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    seen: list[Request] = []

    async def invite(request: Request) -> Response:
        seen.append(request)
        body = await request.json()
        if body.get("deny"):
            raise MatrixError(403, Codes.FORBIDDEN, "not today")
        upstream = await request.services.forwarder.forward(request)
        return Response.json({"params": dict(request.path_params), "hs": upstream.status})

    def install(router: Router, services: Services) -> None:
        assert services.config.server.server_name == "hs.test"
        router.add("PUT", "/_matrix/federation/v3/invite/{roomId}/{eventId}", invite, name="inv")

    gw = await start_gateway(make_config(tmp_path, homeserver.url), [install])
    url = gw.public_url + "/_matrix/federation/v3/invite/%21r%3Ahs.test/%24e?x=1"
    async with httpx.AsyncClient() as client:
        ok = await client.put(url, json={"event": {}})
        denied = await client.put(url, json={"deny": True})
        bad = await client.put(url, content=b"{nope")
        metrics = (await client.get(gw.internal_url + "/metrics")).text
    assert ok.status_code == 200
    assert ok.json() == {"params": {"roomId": "!r:hs.test", "eventId": "$e"}, "hs": 200}
    assert denied.status_code == 403
    assert denied.json() == {"errcode": "M_FORBIDDEN", "error": "not today"}
    assert bad.status_code == 400
    assert bad.json()["errcode"] == "M_NOT_JSON"
    request = seen[0]
    assert request.raw_path == b"/_matrix/federation/v3/invite/%21r%3Ahs.test/%24e"
    assert request.query_string == b"x=1"
    assert request.method == "PUT"
    assert len(request.request_id) == 16
    assert request.header("content-type") == "application/json"
    # forward() sent the original target and body.
    assert len(homeserver.seen) == 1
    assert homeserver.seen[0].raw_path == request.raw_path
    assert homeserver.seen[0].query_string == b"x=1"
    assert json.loads(homeserver.seen[0].body) == {"event": {}}
    assert 'gateway_requests_total{route="inv",status="200"} 1.0' in metrics
    assert 'gateway_requests_total{route="inv",status="403"} 1.0' in metrics


async def test_internal_listener_health_and_metrics(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(make_config(tmp_path, homeserver.url))
    async with httpx.AsyncClient() as client:
        await client.get(gw.public_url + "/_matrix/federation/v1/version")
        await client.get(gw.public_url + "/_synapse/admin/v1/x")
        health = await client.get(gw.internal_url + "/health")
        live = await client.get(gw.internal_url + "/health/live")
        metrics = await client.get(gw.internal_url + "/metrics")
        other = await client.get(gw.internal_url + "/_matrix/federation/v1/version")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "homeserver": "ok"}
    assert live.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'gateway_requests_total{route="passthrough",status="200"} 1.0' in text
    assert 'gateway_requests_total{route="admin_blocked",status="404"} 1.0' in text
    assert 'gateway_request_duration_seconds_count{route="passthrough",status="200"} 1.0' in text
    assert "gateway_worker_starts_total 1.0" in text
    assert other.status_code == 404


async def test_one_json_log_line_per_request_without_secrets(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    try:
        gw = await start_gateway(make_config(tmp_path, homeserver.url))
        async with httpx.AsyncClient() as client:
            await client.get(
                gw.public_url + "/_matrix/client/v3/sync?since=s1&access_token=SECRET1",
                headers={"Authorization": "Bearer SECRET2", "X-Request-Id": "chosen"},
            )
        # The line is written just after the response went out.
        with trio.fail_after(2):
            while '"event": "request"' not in stream.getvalue():  # noqa: ASYNC110 (no event)
                await trio.sleep(0.01)
    finally:
        configure_logging("console", "info")
    output = stream.getvalue()
    assert "SECRET" not in output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    requests = [line for line in lines if line["event"] == "request"]
    assert len(requests) == 1
    line = requests[0]
    assert line["method"] == "GET"
    assert line["path"] == "/_matrix/client/v3/sync"
    assert line["query"] == "since=s1"
    assert line["route"] == "passthrough"
    assert line["status"] == 200
    assert line["duration_ms"] >= 0
    assert line["request_id"] != "chosen" and len(line["request_id"]) == 16


async def test_tls_on_the_public_listener(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    config = make_config(
        tmp_path,
        homeserver.url,
        public={"tls_certificate_path": "cert.pem", "tls_private_key_path": "key.pem"},
    )
    gw = await start_gateway(config)
    assert gw.public_url.startswith("https://")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with httpx.AsyncClient(verify=context) as client:
        r = await client.get(gw.public_url + "/_matrix/federation/v1/version")
    assert r.status_code == 200
    assert homeserver.seen[-1].header(b"x-forwarded-proto") == [b"https"]
