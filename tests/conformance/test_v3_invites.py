"""v3 invites ("inviting with authorization"): one test per rule, against a real Synapse.

Each test is named after the rule it checks. A refused invite must be answered with the
exact status and errcode, and nothing of it may reach the homeserver: Synapse's access log
has no ``/_matrix/federation/v2/invite/`` line for that room and the invitee's ``/sync``
shows no invite. Delivery itself (room versions 10, 11, 12, the unstable prefix) is shown in
``tests/integration/test_v3_invites.py``.
"""

from __future__ import annotations

import copy
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
import signedjson.key
from canonicaljson import encode_canonical_json
from signedjson.key import generate_signing_key
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.crypto.event_signing import compute_event_signature

from gateway.demo.stack import Stack, StackProcesses, prepare_stack
from gateway.demo.synapse import RegisteredUser, free_port
from gateway.demo.synapse import register_user as register
from gateway.notary.keys import DelegationKeys, load_or_create_secret
from tests.integration.test_v3_invites import invite_in_sync
from tests.support.client_api import invites_now
from tests.support.pdus import RemoteRoom, event_id_of, make_remote_room, sign_pdu
from tests.support.remote_server import RemoteServer, x_matrix_authorization

pytestmark = [pytest.mark.integration, pytest.mark.both_stores]

TIMEOUT = httpx.Timeout(30.0)
DELEGATION_KEY_ID_PREFIX = "ed25519:mxgw_"


# --- helpers ------------------------------------------------------------------------------


def v3_uri(room_id: str) -> str:
    return f"/_matrix/federation/v3/invite/{quote(room_id, safe='')}"


def body_of(room: RemoteRoom, invite: dict[str, Any], state: list[Any] | None = None) -> Any:
    return {
        "event": invite,
        "invite_room_state": [],
        "state": [room.create, *room.state] if state is None else state,
    }


def send(
    remote: RemoteServer,
    client: httpx.Client,
    stack: Stack,
    room_id: str,
    body: Any,
    **kwargs: Any,
) -> httpx.Response:
    return remote.federation_request(
        client, "PUT", v3_uri(room_id), destination=stack.server_name, content=body, **kwargs
    )


def raw_put(client: httpx.Client, uri: str, data: bytes, headers: dict[str, str]) -> httpx.Response:
    request = client.build_request("PUT", uri, headers=headers, content=data)
    request.url = request.url.copy_with(raw_path=uri.encode("ascii"))
    return client.send(request)


