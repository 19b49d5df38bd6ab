"""Builds signed PDUs the way a remote homeserver would, with Synapse's own event code.

Tests use Synapse's implementation (not the gateway's) to make the events they send, so the
gateway's hashing and signing are checked against an independent implementation.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

from signedjson.types import SigningKey
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.crypto.event_signing import add_hashes_and_signatures
from synapse.events import make_event_from_dict


def event_id_of(event: dict[str, Any], room_version: str) -> str:
    return make_event_from_dict(copy.deepcopy(event), KNOWN_ROOM_VERSIONS[room_version]).event_id


def sign_pdu(
    event: dict[str, Any], room_version: str, server_name: str, key: SigningKey
) -> dict[str, Any]:
    """Adds content hashes and the server's signature (as a homeserver does on sending)."""
    event = copy.deepcopy(event)
    event.pop("signatures", None)
    event.pop("hashes", None)
    add_hashes_and_signatures(KNOWN_ROOM_VERSIONS[room_version], event, server_name, key)
    return event


@dataclass
class RemoteRoom:
    """A room that lives on a remote server, with the events an invite needs."""

    room_version: str
    server_name: str
    key: SigningKey
    creator: str
    create: dict[str, Any] = field(default_factory=dict)
    room_id: str = ""
    state: list[dict[str, Any]] = field(default_factory=list)
    _depth: int = 1

    @property
    def uses_hashed_room_ids(self) -> bool:
        return KNOWN_ROOM_VERSIONS[self.room_version].msc4291_room_ids_as_hashes

    def _event(self, **fields: Any) -> dict[str, Any]:
        self._depth += 1
        ev: dict[str, Any] = {
            "room_id": self.room_id,
            "origin_server_ts": int(time.time() * 1000),
            "depth": self._depth,
            "prev_events": [self.event_id(self.state[-1])] if self.state else [],
            "auth_events": self.auth_ids(),
            "origin": self.server_name,
        }
        ev.update(fields)
        return sign_pdu(ev, self.room_version, self.server_name, self.key)

    def event_id(self, event: dict[str, Any]) -> str:
        return event_id_of(event, self.room_version)

    def auth_ids(self) -> list[str]:
        wanted = {("m.room.member", self.creator), ("m.room.power_levels", "")}
        if not self.uses_hashed_room_ids:
            wanted.add(("m.room.create", ""))
        return [
            self.event_id(e)
            for e in [self.create, *self.state]
            if e and (e["type"], e["state_key"]) in wanted
        ]

    def make_invite(self, invitee: str, sender: str | None = None) -> dict[str, Any]:
        return self._event(
            type="m.room.member",
            state_key=invitee,
            sender=sender or self.creator,
            content={"membership": "invite"},
        )


def make_remote_room(
    room_version: str, server_name: str, key: SigningKey, creator_localpart: str = "alice"
) -> RemoteRoom:
    creator = f"@{creator_localpart}:{server_name}"
    room = RemoteRoom(room_version=room_version, server_name=server_name, key=key, creator=creator)
    create: dict[str, Any] = {
        "type": "m.room.create",
        "state_key": "",
        "sender": creator,
        "content": {"room_version": room_version},
        "origin_server_ts": int(time.time() * 1000),
        "depth": 1,
        "prev_events": [],
        "auth_events": [],
        "origin": server_name,
    }
    if not KNOWN_ROOM_VERSIONS[room_version].implicit_room_creator:
        create["content"]["creator"] = creator
    if room.uses_hashed_room_ids:
        create = sign_pdu(create, room_version, server_name, key)
        room.room_id = "!" + event_id_of(create, room_version)[1:]
    else:
        room.room_id = f"!{int(time.time() * 1e6)}:{server_name}"
        create["room_id"] = room.room_id
        create = sign_pdu(create, room_version, server_name, key)
    room.create = create
    member = room._event(
        type="m.room.member", state_key=creator, sender=creator, content={"membership": "join"}
    )
    room.state.append(member)
    power = room._event(
        type="m.room.power_levels",
        state_key="",
        sender=creator,
        content={"users": {creator: 100}, "invite": 0},
    )
    room.state.append(power)
    join_rules = room._event(
        type="m.room.join_rules", state_key="", sender=creator, content={"join_rule": "invite"}
    )
    room.state.append(join_rules)
    return room
