"""make_knock / send_knock handlers in front of a fake homeserver (real HTTP on loopback).

The fake answers make_knock and send_knock with bodies of its own formatting, so a test can
tell a forwarded answer from a re-encoded one, records every request it receives, and serves
room state to requests signed as the homeserver. The remote side signs with the test support
code (signedjson), independent of the gateway's own implementation.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import signedjson.key
import trio

from gateway.errors import MatrixError
from gateway.features.knocks import check_knock_event, register
from gateway.policy.api import KnockContext
from gateway.services import Services
from tests.support.inprocess_gateway import (
    HS,
    HS_KEY,
    REMOTE,
    REMOTE_KEY,
    FakeHomeserverApp,
    HomeserverRequest,
    gateway_in_front_of,
    q,
    signed_as,
    signed_request,
)
from tests.support.policy_stub import HookPolicy
from tests.support.remote_server import x_matrix_authorization

VERSION = "7"
ROOM = "!knockable:hs.test"
ALICE = "@alice:hs.test"
KNOCKER = "@knocker:remote.test"

# Deliberately not what json.dumps would produce: spaces, key order, a trailing newline.
MAKE_KNOCK_ANSWER = (
    b'{ "room_version" : "7",  "event": {"type": "m.room.member", "content": '
    b'{"membership": "knock"}, "room_id": "!knockable:hs.test"} }\n'
)
SEND_KNOCK_ANSWER = b'{"knock_room_state" :  [ {"type": "m.room.join_rules"} ] }\n'


def _state_event(kind: str, state_key: str, content: Any, n: int) -> dict[str, Any]:
    return {
        "room_id": ROOM,
        "type": kind,
        "state_key": state_key,
        "sender": ALICE,
        "content": content,
        "event_id": f"$knock{n}",
    }


ROOM_EVENTS = [
    _state_event("m.room.create", "", {"room_version": VERSION, "creator": ALICE}, 0),
    _state_event("m.room.join_rules", "", {"join_rule": "knock"}, 1),
    _state_event("m.room.member", ALICE, {"membership": "join"}, 2),
]


@dataclass
class FakeHomeserver(FakeHomeserverApp):
    seen: list[HomeserverRequest] = field(default_factory=list)

    def knock_requests(self) -> list[HomeserverRequest]:
        return [s for s in self.seen if "_knock/" in s.target]

    def handle(self, request: HomeserverRequest) -> tuple[int, bytes]:
        self.seen.append(request)
        raw = request.raw_path
        parts = [unquote(p) for p in raw.split("/")]
        if raw.startswith("/_matrix/federation/v1/make_knock/"):
            return 200, MAKE_KNOCK_ANSWER
        if raw.startswith("/_matrix/federation/v1/send_knock/"):
            return 200, SEND_KNOCK_ANSWER
        if not signed_as(request, HS, HS_KEY):
            return 401, b'{"errcode": "M_UNAUTHORIZED", "error": "bad signature"}'
        known = parts[-1] == ROOM if "/event/" not in raw else True
        if not known:
            return 403, b'{"errcode": "M_FORBIDDEN", "error": "Host not in room."}'
        if raw.startswith("/_matrix/federation/v1/timestamp_to_event/"):
            return 200, json.dumps({"event_id": "$knock2", "origin_server_ts": 1}).encode()
        if raw.startswith("/_matrix/federation/v1/state/"):
            return 200, json.dumps({"pdus": ROOM_EVENTS[:2], "auth_chain": []}).encode()
        if raw.startswith("/_matrix/federation/v1/event/"):
            pdus = [e for e in ROOM_EVENTS if e["event_id"] == parts[-1]]
            if not pdus:
                return 404, b'{"errcode": "M_NOT_FOUND", "error": "no"}'
            return 200, json.dumps({"origin": HS, "origin_server_ts": 1, "pdus": pdus}).encode()
        return 404, b'{"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}'


@dataclass
class Setup:
    homeserver: FakeHomeserver
    gateway: httpx.AsyncClient
    services: Services


@pytest.fixture
async def setup(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Setup]:
    fake = FakeHomeserver()
    async with gateway_in_front_of(nursery, tmp_path, fake, register) as gateway:
        yield Setup(fake, gateway.client, gateway.services)


# Percent-encoding the peer chose (lower-case hex, an encoded "!" left as is would also do):
# the homeserver must see these exact bytes, as the signature covers them.
MAKE_KNOCK_URI = (
    f"/_matrix/federation/v1/make_knock/{q(ROOM)}/{q(KNOCKER)}?ver=6&ver=7&ver=org.example.v1"
)


def knock_event(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "room_id": ROOM,
        "type": "m.room.member",
        "state_key": KNOCKER,
        "sender": KNOCKER,
        "content": {"membership": "knock", "reason": "let me in"},
        "origin": REMOTE,
        "origin_server_ts": 1,
        "prev_events": ["$knock2"],
        "auth_events": ["$knock0", "$knock1"],
        "depth": 4,
        "hashes": {"sha256": "AAAA"},
        "signatures": {REMOTE: {"ed25519:r1": "BBBB"}},
    }
    event.update(changes)
    return event


SEND_KNOCK_URI = f"/_matrix/federation/v1/send_knock/{q(ROOM)}/{q('$some-event-id')}"


def refusing_policy(seen: list[KnockContext]) -> Any:
    async def policy(ctx: KnockContext) -> None:
        seen.append(ctx)
        raise MatrixError(403, "M_FORBIDDEN", "no knocking here")

    return policy


def allowing_policy(seen: list[KnockContext]) -> Any:
    async def policy(ctx: KnockContext) -> None:
        seen.append(ctx)

    return policy


# --- make_knock -----------------------------------------------------------------------------


@pytest.mark.parametrize("with_policy", [True, False])
async def test_make_knock_is_forwarded_byte_for_byte(setup: Setup, with_policy: bool) -> None:
    seen: list[KnockContext] = []
    if with_policy:
        setup.services.policy = HookPolicy(knock=allowing_policy(seen))  # type: ignore[assignment]
    response = await signed_request(setup.gateway, "GET", MAKE_KNOCK_URI)
    assert response.status_code == 200, response.text
    assert response.content == MAKE_KNOCK_ANSWER
    [forwarded] = setup.homeserver.knock_requests()
    assert forwarded.method == "GET"
    assert forwarded.target == MAKE_KNOCK_URI
    assert forwarded.headers["authorization"].startswith(f'X-Matrix origin="{REMOTE}"')
    assert forwarded.headers["authorization"] == x_matrix_authorization(
        method="GET", uri=MAKE_KNOCK_URI, origin=REMOTE, destination=HS, signing_key=REMOTE_KEY
    )
    if with_policy:
        assert [
            (c.stage, c.user, c.origin, c.room_id, c.room_version, c.join_rule) for c in seen
        ] == [("make_knock", KNOCKER, REMOTE, ROOM, VERSION, "knock")]
        assert seen[0].request_id
    else:
        # No policy: the room's state is not even read.
        assert len(setup.homeserver.seen) == 1


async def test_make_knock_refused_by_policy_never_reaches_the_homeserver(setup: Setup) -> None:
    seen: list[KnockContext] = []
    setup.services.policy = HookPolicy(knock=refusing_policy(seen))  # type: ignore[assignment]
    response = await signed_request(setup.gateway, "GET", MAKE_KNOCK_URI)
    assert response.status_code == 403, response.text
    assert response.json() == {"errcode": "M_FORBIDDEN", "error": "no knocking here"}
    assert [c.stage for c in seen] == ["make_knock"]
    assert setup.homeserver.knock_requests() == []


async def test_make_knock_policy_sees_an_unknown_room_without_version(setup: Setup) -> None:
    seen: list[KnockContext] = []
    setup.services.policy = HookPolicy(knock=allowing_policy(seen))  # type: ignore[assignment]
    uri = f"/_matrix/federation/v1/make_knock/{q('!elsewhere:hs.test')}/{q(KNOCKER)}?ver=7"
    response = await signed_request(setup.gateway, "GET", uri)
    assert response.status_code == 200, response.text
    assert [(c.room_id, c.room_version, c.join_rule) for c in seen] == [
        ("!elsewhere:hs.test", "", None)
    ]


@pytest.mark.parametrize("problem", ["bad_signature", "other_destination", "unknown_key", "none"])
async def test_make_knock_needs_a_valid_x_matrix_signature(setup: Setup, problem: str) -> None:
    if problem == "none":
        response = await setup.gateway.get(MAKE_KNOCK_URI)
    else:
        key = REMOTE_KEY
        if problem == "bad_signature":
            key = signedjson.key.generate_signing_key(REMOTE_KEY.version)
        elif problem == "unknown_key":
            key = signedjson.key.generate_signing_key("other")
        response = await signed_request(
            setup.gateway,
            "GET",
            MAKE_KNOCK_URI,
            destination="elsewhere.test" if problem == "other_destination" else HS,
            key=key,
        )
    assert response.status_code == 401, response.text
    assert response.json()["errcode"] == "M_UNAUTHORIZED"
    assert setup.homeserver.knock_requests() == []


async def test_make_knock_for_a_user_of_another_server_is_forbidden(setup: Setup) -> None:
    uri = f"/_matrix/federation/v1/make_knock/{q(ROOM)}/{q('@victim:elsewhere.test')}?ver=7"
    response = await signed_request(setup.gateway, "GET", uri)
    assert response.status_code == 403, response.text
    assert response.json()["errcode"] == "M_FORBIDDEN"
    assert setup.homeserver.seen == []


# --- send_knock -----------------------------------------------------------------------------


@pytest.mark.parametrize("with_policy", [True, False])
async def test_send_knock_is_forwarded_byte_for_byte(setup: Setup, with_policy: bool) -> None:
    seen: list[KnockContext] = []
    if with_policy:
        setup.services.policy = HookPolicy(knock=allowing_policy(seen))  # type: ignore[assignment]
    event = knock_event()
    # Not canonical JSON: the homeserver must get these bytes, not a re-encoding.
    body = json.dumps(event, indent=1).encode()
    response = await signed_request(setup.gateway, "PUT", SEND_KNOCK_URI, event, body=body)
    assert response.status_code == 200, response.text
    assert response.content == SEND_KNOCK_ANSWER
    [forwarded] = setup.homeserver.knock_requests()
    assert (forwarded.method, forwarded.target, forwarded.body) == ("PUT", SEND_KNOCK_URI, body)
    assert forwarded.headers["authorization"] == x_matrix_authorization(
        method="PUT",
        uri=SEND_KNOCK_URI,
        origin=REMOTE,
        destination=HS,
        signing_key=REMOTE_KEY,
        content=event,
    )
    if with_policy:
        assert [
            (c.stage, c.user, c.origin, c.room_id, c.room_version, c.join_rule) for c in seen
        ] == [("send_knock", KNOCKER, REMOTE, ROOM, VERSION, "knock")]


async def test_send_knock_refused_by_policy_never_reaches_the_homeserver(setup: Setup) -> None:
    seen: list[KnockContext] = []
    setup.services.policy = HookPolicy(knock=refusing_policy(seen))  # type: ignore[assignment]
    response = await signed_request(setup.gateway, "PUT", SEND_KNOCK_URI, knock_event())
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "no knocking here"
    assert [c.stage for c in seen] == ["send_knock"]
    assert setup.homeserver.knock_requests() == []


@pytest.mark.parametrize(
    ("changes", "status", "errcode"),
    [
        (
            {"sender": "@victim:elsewhere.test", "state_key": "@victim:elsewhere.test"},
            403,
            "M_FORBIDDEN",
        ),
        ({"state_key": "@other:remote.test"}, 400, "M_INVALID_PARAM"),
        ({"content": {"membership": "join"}}, 400, "M_INVALID_PARAM"),
        ({"content": "knock"}, 400, "M_INVALID_PARAM"),
        ({"type": "m.room.message"}, 400, "M_INVALID_PARAM"),
        ({"room_id": "!other:hs.test"}, 400, "M_INVALID_PARAM"),
    ],
)
async def test_send_knock_refuses_what_is_not_a_knock_of_the_origin(
    setup: Setup, changes: dict[str, Any], status: int, errcode: str
) -> None:
    setup.services.policy = HookPolicy(knock=allowing_policy([]))  # type: ignore[assignment]
    response = await signed_request(setup.gateway, "PUT", SEND_KNOCK_URI, knock_event(**changes))
    assert response.status_code == status, response.text
    assert response.json()["errcode"] == errcode
    assert setup.homeserver.knock_requests() == []


async def test_send_knock_needs_the_origin_signature_over_the_body(setup: Setup) -> None:
    event = knock_event()
    authorization = x_matrix_authorization(
        method="PUT",
        uri=SEND_KNOCK_URI,
        origin=REMOTE,
        destination=HS,
        signing_key=REMOTE_KEY,
        content=event,
    )
    changed = knock_event(content={"membership": "knock", "reason": "changed on the way"})
    request = setup.gateway.build_request(
        "PUT",
        SEND_KNOCK_URI,
        headers={"Authorization": authorization},
        content=json.dumps(changed).encode(),
    )
    request.url = request.url.copy_with(raw_path=SEND_KNOCK_URI.encode("ascii"))
    response = await setup.gateway.send(request)
    assert response.status_code == 401, response.text
    assert setup.homeserver.knock_requests() == []


def test_check_knock_event_returns_the_sender() -> None:
    assert check_knock_event(knock_event(), room_id=ROOM, origin=REMOTE) == KNOCKER
    with pytest.raises(MatrixError) as refused:
        check_knock_event([knock_event()], room_id=ROOM, origin=REMOTE)
    assert (refused.value.status, refused.value.errcode) == (400, "M_INVALID_PARAM")
