"""Restricted joins (MSC3083) through the gateway's join handlers, against a real Synapse.

The stack's gateway process may not list the join routes yet, so this module runs a second
gateway in this process (``gateway.app.serve`` with ``gateway.features.joins.install``
added unless ``PUBLIC_ROUTES`` has it) in front of the same Synapse, using the same
configuration file. A remote server (its own key, its keys served over TLS) builds its join
events with Synapse's own event code from the templates Synapse hands out.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import signedjson.key
from signedjson.sign import verify_signed_json
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.events import make_event_from_dict
from synapse.events.utils import prune_event

from gateway.demo.stack import Stack
from gateway.demo.synapse import RegisteredUser
from gateway.errors import MatrixError
from gateway.features import joins
from gateway.features.joins import AUTHORISING_USER
from gateway.features.restricted_joins import decide_join
from gateway.homeserver.state import HomeserverStateReader
from tests.support import client_api
from tests.support.inprocess_gateway import gateway_thread, q
from tests.support.pdus import event_id_of, sign_pdu
from tests.support.remote_server import ReceivedRequest, RemoteServer

pytestmark = [pytest.mark.integration, pytest.mark.both_stores]

TIMEOUT = httpx.Timeout(30.0)
VERSION = "10"


# --- the gateway with the join routes, in this process --------------------------------------


@pytest.fixture(scope="module")
def joins_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    db_path = tmp_path_factory.mktemp("joins") / "gateway.db"
    with gateway_thread(
        stack.gateway_config_path, db_path, joins.install, name="joins-gateway"
    ) as url:
        yield url


@pytest.fixture
def gateway(joins_gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=joins_gateway, timeout=TIMEOUT) as client:
        yield client


# --- a remote server that also accepts invites ------------------------------------------------


class InviteAcceptingRemote(RemoteServer):
    """Signs and returns every v2 invite Synapse sends it (as a real server would)."""

    def _handle(self, request: ReceivedRequest) -> tuple[int, Any]:
        path = urlsplit(request.uri).path
        if request.method == "PUT" and path.startswith("/_matrix/federation/v2/invite/"):
            with self._lock:
                self.requests.append(request)
            body = request.json()
            signed = sign_pdu(
                body["event"], body["room_version"], self.server_name, self.signing_key
            )
            # sign_pdu replaces the hashes; keep the sender's signature as well.
            signed["signatures"] = {**body["event"]["signatures"], **signed["signatures"]}
            signed["hashes"] = body["event"]["hashes"]
            return 200, {"event": signed}
        return super()._handle(request)


@pytest.fixture(scope="module")
def remote() -> Iterator[RemoteServer]:
    with InviteAcceptingRemote() as server:
        yield server


# --- building blocks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alice(register_user: Callable[..., RegisteredUser]) -> RegisteredUser:
    return register_user()


def create_room(stack: Stack, user: RegisteredUser, **body: Any) -> str:
    return client_api.create_room(stack, user, **{"room_version": VERSION, **body})


def restricted_room(stack: Stack, user: RegisteredUser, allow: list[str], rule: str) -> str:
    join_rules = {
        "join_rule": rule,
        "allow": [{"type": "m.room_membership", "room_id": r} for r in allow],
    }
    return create_room(
        stack,
        user,
        initial_state=[{"type": "m.room.join_rules", "state_key": "", "content": join_rules}],
    )


def joined_members(stack: Stack, user: RegisteredUser, room_id: str) -> set[str]:
    response = httpx.get(
        f"{stack.homeserver_url}/_matrix/client/v3/rooms/{q(room_id)}/joined_members",
        headers={"Authorization": f"Bearer {user.access_token}"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    return set(response.json()["joined"])


def make_join(
    remote: RemoteServer, gateway: httpx.Client, server_name: str, room_id: str, user_id: str
) -> httpx.Response:
    uri = f"/_matrix/federation/v1/make_join/{q(room_id)}/{q(user_id)}?ver={VERSION}"
    return remote.federation_request(gateway, "GET", uri, destination=server_name)


def send_join(
    remote: RemoteServer,
    gateway: httpx.Client,
    server_name: str,
    template: dict[str, Any],
    *,
    api: str = "v2",
) -> tuple[str, dict[str, Any], httpx.Response]:
    event = dict(template)
    event["origin_server_ts"] = int(time.time() * 1000)
    signed = sign_pdu(event, VERSION, remote.server_name, remote.signing_key)
    event_id = event_id_of(signed, VERSION)
    uri = f"/_matrix/federation/{api}/send_join/{q(signed['room_id'])}/{q(event_id)}"
    response = remote.federation_request(
        gateway, "PUT", uri, destination=server_name, content=signed
    )
    return event_id, signed, response


def join(
    remote: RemoteServer, gateway: httpx.Client, server_name: str, room_id: str, user_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """make_join then send_join; returns (template, send_join answer)."""
    made = make_join(remote, gateway, server_name, room_id, user_id)
    assert made.status_code == 200, made.text
    template: dict[str, Any] = made.json()["event"]
    _, _, sent = send_join(remote, gateway, server_name, template)
    assert sent.status_code == 200, sent.text
    return template, sent.json()


def homeserver_verify_key(stack: Stack) -> Any:
    with open(stack.synapse.signing_key_path, encoding="utf8") as f:
        return signedjson.key.get_verify_key(signedjson.key.read_signing_keys(f)[0])


def assert_signed_by(event: dict[str, Any], server: str, verify_key: Any) -> None:
    parsed = make_event_from_dict(copy.deepcopy(event), KNOWN_ROOM_VERSIONS[VERSION])
    pruned = prune_event(parsed).get_pdu_json()
    verify_signed_json(pruned, server, verify_key)


# --- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["restricted", "knock_restricted"])
def test_member_of_the_allowed_room_joins_and_the_event_carries_both_signatures(
    rule: str,
    stack: Stack,
    gateway: httpx.Client,
    remote: RemoteServer,
    alice: RegisteredUser,
    server_name: str,
) -> None:
    public = create_room(stack, alice, preset="public_chat")
    restricted = restricted_room(stack, alice, [public], rule)
    user = f"@joiner-{rule}:{remote.server_name}"

    # A real join of the public room through the gateway first.
    join(remote, gateway, server_name, public, user)
    assert user in joined_members(stack, alice, public)

    template, answer = join(remote, gateway, server_name, restricted, user)
    assert template["content"][AUTHORISING_USER] == alice.user_id
    event = answer["event"]
    assert event["content"][AUTHORISING_USER] == alice.user_id
    assert set(event["signatures"]) == {remote.server_name, server_name}
    assert_signed_by(event, server_name, homeserver_verify_key(stack))
    assert_signed_by(event, remote.server_name, signedjson.key.get_verify_key(remote.signing_key))
    assert user in joined_members(stack, alice, restricted)


def test_user_in_none_of_the_allowed_rooms_is_forbidden(
    stack: Stack,
    gateway: httpx.Client,
    remote: RemoteServer,
    alice: RegisteredUser,
    server_name: str,
) -> None:
    public = create_room(stack, alice, preset="public_chat")
    restricted = restricted_room(stack, alice, [public], "restricted")
    made = make_join(remote, gateway, server_name, restricted, f"@stranger:{remote.server_name}")
    assert made.status_code == 403, made.text
    assert made.json()["errcode"] == "M_FORBIDDEN"


def test_allowed_room_unknown_to_the_homeserver_is_unable_to_authorise(
    stack: Stack,
    gateway: httpx.Client,
    remote: RemoteServer,
    alice: RegisteredUser,
    server_name: str,
) -> None:
    restricted = restricted_room(stack, alice, ["!nowhere:elsewhere.example"], "restricted")
    made = make_join(remote, gateway, server_name, restricted, f"@someone:{remote.server_name}")
    assert made.status_code == 400, made.text
    assert made.json()["errcode"] == "M_UNABLE_TO_AUTHORISE_JOIN"


def test_send_join_authorised_by_a_user_of_another_server_is_refused(
    stack: Stack,
    gateway: httpx.Client,
    remote: RemoteServer,
    alice: RegisteredUser,
    server_name: str,
) -> None:
    public = create_room(stack, alice, preset="public_chat")
    restricted = restricted_room(stack, alice, [public], "restricted")
    user = f"@elsewhere:{remote.server_name}"
    join(remote, gateway, server_name, public, user)
    made = make_join(remote, gateway, server_name, restricted, user)
    assert made.status_code == 200, made.text
    template = made.json()["event"]
    # As if another resident server had prepared the join.
    template["content"][AUTHORISING_USER] = f"@admin:{remote.server_name}"

    _, _, sent = send_join(remote, gateway, server_name, template)

    assert sent.status_code == 400, sent.text
    assert sent.json()["errcode"] == "M_UNABLE_TO_AUTHORISE_JOIN"
    assert user not in joined_members(stack, alice, restricted)


def test_invited_user_joins_without_the_allow_rule(
    stack: Stack,
    gateway: httpx.Client,
    remote: RemoteServer,
    alice: RegisteredUser,
    server_name: str,
) -> None:
    restricted = restricted_room(stack, alice, [], "restricted")
    user = f"@invited:{remote.server_name}"
    invited = httpx.post(
        f"{stack.homeserver_url}/_matrix/client/v3/rooms/{q(restricted)}/invite",
        json={"user_id": user},
        headers={"Authorization": f"Bearer {alice.access_token}"},
        timeout=TIMEOUT,
    )
    assert invited.status_code == 200, invited.text

    template, answer = join(remote, gateway, server_name, restricted, user)

    assert AUTHORISING_USER not in template["content"]
    assert AUTHORISING_USER not in answer["event"]["content"]
    assert user in joined_members(stack, alice, restricted)


def test_v1_send_join_answer_keeps_its_shape(
    stack: Stack,
    gateway: httpx.Client,
    remote: RemoteServer,
    alice: RegisteredUser,
    server_name: str,
) -> None:
    public = create_room(stack, alice, preset="public_chat")
    restricted = restricted_room(stack, alice, [public], "restricted")
    user = f"@v1:{remote.server_name}"
    join(remote, gateway, server_name, public, user)
    made = make_join(remote, gateway, server_name, restricted, user)
    assert made.status_code == 200, made.text
    event_id, _, sent = send_join(remote, gateway, server_name, made.json()["event"], api="v1")
    assert sent.status_code == 200, sent.text
    status, body = sent.json()
    assert status == 200
    assert event_id_of(body["event"], VERSION) == event_id
    assert server_name in body["event"]["signatures"]
    assert user in joined_members(stack, alice, restricted)


def test_make_join_for_a_user_of_another_server_is_forbidden(
    stack: Stack,
    gateway: httpx.Client,
    remote: RemoteServer,
    alice: RegisteredUser,
    server_name: str,
) -> None:
    public = create_room(stack, alice, preset="public_chat")
    made = make_join(remote, gateway, server_name, public, "@victim:other.example")
    assert made.status_code == 403, made.text
    assert made.json()["errcode"] == "M_FORBIDDEN"


async def test_state_is_read_through_the_homeserver_as_itself(
    stack: Stack, alice: RegisteredUser, server_name: str
) -> None:
    public = create_room(stack, alice, preset="public_chat")
    restricted = restricted_room(stack, alice, [public], "restricted")
    key_lines = stack.synapse.signing_key_path.read_text(encoding="utf8").splitlines()
    key = signedjson.key.read_signing_keys(key_lines)[0]
    async with httpx.AsyncClient(base_url=stack.homeserver_url, timeout=TIMEOUT) as client:
        reader = HomeserverStateReader(client, server_name=server_name, signing_key=key)
        state = await reader.room_state(restricted)
        assert state is not None
        assert state.room_version == VERSION
        assert state.content("m.room.join_rules")["join_rule"] == "restricted"
        assert state.members("join") == [alice.user_id]
        assert await reader.room_state("!nowhere:elsewhere.example") is None


async def test_gateway_decision_on_synapse_state_agrees_with_synapse(
    stack: Stack,
    gateway: httpx.Client,
    remote: RemoteServer,
    alice: RegisteredUser,
    server_name: str,
) -> None:
    public = create_room(stack, alice, preset="public_chat")
    restricted = restricted_room(stack, alice, [public], "restricted")
    unknowable = restricted_room(stack, alice, ["!nowhere:elsewhere.example"], "restricted")
    member = f"@decided:{remote.server_name}"
    join(remote, gateway, server_name, public, member)
    key_lines = stack.synapse.signing_key_path.read_text(encoding="utf8").splitlines()
    key = signedjson.key.read_signing_keys(key_lines)[0]
    async with httpx.AsyncClient(base_url=stack.homeserver_url, timeout=TIMEOUT) as client:
        reader = HomeserverStateReader(client, server_name=server_name, signing_key=key)

        decision = await decide_join(reader, restricted, member, server_name=server_name)
        assert decision.restricted
        assert decision.allowed_via == public
        assert decision.authorising_users == (alice.user_id,)

        stranger = f"@undecided:{remote.server_name}"
        with pytest.raises(MatrixError) as forbidden:
            await decide_join(reader, restricted, stranger, server_name=server_name)
        assert (forbidden.value.status, forbidden.value.errcode) == (403, "M_FORBIDDEN")
        with pytest.raises(MatrixError) as unable:
            await decide_join(reader, unknowable, member, server_name=server_name)
        assert unable.value.errcode == "M_UNABLE_TO_AUTHORISE_JOIN"
    # Synapse, asked directly (not through the gateway), agrees on each.
    with httpx.Client(base_url=stack.homeserver_url, timeout=TIMEOUT) as direct:
        assert make_join(remote, direct, server_name, restricted, member).status_code == 200
        refused = make_join(remote, direct, server_name, restricted, stranger)
        assert (refused.status_code, refused.json()["errcode"]) == (403, "M_FORBIDDEN")
        unable_there = make_join(remote, direct, server_name, unknowable, member)
        assert unable_there.json()["errcode"] == "M_UNABLE_TO_AUTHORISE_JOIN"