def assert_refused(answer: httpx.Response, status: int, errcode: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    error: dict[str, Any] = answer.json()
    assert error["errcode"] == errcode, error
    return error


def v2_invite_lines(stack: Stack, room_id: str) -> list[str]:
    """Synapse's access-log lines of v2 invites for ``room_id`` (path as sent, encoded)."""
    forms = (quote(room_id, safe=""), room_id)
    text = Path(stack.synapse.log_path).read_text(encoding="utf8", errors="replace")
    return [
        line
        for line in text.splitlines()
        if "/_matrix/federation/v2/invite/" in line and any(f in line for f in forms)
    ]


def assert_nothing_reached_homeserver(
    stack: Stack, client: httpx.Client, room_id: str, invitee: RegisteredUser | None = None
) -> None:
    # The gateway answers only after the homeserver answered whatever it forwarded, so a
    # forwarded invite would already be in Synapse's access log.
    assert v2_invite_lines(stack, room_id) == []
    if invitee is not None:
        assert room_id not in invites_now(client, invitee)


def resign(event: dict[str, Any], room_version: str, server: str, key: Any) -> dict[str, Any]:
    """Signs ``event`` again as is, keeping its (maybe wrong) content hash."""
    event = copy.deepcopy(event)
    event.pop("signatures", None)
    event["signatures"] = compute_event_signature(
        KNOWN_ROOM_VERSIONS[room_version], event, server, key
    )
    return event


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def invitee(register_user: Callable[..., RegisteredUser]) -> RegisteredUser:
    return register_user()


@pytest.fixture
def room11(remote_server: RemoteServer) -> RemoteRoom:
    return make_remote_room("11", remote_server.server_name, remote_server.signing_key)


@pytest.fixture
def room12(remote_server: RemoteServer) -> RemoteRoom:
    return make_remote_room("12", remote_server.server_name, remote_server.signing_key)


# --- state and the create event -----------------------------------------------------------


def test_state_with_two_create_events_is_refused_with_m_invalid_param(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    other = make_remote_room("11", remote_server.server_name, remote_server.signing_key)
    invite = room11.make_invite(invitee.user_id)
    body = body_of(room11, invite, [room11.create, other.create, *room11.state])
    answer = send(remote_server, gateway_client, stack, room11.room_id, body)
    error = assert_refused(answer, 400, "M_INVALID_PARAM")
    assert "exactly one" in error["error"]
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id, invitee)


def test_state_without_create_event_is_refused_with_m_invalid_param(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    body = body_of(room11, room11.make_invite(invitee.user_id), list(room11.state))
    answer = send(remote_server, gateway_client, stack, room11.room_id, body)
    assert_refused(answer, 400, "M_INVALID_PARAM")
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id, invitee)


def test_create_event_for_another_room_is_refused_with_m_invalid_param(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    other = make_remote_room("11", remote_server.server_name, remote_server.signing_key)
    body = body_of(room11, room11.make_invite(invitee.user_id), [other.create, *room11.state])
    answer = send(remote_server, gateway_client, stack, room11.room_id, body)
    error = assert_refused(answer, 400, "M_INVALID_PARAM")
    assert "another room" in error["error"]
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id, invitee)


def test_v12_room_id_not_matching_the_create_event_hash_is_refused_with_m_invalid_param(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room12: RemoteRoom,
) -> None:
    # The create event of room12, sent for another (well-formed v12) room ID.
    other = make_remote_room("12", remote_server.server_name, remote_server.signing_key)
    invite = other.make_invite(invitee.user_id)
    body = body_of(room12, invite, [room12.create, *room12.state])
    answer = send(remote_server, gateway_client, stack, other.room_id, body)
    error = assert_refused(answer, 400, "M_INVALID_PARAM")
    assert "hash" in error["error"]
    assert_nothing_reached_homeserver(stack, gateway_client, other.room_id, invitee)
    assert_nothing_reached_homeserver(stack, gateway_client, room12.room_id)


def test_create_event_with_non_empty_state_key_is_refused_with_m_invalid_param(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    create = dict(room11.create, state_key="x")
    create = sign_pdu(create, "11", remote_server.server_name, remote_server.signing_key)
    body = body_of(room11, room11.make_invite(invitee.user_id), [create, *room11.state])
    answer = send(remote_server, gateway_client, stack, room11.room_id, body)
    error = assert_refused(answer, 400, "M_INVALID_PARAM")
    assert "state_key" in error["error"]
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id, invitee)


def test_create_event_with_forged_signature_is_refused_with_m_invalid_param(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    # Same server name and key id as the remote's real key, another private key.
    forger = generate_signing_key(remote_server.key_version)
    create = sign_pdu(room11.create, "11", remote_server.server_name, forger)
    body = body_of(room11, room11.make_invite(invitee.user_id), [create, *room11.state])
    answer = send(remote_server, gateway_client, stack, room11.room_id, body)
    error = assert_refused(answer, 400, "M_INVALID_PARAM")
    assert "signature" in error["error"]
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id, invitee)


def test_create_event_with_broken_content_hash_is_refused_with_m_invalid_param(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    # A correct signature over a wrong content hash: only the hash check can catch it.
    create = copy.deepcopy(room11.create)
    create["hashes"] = {"sha256": "A" * 43}
    create = resign(create, "11", remote_server.server_name, remote_server.signing_key)
    body = body_of(room11, room11.make_invite(invitee.user_id), [create, *room11.state])
    answer = send(remote_server, gateway_client, stack, room11.room_id, body)
    error = assert_refused(answer, 400, "M_INVALID_PARAM")
    assert "content hash" in error["error"]
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id, invitee)


# --- room versions ------------------------------------------------------------------------


def _create_with_version(
    room: RemoteRoom, remote: RemoteServer, content: dict[str, Any], sign_as: str
) -> dict[str, Any]:
    create = dict(copy.deepcopy(room.create), content=content)
    if sign_as in ("1", "2"):
        create["event_id"] = f"$create{int(time.time() * 1e6)}:{remote.server_name}"
    return sign_pdu(create, sign_as, remote.server_name, remote.signing_key)


def test_room_version_2_room_is_refused_with_m_incompatible_room_version(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    content = {"room_version": "2", "creator": room11.creator}
    create = _create_with_version(room11, remote_server, content, "2")
    body = body_of(room11, room11.make_invite(invitee.user_id), [create, *room11.state])
    answer = send(remote_server, gateway_client, stack, room11.room_id, body)
    error = assert_refused(answer, 400, "M_INCOMPATIBLE_ROOM_VERSION")
    assert error["room_version"] == "2"
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id, invitee)


def test_create_event_without_room_version_means_version_1_and_is_refused(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    create = _create_with_version(room11, remote_server, {"creator": room11.creator}, "1")
    body = body_of(room11, room11.make_invite(invitee.user_id), [create, *room11.state])
    answer = send(remote_server, gateway_client, stack, room11.room_id, body)
    error = assert_refused(answer, 400, "M_INCOMPATIBLE_ROOM_VERSION")
    assert error["room_version"] == "1"
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id, invitee)


# --- the invite event ---------------------------------------------------------------------


def test_invite_whose_sender_is_not_from_the_origin_is_refused_with_m_invalid_param(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    invite = room11.make_invite(invitee.user_id, sender="@mallory:elsewhere.example")
    answer = send(remote_server, gateway_client, stack, room11.room_id, body_of(room11, invite))
    error = assert_refused(answer, 400, "M_INVALID_PARAM")
    assert "origin" in error["error"]
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id, invitee)


def test_invitee_on_another_server_is_refused_with_m_invalid_param(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    room11: RemoteRoom,
) -> None:
    invite = room11.make_invite("@bob:elsewhere.example")
    answer = send(remote_server, gateway_client, stack, room11.room_id, body_of(room11, invite))
    error = assert_refused(answer, 400, "M_INVALID_PARAM")
    assert "invitee" in error["error"]
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id)


