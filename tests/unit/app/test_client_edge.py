"""The client API on the public listener: CORS answered and normalised by the gateway, and
the guest edge in front of passthrough. A fake homeserver that sets CORS headers itself, as
Synapse does, and answers whoami."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from tests.unit.app.conftest import StartGateway, free_port_url, make_config
from tests.unit.app.test_app_passthrough import raw_request

GUEST = "guest-token-abcdef"
USER = "user-token-abcdef"
#: What Synapse 1.163 sets on its client API answers.
SYNAPSE_CORS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"GET, HEAD, POST, PUT, DELETE, OPTIONS"),
    (b"access-control-allow-headers", b"X-Requested-With, Content-Type, Authorization, Date"),
    (b"access-control-expose-headers", b"Synapse-Trace-Id, Server"),
]


class Homeserver:
    def __init__(self) -> None:
        self.url = ""
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                done = message["type"] == "lifespan.shutdown"
                await send({"type": message["type"] + ".complete"})
                if done:
                    return
        while (await receive()).get("more_body", False):
            pass
        path: str = scope["path"]
        self.seen.append((scope["method"], path))
        headers = dict(scope["headers"])
        status, body = 200, {"ok": True}
        if path == "/_matrix/client/v3/account/whoami":
            token = headers.get(b"authorization", b"").removeprefix(b"Bearer ").decode()
            if token == GUEST:
                body = {"user_id": "@guest:hs.test", "is_guest": True, "device_id": "G"}
            elif token == USER:
                body = {"user_id": "@user:hs.test", "is_guest": False, "device_id": "U"}
            else:
                status, body = 401, {"errcode": "M_UNKNOWN_TOKEN", "error": "unknown"}
        extra = [] if path.startswith("/_matrix/federation/") else SYNAPSE_CORS
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), *extra],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


@pytest.fixture
async def homeserver(nursery: trio.Nursery) -> AsyncIterator[Homeserver]:
    fake = Homeserver()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.1
    fake.url = (await nursery.start(hypercorn_serve, fake, config))[0]
    yield fake


def cors_of(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower(), v) for k, v in headers if k.lower().startswith(b"access-control-")]


SPEC_CORS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, OPTIONS"),
    (b"access-control-allow-headers", b"X-Requested-With, Content-Type, Authorization"),
]


async def test_preflight_is_answered_by_the_gateway(
    tmp_path: Path, homeserver: Homeserver, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(make_config(tmp_path, homeserver.url))
    status, headers, body = await raw_request(
        gw.public_url,
        b"OPTIONS",
        b"/_matrix/client/v3/rooms/!r:hs.test/send/m.room.message/1",
        [
            (b"origin", b"http://app.example"),
            (b"access-control-request-method", b"PUT"),
            (b"access-control-request-headers", b"authorization, content-type"),
        ],
    )
    assert (status, body) == (204, b"")
    assert sorted(cors_of(headers)) == sorted(SPEC_CORS)
    assert homeserver.seen == []  # no endpoint logic: the homeserver never saw it


async def test_cors_headers_replace_the_homeservers_on_every_client_answer(
    tmp_path: Path, homeserver: Homeserver, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(make_config(tmp_path, homeserver.url))
    status, headers, _ = await raw_request(gw.public_url, b"GET", b"/_matrix/client/v3/sync")
    assert status == 200
    cors = cors_of(headers)
    # Each once, ours; the homeserver's Expose-Headers stays as it is not configured.
    assert sorted(cors) == sorted([*SPEC_CORS, SYNAPSE_CORS[3]])
    # Federation answers are not touched.
    _, headers, _ = await raw_request(gw.public_url, b"GET", b"/_matrix/federation/v1/version")
    assert cors_of(headers) == []
    # An answer the gateway makes itself carries them too.
    down = await start_gateway(make_config(tmp_path, free_port_url()))
    status, headers, _ = await raw_request(down.public_url, b"GET", b"/_matrix/client/v3/sync")
    assert status == 502
    assert sorted(cors_of(headers)) == sorted(SPEC_CORS)


async def test_cors_is_configurable_and_can_be_left_to_the_homeserver(
    tmp_path: Path, homeserver: Homeserver, start_gateway: StartGateway
) -> None:
    config = make_config(
        tmp_path,
        homeserver.url,
        cors={
            "allow_origin": "https://app.example",
            "allow_headers": ["Authorization", "Content-Type", "X-Custom"],
            "expose_headers": ["Server"],
            "max_age": 600,
        },
    )
    gw = await start_gateway(config)
    status, headers, _ = await raw_request(gw.public_url, b"OPTIONS", b"/_matrix/client/v3/sync")
    assert status == 204
    assert dict(cors_of(headers)) == {
        b"access-control-allow-origin": b"https://app.example",
        b"access-control-allow-methods": b"GET, POST, PUT, DELETE, OPTIONS",
        b"access-control-allow-headers": b"Authorization, Content-Type, X-Custom",
        b"access-control-expose-headers": b"Server",
        b"access-control-max-age": b"600",
    }
    _, headers, _ = await raw_request(gw.public_url, b"GET", b"/_matrix/client/v3/sync")
    assert [k for k, _ in cors_of(headers)].count(b"access-control-expose-headers") == 1
    # The MSC4108 rendezvous keeps the homeserver's own CORS, preflight included.
    rendezvous = b"/_matrix/client/unstable/org.matrix.msc4108/rendezvous"
    _, headers, _ = await raw_request(gw.public_url, b"OPTIONS", rendezvous)
    assert cors_of(headers) == SYNAPSE_CORS
    assert homeserver.seen[-1] == ("OPTIONS", rendezvous.decode())

    off = await start_gateway(make_config(tmp_path, homeserver.url, cors={"enabled": False}))
    _, headers, _ = await raw_request(off.public_url, b"GET", b"/_matrix/client/v3/sync")
    assert cors_of(headers) == SYNAPSE_CORS
    _, headers, _ = await raw_request(off.public_url, b"OPTIONS", b"/_matrix/client/v3/sync")
    assert homeserver.seen[-1] == ("OPTIONS", "/_matrix/client/v3/sync")


STATE = "/_matrix/client/v3/rooms/!r:hs.test/state/m.room.topic/"


async def test_guests_state_events_are_limited_at_the_edge(
    tmp_path: Path, homeserver: Homeserver, start_gateway: StartGateway
) -> None:
    config = make_config(
        tmp_path,
        homeserver.url,
        guests={"enabled": True, "state_rate": {"capacity": 2, "per_second": 0.01}},
        store={"sqlite_path": str(tmp_path / "gw.db")},
    )
    gw = await start_gateway(config)
    async with httpx.AsyncClient(base_url=gw.public_url) as client:
        auth = {"Authorization": f"Bearer {GUEST}"}
        for _ in range(2):
            answer = await client.put(STATE, json={"topic": "hi"}, headers=auth)
            assert answer.status_code == 200
        answer = await client.put(STATE, json={"topic": "again"}, headers=auth)
        assert answer.status_code == 429
        body = answer.json()
        assert body["errcode"] == "M_LIMIT_EXCEEDED" and body["retry_after_ms"] > 90_000
        assert int(answer.headers["retry-after"]) >= 90
        assert answer.headers["access-control-allow-origin"] == "*"
        assert answer.headers["connection"] == "close"  # the body was never read
        user = await client.put(
            STATE, json={"topic": "x"}, headers={"Authorization": f"Bearer {USER}"}
        )
        assert user.status_code == 200
    puts = [seen for seen in homeserver.seen if seen[0] == "PUT"]
    assert len(puts) == 3  # the refused one never reached the homeserver
    whoami = [seen for seen in homeserver.seen if seen[1].endswith("/whoami")]
    assert len(whoami) == 2  # once per token


async def test_guests_off_by_default(
    tmp_path: Path, homeserver: Homeserver, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(make_config(tmp_path, homeserver.url))
    async with httpx.AsyncClient(base_url=gw.public_url) as client:
        for _ in range(8):
            answer = await client.put(
                STATE, json={"topic": "hi"}, headers={"Authorization": f"Bearer {GUEST}"}
            )
            assert answer.status_code == 200
    assert not any(path.endswith("/whoami") for _, path in homeserver.seen)


async def test_guests_forbidden_endpoints(
    tmp_path: Path, homeserver: Homeserver, start_gateway: StartGateway
) -> None:
    config = make_config(
        tmp_path,
        homeserver.url,
        guests={"enabled": True, "restrict_endpoints": True},
        store={"sqlite_path": str(tmp_path / "gw.db")},
    )
    gw = await start_gateway(config)
    async with httpx.AsyncClient(base_url=gw.public_url) as client:
        answer = await client.post(
            "/_matrix/client/v3/createRoom",
            json={},
            params={"access_token": GUEST},
        )
        assert answer.status_code == 403
        assert answer.json()["errcode"] == "M_GUEST_ACCESS_FORBIDDEN"
        answer = await client.get("/_matrix/client/v3/sync", params={"access_token": GUEST})
        assert answer.status_code == 200
        # /versions needs no authentication; a client sending its token anyway is not judged.
        answer = await client.get("/_matrix/client/versions", params={"access_token": GUEST})
        assert answer.status_code == 200
        answer = await client.get(
            "/_matrix/client/v3/sync",
            params={"access_token": GUEST},
            headers={"Authorization": f"Bearer {USER}"},
        )
        assert answer.status_code == 200  # an allowed endpoint: nothing to judge
        answer = await client.post(
            "/_matrix/client/v3/createRoom",
            params={"access_token": GUEST},
            headers={"Authorization": f"Bearer {USER}"},
            json={},
        )
        assert (answer.status_code, answer.json()["errcode"]) == (401, "M_MISSING_TOKEN")
    assert ("POST", "/_matrix/client/v3/createRoom") not in homeserver.seen
