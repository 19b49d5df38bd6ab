"""Room creators and power levels as the authorization rules read them, per room version.

Pure: the state comes in as a :class:`~gateway.matrix.room_state.RoomState`, the create
event as a mapping. Spec: "Authorization rules" of each room version (power levels; v10
"Values in m.room.power_levels events must be integers"; v11 the creator is the create
event's sender; v12 ``additional_creators`` and creators' infinite power level).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gateway.matrix.identifiers import user_server_name
from gateway.matrix.room_state import RoomState
from gateway.matrix.room_versions import RoomVersion

__all__ = [
    "INFINITE_POWER",
    "additional_creators",
    "can_invite",
    "creator_servers",
    "invite_level",
    "power_level_of",
    "room_creators",
    "users_who_can_invite",
]

#: v12 "creators have infinite power level".
INFINITE_POWER = float("inf")

_STRING_INT = re.compile(r"\s*[+-]?[0-9]+\s*")


def _level(value: object, version: RoomVersion) -> int | None:
    """A power level as the room version reads it: integers; before v10 also strings that
    hold an integer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if (
        not version.integer_only_power_levels
        and isinstance(value, str)
        and _STRING_INT.fullmatch(value)
    ):
        return int(value)
    return None


def additional_creators(create_event: Mapping[str, Any], version: RoomVersion) -> list[str]:
    """``content.additional_creators`` where the room version gives it a meaning (v12), the
    entries that are strings; empty before."""
    if not version.authorization.additional_creators:
        return []
    content = create_event.get("content")
    extra = content.get("additional_creators") if isinstance(content, Mapping) else None
    return [u for u in extra if isinstance(u, str)] if isinstance(extra, list) else []


def room_creators(create_event: Mapping[str, Any] | None, version: RoomVersion) -> set[str]:
    """The room's creators as the authorization rules count them: ``content.creator`` up to
    v10, the create event's sender from v11, and from v12 also ``additional_creators``."""
    if create_event is None:
        return set()
    creators: set[str] = set()
    if version.authorization.creator_is_sender:
        sender = create_event.get("sender")
        if isinstance(sender, str):
            creators.add(sender)
    else:
        content = create_event.get("content")
        creator = content.get("creator") if isinstance(content, Mapping) else None
        if isinstance(creator, str):
            creators.add(creator)
    creators.update(additional_creators(create_event, version))
    return creators


def creator_servers(
    create_event: Mapping[str, Any], version: RoomVersion | None
) -> tuple[str, ...]:
    """The servers that created the room, in order, without duplicates: the create event's
    sender's, and from v12 those of ``additional_creators`` (entries that are not user IDs are
    left out). ``version`` None (a version this code does not know) counts the sender only.

    The sender, not ``content.creator`` as :func:`room_creators` reads before v11: the
    sender's server is the one whose signature the create event carries, while
    ``content.creator`` is only what that server wrote into it.
    """
    users: list[object] = [create_event.get("sender")]
    if version is not None:
        users += additional_creators(create_event, version)
    servers: dict[str, None] = {}
    for user in users:
        server = user_server_name(user)
        if server:
            servers[server] = None
    return tuple(servers)


def power_level_of(state: RoomState, user_id: str, version: RoomVersion) -> float:
    """The user's power level.

    Without an ``m.room.power_levels`` event the room creator has 100 and everyone else 0;
    from v12 the creators' power is infinite whatever the event says.
    """
    creators = room_creators(state.get("m.room.create"), version)
    if version.authorization.additional_creators and user_id in creators:
        return INFINITE_POWER
    if state.get("m.room.power_levels") is None:
        return 100 if user_id in creators else 0
    content = state.content("m.room.power_levels")
    users = content.get("users")
    if isinstance(users, Mapping) and user_id in users:
        level = _level(users[user_id], version)
        if level is not None:
            return level
    default = _level(content.get("users_default", 0), version)
    return default if default is not None else 0


def invite_level(state: RoomState, version: RoomVersion) -> int:
    """``invite`` in ``m.room.power_levels``; 0 when missing (spec default)."""
    level = _level(state.content("m.room.power_levels").get("invite", 0), version)
    return level if level is not None else 0


def can_invite(state: RoomState, user_id: str, version: RoomVersion) -> bool:
    """Joined, with a power level at least the invite level."""
    return state.membership(user_id) == "join" and power_level_of(
        state, user_id, version
    ) >= invite_level(state, version)


def users_who_can_invite(state: RoomState, server_name: str, version: RoomVersion) -> list[str]:
    """Local joined users who could invite, most powerful first (then by user ID)."""
    local = [u for u in state.members("join") if user_server_name(u) == server_name]
    able = [u for u in local if can_invite(state, u, version)]
    return sorted(able, key=lambda u: (-power_level_of(state, u, version), u))