def test_member_event_that_is_not_an_invite_is_refused_with_m_invalid_param(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    join = room11._event(
        type="m.room.member",
        state_key=invitee.user_id,
        sender=room11.creator,
        content={"membership": "join"},
    )
    answer = send(remote_server, gateway_client, stack, room11.room_id, body_of(room11, join))
    error = assert_refused(answer, 400, "M_INVALID_PARAM")
    assert "membership" in error["error"]
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id, invitee)


def test_invite_for_another_room_than_the_path_is_refused_with_m_invalid_param(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    other = make_remote_room("11", remote_server.server_name, remote_server.signing_key)
    invite = other.make_invite(invitee.user_id)
    answer = send(remote_server, gateway_client, stack, room11.room_id, body_of(room11, invite))
    error = assert_refused(answer, 400, "M_INVALID_PARAM")
    assert "another room" in error["error"]
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id, invitee)
    assert_nothing_reached_homeserver(stack, gateway_client, other.room_id, invitee)


# --- request authentication ---------------------------------------------------------------


def test_unsigned_request_is_refused_with_401_m_unauthorized(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    body = body_of(room11, room11.make_invite(invitee.user_id))
    answer = raw_put(
        gateway_client,
        v3_uri(room11.room_id),
        encode_canonical_json(body),
        {"Content-Type": "application/json"},
    )
    assert_refused(answer, 401, "M_UNAUTHORIZED")
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id, invitee)


def test_request_for_another_destination_is_refused_with_401_m_unauthorized(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    body = body_of(room11, room11.make_invite(invitee.user_id))
    # A correct signature, for a request addressed to another server.
    authorization = remote_server.authorization(
        "PUT", v3_uri(room11.room_id), "elsewhere.example", body
    )
    answer = send(
        remote_server, gateway_client, stack, room11.room_id, body, authorization=authorization
    )
    assert_refused(answer, 401, "M_UNAUTHORIZED")
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id, invitee)


def test_request_with_bad_x_matrix_signature_is_refused_with_401_m_unauthorized(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    body = body_of(room11, room11.make_invite(invitee.user_id))
    # A well-formed header whose signature covers another body.
    authorization = remote_server.authorization(
        "PUT", v3_uri(room11.room_id), stack.server_name, {"something": "else"}
    )
    answer = send(
        remote_server, gateway_client, stack, room11.room_id, body, authorization=authorization
    )
    assert_refused(answer, 401, "M_UNAUTHORIZED")
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id, invitee)


