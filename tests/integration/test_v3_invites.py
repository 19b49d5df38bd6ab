"""v3 invites through the gateway to a real Synapse, which only speaks v2.

The remote server builds its room and invite with Synapse's own event code
(tests/support/pdus.py) and sends them to the gateway as a v3 invite.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from signedjson.key import decode_signing_key_base64, get_verify_key
from signedjson.sign import SignatureVerifyException, verify_signed_json

from gateway.demo.stack import Stack
from gateway.matrix.events import redact
from tests.support.pdus import RemoteRoom, make_remote_room
from tests.support.remote_server import RemoteServer
from tests.support.stack_fixtures import RegisteredUser

pytestmark = [pytest.mark.integration, pytest.mark.both_stores]


def v3_invite_body(room: RemoteRoom, invite: dict[str, Any]) -> dict[str, Any]:
    return {
        "event": invite,
        "invite_room_state": [
            {
                "type": "m.room.name",
                "state_key": "",
                "sender": room.creator,
                "content": {"name": "x"},
            }
        ],
        "state": [room.create, *room.state],
    }


def send_v3_invite(
    remote: RemoteServer,
    client: httpx.Client,
    stack: Stack,
    room_id: str,
    body: Any,
    *,
    unstable: bool = False,
) -> httpx.Response:
    prefix = (
        "/_matrix/federation/unstable/org.matrix.msc0000" if unstable else "/_matrix/federation/v3"
    )
    uri = f"{prefix}/invite/{quote(room_id, safe='')}"
    return remote.federation_request(
        client, "PUT", uri, destination=stack.server_name, content=body
    )


def our_signature_verifies(event: dict[str, Any], room_version: str, stack: Stack) -> bool:
    """Whether the homeserver's signature on ``event`` verifies with its own key."""
    with open(stack.synapse.signing_key_path) as f:
        alg, version, seed = f.read().split()
    verify_key = get_verify_key(decode_signing_key_base64(alg, version, seed))
    if f"{alg}:{version}" not in event.get("signatures", {}).get(stack.server_name, {}):
        return False
    try:
        verify_signed_json(redact(event, room_version), stack.server_name, verify_key)
    except SignatureVerifyException:
        return False
    return True


def invite_in_sync(
    client: httpx.Client, user: RegisteredUser, room_id: str
) -> dict[str, Any] | None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        sync = client.get(
            "/_matrix/client/v3/sync",
            params={"timeout": "1000"},
            headers={"Authorization": f"Bearer {user.access_token}"},
        )
        assert sync.status_code == 200, sync.text
        invites = sync.json().get("rooms", {}).get("invite", {})
        if room_id in invites:
            return invites[room_id]
        time.sleep(0.3)
    return None


@pytest.mark.parametrize("room_version", ["10", "11", "12"])
def test_v3_invite_is_delivered_to_synapse_as_v2(
    room_version: str,
    stack: Stack,
    remote_server: RemoteServer,
    register_user: Any,
    gateway_client: httpx.Client,
) -> None:
    invitee = register_user()
    room = make_remote_room(room_version, remote_server.server_name, remote_server.signing_key)
    invite = room.make_invite(invitee.user_id)
    body = v3_invite_body(room, invite)

    answer = send_v3_invite(remote_server, gateway_client, stack, room.room_id, body)
    assert answer.status_code == 200, answer.text
    signed = answer.json()["event"]
    assert stack.server_name in signed["signatures"], signed
    assert remote_server.server_name in signed["signatures"]
    assert our_signature_verifies(signed, room_version, stack)

    state = invite_in_sync(gateway_client, invitee, room.room_id)
    assert state is not None, "the invite never reached the invitee's /sync"
    events = state["invite_state"]["events"]
    creates = [e for e in events if e["type"] == "m.room.create"]
    assert len(creates) == 1
    assert creates[0]["sender"] == room.creator
    assert creates[0]["content"]["room_version"] == room_version

    # The same invite again is harmless.
    again = send_v3_invite(remote_server, gateway_client, stack, room.room_id, body)
    assert again.status_code == 200, again.text


def test_unstable_prefix_is_served_too(
    stack: Stack,
    remote_server: RemoteServer,
    register_user: Any,
    gateway_client: httpx.Client,
) -> None:
    invitee = register_user()
    room = make_remote_room("11", remote_server.server_name, remote_server.signing_key)
    body = v3_invite_body(room, room.make_invite(invitee.user_id))
    answer = send_v3_invite(remote_server, gateway_client, stack, room.room_id, body, unstable=True)
    assert answer.status_code == 200, answer.text
    assert invite_in_sync(gateway_client, invitee, room.room_id) is not None
