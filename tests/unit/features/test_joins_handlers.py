"""make_join / send_join handlers in front of a homeserver that lacks restricted joins.

A fake homeserver (real HTTP on loopback) hands out templates without
``join_authorised_via_users_server`` and send_join answers without our signature (or with
the unstable ``org.matrix.msc3083.v2.event`` key); it serves room state only to requests
signed as itself. The remote side signs with the test support code (signedjson and Synapse's
event code), independent of the gateway's own implementation.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import httpx
import pytest
import signedjson.key
import trio
from signedjson.sign import verify_signed_json
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.events import make_event_from_dict
from synapse.events.utils import prune_event

from gateway.errors import MatrixError
from gateway.features.joins import (
    AUTHORISING_USER,
    MAKE_JOIN_NAMESPACE,
    UNSTABLE_EVENT_KEY,
    register,
)
from gateway.policy.api import JoinContext
from gateway.services import Services
from gateway.store import Store
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
from tests.support.pdus import event_id_of, sign_pdu
from tests.support.policy_stub import HookPolicy

VERSION = "10"
ROOM = "!restricted:hs.test"
PUBLIC = "!public:hs.test"
ALICE = "@alice:hs.test"
JOINER = "@joiner:remote.test"


def _state_event(room_id: str, kind: str, state_key: str, content: Any, n: int) -> dict[str, Any]:
    return {
        "room_id": room_id,
        "type": kind,
        "state_key": state_key,
        "sender": ALICE,
        "content": content,
        "event_id": f"${room_id[1:4]}{n}",
    }


def room_events(room_id: str, join_rules: dict[str, Any], members: dict[str, str]) -> list[Any]:
    events = [
        _state_event(room_id, "m.room.create", "", {"room_version": VERSION, "creator": ALICE}, 0),
        _state_event(room_id, "m.room.power_levels", "", {"users": {ALICE: 100}, "invite": 50}, 1),
        _state_event(room_id, "m.room.join_rules", "", join_rules, 2),
    ]
    for i, (user, membership) in enumerate({ALICE: "join", **members}.items()):
        events.append(
            _state_event(room_id, "m.room.member", user, {"membership": membership}, 3 + i)
        )
    return events


@dataclass
class FakeHomeserver(FakeHomeserverApp):
    """A homeserver without MSC3083: answers make_join and send_join, serves state to itself."""

    #: room ID -> state events; the last one is the room's "newest event".
    rooms: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    template_content: dict[str, Any] = field(default_factory=lambda: {"membership": "join"})
    send_join_answer: Callable[[dict[str, Any]], Any] = lambda event: {
        "state": [],
        "auth_chain": [],
    }
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    state_reads_signed_by_us: int = 0

    def _event(self, event_id: str) -> dict[str, Any] | None:
        for events in self.rooms.values():
            for event in events:
                if event["event_id"] == event_id:
                    return event
        return None

    def handle(self, request: HomeserverRequest) -> tuple[int, bytes]:
        self.seen.append((request.method, request.target, request.headers))
        status, answer = self.answer(request)
        return status, json.dumps(answer).encode()

    def answer(self, request: HomeserverRequest) -> tuple[int, Any]:
        raw = request.raw_path
        parts = [unquote(p) for p in raw.split("/")]
        args = parse_qs(request.query)
        if "/state/" in raw or "/event/" in raw or "/timestamp_to_event/" in raw:
            if not signed_as(request, HS, HS_KEY, destination_required=True):
                return 401, {"errcode": "M_UNAUTHORIZED", "error": "bad signature"}
            self.state_reads_signed_by_us += 1
        if raw.startswith("/_matrix/federation/v1/make_join/"):
            room_id, user_id = parts[-2], parts[-1]
            template = {
                "room_id": room_id,
                "type": "m.room.member",
                "state_key": user_id,
                "sender": user_id,
                "content": copy.deepcopy(self.template_content),
                "prev_events": [self.rooms[room_id][-1]["event_id"]],
                "auth_events": [],
                "depth": 10,
                "origin": HS,
            }
            return 200, {"event": template, "room_version": VERSION}
        if "/send_join/" in raw:
            answer = self.send_join_answer(json.loads(request.body))
            return 200, ([200, answer] if "/v1/" in raw else answer)
        if raw.startswith("/_matrix/federation/v1/timestamp_to_event/"):
            events = self.rooms.get(parts[-1])
            if events is None:
                return 403, {"errcode": "M_FORBIDDEN", "error": "Host not in room."}
            return 200, {"event_id": events[-1]["event_id"], "origin_server_ts": 1}
        if raw.startswith("/_matrix/federation/v1/state/"):
            events = self.rooms.get(parts[-1])
            if events is None:
                return 403, {"errcode": "M_FORBIDDEN", "error": "Host not in room."}
            at = args["event_id"][0]
            index = [e["event_id"] for e in events].index(at)
            return 200, {"pdus": events[:index], "auth_chain": []}
        if raw.startswith("/_matrix/federation/v1/event/"):
            event = self._event(parts[-1])
            if event is None:
                return 404, {"errcode": "M_NOT_FOUND", "error": "no"}
            return 200, {"origin": HS, "origin_server_ts": 1, "pdus": [event]}
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}


@dataclass
class Setup:
    homeserver: FakeHomeserver
    gateway: httpx.AsyncClient
    store: Store
    services: Services


@pytest.fixture
async def setup(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Setup]:
    fake = FakeHomeserver()
    fake.rooms[ROOM] = room_events(
        ROOM,
        {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": PUBLIC}]},
        {},
    )
    fake.rooms[PUBLIC] = room_events(PUBLIC, {"join_rule": "public"}, {JOINER: "join"})
    async with gateway_in_front_of(nursery, tmp_path, fake, register) as gateway:
        store = gateway.services.store
        assert store is not None
        yield Setup(fake, gateway.client, store, gateway.services)


def make_join_uri(room_id: str = ROOM, user_id: str = JOINER) -> str:
    return f"/_matrix/federation/v1/make_join/{q(room_id)}/{q(user_id)}?ver={VERSION}"


def signed_join(template: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    event = dict(template, origin_server_ts=int(time.time() * 1000))
    signed = sign_pdu(event, VERSION, REMOTE, REMOTE_KEY)
    return event_id_of(signed, VERSION), signed


def assert_signed_by_homeserver(event: dict[str, Any]) -> None:
    parsed = make_event_from_dict(copy.deepcopy(event), KNOWN_ROOM_VERSIONS[VERSION])
    verify_signed_json(
        prune_event(parsed).get_pdu_json(), HS, signedjson.key.get_verify_key(HS_KEY)
    )


# --- make_join ------------------------------------------------------------------------------


async def test_make_join_fills_in_the_authorising_user_and_remembers_it(setup: Setup) -> None:
    response = await signed_request(setup.gateway, "GET", make_join_uri())
    assert response.status_code == 200, response.text
    assert response.json()["event"]["content"] == {"membership": "join", AUTHORISING_USER: ALICE}
    # The homeserver got the peer's own request: same target, same signature.
    _, target, headers = next(s for s in setup.homeserver.seen if "make_join" in s[1])
    assert target == make_join_uri()
    assert headers["authorization"].startswith(f'X-Matrix origin="{REMOTE}"')
    # State was read, signed as the homeserver itself.
    assert setup.homeserver.state_reads_signed_by_us >= 3
    record = await setup.store.kv_get(
        MAKE_JOIN_NAMESPACE, json.dumps([ROOM, JOINER]), now_ts=int(time.time() * 1000)
    )
    assert record is not None and json.loads(record)["authorising_user"] == ALICE


async def test_make_join_replaces_an_authorising_user_who_cannot_invite(setup: Setup) -> None:
    setup.homeserver.template_content = {"membership": "join", AUTHORISING_USER: "@bob:hs.test"}
    response = await signed_request(setup.gateway, "GET", make_join_uri())
    assert response.status_code == 200, response.text
    assert response.json()["event"]["content"][AUTHORISING_USER] == ALICE


async def test_make_join_refuses_a_user_outside_the_allowed_rooms(setup: Setup) -> None:
    response = await signed_request(
        setup.gateway, "GET", make_join_uri(user_id="@other:remote.test")
    )
    assert response.status_code == 403, response.text
    assert response.json()["errcode"] == "M_FORBIDDEN"


async def test_make_join_of_a_public_room_is_passed_through_untouched(setup: Setup) -> None:
    response = await signed_request(setup.gateway, "GET", make_join_uri(room_id=PUBLIC))
    assert response.status_code == 200, response.text
    assert AUTHORISING_USER not in response.json()["event"]["content"]


@pytest.mark.parametrize("problem", ["bad_signature", "other_destination", "unknown_key", "none"])
async def test_make_join_needs_a_valid_x_matrix_signature(setup: Setup, problem: str) -> None:
    if problem == "none":
        response = await setup.gateway.get(make_join_uri())
    else:
        response = await signed_request(
            setup.gateway,
            "GET",
            make_join_uri(),
            destination="elsewhere.test" if problem == "other_destination" else HS,
            key=signedjson.key.generate_signing_key(
                REMOTE_KEY.version if problem == "bad_signature" else "other"
            )
            if problem != "other_destination"
            else REMOTE_KEY,
        )
    assert response.status_code == 401, response.text
    assert response.json()["errcode"] == "M_UNAUTHORIZED"
    assert not any("make_join" in s[1] for s in setup.homeserver.seen)


async def test_make_join_for_a_user_of_another_server_is_forbidden(setup: Setup) -> None:
    response = await signed_request(
        setup.gateway, "GET", make_join_uri(user_id="@joiner:elsewhere.test")
    )
    assert response.status_code == 403, response.text
    assert not any("make_join" in s[1] for s in setup.homeserver.seen)


async def test_join_policy_is_asked_before_the_homeserver(setup: Setup) -> None:
    seen: list[JoinContext] = []

    async def policy(ctx: JoinContext) -> None:
        seen.append(ctx)
        raise MatrixError(403, "M_FORBIDDEN", "not today")

    setup.services.policy = HookPolicy(join=policy)  # type: ignore[assignment]
    response = await signed_request(setup.gateway, "GET", make_join_uri())
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "not today"
    assert [(c.stage, c.user, c.room_id, c.join_rule, c.is_restricted) for c in seen] == [
        ("make_join", JOINER, ROOM, "restricted", True)
    ]
    assert not any("make_join" in s[1] for s in setup.homeserver.seen)


# --- send_join ------------------------------------------------------------------------------


async def _template(setup: Setup) -> dict[str, Any]:
    made = await signed_request(setup.gateway, "GET", make_join_uri())
    assert made.status_code == 200, made.text
    template: dict[str, Any] = made.json()["event"]
    return template


@pytest.mark.parametrize("answer_key", ["event", UNSTABLE_EVENT_KEY, None])
@pytest.mark.parametrize("api", ["v1", "v2"])
async def test_send_join_answer_carries_the_event_signed_by_our_server(
    setup: Setup, api: str, answer_key: str | None
) -> None:
    def answer(event: dict[str, Any]) -> Any:
        base: dict[str, Any] = {"state": [], "auth_chain": []}
        if answer_key is not None:
            base[answer_key] = event  # as received: the homeserver did not sign
        return base

    setup.homeserver.send_join_answer = answer
    event_id, event = signed_join(await _template(setup))
    uri = f"/_matrix/federation/{api}/send_join/{q(ROOM)}/{q(event_id)}"
    response = await signed_request(setup.gateway, "PUT", uri, event)
    assert response.status_code == 200, response.text
    body = response.json()
    if api == "v1":
        assert body[0] == 200
        body = body[1]
    assert UNSTABLE_EVENT_KEY not in body
    returned = body["event"]
    assert event_id_of(returned, VERSION) == event_id
    assert set(returned["signatures"]) == {REMOTE, HS}
    assert_signed_by_homeserver(returned)
    # The homeserver got the event exactly as sent.
    sent = next(s for s in setup.homeserver.seen if "send_join" in s[1])
    assert sent[1] == uri


async def test_send_join_is_not_signed_for_a_grant_this_server_did_not_make(setup: Setup) -> None:
    # The homeserver does not sign; the gateway adds our signature only for an authorising
    # user its own make_join handed to this origin. Without that record: refused.
    setup.homeserver.send_join_answer = lambda event: {"state": [], "auth_chain": []}
    event_id, event = signed_join(await _template(setup))
    await setup.store.kv_delete(MAKE_JOIN_NAMESPACE, json.dumps([ROOM, JOINER]))
    uri = f"/_matrix/federation/v2/send_join/{q(ROOM)}/{q(event_id)}"
    response = await signed_request(setup.gateway, "PUT", uri, event)
    assert response.status_code == 502, response.text
    assert HS not in response.text


def _tampered(event: dict[str, Any], how: str) -> dict[str, Any]:
    event = copy.deepcopy(event)
    if how == "content":
        event["content"]["displayname"] = "changed after signing"
    elif how == "unsigned":
        event["signatures"] = {}
    elif how == "signature":
        event = sign_pdu(
            event, VERSION, REMOTE, signedjson.key.generate_signing_key(REMOTE_KEY.version)
        )
    return event


@pytest.mark.parametrize(
    ("how", "status"),
    [("content", 400), ("unsigned", 403), ("signature", 403), ("event_id", 400), ("sender", 403)],
)
async def test_send_join_refuses_events_that_do_not_verify(
    setup: Setup, how: str, status: int
) -> None:
    template = await _template(setup)
    if how == "sender":
        template = dict(
            template, sender="@joiner:elsewhere.test", state_key="@joiner:elsewhere.test"
        )
    event_id, event = signed_join(template)
    event = _tampered(event, how)
    if how == "event_id":
        event_id = "$" + "A" * 43
    uri = f"/_matrix/federation/v2/send_join/{q(ROOM)}/{q(event_id)}"
    response = await signed_request(setup.gateway, "PUT", uri, event)
    assert response.status_code == status, response.text
    assert not any("send_join" in s[1] for s in setup.homeserver.seen)


@pytest.mark.parametrize(
    ("authoriser", "errcode"),
    [
        ("@admin:remote.test", "M_UNABLE_TO_AUTHORISE_JOIN"),
        ("@bob:hs.test", "M_UNABLE_TO_GRANT_JOIN"),
    ],
)
async def test_send_join_checks_the_authorising_user(
    setup: Setup, authoriser: str, errcode: str
) -> None:
    template = await _template(setup)
    template["content"][AUTHORISING_USER] = authoriser
    event_id, event = signed_join(template)
    uri = f"/_matrix/federation/v2/send_join/{q(ROOM)}/{q(event_id)}"
    response = await signed_request(setup.gateway, "PUT", uri, event)
    assert response.status_code == 400, response.text
    assert response.json()["errcode"] == errcode
    assert not any("send_join" in s[1] for s in setup.homeserver.seen)
