"""The v3 invite handler in front of a fake homeserver, with an injected keyring.

The remote room is built and signed with Synapse's event code (``tests/support/pdus.py``),
independent of the gateway's own hashing and signing. The keyring knows ``REMOTE``'s key
only; the fake homeserver records the v2 invites it is handed, so a test sees exactly which
events of ``state`` the gateway verified and passed on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import signedjson.key
import trio

from gateway.errors import MatrixError
from gateway.http import Router
from tests.support.inprocess_gateway import (
    HS,
    REMOTE,
    REMOTE_KEY,
    FakeHomeserverApp,
    HomeserverRequest,
    gateway_in_front_of,
    signed_request,
)
from tests.support.pdus import RemoteRoom, event_id_of, make_remote_room, sign_pdu

INVITEE = f"@bob:{HS}"
#: Room versions whose events list the create event among their auth events, and those
#: (v12 and later) where it is implied and must not be listed.
CREATE_LISTED = ["10", "11"]
CREATE_IMPLIED = ["12"]


@dataclass
class KeyringOfOne:
    """Knows ``REMOTE``'s key, valid until ``valid_until_ts``; records every lookup."""

    valid_until_ts: int = 4_000_000_000_000
    lookups: list[tuple[str, str, int]] = field(default_factory=list)

    async def get_verify_key(
        self, server_name: str, key_id: str, *, minimum_valid_until_ts: int
    ) -> Any:
        self.lookups.append((server_name, key_id, minimum_valid_until_ts))
        if (server_name, key_id) != (REMOTE, f"ed25519:{REMOTE_KEY.version}"):
            raise MatrixError(401, "M_UNAUTHORIZED", f"no key {key_id} of {server_name}")
        return SimpleNamespace(
            verify_key=signedjson.key.get_verify_key(REMOTE_KEY),
            valid_until_ts=self.valid_until_ts,
        )


@dataclass
class InvitedHomeserver(FakeHomeserverApp):
    """Accepts every v2 invite and keeps its body."""

    invites: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def handle(self, request: HomeserverRequest) -> tuple[int, bytes]:
        if request.method == "PUT" and request.raw_path.startswith(
            "/_matrix/federation/v2/invite/"
        ):
            body = json.loads(request.body)
            self.invites.append((request.raw_path, body))
            return 200, json.dumps({"event": body["event"]}).encode()
        return 404, b'{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}'


@dataclass
class Setup:
    homeserver: InvitedHomeserver
    gateway: httpx.AsyncClient
    keyring: KeyringOfOne


def _routes_already_public(router: Router) -> None:
    """The invite routes are in ``gateway.app.PUBLIC_ROUTES``: nothing to add."""


@pytest.fixture
async def setup(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Setup]:
    fake = InvitedHomeserver()
    async with gateway_in_front_of(nursery, tmp_path, fake, _routes_already_public) as gateway:
        keyring = KeyringOfOne()
        gateway.services.keyring = keyring  # type: ignore[assignment]
        yield Setup(fake, gateway.client, keyring)


def v3_uri(room_id: str) -> str:
    return f"/_matrix/federation/v3/invite/{quote(room_id, safe='')}"


async def send_invite(
    setup: Setup, room: RemoteRoom, state: list[Any], invite: dict[str, Any] | None = None
) -> httpx.Response:
    body = {
        "event": invite or room.make_invite(INVITEE),
        "invite_room_state": [],
        "state": state,
    }
    return await signed_request(setup.gateway, "PUT", v3_uri(room.room_id), body)


def delivered_pdus(setup: Setup, room: RemoteRoom) -> list[str]:
    """Event IDs of the full PDUs in the one v2 invite the homeserver got, in order."""
    [(_, body)] = setup.homeserver.invites
    return [room.event_id(e) for e in body["invite_room_state"] if "signatures" in e]


def with_auth_events(room: RemoteRoom, event: dict[str, Any], auth: list[str]) -> dict[str, Any]:
    """``event`` with other auth events, hashed and signed again by the room's server."""
    return sign_pdu(dict(event, auth_events=auth), room.room_version, room.server_name, room.key)


# --- the create event in auth_events, per room version ---------------------------------------


@pytest.mark.parametrize("version", CREATE_LISTED + CREATE_IMPLIED)
async def test_state_whose_auth_events_follow_the_room_version_is_verified_and_passed_on(
    setup: Setup, version: str
) -> None:
    room = make_remote_room(version, REMOTE, REMOTE_KEY)
    create_id = room.event_id(room.create)
    cites_create = [create_id in e["auth_events"] for e in room.state]
    assert cites_create == [version in CREATE_LISTED] * len(room.state)
    answer = await send_invite(setup, room, [room.create, *room.state])
    assert answer.status_code == 200, answer.text
    delivered = delivered_pdus(setup, room)
    assert delivered[0] == create_id
    assert sorted(delivered[1:]) == sorted(room.event_id(e) for e in room.state)


@pytest.mark.parametrize("version", CREATE_IMPLIED)
async def test_from_v12_a_state_event_listing_the_create_event_is_ignored(
    setup: Setup, version: str
) -> None:
    room = make_remote_room(version, REMOTE, REMOTE_KEY)
    create_id = room.event_id(room.create)
    member, power, join_rules = room.state
    listed = with_auth_events(room, join_rules, [create_id, *join_rules["auth_events"]])
    answer = await send_invite(setup, room, [room.create, member, power, listed])
    assert answer.status_code == 200, answer.text
    delivered = delivered_pdus(setup, room)
    assert room.event_id(listed) not in delivered
    assert sorted(delivered) == sorted([create_id, room.event_id(member), room.event_id(power)])


