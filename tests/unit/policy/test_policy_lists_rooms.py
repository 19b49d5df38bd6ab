"""policies.policy_lists following policy rooms through ``ctx.tools.room_state``."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.matrix.room_state import RoomState
from gateway.policy.api import Allow, Deny, MemoryTools, OptionsError, PolicyTools
from gateway.policy.engine import FAILED_CLOSED_REASON, PolicyEngine
from gateway.policy.loading import load_policy_set, parse_policy_config
from gateway.policy.ratelimit import StoreBuckets, StoreTools
from gateway.store import open_store
from policies import policy_lists
from tests.unit.policy.contexts import FIXTURES, invite, join, knock

ROOM = "!banlist:our.example"
OTHER_ROOM = "!more:our.example"


def rule(kind: str, entity: str, *, reason: str = "spam", recommendation: str = "m.ban") -> Any:
    return {
        "type": f"m.policy.rule.{kind}",
        "state_key": f"rule:{entity}",
        "sender": "@mod:our.example",
        "room_id": ROOM,
        "content": {"entity": entity, "recommendation": recommendation, "reason": reason},
    }


def room_events(*rules: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A policy room's state: the usual room events plus ``rules``."""
    return [
        {"type": "m.room.create", "state_key": "", "sender": "@mod:our.example", "content": {}},
        {
            "type": "m.room.member",
            "state_key": "@mod:our.example",
            "sender": "@mod:our.example",
            "content": {"membership": "join"},
        },
        *rules,
    ]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class CountingTools(MemoryTools):
    """MemoryTools that count reads, and fail them while ``failing`` is set."""

    def __init__(self, clock: Clock, rooms: dict[str, list[Mapping[str, Any]]]) -> None:
        super().__init__(clock, rooms)
        self.reads: list[str] = []
        self.failing: Exception | None = None

    async def room_state(self, room_id: str) -> list[Mapping[str, Any]]:
        self.reads.append(room_id)
        if self.failing is not None:
            raise self.failing
        return await super().room_state(room_id)


def with_tools(ctx: Any, tools: PolicyTools) -> Any:
    return dataclasses.replace(ctx, tools=tools)


async def test_memory_tools_room_state() -> None:
    tools = MemoryTools(rooms={ROOM: room_events(rule("server", "spam.example"))})
    events = await tools.room_state(ROOM)
    assert [e["type"] for e in events] == [
        "m.room.create",
        "m.room.member",
        "m.policy.rule.server",
    ]
    first = events[0]
    assert isinstance(first, dict)
    first["type"] = "changed"  # the caller gets copies
    assert (await tools.room_state(ROOM))[0]["type"] == "m.room.create"
    with pytest.raises(LookupError, match=re.escape("not in room !nowhere:our.example")):
        await MemoryTools().room_state("!nowhere:our.example")


async def test_rules_from_a_policy_room_apply_to_invites_joins_and_knocks() -> None:
    rooms = {
        ROOM: room_events(
            rule("server", "*.spam.example"),
            rule("user", "@troll*:friends.example", reason="trolling"),
            rule("room", "!badroom:*"),
            rule("server", "ignored.example", recommendation="m.mute"),
            {**rule("server", "removed.example"), "content": {}},
        )
    }
    options = policy_lists.validate_options({"policy_rooms": [ROOM]})
    tools = MemoryTools(Clock(), rooms)

    assert isinstance(await policy_lists.on_invite(with_tools(invite(), tools), options), Allow)
    by_server = await policy_lists.on_invite(
        with_tools(invite(inviter="@a:x.spam.example"), tools), options
    )
    assert isinstance(by_server, Deny)
    assert by_server.reason == "server x.spam.example is banned by this server's policy list: spam"
    by_user = await policy_lists.on_join(
        with_tools(join(user="@troll9:friends.example"), tools), options
    )
    assert isinstance(by_user, Deny) and "trolling" in by_user.reason
    by_room = await policy_lists.on_knock(
        with_tools(knock(room_id="!badroom:our.example"), tools), options
    )
    assert isinstance(by_room, Deny)
    for allowed in ("@a:ignored.example", "@a:removed.example"):
        decision = await policy_lists.on_invite(with_tools(invite(inviter=allowed), tools), options)
        assert isinstance(decision, Allow), allowed


async def test_file_rules_and_several_rooms_add_up() -> None:
    rooms = {
        ROOM: room_events(rule("server", "one.example")),
        OTHER_ROOM: room_events(rule("server", "two.example")),
    }
    options = policy_lists.validate_options(
        {"files": [str(FIXTURES / "banlist.json")], "policy_rooms": [ROOM, OTHER_ROOM]}
    )
    tools = MemoryTools(Clock(), rooms)
    for server in ("one.example", "two.example", "spam.example"):
        decision = await policy_lists.on_invite(
            with_tools(invite(inviter=f"@a:{server}"), tools), options
        )
        assert isinstance(decision, Deny), server
    decision = await policy_lists.on_invite(
        with_tools(invite(inviter="@a:fine.example"), tools), options
    )
    assert isinstance(decision, Allow)


