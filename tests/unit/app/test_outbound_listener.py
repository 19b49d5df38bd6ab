"""The outbound listener in process: what reaches the destination, what comes back, and that
requests in flight do not wait for each other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import signedjson.key
import trio
import trustme

from gateway.config import GatewayConfig
from tests.unit.app.conftest import (
    FAKE_HOMESERVER_KEY,
    FakeHomeserver,
    StartGateway,
    make_config,
)
from tests.unit.federation.support import HttpsTestServer, ReceivedRequest, Reply

SECRET = "outbound-test-secret-0123456789"


async def start_destination(nursery: trio.Nursery) -> HttpsTestServer:
    server = HttpsTestServer(trustme.CA(), ("localhost",))
    await nursery.start(server.serve)
    return server


def outbound_config(tmp_path: Path, homeserver: FakeHomeserver) -> GatewayConfig:
    return make_config(
        tmp_path,
        homeserver.url,
        outbound={"enabled": True, "bind": "127.0.0.1:0", "secret": SECRET},
        federation={
            "ip_range_whitelist": ["127.0.0.0/8"],
            "federation_certificate_verification_whitelist": ["localhost"],
            "trusted_key_servers": [],
        },
    )


async def proxy_request(
    url: str,
    method: str,
    destination: str,
    target: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    secret: str = SECRET,
) -> tuple[int, dict[str, str], bytes]:
    """Speak Synapse's proxy protocol to the outbound listener: (status, headers, body)."""
    address = urlsplit(url)
    assert address.hostname is not None and address.port is not None
    stream = await trio.open_tcp_stream(address.hostname, address.port)
    lines = [f"{method} matrix-federation://{destination}{target} HTTP/1.1", f"Host: {destination}"]
    lines.append(f"Proxy-Authorization: Bearer {secret}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    data = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    await stream.aclose()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer_headers = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        answer_headers[k.strip().lower()] = v.strip()
    if answer_headers.get("transfer-encoding") == "chunked":
        decoded = b""
        while rest:
            size_text, _, rest = rest.partition(b"\r\n")
            size = int(size_text, 16)
            if size == 0:
                break
            decoded += rest[:size]
            rest = rest[size + 2 :]
        rest = decoded
    return int(status_line.split()[1]), answer_headers, rest


async def test_request_goes_on_exactly_as_signed_and_the_answer_comes_back(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    destination = await start_destination(nursery)
    big = b"x" * (3 * 1024 * 1024)
    destination.reply(
        "PUT",
        "/_matrix/federation/v1/send/1700%2F1",
        Reply(200, big, {"Content-Type": "application/octet-stream", "X-Extra": "kept"}),
    )
    listening = await start_gateway(outbound_config(tmp_path, homeserver))
    assert listening.outbound_url is not None
    body = json.dumps({"pdus": [], "edus": [{"edu_type": "m.typing"}]}).encode()
    status, headers, answer = await proxy_request(
        listening.outbound_url,
        "PUT",
        f"localhost:{destination.port}",
        "/_matrix/federation/v1/send/1700%2F1?x=%2F",
        body=body,
        headers={
            "Authorization": 'X-Matrix origin="hs.test",key="ed25519:a",sig="c2ln"',
            "Content-Type": "application/json",
            "User-Agent": "Synapse/1.163.2",
            "X-Not-Forwarded": "1",
        },
    )
    assert status == 200
    assert answer == big
    assert headers["x-extra"] == "kept"
    (received,) = destination.requests
    assert received.target == "/_matrix/federation/v1/send/1700%2F1?x=%2F"
    assert received.body == body
    assert received.headers["authorization"] == (
        'X-Matrix origin="hs.test",key="ed25519:a",sig="c2ln"'
    )
    assert received.headers["user-agent"] == "Synapse/1.163.2"
    assert received.headers["host"] == f"localhost:{destination.port}"
    assert "proxy-authorization" not in received.headers
    assert "x-not-forwarded" not in received.headers
    assert received.sni == "localhost"


async def test_requests_in_flight_do_not_wait_for_each_other(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    destination = await start_destination(nursery)
    count = 8
    arrived = 0
    all_arrived = trio.Event()

    async def held_until_all_arrived(_: ReceivedRequest) -> Reply:
        nonlocal arrived
        arrived += 1
        if arrived == count:
            all_arrived.set()
        # Serialised forwarding would never let the last request arrive.
        await all_arrived.wait()
        return Reply.json({"pdus": {}})

    destination.route("PUT", "/_matrix/federation/v1/send/t", held_until_all_arrived)
    listening = await start_gateway(outbound_config(tmp_path, homeserver))
    statuses: list[int] = []

    async def one() -> None:
        status, _, _ = await proxy_request(
            listening.outbound_url,
            "PUT",
            f"localhost:{destination.port}",
            "/_matrix/federation/v1/send/t",
            body=b"{}",
        )
        statuses.append(status)

    with trio.fail_after(20):
        async with trio.open_nursery() as requests:
            for _ in range(count):
                requests.start_soon(one)
    assert statuses == [200] * count


async def test_unreachable_destination_is_a_502_matrix_error(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    listening = await start_gateway(outbound_config(tmp_path, homeserver))
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status, _, body = await proxy_request(
        listening.outbound_url, "GET", f"localhost:{port}", "/_matrix/federation/v1/version"
    )
    answer: dict[str, Any] = json.loads(body)
    assert status == 502
    assert answer["errcode"] == "M_UNKNOWN"
    assert f"localhost:{port}" in answer["error"]
    assert answer["retry_after_ms"] > 0


async def test_private_addresses_stay_refused_without_the_whitelist(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    destination = await start_destination(nursery)
    config = make_config(
        tmp_path,
        homeserver.url,
        outbound={"enabled": True, "bind": "127.0.0.1:0", "secret": SECRET},
    )
    listening = await start_gateway(config)
    status, _, body = await proxy_request(
        listening.outbound_url,
        "GET",
        f"localhost:{destination.port}",
        "/_matrix/federation/v1/version",
    )
    assert status == 502
    assert "may not contact" in json.loads(body)["error"]
    assert destination.requests == []


async def test_wrong_secret_reaches_nothing(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    destination = await start_destination(nursery)
    listening = await start_gateway(outbound_config(tmp_path, homeserver))
    status, _, body = await proxy_request(
        listening.outbound_url,
        "GET",
        f"localhost:{destination.port}",
        "/_matrix/federation/v1/version",
        secret="not-the-secret-at-all",
    )
    assert status == 401
    assert json.loads(body)["errcode"] == "M_UNAUTHORIZED"
    assert destination.requests == []


# --- our invites as v3 ------------------------------------------------------------------

ROOM = "!room:hs.test"
CREATE_ID = "$create-event-id"
INVITE_ID = "$invite-event-id"
CREATE = {
    "type": "m.room.create",
    "state_key": "",
    "room_id": ROOM,
    "sender": "@alice:hs.test",
    "content": {"room_version": "10"},
    "hashes": {"sha256": "aGFzaA"},
    "signatures": {"hs.test": {"ed25519:a_fake": "c2ln"}},
}


def v2_invite(destination: str) -> dict[str, Any]:
    return {
        "room_version": "10",
        "event": {
            "type": "m.room.member",
            "state_key": f"@bob:{destination}",
            "sender": "@alice:hs.test",
            "room_id": ROOM,
            "content": {"membership": "invite"},
            "auth_events": ["$power-levels", CREATE_ID],
        },
        "invite_room_state": [
            {"type": "m.room.create", "state_key": "", "sender": "@alice:hs.test", "content": {}},
            {"type": "m.room.name", "state_key": "", "sender": "@alice:hs.test", "content": {}},
        ],
    }


def invite_config(
    tmp_path: Path, homeserver: FakeHomeserver, version: str = "unstable"
) -> GatewayConfig:
    with (tmp_path / "signing.key").open("w") as f:
        signedjson.key.write_signing_keys(f, [FAKE_HOMESERVER_KEY])
    return make_config(
        tmp_path,
        homeserver.url,
        server={"signing_key_path": "signing.key"},
        outbound={
            "enabled": True,
            "bind": "127.0.0.1:0",
            "secret": SECRET,
            "invite_version": version,
        },
        federation={
            "ip_range_whitelist": ["127.0.0.0/8"],
            "federation_certificate_verification_whitelist": ["localhost"],
            "trusted_key_servers": [],
        },
    )


def v2_target() -> str:
    return (
        "/_matrix/federation/v2/invite/"
        + ROOM.replace("!", "%21").replace(":", "%3A")
        + "/"
        + INVITE_ID.replace("$", "%24")
    )


async def test_unstable_prefix_is_used_when_configured(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    homeserver.events[CREATE_ID] = CREATE
    destination = await start_destination(nursery)
    name = f"localhost:{destination.port}"
    unstable = "/_matrix/federation/unstable/org.matrix.msc0000/invite/%21room%3Ahs.test"
    destination.reply("PUT", unstable, Reply.json({"event": {"signed": "by the invitee"}}))
    listening = await start_gateway(invite_config(tmp_path, homeserver))
    status, _, answer = await proxy_request(
        listening.outbound_url,
        "PUT",
        name,
        v2_target(),
        body=json.dumps(v2_invite(name)).encode(),
        headers={"Authorization": 'X-Matrix origin="hs.test",key="ed25519:a_fake",sig="eA"'},
    )
    assert status == 200
    assert json.loads(answer) == {"event": {"signed": "by the invitee"}}
    (sent,) = destination.requests
    assert sent.target == unstable
    body = sent.json()
    assert body["state"] == [CREATE]
    assert [e["type"] for e in body["invite_room_state"]] == ["m.room.name"]
    assert sent.headers["authorization"].startswith('X-Matrix origin="hs.test"')
    assert f'destination="{name}"' in sent.headers["authorization"]


async def test_missing_endpoint_falls_back_to_the_original_request(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    homeserver.events[CREATE_ID] = CREATE
    destination = await start_destination(nursery)
    name = f"localhost:{destination.port}"
    destination.reply("PUT", v2_target(), Reply.json({"event": {"v2": True}}))
    listening = await start_gateway(invite_config(tmp_path, homeserver, version="v3"))
    original = json.dumps(v2_invite(name)).encode()
    synapse_auth = 'X-Matrix origin="hs.test",key="ed25519:a_fake",sig="eA"'
    status, _, answer = await proxy_request(
        listening.outbound_url,
        "PUT",
        name,
        v2_target(),
        body=original,
        headers={"Authorization": synapse_auth},
    )
    assert status == 200 and json.loads(answer) == {"event": {"v2": True}}
    v3, v2 = destination.requests
    assert v3.target.startswith("/_matrix/federation/v3/invite/")
    assert (v2.target, v2.body, v2.headers["authorization"]) == (
        v2_target(),
        original,
        synapse_auth,
    )


async def test_no_create_event_means_v2_unchanged(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    destination = await start_destination(nursery)  # the homeserver has no create event
    name = f"localhost:{destination.port}"
    destination.reply("PUT", v2_target(), Reply.json({"event": {"v2": True}}))
    listening = await start_gateway(invite_config(tmp_path, homeserver, version="v3"))
    status, _, _ = await proxy_request(
        listening.outbound_url,
        "PUT",
        name,
        v2_target(),
        body=json.dumps(v2_invite(name)).encode(),
    )
    assert status == 200
    assert [r.target for r in destination.requests] == [v2_target()]
