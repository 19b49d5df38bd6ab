"""Context builders for the policy tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.policy.api import InviteContext, JoinContext, KnockContext

#: The fixtures shipped with the built-in policies.
FIXTURES = Path(__file__).resolve().parents[3] / "policies" / "fixtures"


def invite(**overrides: Any) -> InviteContext:
    inviter = overrides.pop("inviter", "@bob:remote.example")
    invitee = overrides.pop("invitee", "@alice:our.example")
    room_id = overrides.pop("room_id", "!room:remote.example")
    fields: dict[str, Any] = {
        "event": {
            "type": "m.room.member",
            "state_key": invitee,
            "sender": inviter,
            "room_id": room_id,
            "content": {"membership": "invite"},
        },
        "inviter": inviter,
        "invitee": invitee,
        "origin": inviter.split(":", 1)[1],
        "room_id": room_id,
        "room_version": "10",
        "create_event": None,
        "create_event_verified": False,
        "creator_servers": ("remote.example",),
        "endpoint": "v2",
        "request_id": "req-invite",
    }
    fields.update(overrides)
    return InviteContext(**fields)


def join(**overrides: Any) -> JoinContext:
    user = overrides.pop("user", "@bob:remote.example")
    fields: dict[str, Any] = {
        "user": user,
        "origin": user.split(":", 1)[1],
        "room_id": "!room:our.example",
        "room_version": "10",
        "join_rule": "public",
        "is_restricted": False,
        "stage": "make_join",
        "request_id": "req-join",
    }
    fields.update(overrides)
    return JoinContext(**fields)


def knock(**overrides: Any) -> KnockContext:
    user = overrides.pop("user", "@bob:remote.example")
    fields: dict[str, Any] = {
        "user": user,
        "origin": user.split(":", 1)[1],
        "room_id": "!room:our.example",
        "room_version": "10",
        "join_rule": "knock",
        "stage": "make_knock",
        "request_id": "req-knock",
    }
    fields.update(overrides)
    return KnockContext(**fields)