async def test_rooms_are_read_again_only_after_refresh_seconds() -> None:
    clock = Clock()
    rooms = {ROOM: room_events(rule("server", "spam.example"))}
    tools = CountingTools(clock, rooms)
    options = policy_lists.validate_options({"policy_rooms": [ROOM], "refresh_seconds": 30})
    spam = invite(inviter="@a:spam.example")
    other = invite(inviter="@a:other.example")

    assert isinstance(await policy_lists.on_invite(with_tools(spam, tools), options), Deny)
    assert tools.reads == [ROOM]

    # The room changes: the spam ban is lifted, other.example is banned.
    rooms[ROOM] = room_events(
        {**rule("server", "spam.example"), "content": {}}, rule("server", "other.example")
    )
    clock.now += 29.9
    assert isinstance(await policy_lists.on_invite(with_tools(spam, tools), options), Deny)
    assert isinstance(await policy_lists.on_invite(with_tools(other, tools), options), Allow)
    assert tools.reads == [ROOM], "read again before refresh_seconds passed"

    clock.now += 0.1
    assert isinstance(await policy_lists.on_invite(with_tools(spam, tools), options), Allow)
    assert isinstance(await policy_lists.on_invite(with_tools(other, tools), options), Deny)
    assert tools.reads == [ROOM, ROOM]


async def test_default_refresh_is_sixty_seconds() -> None:
    clock = Clock()
    tools = CountingTools(clock, {ROOM: room_events()})
    options = policy_lists.validate_options({"policy_rooms": [ROOM]})
    await policy_lists.on_invite(with_tools(invite(), tools), options)
    clock.now += 59.9
    await policy_lists.on_invite(with_tools(invite(), tools), options)
    assert len(tools.reads) == 1
    clock.now += 0.1
    await policy_lists.on_invite(with_tools(invite(), tools), options)
    assert len(tools.reads) == 2


async def test_a_failed_refresh_keeps_the_last_good_rules(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    tools = CountingTools(clock, {ROOM: room_events(rule("server", "spam.example"))})
    options = policy_lists.validate_options({"policy_rooms": [ROOM], "refresh_seconds": 5})
    spam = with_tools(invite(inviter="@a:spam.example"), tools)
    assert isinstance(await policy_lists.on_invite(spam, options), Deny)

    tools.failing = LookupError("the homeserver is not in room " + ROOM)
    clock.now += 5
    with caplog.at_level("WARNING", logger="policies.policy_lists"):
        assert isinstance(await policy_lists.on_invite(spam, options), Deny)
    assert len(tools.reads) == 2
    assert any(ROOM in r.getMessage() for r in caplog.records), caplog.text

    # Not retried on every request: the next read is again refresh_seconds later.
    clock.now += 1
    assert isinstance(await policy_lists.on_invite(spam, options), Deny)
    assert len(tools.reads) == 2

    # Any exception (an unreachable homeserver) keeps them too; a later good read applies.
    tools.failing = RuntimeError("homeserver unreachable")
    clock.now += 5
    assert isinstance(await policy_lists.on_invite(spam, options), Deny)
    tools.failing = None
    tools.rooms[ROOM] = room_events()
    clock.now += 5
    assert isinstance(await policy_lists.on_invite(spam, options), Allow)
    assert len(tools.reads) == 4


async def test_without_any_good_read_the_decision_fails() -> None:
    clock = Clock()
    tools = CountingTools(clock, {})
    options = policy_lists.validate_options({"policy_rooms": [ROOM]})
    with pytest.raises(policy_lists.PolicyRoomError, match="not in room"):
        await policy_lists.on_invite(with_tools(invite(), tools), options)
    # Each request tries again until the room can be read (no waiting a whole interval).
    with pytest.raises(policy_lists.PolicyRoomError):
        await policy_lists.on_join(with_tools(join(), tools), options)
    assert tools.reads == [ROOM, ROOM]
    tools.rooms[ROOM] = room_events(rule("server", "remote.example"))
    assert isinstance(await policy_lists.on_knock(with_tools(knock(), tools), options), Deny)
    assert tools.reads == [ROOM, ROOM, ROOM]


async def test_one_unreadable_room_fails_the_decision_until_read() -> None:
    clock = Clock()
    tools = CountingTools(clock, {ROOM: room_events(rule("server", "spam.example"))})
    options = policy_lists.validate_options({"policy_rooms": [ROOM, OTHER_ROOM]})
    with pytest.raises(policy_lists.PolicyRoomError, match=re.escape(OTHER_ROOM)):
        await policy_lists.on_invite(with_tools(invite(), tools), options)


async def test_the_engine_applies_on_error_when_no_room_was_ever_read() -> None:
    """Through the engine: a failing read is a failing hook, ``on_error`` decides."""
    entries = [
        {"module": "policies.policy_lists", "name": "lists", "options": {"policy_rooms": [ROOM]}},
    ]
    engine = PolicyEngine(load_policy_set(parse_policy_config(entries), generation=1))
    outcome = await engine.decide_invite(invite())
    assert outcome.denied and outcome.failure == "exception"
    assert isinstance(outcome.decision, Deny) and outcome.decision.reason == FAILED_CLOSED_REASON

    entries[0]["on_error"] = "open"
    engine = PolicyEngine(load_policy_set(parse_policy_config(entries), generation=1))
    outcome = await engine.decide_invite(invite())
    assert outcome.allowed
    failures = engine.metrics.registry.get_sample_value(
        "gateway_policy_failures_total",
        {"policy": "lists", "point": "invite", "kind": "exception"},
    )
    assert failures == 1


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"policy_rooms": "!room:example.org"}, "policy_rooms"),
        ({"policy_rooms": ["#alias:example.org"]}, "policy_rooms[0]"),
        ({"policy_rooms": [ROOM, "!"]}, "policy_rooms[1]"),
        ({"policy_rooms": [ROOM, 5]}, "policy_rooms[1]"),
        ({"policy_rooms": ["!a b:example.org"]}, "policy_rooms[0]"),
        ({"policy_rooms": [ROOM], "refresh_seconds": 0}, "refresh_seconds"),
        ({"policy_rooms": [ROOM], "refresh_seconds": -1}, "refresh_seconds"),
        ({"policy_rooms": [ROOM], "refresh_seconds": "60"}, "refresh_seconds"),
        ({"policy_rooms": [ROOM], "refresh_seconds": True}, "refresh_seconds"),
        ({"refresh_seconds": 60}, "refresh_seconds"),
        ({"policy_room": [ROOM]}, "policy_room"),
    ],
)
def test_bad_room_options(options: dict[str, Any], key: str) -> None:
    with pytest.raises(OptionsError) as info:
        policy_lists.validate_options(options)
    assert info.value.key == key, info.value


