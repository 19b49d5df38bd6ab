"""The restricted-join decision (MSC3083) with an injected state reader, room versions 8-12."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.errors import MatrixError
from gateway.features.restricted_joins import allowed_room_ids, decide_join
from gateway.matrix.power_levels import can_invite, power_level_of, users_who_can_invite
from gateway.matrix.room_state import RoomState
from gateway.matrix.room_versions import get_room_version

HERE = "here.example"
ALL_VERSIONS = ["8", "9", "10", "11", "12"]
CREATOR = f"@creator:{HERE}"
JOINER = "@joiner:remote.example"


def _event(room_id: str, kind: str, state_key: str, sender: str, content: Any) -> dict[str, Any]:
    return {
        "room_id": room_id,
        "type": kind,
        "state_key": state_key,
        "sender": sender,
        "content": content,
    }


def room(
    room_id: str,
    version: str,
    *,
    join_rule: str | None = "restricted",
    allow: Any = None,
    members: dict[str, str] | None = None,
    power_levels: dict[str, Any] | None = None,
    creator: str = CREATOR,
) -> RoomState:
    """A room's state; ``power_levels=None`` means a room without a power-levels event."""
    create_content: dict[str, Any] = {"room_version": version}
    if version in ("8", "9", "10"):
        create_content["creator"] = creator
    events = [_event(room_id, "m.room.create", "", creator, create_content)]
    for user, membership in {creator: "join", **(members or {})}.items():
        events.append(_event(room_id, "m.room.member", user, user, {"membership": membership}))
    if power_levels is not None:
        events.append(_event(room_id, "m.room.power_levels", "", creator, power_levels))
    if join_rule is not None:
        content: dict[str, Any] = {"join_rule": join_rule}
        if allow is not None:
            content["allow"] = allow
        events.append(_event(room_id, "m.room.join_rules", "", creator, content))
    return RoomState.from_events(room_id, events)


def allow_rooms(*room_ids: str) -> list[dict[str, str]]:
    return [{"type": "m.room_membership", "room_id": r} for r in room_ids]


@dataclass
class FakeReader:
    """Rooms the "homeserver" is in; any other room is unknown to it."""

    rooms: dict[str, RoomState] = field(default_factory=dict)
    calls: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    async def room_state(
        self, room_id: str, *, at_event_ids: Sequence[str] = ()
    ) -> RoomState | None:
        self.calls.append((room_id, tuple(at_event_ids)))
        return self.rooms.get(room_id)


def reader_with(*states: RoomState) -> FakeReader:
    return FakeReader({s.room_id: s for s in states})


async def decide(reader: FakeReader, room_id: str = "!target:here.example", user: str = JOINER):
    return await decide_join(reader, room_id, user, server_name=HERE)


def public_room_with(user: str, membership: str, version: str) -> RoomState:
    return room("!public:here.example", version, join_rule="public", members={user: membership})


# --- who may join ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL_VERSIONS)
async def test_member_of_an_allowed_room_may_join_and_a_local_inviter_is_named(
    version: str,
) -> None:
    target = room("!target:here.example", version, allow=allow_rooms("!public:here.example"))
    decision = await decide(reader_with(target, public_room_with(JOINER, "join", version)))
    assert decision.restricted
    assert decision.allowed_via == "!public:here.example"
    assert decision.authorising_users == (CREATOR,)
    assert decision.room_version == version


@pytest.mark.parametrize("version", ALL_VERSIONS)
@pytest.mark.parametrize("membership", ["invite", "leave", "ban", "knock"])
async def test_only_joined_membership_of_an_allowed_room_counts(
    version: str, membership: str
) -> None:
    target = room("!target:here.example", version, allow=allow_rooms("!public:here.example"))
    reader = reader_with(target, public_room_with(JOINER, membership, version))
    with pytest.raises(MatrixError) as raised:
        await decide(reader)
    assert (raised.value.status, raised.value.errcode) == (403, "M_FORBIDDEN")