@pytest.mark.parametrize("version", CREATE_LISTED)
async def test_before_v12_a_state_event_not_listing_the_create_event_is_ignored(
    setup: Setup, version: str
) -> None:
    room = make_remote_room(version, REMOTE, REMOTE_KEY)
    create_id = room.event_id(room.create)
    member, power, join_rules = room.state
    unlisted = with_auth_events(
        room, join_rules, [a for a in join_rules["auth_events"] if a != create_id]
    )
    answer = await send_invite(setup, room, [room.create, member, power, unlisted])
    assert answer.status_code == 200, answer.text
    delivered = delivered_pdus(setup, room)
    assert room.event_id(unlisted) not in delivered
    assert sorted(delivered) == sorted([create_id, room.event_id(member), room.event_id(power)])


@pytest.mark.parametrize("version", CREATE_LISTED + CREATE_IMPLIED)
async def test_a_state_event_whose_auth_event_was_ignored_is_ignored_too(
    setup: Setup, version: str
) -> None:
    # The power levels break the version's rule; the join rules, which cite them, cannot
    # be verified from what was sent either.
    room = make_remote_room(version, REMOTE, REMOTE_KEY)
    create_id = room.event_id(room.create)
    member, power, join_rules = room.state
    broken_auth = (
        [a for a in power["auth_events"] if a != create_id]
        if version in CREATE_LISTED
        else [create_id, *power["auth_events"]]
    )
    broken = with_auth_events(room, power, broken_auth)
    cites_broken = with_auth_events(
        room,
        join_rules,
        [
            room.event_id(broken) if a == room.event_id(power) else a
            for a in join_rules["auth_events"]
        ],
    )
    answer = await send_invite(setup, room, [room.create, member, broken, cites_broken])
    assert answer.status_code == 200, answer.text
    assert sorted(delivered_pdus(setup, room)) == sorted([create_id, room.event_id(member)])


@pytest.mark.parametrize("version", CREATE_LISTED + CREATE_IMPLIED)
async def test_only_the_verified_create_event_and_state_reach_the_homeserver_from_v12(
    setup: Setup, version: str
) -> None:
    # Up to v11 unverified stripped entries are passed on too; from v12 only verified PDUs.
    room = make_remote_room(version, REMOTE, REMOTE_KEY)
    stripped = {"type": "m.room.name", "state_key": "", "sender": room.creator}
    stripped["content"] = {"name": "stripped"}
    body = {
        "event": room.make_invite(INVITEE),
        "invite_room_state": [stripped],
        "state": [room.create, *room.state],
    }
    answer = await signed_request(setup.gateway, "PUT", v3_uri(room.room_id), body)
    assert answer.status_code == 200, answer.text
    [(_, delivered)] = setup.homeserver.invites
    unverified = [e for e in delivered["invite_room_state"] if "signatures" not in e]
    assert unverified == ([stripped] if version in CREATE_LISTED else [])


# --- what the keyring is asked, and what it does not know ------------------------------------


@pytest.mark.parametrize("version", CREATE_LISTED + CREATE_IMPLIED)
async def test_keys_are_asked_for_valid_when_each_event_was_sent(
    setup: Setup, version: str
) -> None:
    room = make_remote_room(version, REMOTE, REMOTE_KEY)
    invite = room.make_invite(INVITEE)
    answer = await send_invite(setup, room, [room.create, *room.state], invite)
    assert answer.status_code == 200, answer.text
    key_id = f"ed25519:{REMOTE_KEY.version}"
    asked = {(s, k, m) for s, k, m in setup.keyring.lookups if m}
    for event in [room.create, invite, *room.state]:
        assert (REMOTE, key_id, event["origin_server_ts"]) in asked


@pytest.mark.parametrize("version", CREATE_LISTED + CREATE_IMPLIED)
async def test_key_that_expired_before_the_create_event_was_sent_is_refused(
    setup: Setup, version: str
) -> None:
    room = make_remote_room(version, REMOTE, REMOTE_KEY)
    setup.keyring.valid_until_ts = room.create["origin_server_ts"] - 1
    answer = await send_invite(setup, room, [room.create, *room.state])
    assert answer.status_code == 400, answer.text
    assert answer.json()["errcode"] == "M_INVALID_PARAM"
    assert "m.room.create event fails its signature check" in answer.json()["error"]
    assert setup.homeserver.invites == []


@pytest.mark.parametrize("version", CREATE_LISTED + CREATE_IMPLIED)
async def test_create_event_signed_by_an_unknown_key_is_refused(setup: Setup, version: str) -> None:
    other_key = signedjson.key.generate_signing_key("other")
    room = make_remote_room(version, REMOTE, other_key)
    # The invite itself is signed with the known key; only the room's events are not.
    invite = sign_pdu(room.make_invite(INVITEE), version, REMOTE, REMOTE_KEY)
    answer = await send_invite(setup, room, [room.create, *room.state], invite)
    assert answer.status_code == 400, answer.text
    assert answer.json()["errcode"] == "M_INVALID_PARAM"
    assert "m.room.create event fails its signature check" in answer.json()["error"]
    assert setup.homeserver.invites == []


@pytest.mark.parametrize("version", CREATE_LISTED + CREATE_IMPLIED)
async def test_state_event_signed_by_an_unknown_key_is_ignored(setup: Setup, version: str) -> None:
    room = make_remote_room(version, REMOTE, REMOTE_KEY)
    member, power, join_rules = room.state
    forged = sign_pdu(join_rules, version, REMOTE, signedjson.key.generate_signing_key("other"))
    answer = await send_invite(setup, room, [room.create, member, power, forged])
    assert answer.status_code == 200, answer.text
    assert event_id_of(forged, version) not in delivered_pdus(setup, room)
    assert len(delivered_pdus(setup, room)) == 3
