"""Knocking through the gateway's make_knock / send_knock handlers, against a real Synapse.

The stack's gateway process may not list the knock routes yet, so this module runs a second
gateway in this process (``gateway.app.serve`` with ``gateway.features.knocks.install`` added
unless ``PUBLIC_ROUTES`` has it) in front of the same Synapse, with a knock policy that
refuses chosen users. A remote server (its own key, served over TLS) signs the knock events
it builds from the templates Synapse hands out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest

from gateway.demo.stack import Stack
from gateway.demo.synapse import RegisteredUser
from gateway.errors import MatrixError
from gateway.features import knocks
from gateway.http import Router
from gateway.policy.api import KnockContext
from gateway.services import Services
from tests.support.client_api import create_room
from tests.support.inprocess_gateway import gateway_thread, q
from tests.support.pdus import event_id_of, sign_pdu
from tests.support.policy_stub import HookPolicy
from tests.support.remote_server import RemoteServer

pytestmark = pytest.mark.integration

TIMEOUT = httpx.Timeout(30.0)
#: The first room version with the ``knock`` join rule.
VERSION = "7"
#: Users the test policy refuses at make_knock, and at send_knock.
REFUSED_AT_MAKE = "refused-make"
REFUSED_AT_SEND = "refused-send"


# --- the gateway with the knock routes, in this process -------------------------------------


@dataclass
class KnocksGateway:
    url: str
    #: Every context the test policy was asked with (appended from the gateway's thread).
    asked: list[KnockContext]


async def _test_policy(asked: list[KnockContext], ctx: KnockContext) -> None:
    asked.append(ctx)
    localpart = ctx.user[1:].split(":", 1)[0]
    if localpart.startswith(REFUSED_AT_MAKE) or (
        localpart.startswith(REFUSED_AT_SEND) and ctx.stage == "send_knock"
    ):
        raise MatrixError(403, "M_FORBIDDEN", "knocks from this user are not accepted")


@pytest.fixture(scope="module")
def knocks_gateway(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KnocksGateway]:
    db_path = tmp_path_factory.mktemp("knocks") / "gateway.db"
    asked: list[KnockContext] = []

    def with_test_policy(router: Router, services: Services) -> None:
        services.policy = HookPolicy(  # type: ignore[assignment]
            knock=partial(_test_policy, asked), otherwise=services.policy
        )

    with gateway_thread(
        stack.gateway_config_path,
        db_path,
        knocks.install,
        extra_routes=[with_test_policy],
        name="knocks-gateway",
    ) as url:
        yield KnocksGateway(url, asked)


@pytest.fixture
def gateway(knocks_gateway: KnocksGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=knocks_gateway.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def alice(register_user: Callable[..., RegisteredUser]) -> RegisteredUser:
    return register_user()


# --- building blocks ------------------------------------------------------------------------


def knock_room(stack: Stack, user: RegisteredUser) -> str:
    join_rules = {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}
    return create_room(stack, user, room_version=VERSION, initial_state=[join_rules])


def membership(stack: Stack, user: RegisteredUser, room_id: str, member: str) -> str | None:
    """``member``'s membership as ``user`` (in the room) sees it; None when there is none."""
    response = httpx.get(
        f"{stack.homeserver_url}/_matrix/client/v3/rooms/{q(room_id)}"
        f"/state/m.room.member/{q(member)}",
        headers={"Authorization": f"Bearer {user.access_token}"},
        timeout=TIMEOUT,
    )
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    value: str = response.json()["membership"]
    return value


def make_knock(
    remote: RemoteServer, gateway: httpx.Client, server_name: str, room_id: str, user_id: str
) -> httpx.Response:
    uri = f"/_matrix/federation/v1/make_knock/{q(room_id)}/{q(user_id)}?ver=6&ver={VERSION}"
    return remote.federation_request(gateway, "GET", uri, destination=server_name)


def send_knock(
    remote: RemoteServer, gateway: httpx.Client, server_name: str, template: dict[str, Any]
) -> httpx.Response:
    event = dict(template, origin_server_ts=int(time.time() * 1000))
    signed = sign_pdu(event, VERSION, remote.server_name, remote.signing_key)
    event_id = event_id_of(signed, VERSION)
    uri = f"/_matrix/federation/v1/send_knock/{q(signed['room_id'])}/{q(event_id)}"
    return remote.federation_request(gateway, "PUT", uri, destination=server_name, content=signed)


