"""A room's state at one point: its state events by (type, state_key).

Pure data: whoever reads the state (the homeserver's federation API, a test) builds one with
:meth:`RoomState.from_events`; the rules that look at it (power levels, join rules) read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RoomState", "StateKey"]

StateKey = tuple[str, str]


@dataclass(frozen=True)
class RoomState:
    """The state of one room at one point: the events by (type, state_key)."""

    room_id: str
    events: Mapping[StateKey, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_events(cls, room_id: str, events: Iterable[Mapping[str, Any]]) -> RoomState:
        """Later events replace earlier ones with the same (type, state_key); events of
        another room, and events that are not state, are ignored."""
        by_key: dict[StateKey, Mapping[str, Any]] = {}
        for event in events:
            kind, state_key = event.get("type"), event.get("state_key")
            if (
                isinstance(kind, str)
                and isinstance(state_key, str)
                and event.get("room_id") == room_id
            ):
                by_key[(kind, state_key)] = event
        return cls(room_id, by_key)

    def get(self, event_type: str, state_key: str = "") -> Mapping[str, Any] | None:
        return self.events.get((event_type, state_key))

    def content(self, event_type: str, state_key: str = "") -> Mapping[str, Any]:
        """The event's content, or ``{}`` when there is no such event or no usable content."""
        event = self.get(event_type, state_key)
        content = event.get("content") if event is not None else None
        return content if isinstance(content, Mapping) else {}

    @property
    def room_version(self) -> str:
        """``m.room.create``'s ``room_version``; "1" when it has none (spec)."""
        version = self.content("m.room.create").get("room_version", "1")
        return version if isinstance(version, str) else "1"

    @property
    def join_rule(self) -> str | None:
        """``m.room.join_rules``' ``join_rule``, or None when the room has none."""
        rule = self.content("m.room.join_rules").get("join_rule")
        return rule if isinstance(rule, str) else None

    def membership(self, user_id: str) -> str | None:
        membership = self.content("m.room.member", user_id).get("membership")
        return membership if isinstance(membership, str) else None

    def members(self, membership: str = "join") -> list[str]:
        """Users whose current membership is ``membership``, sorted."""
        return sorted(
            key
            for (kind, key), event in self.events.items()
            if kind == "m.room.member" and self.membership(key) == membership
        )
