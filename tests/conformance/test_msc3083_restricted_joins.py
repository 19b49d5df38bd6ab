"""MSC3083 (restricted rooms): one test per requirement on the resident server.

Each test is named after the proposal's sentence it checks. The decision runs against an
injected state reader (see ``tests/unit/features/test_joins.py`` for every branch per room
version); the send_join answer is completed with the homeserver's key as the gateway does
for a homeserver that does not sign.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
import signedjson.key
from signedjson.sign import verify_signed_json
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.events import make_event_from_dict
from synapse.events.utils import prune_event

from gateway.errors import MatrixError
from gateway.features.joins import (
    AUTHORISING_USER,
    UNSTABLE_EVENT_KEY,
    complete_send_join_answer,
)
from gateway.features.restricted_joins import decide_join
from gateway.matrix.room_versions import get_room_version
from tests.support.pdus import event_id_of, sign_pdu
from tests.unit.features.test_joins import (
    CREATOR,
    HERE,
    JOINER,
    FakeReader,
    allow_rooms,
    public_room_with,
    reader_with,
    room,
)

TARGET = "!target:here.example"
PUBLIC = "!public:here.example"


async def decide(reader: FakeReader, user: str = JOINER) -> Any:
    return await decide_join(reader, TARGET, user, server_name=HERE)


async def test_join_permitted_if_the_user_is_invited() -> None:
    target = room(TARGET, "10", allow=allow_rooms(PUBLIC), members={JOINER: "invite"})
    assert not (await decide(reader_with(target))).restricted


async def test_join_permitted_if_the_user_is_joined_to_one_of_the_listed_rooms() -> None:
    target = room(TARGET, "10", allow=allow_rooms("!other:here.example", PUBLIC))
    other = room("!other:here.example", "10", join_rule="invite")
    decision = await decide(reader_with(target, other, public_room_with(JOINER, "join", "10")))
    assert decision.allowed_via == PUBLIC


async def test_user_not_member_of_at_least_one_room_gets_403_m_forbidden() -> None:
    target = room(TARGET, "10", allow=allow_rooms(PUBLIC))
    with pytest.raises(MatrixError) as raised:
        await decide(reader_with(target, public_room_with(JOINER, "leave", "10")))
    assert (raised.value.status, raised.value.errcode) == (403, "M_FORBIDDEN")


async def test_entries_not_matching_the_expected_format_are_ignored_so_all_invalid_is_empty() -> (
    None
):
    allow = [{"type": "m.space_parent", "room_id": PUBLIC}, {"room_id": PUBLIC}, PUBLIC]
    target = room(TARGET, "10", allow=allow)
    with pytest.raises(MatrixError) as raised:
        await decide(reader_with(target, public_room_with(JOINER, "join", "10")))
    assert raised.value.errcode == "M_FORBIDDEN"


async def test_in_no_known_allowed_room_while_others_unknown_gives_400_unable_to_authorise() -> (
    None
):
    target = room(TARGET, "10", allow=allow_rooms("!remote:elsewhere.example", PUBLIC))
    with pytest.raises(MatrixError) as raised:
        await decide(reader_with(target, public_room_with(JOINER, "leave", "10")))
    assert (raised.value.status, raised.value.errcode) == (400, "M_UNABLE_TO_AUTHORISE_JOIN")


async def test_resident_server_unable_to_issue_invites_gives_400_unable_to_grant_join() -> None:
    target = room(
        TARGET,
        "10",
        allow=allow_rooms(PUBLIC),
        members={CREATOR: "leave", f"@low:{HERE}": "join"},
        power_levels={"invite": 50},
    )
    with pytest.raises(MatrixError) as raised:
        await decide(reader_with(target, public_room_with(JOINER, "join", "10")))
    assert (raised.value.status, raised.value.errcode) == (400, "M_UNABLE_TO_GRANT_JOIN")


async def test_join_event_should_name_a_local_user_who_could_issue_an_invite() -> None:
    target = room(
        TARGET,
        "10",
        allow=allow_rooms(PUBLIC),
        members={f"@low:{HERE}": "join", "@high:elsewhere.example": "join"},
        power_levels={"invite": 50, "users": {CREATOR: 50, "@high:elsewhere.example": 100}},
    )
    decision = await decide(reader_with(target, public_room_with(JOINER, "join", "10")))
    assert decision.authorising_users == (CREATOR,)


async def test_knock_restricted_joins_behave_as_restricted() -> None:
    target = room(TARGET, "10", join_rule="knock_restricted", allow=allow_rooms(PUBLIC))
    decision = await decide(reader_with(target, public_room_with(JOINER, "join", "10")))
    assert decision.restricted and decision.authorising_users == (CREATOR,)


def test_join_event_returned_in_the_event_field_signed_by_the_resident_server() -> None:
    version = "10"
    remote_key = signedjson.key.generate_signing_key("r1")
    our_key = signedjson.key.generate_signing_key("hs1")
    event = sign_pdu(
        {
            "room_id": TARGET,
            "type": "m.room.member",
            "state_key": JOINER,
            "sender": JOINER,
            "content": {"membership": "join", AUTHORISING_USER: CREATOR},
            "prev_events": [],
            "auth_events": [],
            "depth": 3,
            "origin_server_ts": int(time.time() * 1000),
        },
        version,
        "remote.example",
        remote_key,
    )
    event_id = event_id_of(event, version)
    answer = complete_send_join_answer(
        {"state": [], "auth_chain": [], UNSTABLE_EVENT_KEY: copy.deepcopy(event)},
        event,
        event_id=event_id,
        version=get_room_version(version),
        server_name=HERE,
        signing_key=our_key,
        granted=True,
    )
    assert UNSTABLE_EVENT_KEY not in answer
    returned = answer["event"]
    parsed = make_event_from_dict(copy.deepcopy(returned), KNOWN_ROOM_VERSIONS[version])
    pruned = prune_event(parsed).get_pdu_json()
    verify_signed_json(pruned, HERE, signedjson.key.get_verify_key(our_key))
    verify_signed_json(pruned, "remote.example", signedjson.key.get_verify_key(remote_key))
    assert event_id_of(returned, version) == event_id
