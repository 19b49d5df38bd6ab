"""Admission policies against a real Synapse, through a gateway running two workers.

One stack for the whole module, configured with four policies (in this order):

* ``by_localpart`` (tests/support/policies_for_tests.py, enforce, on_error closed, 0.5 s):
  decides by the invitee's localpart: ``deny-*`` deny, ``drop-*`` drop, ``slow-*`` times
  out, ``boom-*`` raises; joins of ``deny-*`` users are denied.
* ``lenient``: the same module for localparts that start with ``open-``, on_error open.
* ``rate_limit`` (policies.rate_limit): at most 3 invites per invitee, no refill.
* ``shadowed``: the same module in shadow mode for localparts that start with ``shadow-``.

Each test registers users whose names pick the decision it wants. Whether the homeserver saw
a request is read from Synapse's own access log (every request it answers is logged with its
path), next to what the invitee's ``/sync`` shows.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from gateway.demo.stack import Stack, StackProcesses, prepare_stack
from gateway.demo.synapse import RegisteredUser, free_port
from gateway.demo.synapse import register_user as register
from tests.integration.test_v3_invites import (
    invite_in_sync,
    our_signature_verifies,
    send_v3_invite,
    v3_invite_body,
)
from tests.support import policies_for_tests
from tests.support.client_api import create_room, invites_now
from tests.support.pdus import RemoteRoom, event_id_of, make_remote_room
from tests.support.remote_server import RemoteServer
from tests.support.stack_fixtures import store_config

pytestmark = [pytest.mark.integration, pytest.mark.both_stores]

TIMEOUT = httpx.Timeout(30.0)
ROOM_VERSION = "11"
POLICY_FILE = "localpart_policy.py"
WORKERS = 2
INVITES_PER_INVITEE = 3
HOOK_TIMEOUT = 0.5


def q(identifier: str) -> str:
    return quote(identifier, safe="")


@pytest.fixture(scope="module")
def policy_stack(
    tmp_path_factory: pytest.TempPathFactory, store_backend: str
) -> Iterator[StackProcesses]:
    with store_config(store_backend, "policies") as store:
        yield from _policy_stack(tmp_path_factory, store)


def _policy_stack(
    tmp_path_factory: pytest.TempPathFactory, store: dict[str, Any]
) -> Iterator[StackProcesses]:
    data_dir = tmp_path_factory.mktemp("policy-stack")
    # The gateway runs a copy, so tests can break and change it without touching the source.
    shutil.copyfile(policies_for_tests.__file__, data_dir / POLICY_FILE)
    policies: list[dict[str, Any]] = [
        {
            "module": POLICY_FILE,  # relative to gateway.toml's directory
            "name": "by_localpart",
            "timeout": HOOK_TIMEOUT,
            "on_error": "closed",
        },
        {
            "module": POLICY_FILE,
            "name": "lenient",
            "options": {"prefix": "open-"},
            "timeout": HOOK_TIMEOUT,
            "on_error": "open",
        },
        {
            "module": "policies.rate_limit",
            "name": "rate_limit",
            "options": {"invites_per_invitee": {"capacity": INVITES_PER_INVITEE, "per_second": 0}},
        },
        {
            "module": POLICY_FILE,
            "name": "shadowed",
            "options": {"prefix": "shadow-"},
            "mode": "shadow",
        },
    ]
    stack = prepare_stack(
        data_dir,
        port=free_port(),
        log_format="json",
        user_config={"policies": policies, "policy": {"audit_allows": True}, "store": store},
    )
    # [public] belongs to the demo; two workers are set in the written file itself.
    config_text = stack.gateway_config_path.read_text(encoding="utf8")
    assert config_text.count("workers = 1\n") == 1, config_text
    stack.gateway_config_path.write_text(
        config_text.replace("workers = 1\n", f"workers = {WORKERS}\n"), encoding="utf8"
    )
    processes = StackProcesses(stack)
    processes.start()
    try:
        yield processes
    finally:
        processes.stop()


@pytest.fixture(scope="module")
def pstack(policy_stack: StackProcesses) -> Stack:
    return policy_stack.stack


@pytest.fixture
def gateway(pstack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pstack.gateway_url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def new_user(pstack: Stack) -> Callable[[str], RegisteredUser]:
    """Registers ``<word><random>`` on the homeserver, e.g. ``new_user("deny-")``."""

    def new_user(word: str) -> RegisteredUser:
        return register(
            pstack.homeserver_url,
            pstack.registration_shared_secret,
            f"{word}{secrets.token_hex(4)}",
            secrets.token_urlsafe(12),
        )

    return new_user


# --- helpers ------------------------------------------------------------------------------


def new_room(remote: RemoteServer) -> RemoteRoom:
    return make_remote_room(ROOM_VERSION, remote.server_name, remote.signing_key)


def v3_invite(
    remote: RemoteServer, gateway: httpx.Client, stack: Stack, user: RegisteredUser
) -> tuple[RemoteRoom, dict[str, Any], httpx.Response]:
    room = new_room(remote)
    invite = room.make_invite(user.user_id)
    answer = send_v3_invite(remote, gateway, stack, room.room_id, v3_invite_body(room, invite))
    return room, invite, answer


def v2_invite(
    remote: RemoteServer, gateway: httpx.Client, stack: Stack, user: RegisteredUser
) -> tuple[RemoteRoom, dict[str, Any], httpx.Response]:
    room = new_room(remote)
    invite = room.make_invite(user.user_id)
    body = {
        "room_version": ROOM_VERSION,
        "event": invite,
        "invite_room_state": [
            room.create,
            {"type": "m.room.name", "state_key": "", "sender": room.creator, "content": {}},
        ],
    }
    uri = f"/_matrix/federation/v2/invite/{q(room.room_id)}/{q(event_id_of(invite, ROOM_VERSION))}"
    answer = remote.federation_request(
        gateway, "PUT", uri, destination=stack.server_name, content=body
    )
    return room, invite, answer


SENDERS = {"v2": v2_invite, "v3": v3_invite}


def synapse_log(stack: Stack) -> str:
    return stack.synapse.log_path.read_text(encoding="utf8", errors="replace")


def synapse_saw(stack: Stack, path_part: str, *, wait: float = 0.0) -> bool:
    """Whether Synapse's access log has a request whose path contains ``path_part``."""
    deadline = time.monotonic() + wait
    while True:
        if any(
            "Processed request" in line and path_part in line
            for line in synapse_log(stack).splitlines()
        ):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def invite_path(room_id: str) -> str:
    return f"/invite/{q(room_id)}/"


