"""policies.policy_lists following a policy room on a real Synapse, through the gateway.

A stack of its own (the session stack has no policies): Synapse and the gateway start with
no policies; a local admin creates a policy room on that Synapse; then the gateway's
configuration gains a ``policies.policy_lists`` entry following the room, and a SIGHUP loads
it. The gateway reads the room through the homeserver's federation API, signed as the
homeserver, like any other room state it reads.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from gateway.demo.stack import Stack, StackProcesses, prepare_stack
from gateway.demo.synapse import RegisteredUser, free_port
from gateway.demo.synapse import register_user as register
from tests.integration.test_policies import gateway_log_events, synapse_saw, v3_invite
from tests.integration.test_v3_invites import invite_in_sync
from tests.support.remote_server import RemoteServer

pytestmark = pytest.mark.integration

TIMEOUT = httpx.Timeout(30.0)
REFRESH_SECONDS = 1
RULE_TYPE = "m.policy.rule.server"


def q(identifier: str) -> str:
    return quote(identifier, safe="")


@pytest.fixture(scope="module")
def room_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcesses]:
    stack = prepare_stack(
        tmp_path_factory.mktemp("policy-room-stack"), port=free_port(), log_format="json"
    )
    processes = StackProcesses(stack)
    processes.start()
    try:
        yield processes
    finally:
        processes.stop()


def new_user(stack: Stack, word: str, *, admin: bool = False) -> RegisteredUser:
    return register(
        stack.homeserver_url,
        stack.registration_shared_secret,
        f"{word}{secrets.token_hex(4)}",
        secrets.token_urlsafe(12),
        admin=admin,
    )


def set_rule(
    client: httpx.Client, admin: RegisteredUser, room_id: str, content: dict[str, str]
) -> None:
    """Sends the rule's state event (empty ``content`` removes the rule)."""
    answer = client.put(
        f"/_matrix/client/v3/rooms/{q(room_id)}/state/{RULE_TYPE}/rule:remote",
        json=content,
        headers={"Authorization": f"Bearer {admin.access_token}"},
    )
    assert answer.status_code == 200, answer.text


def follow_room(processes: StackProcesses, room_id: str) -> None:
    """Adds the policy entry to gateway.toml and reloads the gateway's policies."""
    stack = processes.stack
    config = stack.gateway_config_path.read_text(encoding="utf8")
    assert "[[policies]]" not in config, config
    entry = (
        "\n[[policies]]\n"
        'module = "policies.policy_lists"\n'
        'name = "policy_room"\n'
        f"options = {{ policy_rooms = [{json.dumps(room_id)}],"
        f" refresh_seconds = {REFRESH_SECONDS} }}\n"
    )
    stack.gateway_config_path.write_text(config + entry, encoding="utf8")
    before = reloads(stack)
    pid = processes.gateway.pid
    assert pid is not None
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while reloads(stack) <= before:
        assert time.monotonic() < deadline, "the gateway did not reload its policies"
        assert processes.poll() is None
        time.sleep(0.1)


def reloads(stack: Stack) -> int:
    return sum(1 for e in gateway_log_events(stack) if e.get("event") == "policies reloaded")


def test_a_ban_in_a_followed_policy_room_refuses_invites_until_it_is_removed(
    room_stack: StackProcesses, remote_server: RemoteServer
) -> None:
    stack = room_stack.stack
    admin = new_user(stack, "moderator-", admin=True)
    with (
        httpx.Client(base_url=stack.homeserver_url, timeout=TIMEOUT) as homeserver,
        httpx.Client(base_url=stack.gateway_url, timeout=TIMEOUT) as gateway,
    ):
        created = homeserver.post(
            "/_matrix/client/v3/createRoom",
            json={"preset": "private_chat", "name": "ban list"},
            headers={"Authorization": f"Bearer {admin.access_token}"},
        )
        assert created.status_code == 200, created.text
        policy_room = created.json()["room_id"]
        set_rule(
            homeserver,
            admin,
            policy_room,
            {
                "entity": remote_server.server_name,
                "recommendation": "m.ban",
                "reason": "invite spam",
            },
        )
        follow_room(room_stack, policy_room)

        # Banned: refused by the gateway, never seen by the homeserver.
        user = new_user(stack, "invitee-")
        room, _, answer = v3_invite(remote_server, gateway, stack, user)
        assert answer.status_code == 403, answer.text
        assert answer.json() == {
            "errcode": "M_FORBIDDEN",
            "error": f"server {remote_server.server_name} is banned by this server's"
            " policy list: invite spam",
        }
        assert not synapse_saw(stack, f"/invite/{q(room.room_id)}")

        # The rule is removed in the room; within the refresh interval (plus the state
        # reader's short cache of the room's newest event) invites are accepted again.
        set_rule(homeserver, admin, policy_room, {})
        deadline = time.monotonic() + 10 * REFRESH_SECONDS + 15
        while True:
            room, _, answer = v3_invite(remote_server, gateway, stack, user)
            if answer.status_code == 200:
                break
            assert answer.status_code == 403, answer.text
            assert time.monotonic() < deadline, "the removed rule still applies"
            time.sleep(0.5)
        assert invite_in_sync(gateway, user, room.room_id) is not None

        # A new ban applies again without a reload.
        set_rule(
            homeserver,
            admin,
            policy_room,
            {"entity": "localhost:*", "recommendation": "m.ban", "reason": "all of them"},
        )
        deadline = time.monotonic() + 10 * REFRESH_SECONDS + 15
        while True:
            _, _, answer = v3_invite(remote_server, gateway, stack, new_user(stack, "again-"))
            if answer.status_code == 403:
                assert "all of them" in answer.json()["error"]
                break
            assert answer.status_code == 200, answer.text
            assert time.monotonic() < deadline, "the new rule does not apply"
            time.sleep(0.5)
    decisions = [e for e in gateway_log_events(stack) if e.get("event") == "policy.decision"]
    assert any(e.get("policy") == "policy_room" and e["decision"] == "deny" for e in decisions)
    assert not any(e.get("failure") for e in decisions), "a decision failed"