@pytest.mark.parametrize("version", ALL_VERSIONS)
@pytest.mark.parametrize("membership", ["join", "invite"])
async def test_joined_or_invited_user_needs_no_allow_rule(version: str, membership: str) -> None:
    target = room("!target:here.example", version, allow=[], members={JOINER: membership})
    reader = reader_with(target)
    decision = await decide(reader)
    assert not decision.restricted
    assert decision.authorising_users == ()
    assert [c[0] for c in reader.calls] == ["!target:here.example"]  # no allowed room read


@pytest.mark.parametrize("version", ALL_VERSIONS)
async def test_banned_user_is_refused(version: str) -> None:
    target = room(
        "!target:here.example",
        version,
        allow=allow_rooms("!public:here.example"),
        members={JOINER: "ban"},
    )
    with pytest.raises(MatrixError) as raised:
        await decide(reader_with(target, public_room_with(JOINER, "join", version)))
    assert (raised.value.status, raised.value.errcode) == (403, "M_FORBIDDEN")


@pytest.mark.parametrize("version", ALL_VERSIONS)
@pytest.mark.parametrize("join_rule", ["public", "invite", "knock", "private", None])
async def test_other_join_rules_are_not_restricted(version: str, join_rule: str | None) -> None:
    target = room("!target:here.example", version, join_rule=join_rule, allow=[])
    decision = await decide(reader_with(target))
    assert not decision.restricted
    assert decision.join_rule == join_rule


@pytest.mark.parametrize("version", ["8", "9"])
async def test_knock_restricted_means_nothing_before_v10(version: str) -> None:
    target = room("!target:here.example", version, join_rule="knock_restricted", allow=[])
    decision = await decide(reader_with(target))
    assert not decision.restricted


@pytest.mark.parametrize("version", ["10", "11", "12"])
async def test_knock_restricted_decides_joins_like_restricted_from_v10(version: str) -> None:
    target = room(
        "!target:here.example",
        version,
        join_rule="knock_restricted",
        allow=allow_rooms("!public:here.example"),
    )
    decision = await decide(reader_with(target, public_room_with(JOINER, "join", version)))
    assert decision.restricted and decision.authorising_users == (CREATOR,)
    with pytest.raises(MatrixError) as raised:
        await decide(reader_with(target, public_room_with(JOINER, "leave", version)))
    assert raised.value.errcode == "M_FORBIDDEN"


# --- the allow list -------------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL_VERSIONS)
@pytest.mark.parametrize(
    "allow",
    [
        None,
        [],
        "!public:here.example",
        {"type": "m.room_membership", "room_id": "!public:here.example"},
        [{"type": "m.room_membership"}],
        [{"type": "m.room_membership", "room_id": 12}],
        [{"type": "m.room.membership", "room_id": "!public:here.example"}],
        [{"room_id": "!public:here.example"}],
        ["!public:here.example"],
        [["m.room_membership", "!public:here.example"]],
    ],
    ids=repr,
)
async def test_missing_empty_or_misshapen_allow_lets_nobody_in(version: str, allow: Any) -> None:
    target = room("!target:here.example", version, allow=allow)
    with pytest.raises(MatrixError) as raised:
        await decide(reader_with(target, public_room_with(JOINER, "join", version)))
    assert (raised.value.status, raised.value.errcode) == (403, "M_FORBIDDEN")


def test_allowed_room_ids_keeps_well_formed_entries_in_order_once() -> None:
    content = {
        "allow": [
            {"type": "m.room_membership", "room_id": "!b:x"},
            {"type": "other", "room_id": "!c:x"},
            7,
            {"type": "m.room_membership", "room_id": "!a:x", "via": ["x"]},
            {"type": "m.room_membership", "room_id": "!b:x"},
        ]
    }
    assert allowed_room_ids(content) == ["!b:x", "!a:x"]