def assert_never_delivered(
    stack: Stack,
    remote: RemoteServer,
    client: httpx.Client,
    user: RegisteredUser,
    room_id: str,
    send: Callable[..., Any],
    new_user: Callable[[str], RegisteredUser],
) -> None:
    """Neither Synapse nor the invitee's /sync ever saw the invite into ``room_id``.

    An allowed invite sent afterwards is waited for first: once it is in /sync and in the
    access log, anything sent before it would have been too.
    """
    control_user = new_user("ok-")
    control_room, _, answer = send(remote, client, stack, control_user)
    assert answer.status_code == 200, answer.text
    assert invite_in_sync(client, control_user, control_room.room_id) is not None
    assert synapse_saw(stack, invite_path(control_room.room_id), wait=10)
    assert not synapse_saw(stack, invite_path(room_id)), "the homeserver saw the invite"
    assert room_id not in invites_now(client, user)


def gateway_log_events(stack: Stack) -> list[dict[str, Any]]:
    events = []
    for line in stack.gateway_log_path.read_text(encoding="utf8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def audit_rows(stack: Stack, tmp_path: Path) -> list[dict[str, Any]]:
    """``gateway decisions --json`` as an operator runs it (from another directory)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "decisions",
            "--json",
            "--limit",
            "10000",
            "--config",
            str(stack.gateway_config_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def rows_for_room(rows: list[dict[str, Any]], room_id: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["room_id"] == room_id]


# --- deny, drop, allow for v2 and v3 ------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["v3", "v2"])
def test_denied_invite_gets_403_and_never_reaches_the_invitee(
    endpoint: str,
    pstack: Stack,
    remote_server: RemoteServer,
    gateway: httpx.Client,
    new_user: Callable[[str], RegisteredUser],
) -> None:
    user = new_user("deny-")
    send = SENDERS[endpoint]
    room, _, answer = send(remote_server, gateway, pstack, user)
    assert answer.status_code == 403, answer.text
    assert answer.json() == {
        "errcode": "M_FORBIDDEN",
        "error": policies_for_tests.DENY_REASON,
    }
    assert_never_delivered(pstack, remote_server, gateway, user, room.room_id, send, new_user)


@pytest.mark.parametrize("endpoint", ["v3", "v2"])
def test_dropped_invite_gets_a_200_signed_by_us_and_never_reaches_the_invitee(
    endpoint: str,
    pstack: Stack,
    remote_server: RemoteServer,
    gateway: httpx.Client,
    new_user: Callable[[str], RegisteredUser],
) -> None:
    user = new_user("drop-")
    send = SENDERS[endpoint]
    room, invite, answer = send(remote_server, gateway, pstack, user)
    assert answer.status_code == 200, answer.text
    signed = answer.json()["event"]
    # The event the peer sent, with our signature added and nothing else changed.
    assert {k: v for k, v in signed.items() if k != "signatures"} == {
        k: v for k, v in invite.items() if k != "signatures"
    }
    assert (
        signed["signatures"][remote_server.server_name]
        == (invite["signatures"][remote_server.server_name])
    )
    assert our_signature_verifies(signed, ROOM_VERSION, pstack)
    assert event_id_of(signed, ROOM_VERSION) == event_id_of(invite, ROOM_VERSION)
    assert_never_delivered(pstack, remote_server, gateway, user, room.room_id, send, new_user)


@pytest.mark.parametrize("endpoint", ["v3", "v2"])
def test_allowed_invite_arrives(
    endpoint: str,
    pstack: Stack,
    remote_server: RemoteServer,
    gateway: httpx.Client,
    new_user: Callable[[str], RegisteredUser],
) -> None:
    user = new_user("ok-")
    room, _, answer = SENDERS[endpoint](remote_server, gateway, pstack, user)
    assert answer.status_code == 200, answer.text
    assert our_signature_verifies(answer.json()["event"], ROOM_VERSION, pstack)
    assert invite_in_sync(gateway, user, room.room_id) is not None
    assert synapse_saw(pstack, invite_path(room.room_id), wait=5)


# --- joins --------------------------------------------------------------------------------


def public_room(stack: Stack, new_user: Callable[[str], RegisteredUser]) -> str:
    return create_room(stack, new_user("owner-"), preset="public_chat", room_version=ROOM_VERSION)


def make_join(
    remote: RemoteServer, client: httpx.Client, stack: Stack, room_id: str, user_id: str
) -> httpx.Response:
    uri = f"/_matrix/federation/v1/make_join/{q(room_id)}/{q(user_id)}?ver={ROOM_VERSION}"
    return remote.federation_request(client, "GET", uri, destination=stack.server_name)


def test_denied_make_join_gets_403_and_synapse_never_answers_it(
    pstack: Stack,
    remote_server: RemoteServer,
    gateway: httpx.Client,
    new_user: Callable[[str], RegisteredUser],
) -> None:
    room_id = public_room(pstack, new_user)
    denied = f"@deny-{secrets.token_hex(4)}:{remote_server.server_name}"
    answer = make_join(remote_server, gateway, pstack, room_id, denied)
    assert answer.status_code == 403, answer.text
    assert answer.json() == {
        "errcode": "M_FORBIDDEN",
        "error": policies_for_tests.JOIN_DENY_REASON,
    }
    # Control: another user of the same server is let through, and Synapse answers.
    allowed = f"@ok-{secrets.token_hex(4)}:{remote_server.server_name}"
    ok = make_join(remote_server, gateway, pstack, room_id, allowed)
    assert ok.status_code == 200, ok.text
    assert ok.json()["event"]["state_key"] == allowed
    assert synapse_saw(pstack, f"/make_join/{q(room_id)}/{q(allowed)}", wait=10)
    assert not synapse_saw(pstack, f"/make_join/{q(room_id)}/{q(denied)}")


# --- audit trail --------------------------------------------------------------------------


def test_every_decision_is_in_the_audit_trail(
    pstack: Stack,
    remote_server: RemoteServer,
    gateway: httpx.Client,
    new_user: Callable[[str], RegisteredUser],
    tmp_path: Path,
) -> None:
    expected: list[tuple[str, str, str, str, str | None]] = []
    for send in SENDERS.values():
        for word, decision, policy in (
            ("deny-", "deny", "by_localpart"),
            ("drop-", "drop", "by_localpart"),
            ("ok-", "allow", ""),
        ):
            user = new_user(word)
            room, invite, answer = send(remote_server, gateway, pstack, user)
            assert answer.status_code == (403 if decision == "deny" else 200), answer.text
            expected.append((room.room_id, decision, policy, invite["sender"], user.user_id))
    room_id = public_room(pstack, new_user)
    joiner = f"@deny-{secrets.token_hex(4)}:{remote_server.server_name}"
    assert make_join(remote_server, gateway, pstack, room_id, joiner).status_code == 403

    rows = audit_rows(pstack, tmp_path)
    requests = {
        e["request_id"]: e
        for e in gateway_log_events(pstack)
        if e.get("event") == "policy.decision"
    }
    for invited_room, decision, policy, sender, target in expected:
        found = rows_for_room(rows, invited_room)
        assert len(found) == 1, (invited_room, found)
        row = found[0]
        assert row["point"] == "invite"
        assert row["origin"] == remote_server.server_name
        assert (row["sender"], row["target"]) == (sender, target)
        assert (row["decision"], row["policy"], row["mode"]) == (decision, policy, "enforce")
        assert row["ts"] > (time.time() - 300) * 1000
        if decision == "deny":
            assert (row["status"], row["errcode"]) == (403, "M_FORBIDDEN")
            assert row["reason"] == policies_for_tests.DENY_REASON
        # The request id is the one the gateway logged for the same decision.
        assert requests[row["request_id"]]["room_id"] == invited_room
        assert requests[row["request_id"]]["decision"] == decision
    joins = rows_for_room(rows, room_id)
    assert [(r["point"], r["decision"], r["policy"], r["sender"], r["target"]) for r in joins] == [
        ("make_join", "deny", "by_localpart", joiner, None)
    ]
    assert joins[0]["origin"] == remote_server.server_name
    assert joins[0]["request_id"] in requests


# --- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["slow-", "boom-"])
def test_failing_hook_closed_refuses_open_lets_through(
    word: str,
    pstack: Stack,
    remote_server: RemoteServer,
    gateway: httpx.Client,
    new_user: Callable[[str], RegisteredUser],
    tmp_path: Path,
) -> None:
    closed_user = new_user(word)
    started = time.monotonic()
    closed_room, _, closed = v3_invite(remote_server, gateway, pstack, closed_user)
    elapsed = time.monotonic() - started
    assert closed.status_code == 403, closed.text
    assert closed.json()["errcode"] == "M_FORBIDDEN"
    # The generic reason: the peer learns nothing about the policy.
    assert "test policy" not in closed.json()["error"]
    if word == "slow-":
        assert HOOK_TIMEOUT <= elapsed < policies_for_tests.SLOW_SECONDS / 2

    open_user = new_user(f"open-{word}")
    open_room, _, opened = v3_invite(remote_server, gateway, pstack, open_user)
    assert opened.status_code == 200, opened.text
    assert invite_in_sync(gateway, open_user, open_room.room_id) is not None
    assert not synapse_saw(pstack, invite_path(closed_room.room_id))

    failure = "timeout" if word == "slow-" else "exception"
    logged = {
        (e.get("room_id"), e.get("decision"), e.get("failure"))
        for e in gateway_log_events(pstack)
        if e.get("event") == "policy.decision"
    }
    assert (closed_room.room_id, "deny", failure) in logged
    assert (open_room.room_id, "allow", None) in logged
    rows = audit_rows(pstack, tmp_path)
    [row] = rows_for_room(rows, closed_room.room_id)
    assert (row["decision"], row["policy"], row["status"]) == ("deny", "by_localpart", 403)


# --- shadow mode ---------------------------------------------------------------------------


def test_shadow_deny_changes_nothing_but_is_logged_and_audited(
    pstack: Stack,
    remote_server: RemoteServer,
    gateway: httpx.Client,
    new_user: Callable[[str], RegisteredUser],
    tmp_path: Path,
) -> None:
    user = new_user("shadow-deny-")
    room, _, answer = v3_invite(remote_server, gateway, pstack, user)
    assert answer.status_code == 200, answer.text
    assert invite_in_sync(gateway, user, room.room_id) is not None

    rows = rows_for_room(audit_rows(pstack, tmp_path), room.room_id)
    by_mode = {r["mode"]: r for r in rows}
    assert len(rows) == 2 and set(by_mode) == {"shadow", "enforce"}, rows
    shadow = by_mode["shadow"]
    assert (shadow["decision"], shadow["policy"]) == ("deny", "shadowed")
    assert shadow["reason"] == policies_for_tests.DENY_REASON
    assert by_mode["enforce"]["decision"] == "allow"
    assert shadow["request_id"] == by_mode["enforce"]["request_id"]
    logged = [
        e
        for e in gateway_log_events(pstack)
        if e.get("event") == "policy.shadow_decision" and e.get("room_id") == room.room_id
    ]
    assert [(e["policy"], e["decision"]) for e in logged] == [("shadowed", "deny")]


# --- reload --------------------------------------------------------------------------------


def wait_for_log(stack: Stack, event: str, count: int, before: int) -> None:
    """Wait until ``event`` was logged ``count`` more times than ``before``."""
    deadline = time.monotonic() + 60  # generous: CI machines are often busy
    while time.monotonic() < deadline:
        seen = sum(1 for e in gateway_log_events(stack) if e.get("event") == event)
        if seen >= before + count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{event!r} not logged {count} times after SIGHUP")


def log_count(stack: Stack, event: str) -> int:
    return sum(1 for e in gateway_log_events(stack) if e.get("event") == event)


def test_broken_policy_file_at_reload_keeps_the_old_set_then_a_fixed_one_applies(
    policy_stack: StackProcesses,
    pstack: Stack,
    remote_server: RemoteServer,
    gateway: httpx.Client,
    new_user: Callable[[str], RegisteredUser],
) -> None:
    pid = policy_stack.gateway.pid
    assert pid is not None
    policy_file = pstack.data_dir / POLICY_FILE
    original = policy_file.read_text(encoding="utf8")
    deny_line = 'DENY_WORDS = ("deny-",)\n'
    assert original.count(deny_line) == 1
    try:
        policy_file.write_text(original + "\ndef broken(:\n", encoding="utf8")
        before = log_count(pstack, "policies not reloaded; the previous set stays active")
        os.kill(pid, signal.SIGHUP)
        # Every worker tries, and keeps its set.
        wait_for_log(
            pstack, "policies not reloaded; the previous set stays active", WORKERS, before
        )
        assert policy_stack.poll() is None
        # Several requests, so both workers answer some.
        for _ in range(4):
            _, _, answer = v3_invite(remote_server, gateway, pstack, new_user("deny-"))
            assert answer.status_code == 403, answer.text
            assert answer.json()["error"] == policies_for_tests.DENY_REASON
        banned = new_user("banned-")
        _, _, answer = v3_invite(remote_server, gateway, pstack, banned)
        assert answer.status_code == 200, answer.text

        # A working file with a changed rule: reloaded by every worker, then applied.
        policy_file.write_text(
            original.replace(deny_line, 'DENY_WORDS = ("deny-", "banned-")\n'), encoding="utf8"
        )
        before = log_count(pstack, "policies reloaded")
        os.kill(pid, signal.SIGHUP)
        wait_for_log(pstack, "policies reloaded", WORKERS, before)
        for _ in range(4):
            _, _, answer = v3_invite(remote_server, gateway, pstack, new_user("banned-"))
            assert answer.status_code == 403, answer.text
            assert answer.json()["error"] == policies_for_tests.DENY_REASON
            _, _, answer = v3_invite(remote_server, gateway, pstack, new_user("deny-"))
            assert answer.status_code == 403, answer.text
        ok_user = new_user("ok-")
        ok_room, _, answer = v3_invite(remote_server, gateway, pstack, ok_user)
        assert answer.status_code == 200, answer.text
        assert invite_in_sync(gateway, ok_user, ok_room.room_id) is not None
    finally:
        if policy_file.read_text(encoding="utf8") != original:
            policy_file.write_text(original, encoding="utf8")
            os.kill(pid, signal.SIGHUP)


# --- rate limits across workers ------------------------------------------------------------


def test_rate_limit_per_invitee_holds_across_two_workers(
    pstack: Stack,
    remote_server: RemoteServer,
    new_user: Callable[[str], RegisteredUser],
) -> None:
    user = new_user("ok-")
    rooms = [new_room(remote_server) for _ in range(16)]

    def send(room: RemoteRoom) -> int:
        # A connection of its own each, so the kernel can hand it to either worker.
        with httpx.Client(base_url=pstack.gateway_url, timeout=TIMEOUT) as client:
            body = v3_invite_body(room, room.make_invite(user.user_id))
            return send_v3_invite(remote_server, client, pstack, room.room_id, body).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(send, rooms))
    accepted = [room for room, status in zip(rooms, statuses, strict=True) if status == 200]
    assert len(accepted) == INVITES_PER_INVITEE, statuses
    assert statuses.count(429) == len(rooms) - INVITES_PER_INVITEE, statuses

    room_ids = {r.room_id for r in rooms}
    decided_by = {
        e.get("worker")
        for e in gateway_log_events(pstack)
        if e.get("event") == "policy.decision" and e.get("room_id") in room_ids
    }
    assert decided_by == set(range(WORKERS)), f"only worker(s) {decided_by} decided"
    with httpx.Client(base_url=pstack.gateway_url, timeout=TIMEOUT) as client:
        for room in accepted:
            assert invite_in_sync(client, user, room.room_id) is not None
        assert len(invites_now(client, user)) == INVITES_PER_INVITEE
    assert [r for r in rooms if synapse_saw(pstack, invite_path(r.room_id))] == accepted


# --- what a v2 invite's policies are told ---------------------------------------------------


def test_v2_invite_from_a_user_of_another_server_is_refused_before_the_policies(
    pstack: Stack,
    remote_server: RemoteServer,
    gateway: httpx.Client,
    new_user: Callable[[str], RegisteredUser],
    tmp_path: Path,
) -> None:
    """InviteContext promises that ``inviter`` is a user of ``origin``. A v2 invite whose
    event claims a sender on another server must be refused as invalid (as v3 invites are,
    and as Synapse does), not handed to the policies and written to the audit trail as an
    invite from that other server."""
    user = new_user("deny-")
    room = new_room(remote_server)
    forged = room.make_invite(user.user_id, sender="@mallory:elsewhere.example")
    body = {"room_version": ROOM_VERSION, "event": forged, "invite_room_state": []}
    uri = f"/_matrix/federation/v2/invite/{q(room.room_id)}/{q(event_id_of(forged, ROOM_VERSION))}"
    answer = remote_server.federation_request(
        gateway, "PUT", uri, destination=pstack.server_name, content=body
    )
    assert answer.status_code in (400, 403), answer.text
    assert answer.json()["error"] != policies_for_tests.DENY_REASON, "the policies decided"
    assert rows_for_room(audit_rows(pstack, tmp_path), room.room_id) == []