# --- the body -----------------------------------------------------------------------------


def test_malformed_json_is_refused_with_m_not_json(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    room11: RemoteRoom,
) -> None:
    uri = v3_uri(room11.room_id)
    headers = {
        "Content-Type": "application/json",
        "Authorization": remote_server.authorization("PUT", uri, stack.server_name),
    }
    answer = raw_put(gateway_client, uri, b'{"event": {"type": ', headers)
    assert_refused(answer, 400, "M_NOT_JSON")
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id)


def test_json_body_that_is_not_an_object_is_refused_with_m_bad_json(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    room11: RemoteRoom,
) -> None:
    answer = send(remote_server, gateway_client, stack, room11.room_id, [room11.create])
    assert_refused(answer, 400, "M_BAD_JSON")
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id)


def test_oversized_body_is_refused_with_413_m_too_large_before_it_is_read(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    room11: RemoteRoom,
) -> None:
    limit = int(stack.gateway_config["public"]["max_body_size"])
    uri = v3_uri(room11.room_id)
    url = urlsplit(stack.gateway_url)
    authorization = remote_server.authorization("PUT", uri, stack.server_name, {})
    head = (
        f"PUT {uri} HTTP/1.1\r\nHost: {stack.server_name}\r\n"
        f"Authorization: {authorization}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {limit + 1}\r\n\r\n"
    ).encode()
    # Only the head and a few bytes are sent: the declared length alone must be refused.
    with socket.create_connection((url.hostname, url.port), timeout=30) as conn:
        conn.sendall(head + b'{"event": ')
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = conn.recv(65536)
            if not chunk:
                break
            received += chunk
        head_part, _, rest = received.partition(b"\r\n\r\n")
        lines = head_part.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        length = int({k.lower(): v for k, v in headers.items()}["content-length"])
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
    assert lines[0].split(" ")[1] == "413", received
    assert httpx.Response(413, content=rest).json()["errcode"] == "M_TOO_LARGE"
    assert_nothing_reached_homeserver(stack, gateway_client, room11.room_id)


