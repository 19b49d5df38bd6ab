"""Client and federation traffic passes through the gateway to a real Synapse, untouched."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from urllib.parse import quote

import httpx
import pytest

from gateway.demo.stack import Stack
from gateway.demo.synapse import RegisteredUser
from tests.support.remote_server import RemoteServer

pytestmark = pytest.mark.integration


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_client_login_room_message_and_sync_through_the_gateway(
    gateway_client: httpx.Client,
    register_user: Callable[..., RegisteredUser],
    login: Callable[[RegisteredUser], str],
    server_name: str,
) -> None:
    user = register_user()
    token = login(user)
    assert token != user.access_token

    whoami = gateway_client.get("/_matrix/client/v3/account/whoami", headers=_auth(token))
    assert whoami.status_code == 200, whoami.text
    assert whoami.json()["user_id"] == f"@{user.localpart}:{server_name}"

    created = gateway_client.post(
        "/_matrix/client/v3/createRoom", json={"name": "passthrough"}, headers=_auth(token)
    )
    assert created.status_code == 200, created.text
    room_id = created.json()["room_id"]

    body = f"hello through the gateway {uuid.uuid4()}"
    sent = gateway_client.put(
        f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/send/m.room.message/txn1",
        json={"msgtype": "m.text", "body": body},
        headers=_auth(token),
    )
    assert sent.status_code == 200, sent.text
    event_id = sent.json()["event_id"]

    synced = gateway_client.get(
        "/_matrix/client/v3/sync", params={"timeout": "0"}, headers=_auth(token)
    )
    assert synced.status_code == 200, synced.text
    timeline = synced.json()["rooms"]["join"][room_id]["timeline"]["events"]
    messages = [e for e in timeline if e["type"] == "m.room.message"]
    assert [(e["event_id"], e["content"]["body"]) for e in messages] == [(event_id, body)]


def test_federation_version_answers_with_synapses(
    gateway_client: httpx.Client, homeserver_client: httpx.Client
) -> None:
    through_gateway = gateway_client.get("/_matrix/federation/v1/version")
    direct = homeserver_client.get("/_matrix/federation/v1/version")
    assert through_gateway.status_code == 200, through_gateway.text
    assert through_gateway.json() == direct.json()
    assert through_gateway.json()["server"]["name"] == "Synapse"


def _profile_uri(user_id: str) -> str:
    # "@" and ":" percent-encoded, as peers send them: the signature covers these bytes.
    return f"/_matrix/federation/v1/query/profile?user_id={quote(user_id, safe='')}"


def test_signed_federation_request_with_percent_encoded_query_is_accepted(
    gateway_client: httpx.Client,
    register_user: Callable[..., RegisteredUser],
    remote_server: RemoteServer,
    server_name: str,
) -> None:
    user = register_user()
    uri = _profile_uri(user.user_id)
    assert "%40" in uri and "%3A" in uri

    response = remote_server.federation_request(gateway_client, "GET", uri, destination=server_name)

    assert response.status_code == 200, response.text
    # Synapse's default display name is the localpart.
    assert response.json() == {"displayname": user.localpart}
    # Synapse checked the signature with the key it fetched from the remote server itself.
    assert any(r.uri == "/_matrix/key/v2/server" for r in remote_server.requests)


def test_broken_signature_is_still_rejected_by_synapse(
    gateway_client: httpx.Client,
    register_user: Callable[..., RegisteredUser],
    remote_server: RemoteServer,
    server_name: str,
) -> None:
    user = register_user()
    uri = _profile_uri(user.user_id)
    good = remote_server.authorization("GET", uri, server_name)
    # Sign the same request for another URI: a valid signature over the wrong bytes.
    other = remote_server.authorization("GET", _profile_uri("@someone:else"), server_name)
    broken = good.split('sig="')[0] + 'sig="' + other.split('sig="')[1]
    assert broken != good

    response = remote_server.federation_request(
        gateway_client, "GET", uri, destination=server_name, authorization=broken
    )

    assert response.status_code == 401, response.text
    assert response.json()["errcode"] == "M_UNAUTHORIZED"


def test_signature_over_decoded_uri_is_rejected(
    gateway_client: httpx.Client,
    register_user: Callable[..., RegisteredUser],
    remote_server: RemoteServer,
    server_name: str,
) -> None:
    # The homeserver checks the signature against the URI byte for byte, so the gateway has
    # to forward it still percent-encoded: here the peer signed the decoded form instead.
    user = register_user()
    uri = _profile_uri(user.user_id)
    decoded = f"/_matrix/federation/v1/query/profile?user_id={user.user_id}"
    authorization = remote_server.authorization("GET", decoded, server_name)

    response = remote_server.federation_request(
        gateway_client, "GET", uri, destination=server_name, authorization=authorization
    )

    assert response.status_code == 401, response.text


def test_unsigned_federation_request_is_rejected_by_synapse(
    gateway_client: httpx.Client, register_user: Callable[..., RegisteredUser]
) -> None:
    user = register_user()
    response = gateway_client.get(_profile_uri(user.user_id))
    assert response.status_code == 401, response.text
    assert response.json()["errcode"] == "M_UNAUTHORIZED"


def test_admin_api_is_not_exposed_through_the_gateway(
    gateway_client: httpx.Client, homeserver_client: httpx.Client
) -> None:
    # The homeserver itself serves it (the shared-secret registration's nonce) ...
    direct = homeserver_client.get("/_synapse/admin/v1/register")
    assert direct.status_code == 200, direct.text
    assert "nonce" in direct.json()
    # ... the gateway's public listener does not.
    for path in ("/_synapse/admin/v1/register", "/_synapse/admin/v1/server_version"):
        through_gateway = gateway_client.get(path)
        assert through_gateway.status_code == 404, (path, through_gateway.text)


def test_stack_answers_on_the_internal_listener(stack: Stack) -> None:
    started = time.monotonic()
    health = httpx.get(f"{stack.internal_url}/health", timeout=10, verify=False)
    assert health.status_code == 200, health.text
    assert time.monotonic() - started < 5
