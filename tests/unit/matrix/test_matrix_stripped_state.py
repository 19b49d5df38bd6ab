from __future__ import annotations

from gateway.matrix.stripped_state import (
    RECOMMENDED_STRIPPED_STATE_TYPES,
    strip_event,
    stripped_state,
)


def _state(event_type: str, state_key: str = "", **content: object) -> dict[str, object]:
    return {
        "type": event_type,
        "state_key": state_key,
        "sender": "@alice:example.org",
        "content": dict(content),
        "event_id": "$e",
        "room_id": "!r:example.org",
        "origin_server_ts": 1,
        "unsigned": {"age": 1},
        "signatures": {},
    }


def test_strip_event_keeps_four_keys() -> None:
    event = _state("m.room.name", name="Room")
    assert strip_event(event) == {
        "type": "m.room.name",
        "state_key": "",
        "sender": "@alice:example.org",
        "content": {"name": "Room"},
    }
    stripped = strip_event(event)
    stripped["content"]["name"] = "changed"  # type: ignore[index]
    assert event["content"] == {"name": "Room"}
    assert strip_event({"type": "x", "extra": 1}) == {"type": "x"}


def test_recommended_types() -> None:
    assert RECOMMENDED_STRIPPED_STATE_TYPES == {
        "m.room.create",
        "m.room.join_rules",
        "m.room.canonical_alias",
        "m.room.avatar",
        "m.room.name",
        "m.room.encryption",
        "m.room.topic",
    }


def test_stripped_state_selects_room_level_recommended_events() -> None:
    state = [
        _state("m.room.create", room_version="10"),
        _state("m.room.member", "@alice:example.org", membership="join"),
        _state("m.room.topic", topic="t"),
        _state("m.room.name", "not-room-level", name="x"),
        _state("m.room.power_levels"),
    ]
    result = stripped_state(state)
    assert [e["type"] for e in result] == ["m.room.create", "m.room.topic"]
    assert all(set(e) == {"type", "state_key", "sender", "content"} for e in result)
    assert stripped_state(state, frozenset({"m.room.power_levels"}))[0]["type"] == (
        "m.room.power_levels"
    )
