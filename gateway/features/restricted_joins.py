"""The restricted-join decision (MSC3083; room versions 8 and later).

A room whose join rule is ``restricted`` (or ``knock_restricted`` from room version 10) lets
a user join without an invite when the user is a member of one of the rooms its
``m.room.join_rules`` ``allow`` list names. The resident server decides, and names one of
its own joined users who could have invited the user.

:func:`decide_join` reaches room state only through a :class:`RoomStateReader`, so every
branch is testable without a homeserver; the handlers in :mod:`gateway.features.joins` act
on its answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import Codes, MatrixError
from gateway.matrix.power_levels import users_who_can_invite
from gateway.matrix.room_state import RoomState
from gateway.matrix.room_versions import RoomVersion, UnknownRoomVersion, get_room_version

__all__ = [
    "JoinDecision",
    "RoomStateReader",
    "allowed_room_ids",
    "decide_join",
    "restricted_rule_applies",
]


class RoomStateReader(Protocol):
    """Room state as the resident homeserver knows it."""

    async def room_state(
        self, room_id: str, *, at_event_ids: Sequence[str] = ()
    ) -> RoomState | None:
        """The state after one of ``at_event_ids`` (default: after the room's newest event);
        None when the homeserver is not in the room."""
        ...


def allowed_room_ids(join_rules_content: Mapping[str, Any]) -> list[str]:
    """Room IDs of the ``allow`` entries that count: ``{"type": "m.room_membership",
    "room_id": "<string>"}``. Entries of any other shape are ignored; a missing or empty
    list allows nobody."""
    allow = join_rules_content.get("allow")
    if not isinstance(allow, list):
        return []
    rooms: list[str] = []
    for entry in allow:
        if (
            isinstance(entry, Mapping)
            and entry.get("type") == "m.room_membership"
            and isinstance(entry.get("room_id"), str)
            and entry["room_id"] not in rooms
        ):
            rooms.append(entry["room_id"])
    return rooms


@dataclass(frozen=True)
class JoinDecision:
    """The outcome of :func:`decide_join` for a join that may go ahead."""

    room_version: str
    join_rule: str | None
    #: True when the allow rules decided (the user was neither joined nor invited).
    restricted: bool
    #: Local users who may authorise the join, best first (empty unless ``restricted``).
    authorising_users: tuple[str, ...] = ()
    #: The allowed room the user is a member of.
    allowed_via: str | None = None

    @property
    def is_restricted_room(self) -> bool:
        return self.join_rule in ("restricted", "knock_restricted")


def restricted_rule_applies(join_rule: str | None, version: RoomVersion) -> bool:
    """Whether the room version gives ``join_rule`` MSC3083's meaning."""
    if join_rule == "restricted":
        return version.restricted_join
    if join_rule == "knock_restricted":
        return version.knock_restricted
    return False


async def decide_join(
    reader: RoomStateReader,
    room_id: str,
    user_id: str,
    *,
    server_name: str,
    at_event_ids: Sequence[str] = (),
) -> JoinDecision:
    """Decides a remote user's join as MSC3083's resident server does.

    Raises :class:`MatrixError`: 404 ``M_NOT_FOUND`` when the homeserver is not in the room;
    403 ``M_FORBIDDEN`` when the user is banned or is in none of the allowed rooms the
    homeserver knows; 400 ``M_UNABLE_TO_AUTHORISE_JOIN`` when the homeserver is not in
    some allowed rooms and knows the user in none of the others; 400
    ``M_UNABLE_TO_GRANT_JOIN`` when no local user could invite.
    """
    state = await reader.room_state(room_id, at_event_ids=at_event_ids)
    if state is None:
        raise MatrixError(404, Codes.NOT_FOUND, "Unknown room")
    try:
        version = get_room_version(state.room_version)
    except UnknownRoomVersion:
        raise MatrixError(
            400, Codes.UNSUPPORTED_ROOM_VERSION, f"Unknown room version {state.room_version!r}"
        ) from None
    join_rule = state.join_rule
    plain = JoinDecision(version.identifier, join_rule, restricted=False)
    if not restricted_rule_applies(join_rule, version):
        return plain
    membership = state.membership(user_id)
    if membership == "ban":
        raise MatrixError(403, Codes.FORBIDDEN, "The user is banned from the room")
    # Auth rules: a user already joined or invited joins as in an invite-only room.
    if membership in ("join", "invite"):
        return plain

    allowed_via: str | None = None
    unknown_rooms = 0
    for allowed in allowed_room_ids(state.content("m.room.join_rules")):
        allowed_state = await reader.room_state(allowed)
        if allowed_state is None:
            unknown_rooms += 1
        elif allowed_state.membership(user_id) == "join":
            allowed_via = allowed
            break
    if allowed_via is None:
        if unknown_rooms:
            raise MatrixError(
                400,
                Codes.UNABLE_TO_AUTHORISE_JOIN,
                "This server is not in the rooms that would allow the join; try another server",
            )
        raise MatrixError(
            403, Codes.FORBIDDEN, "The user is not a member of any room that allows the join"
        )
    authorisers = users_who_can_invite(state, server_name, version)
    if not authorisers:
        raise MatrixError(
            400, Codes.UNABLE_TO_GRANT_JOIN, "No user on this server can authorise the join"
        )
    return JoinDecision(
        version.identifier,
        join_rule,
        restricted=True,
        authorising_users=tuple(authorisers),
        allowed_via=allowed_via,
    )