@pytest.mark.parametrize("version", ALL_VERSIONS)
async def test_misshapen_entries_next_to_a_good_one_are_skipped(version: str) -> None:
    allow = [{"type": "m.room_membership", "room_id": None}, *allow_rooms("!public:here.example")]
    target = room("!target:here.example", version, allow=allow)
    decision = await decide(reader_with(target, public_room_with(JOINER, "join", version)))
    assert decision.allowed_via == "!public:here.example"


@pytest.mark.parametrize("version", ALL_VERSIONS)
async def test_unknown_allowed_room_and_no_known_membership_is_unable_to_authorise(
    version: str,
) -> None:
    target = room(
        "!target:here.example",
        version,
        allow=allow_rooms("!elsewhere:other.example", "!public:here.example"),
    )
    with pytest.raises(MatrixError) as raised:
        await decide(reader_with(target, public_room_with(JOINER, "leave", version)))
    assert (raised.value.status, raised.value.errcode) == (400, "M_UNABLE_TO_AUTHORISE_JOIN")


@pytest.mark.parametrize("version", ALL_VERSIONS)
async def test_unknown_allowed_room_does_not_matter_when_a_known_one_allows(version: str) -> None:
    target = room(
        "!target:here.example",
        version,
        allow=allow_rooms("!elsewhere:other.example", "!public:here.example"),
    )
    decision = await decide(reader_with(target, public_room_with(JOINER, "join", version)))
    assert decision.allowed_via == "!public:here.example"


@pytest.mark.parametrize("version", ALL_VERSIONS)
async def test_all_allowed_rooms_known_and_user_in_none_is_forbidden(version: str) -> None:
    other = room("!other:here.example", version, join_rule="invite")
    target = room(
        "!target:here.example",
        version,
        allow=allow_rooms("!other:here.example", "!public:here.example"),
    )
    with pytest.raises(MatrixError) as raised:
        await decide(reader_with(target, other, public_room_with("@someone:else", "join", version)))
    assert (raised.value.status, raised.value.errcode) == (403, "M_FORBIDDEN")


async def test_unknown_target_room_is_not_found() -> None:
    with pytest.raises(MatrixError) as raised:
        await decide(FakeReader())
    assert (raised.value.status, raised.value.errcode) == (404, "M_NOT_FOUND")


async def test_state_is_read_at_the_events_given() -> None:
    target = room("!target:here.example", "10", join_rule="public")
    reader = reader_with(target)
    await decide_join(
        reader, "!target:here.example", JOINER, server_name=HERE, at_event_ids=["$prev"]
    )
    assert reader.calls == [("!target:here.example", ("$prev",))]


# --- who may authorise ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL_VERSIONS)
async def test_no_local_user_able_to_invite_is_unable_to_grant(version: str) -> None:
    # The creator left; the local user who stayed is below the invite level, and the
    # powerful member is on another server.
    target = room(
        "!target:here.example",
        version,
        allow=allow_rooms("!public:here.example"),
        members={CREATOR: "leave", f"@weak:{HERE}": "join", "@boss:other.example": "join"},
        power_levels={"invite": 50, "users": {"@boss:other.example": 100}},
    )
    with pytest.raises(MatrixError) as raised:
        await decide(reader_with(target, public_room_with(JOINER, "join", version)))
    assert (raised.value.status, raised.value.errcode) == (400, "M_UNABLE_TO_GRANT_JOIN")


@pytest.mark.parametrize("version", ALL_VERSIONS)
async def test_most_powerful_local_inviter_is_named_first(version: str) -> None:
    target = room(
        "!target:here.example",
        version,
        allow=allow_rooms("!public:here.example"),
        members={f"@mod:{HERE}": "join", f"@user:{HERE}": "join", f"@gone:{HERE}": "leave"},
        power_levels={
            "invite": 50,
            "users": {CREATOR: 75, f"@mod:{HERE}": 90, f"@gone:{HERE}": 100},
        },
    )
    decision = await decide(reader_with(target, public_room_with(JOINER, "join", version)))
    if version == "12":
        # v12: the creator's power is infinite whatever the power levels say.
        assert decision.authorising_users == (CREATOR, f"@mod:{HERE}")
    else:
        assert decision.authorising_users == (f"@mod:{HERE}", CREATOR)


