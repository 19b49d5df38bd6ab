"""What a local user does through the homeserver's client API in the integration tests."""

from __future__ import annotations

from typing import Any

import httpx

from gateway.demo.stack import Stack
from gateway.demo.synapse import RegisteredUser

TIMEOUT = httpx.Timeout(30.0)


def create_room(stack: Stack, user: RegisteredUser, **body: Any) -> str:
    """Creates a room as ``user`` directly on the homeserver; returns its ID."""
    response = httpx.post(
        f"{stack.homeserver_url}/_matrix/client/v3/createRoom",
        json=body,
        headers={"Authorization": f"Bearer {user.access_token}"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    room_id: str = response.json()["room_id"]
    return room_id


def invites_now(client: httpx.Client, user: RegisteredUser) -> dict[str, Any]:
    """The rooms ``user`` is invited to, as one ``/sync`` that does not wait shows them."""
    sync = client.get(
        "/_matrix/client/v3/sync",
        params={"timeout": "0"},
        headers={"Authorization": f"Bearer {user.access_token}"},
    )
    assert sync.status_code == 200, sync.text
    invites: dict[str, Any] = sync.json().get("rooms", {}).get("invite", {})
    return invites