def template_of(made: httpx.Response) -> dict[str, Any]:
    assert made.status_code == 200, made.text
    assert made.json()["room_version"] == VERSION
    template: dict[str, Any] = made.json()["event"]
    assert template["content"]["membership"] == "knock"
    return template


# --- the tests ------------------------------------------------------------------------------


def test_remote_user_knocks_and_synapse_shows_the_knock(
    stack: Stack,
    gateway: httpx.Client,
    knocks_gateway: KnocksGateway,
    remote_server: RemoteServer,
    alice: RegisteredUser,
    server_name: str,
) -> None:
    room = knock_room(stack, alice)
    user = f"@knocker:{remote_server.server_name}"

    template = template_of(make_knock(remote_server, gateway, server_name, room, user))
    sent = send_knock(remote_server, gateway, server_name, template)

    assert sent.status_code == 200, sent.text
    stripped = sent.json()["knock_room_state"]
    assert any(e.get("type") == "m.room.join_rules" for e in stripped)
    assert membership(stack, alice, room, user) == "knock"
    # The policy saw both steps, with the room as Synapse has it.
    asked = [
        (c.stage, c.origin, c.room_version, c.join_rule)
        for c in knocks_gateway.asked
        if c.user == user
    ]
    assert asked == [
        ("make_knock", remote_server.server_name, VERSION, "knock"),
        ("send_knock", remote_server.server_name, VERSION, "knock"),
    ]


def test_knock_refused_at_make_knock_never_reaches_synapse(
    stack: Stack,
    gateway: httpx.Client,
    remote_server: RemoteServer,
    alice: RegisteredUser,
    server_name: str,
) -> None:
    room = knock_room(stack, alice)
    user = f"@{REFUSED_AT_MAKE}:{remote_server.server_name}"
    made = make_knock(remote_server, gateway, server_name, room, user)
    assert made.status_code == 403, made.text
    assert made.json()["errcode"] == "M_FORBIDDEN"
    # Synapse, asked directly, would have handed out the template.
    with httpx.Client(base_url=stack.homeserver_url, timeout=TIMEOUT) as direct:
        template_of(make_knock(remote_server, direct, server_name, room, user))
    assert membership(stack, alice, room, user) is None


def test_knock_refused_at_send_knock_leaves_no_membership(
    stack: Stack,
    gateway: httpx.Client,
    remote_server: RemoteServer,
    alice: RegisteredUser,
    server_name: str,
) -> None:
    room = knock_room(stack, alice)
    user = f"@{REFUSED_AT_SEND}:{remote_server.server_name}"
    template = template_of(make_knock(remote_server, gateway, server_name, room, user))
    sent = send_knock(remote_server, gateway, server_name, template)
    assert sent.status_code == 403, sent.text
    assert sent.json()["errcode"] == "M_FORBIDDEN"
    assert membership(stack, alice, room, user) is None


def test_make_knock_for_a_user_of_another_server_is_forbidden(
    stack: Stack,
    gateway: httpx.Client,
    remote_server: RemoteServer,
    alice: RegisteredUser,
    server_name: str,
) -> None:
    room = knock_room(stack, alice)
    made = make_knock(remote_server, gateway, server_name, room, "@victim:other.example")
    assert made.status_code == 403, made.text
    assert made.json()["errcode"] == "M_FORBIDDEN"


def test_synapse_refusal_is_passed_back_unchanged(
    stack: Stack,
    gateway: httpx.Client,
    remote_server: RemoteServer,
    alice: RegisteredUser,
    server_name: str,
) -> None:
    # A room version the knocking server does not claim to support: Synapse answers
    # M_INCOMPATIBLE_ROOM_VERSION, and the gateway hands that answer back as it is.
    room = knock_room(stack, alice)
    user = f"@old-server:{remote_server.server_name}"
    uri = f"/_matrix/federation/v1/make_knock/{q(room)}/{q(user)}?ver=6"
    made = remote_server.federation_request(gateway, "GET", uri, destination=server_name)
    assert made.status_code == 400, made.text
    assert made.json()["errcode"] == "M_INCOMPATIBLE_ROOM_VERSION"