@pytest.mark.parametrize("version", ["8", "9"])
async def test_string_power_levels_count_before_v10(version: str) -> None:
    state = room(
        "!r:here.example",
        version,
        members={f"@mod:{HERE}": "join"},
        power_levels={"invite": "50", "users": {f"@mod:{HERE}": " 60 ", CREATOR: "0"}},
    )
    v = get_room_version(version)
    assert users_who_can_invite(state, HERE, v) == [f"@mod:{HERE}"]
    assert power_level_of(state, f"@mod:{HERE}", v) == 60


@pytest.mark.parametrize("version", ["10", "11"])
async def test_string_power_levels_are_ignored_from_v10(version: str) -> None:
    state = room(
        "!r:here.example",
        version,
        members={f"@mod:{HERE}": "join"},
        power_levels={"invite": 50, "users_default": 0, "users": {f"@mod:{HERE}": "60"}},
    )
    v = get_room_version(version)
    assert power_level_of(state, f"@mod:{HERE}", v) == 0
    assert not can_invite(state, f"@mod:{HERE}", v)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_without_power_levels_the_creator_has_100_and_others_0(version: str) -> None:
    state = room("!r:here.example", version, members={f"@other:{HERE}": "join"})
    v = get_room_version(version)
    expected = float("inf") if version == "12" else 100
    assert power_level_of(state, CREATOR, v) == expected
    assert power_level_of(state, f"@other:{HERE}", v) == 0
    # The invite level defaults to 0: every joined local user could invite.
    assert users_who_can_invite(state, HERE, v) == [CREATOR, f"@other:{HERE}"]


@pytest.mark.parametrize("version", ["8", "9", "10"])
def test_before_v11_the_creator_is_content_creator_not_sender(version: str) -> None:
    events = [
        _event(
            "!r:x",
            "m.room.create",
            "",
            "@sender:x",
            {"room_version": version, "creator": "@named:x"},
        ),
        _event("!r:x", "m.room.member", "@named:x", "@named:x", {"membership": "join"}),
        _event("!r:x", "m.room.member", "@sender:x", "@sender:x", {"membership": "join"}),
    ]
    state = RoomState.from_events("!r:x", events)
    v = get_room_version(version)
    assert (power_level_of(state, "@named:x", v), power_level_of(state, "@sender:x", v)) == (100, 0)


def test_v12_additional_creators_have_infinite_power() -> None:
    state = room(
        "!r:here.example",
        "12",
        members={f"@co:{HERE}": "join"},
        power_levels={"invite": 100, "users": {f"@co:{HERE}": 0}},
    )
    events = dict(state.events)
    create = dict(events[("m.room.create", "")])
    create["content"] = {"room_version": "12", "additional_creators": [f"@co:{HERE}"]}
    events[("m.room.create", "")] = create
    state = RoomState("!r:here.example", events)
    v = get_room_version("12")
    assert power_level_of(state, f"@co:{HERE}", v) == float("inf")
    assert users_who_can_invite(state, HERE, v) == [f"@co:{HERE}", CREATOR]  # equal: by ID
    # Before v12 the same create content gives nothing.
    assert power_level_of(state, f"@co:{HERE}", get_room_version("11")) == 0


def test_room_state_later_events_replace_earlier_and_other_rooms_are_ignored() -> None:
    events = [
        _event("!r:x", "m.room.member", "@u:x", "@u:x", {"membership": "invite"}),
        _event("!r:x", "m.room.member", "@u:x", "@u:x", {"membership": "join"}),
        _event("!other:x", "m.room.member", "@v:x", "@v:x", {"membership": "join"}),
        {"room_id": "!r:x", "type": "m.room.message", "content": {}},
    ]
    state = RoomState.from_events("!r:x", events)
    assert state.members("join") == ["@u:x"]
    assert state.membership("@v:x") is None
    assert state.room_version == "1"