def test_good_room_options() -> None:
    options = policy_lists.validate_options(
        {"policy_rooms": [ROOM, "!v12roomidwithoutserver", ROOM], "refresh_seconds": 0.5}
    )
    assert options.follower is not None
    assert options.follower.rooms == (ROOM, "!v12roomidwithoutserver")
    assert options.follower.refresh_ms == 500
    assert policy_lists.validate_options({}).follower is None


# --- the gateway's tools: room state through a homeserver state reader -----------------------


class FakeReader:
    """Stands in for HomeserverStateReader (tested against Synapse in the integration
    tests): the rooms it knows, as RoomState."""

    def __init__(self, rooms: dict[str, list[Mapping[str, Any]]]) -> None:
        self.rooms = rooms

    async def room_state(self, room_id: str) -> RoomState | None:
        events = self.rooms.get(room_id)
        if events is None:
            return None
        return RoomState.from_events(room_id, [{**e, "room_id": room_id} for e in events])


async def test_store_tools_room_state_and_the_engine_passes_the_reader(tmp_path: Path) -> None:
    store = await open_store("sqlite", sqlite_path=str(tmp_path / "gateway.db"))
    try:
        reader = FakeReader({ROOM: room_events(rule("server", "spam.example"))})
        tools = StoreTools(StoreBuckets(store), prefix="lists", state_reader=reader)
        events = await tools.room_state(ROOM)
        assert all(isinstance(e, dict) for e in events)
        by_key = {(e["type"], e["state_key"]): e for e in events}
        banned = by_key[("m.policy.rule.server", "rule:spam.example")]
        assert banned["sender"] == "@mod:our.example"
        assert banned["content"]["entity"] == "spam.example"
        assert len(events) == 3
        with pytest.raises(LookupError, match=re.escape("not in room !gone:our.example")):
            await tools.room_state("!gone:our.example")
        no_reader = StoreTools(StoreBuckets(store), prefix="lists")
        with pytest.raises(LookupError, match="signing_key_path"):
            await no_reader.room_state(ROOM)

        entries = [{"module": "policies.policy_lists", "options": {"policy_rooms": [ROOM]}}]
        engine = PolicyEngine.from_specs(
            parse_policy_config(entries), store=store, state_reader=reader
        )
        outcome = await engine.decide_invite(invite(inviter="@a:spam.example"))
        assert outcome.denied and outcome.failure is None, outcome
        assert (await engine.decide_invite(invite())).allowed
    finally:
        await store.aclose()