def test_state_with_extra_unrelated_entries_is_tolerated(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    other = make_remote_room("11", remote_server.server_name, remote_server.signing_key)
    state = [
        room11.create,
        *room11.state,
        *other.state,  # events of another room
        {"type": "org.example.not_a_pdu"},
        "not even an object",
    ]
    invite = room11.make_invite(invitee.user_id)
    answer = send(
        remote_server, gateway_client, stack, room11.room_id, body_of(room11, invite, state)
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["event"]["state_key"] == invitee.user_id
    assert invite_in_sync(gateway_client, invitee, room11.room_id) is not None
    # The log check every refusal relies on does see a delivered invite.
    assert v2_invite_lines(stack, room11.room_id) != []


def test_state_event_whose_auth_events_are_not_all_in_state_is_ignored(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    register_user: Callable[..., RegisteredUser],
    room11: RemoteRoom,
) -> None:
    user = register_user()
    missing = "$" + "A" * 43
    name = room11._event(
        type="m.room.name",
        state_key="",
        sender=room11.creator,
        content={"name": "from state, unverifiable"},
        auth_events=[*room11.auth_ids(), missing],
    )
    # A control in the same request: a state event whose auth events were all sent.
    topic = room11._event(
        type="m.room.topic",
        state_key="",
        sender=room11.creator,
        content={"topic": "from state, verified"},
    )
    invite = room11.make_invite(user.user_id)
    stripped = [
        {"type": kind, "state_key": "", "sender": room11.creator, "content": content}
        for kind, content in (
            ("m.room.name", {"name": "stripped"}),
            ("m.room.topic", {"topic": "stripped"}),
        )
    ]
    body = {
        "event": invite,
        "invite_room_state": stripped,
        "state": [room11.create, *room11.state, name, topic],
    }
    answer = send(remote_server, gateway_client, stack, room11.room_id, body)
    assert answer.status_code == 200, answer.text
    delivered = invite_in_sync(gateway_client, user, room11.room_id)
    assert delivered is not None, "the invite never reached the invitee's /sync"
    names = [e for e in delivered["invite_state"]["events"] if e["type"] == "m.room.name"]
    # The unverifiable event did not replace the stripped one (a verified one would have).
    assert [e["content"]["name"] for e in names] == ["stripped"]
    topics = [e for e in delivered["invite_state"]["events"] if e["type"] == "m.room.topic"]
    assert [e["content"]["topic"] for e in topics] == ["from state, verified"]


# --- keys: the public filter and the notary ------------------------------------------------


def delegation_key_ids(answer: dict[str, Any]) -> list[str]:
    found = []
    for entry in answer.get("server_keys", []):
        for field in ("verify_keys", "old_verify_keys"):
            found += [k for k in entry.get(field, {}) if k.startswith(DELEGATION_KEY_ID_PREFIX)]
        for by_key in entry.get("signatures", {}).values():
            found += [k for k in by_key if k.startswith(DELEGATION_KEY_ID_PREFIX)]
    return found


def test_no_delegation_key_appears_in_any_public_key_answer(
    stack: Stack,
    remote_server: RemoteServer,
    gateway_client: httpx.Client,
    homeserver_client: httpx.Client,
    invitee: RegisteredUser,
    room11: RemoteRoom,
) -> None:
    invite = room11.make_invite(invitee.user_id)
    answer = send(remote_server, gateway_client, stack, room11.room_id, body_of(room11, invite))
    assert answer.status_code == 200, answer.text

    remote = remote_server.server_name
    post_body = {"server_keys": {remote: {}}}
    get_uri = f"/_matrix/key/v2/query/{quote(remote, safe='')}"

    # Synapse itself re-serves the delegation key it cached: the filter has work to do.
    direct_post = homeserver_client.post("/_matrix/key/v2/query", json=post_body)
    assert direct_post.status_code == 200, direct_post.text
    direct_get = homeserver_client.get(get_uri)
    assert direct_get.status_code == 200, direct_get.text
    assert delegation_key_ids(direct_post.json()) or delegation_key_ids(direct_get.json())

    public_post = gateway_client.post("/_matrix/key/v2/query", json=post_body)
    assert public_post.status_code == 200, public_post.text
    public_get = gateway_client.get(get_uri)
    assert public_get.status_code == 200, public_get.text
    assert delegation_key_ids(public_post.json()) == []
    assert delegation_key_ids(public_get.json()) == []
    # The remote's real key is still served.
    for public in (public_post, public_get):
        servers = {e["server_name"] for e in public.json()["server_keys"]}
        assert remote in servers, public.text

    # Synapse also answers other shapes of the GET path (trailing slash, a key id): they
    # must be filtered as well. The first one leaks when asked directly.
    key_id = f"ed25519:{remote_server.key_version}"
    for shape in (f"{get_uri}/", f"{get_uri}/{quote(key_id, safe='')}", f"{get_uri}/%20"):
        direct = homeserver_client.get(shape)
        public = gateway_client.get(shape)
        assert public.status_code == direct.status_code, (shape, public.text)
        if public.status_code == 200:
            assert delegation_key_ids(public.json()) == [], shape
    leaky = homeserver_client.get(f"{get_uri}/")
    assert leaky.status_code == 200 and delegation_key_ids(leaky.json())


def homeserver_signing_key(stack: Stack) -> Any:
    with open(stack.synapse.signing_key_path) as f:
        return signedjson.key.read_signing_keys(f)[0]


def test_notary_refuses_requests_not_signed_by_our_homeserver(
    stack: Stack, remote_server: RemoteServer
) -> None:
    notary_name = str(stack.gateway_config["notary"]["server_name"])
    uri = "/_matrix/key/v2/query"
    content = {"server_keys": {remote_server.server_name: {}}}

    def post(authorization: str | None) -> httpx.Response:
        headers = {"Authorization": authorization} if authorization else {}
        with httpx.Client(base_url=stack.internal_url, verify=False, timeout=TIMEOUT) as client:
            return client.post(uri, json=content, headers=headers)

    assert_refused(post(None), 401, "M_UNAUTHORIZED")
    by_remote = remote_server.authorization("POST", uri, notary_name, content)
    assert_refused(post(by_remote), 401, "M_UNAUTHORIZED")
    with httpx.Client(base_url=stack.internal_url, verify=False, timeout=TIMEOUT) as client:
        get_uri = f"{uri}/{quote(remote_server.server_name, safe='')}"
        assert_refused(client.get(get_uri), 401, "M_UNAUTHORIZED")

    # The same request signed by our homeserver is answered: the refusals were about who signed.
    by_homeserver = x_matrix_authorization(
        method="POST",
        uri=uri,
        origin=stack.server_name,
        destination=notary_name,
        signing_key=homeserver_signing_key(stack),
        content=content,
    )
    answer = post(by_homeserver)
    assert answer.status_code == 200, answer.text
    assert remote_server.server_name in {e["server_name"] for e in answer.json()["server_keys"]}


# --- an expired delegation key ----------------------------------------------------------------

LIFETIME_S = 4


@pytest.fixture(scope="module")
def short_lived_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second stack whose delegation keys live a few seconds."""
    data_dir = tmp_path_factory.mktemp("short-lived-keys")
    stack = prepare_stack(
        data_dir,
        port=free_port(),
        log_format="json",
        user_config={"notary": {"delegation_key_lifetime": LIFETIME_S}},
    )
    processes = StackProcesses(stack)
    processes.start()
    try:
        yield stack
    finally:
        processes.stop()


def now_ms() -> int:
    return int(time.time() * 1000)


def v2_invite_to_synapse(
    stack: Stack, remote: RemoteServer, invitee: RegisteredUser, key: Any
) -> httpx.Response:
    """A v2 invite sent straight to Synapse as the remote origin, signed with ``key``."""
    room = make_remote_room("11", remote.server_name, remote.signing_key)
    invite = room.make_invite(invitee.user_id)
    event_id = event_id_of(invite, "11")
    uri = f"/_matrix/federation/v2/invite/{quote(room.room_id, safe='')}/{quote(event_id, safe='')}"
    content = {"room_version": "11", "event": invite, "invite_room_state": [room.create]}
    authorization = x_matrix_authorization(
        method="PUT",
        uri=uri,
        origin=remote.server_name,
        destination=stack.server_name,
        signing_key=key,
        content=content,
    )
    with httpx.Client(base_url=stack.homeserver_url, timeout=TIMEOUT) as client:
        return raw_put(
            client,
            uri,
            encode_canonical_json(content),
            {"Authorization": authorization, "Content-Type": "application/json"},
        )


def test_expired_delegation_key_is_no_longer_accepted_by_synapse(
    short_lived_stack: Stack, remote_server: RemoteServer
) -> None:
    stack = short_lived_stack

    def new_user() -> RegisteredUser:
        return register(
            stack.homeserver_url,
            stack.registration_shared_secret,
            f"expiry-{now_ms()}",
            "password-expiry",
        )

    keys = DelegationKeys(
        load_or_create_secret(stack.data_dir / "state" / "delegation.secret"),
        lifetime_ms=LIFETIME_S * 1000,
    )
    origin = remote_server.server_name
    # One real v3 invite through the gateway: it vouches the key of the current period.
    for _ in range(5):
        before = keys.period_at(now_ms())
        room = make_remote_room("11", origin, remote_server.signing_key)
        invite = room.make_invite(new_user().user_id)
        with httpx.Client(base_url=stack.gateway_url, timeout=TIMEOUT) as client:
            answer = send(remote_server, client, stack, room.room_id, body_of(room, invite))
        assert answer.status_code == 200, answer.text
        if keys.period_at(now_ms()) == before:
            break
    else:
        pytest.fail("could not send a v3 invite within one delegation period")
    key = keys.for_period(origin, before)
    assert now_ms() < key.valid_until_ts

    # While the vouched key is valid, Synapse accepts a request signed with it.
    accepted = v2_invite_to_synapse(stack, remote_server, new_user(), key.signing_key)
    assert accepted.status_code == 200, accepted.text
    assert now_ms() < key.valid_until_ts, "the check above ran too late to prove anything"

    # Once it has expired, Synapse refuses it.
    time.sleep(max(0.0, (key.valid_until_ts - now_ms()) / 1000) + 1.0)
    refused = v2_invite_to_synapse(stack, remote_server, new_user(), key.signing_key)
    assert_refused(refused, 401, "M_UNAUTHORIZED")
