"""Stripped state (client-server "Stripped state", MSC3173).

A stripped state event keeps only ``sender``, ``type``, ``state_key`` and ``content``; it
helps a prospective member recognise a room in invites and knocks. A state sub-key
(MSC3760, stable or unstable name) is kept too: it is part of which piece of state the event
is, wherever a room version gives it that meaning, and costs nothing where none does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gateway.matrix.events import STATE_SUBKEY, STATE_SUBKEY_UNSTABLE, JsonDict, json_copy

STRIPPED_KEYS = ("sender", "type", "state_key", "content", STATE_SUBKEY, STATE_SUBKEY_UNSTABLE)

# The state types stripped state "should contain some or all of". Since spec v1.16 the
# create event is required in invite and knock state.
RECOMMENDED_STRIPPED_STATE_TYPES = frozenset(
    {
        "m.room.create",
        "m.room.join_rules",
        "m.room.canonical_alias",
        "m.room.avatar",
        "m.room.name",
        "m.room.encryption",
        "m.room.topic",
    }
)


def strip_event(event: Mapping[str, Any]) -> JsonDict:
    """A copy of ``event`` with only the stripped-state keys that it has."""
    return {key: json_copy(event[key]) for key in STRIPPED_KEYS if key in event}


def stripped_state(
    state: Iterable[Mapping[str, Any]],
    types: frozenset[str] = RECOMMENDED_STRIPPED_STATE_TYPES,
) -> list[JsonDict]:
    """Stripped copies of the room-level (empty ``state_key``) state events of ``types``."""
    return [
        strip_event(event)
        for event in state
        if event.get("type") in types and event.get("state_key") == ""
    ]
