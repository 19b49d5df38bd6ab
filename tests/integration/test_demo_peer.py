"""The README walkthrough: ``gateway demo --config examples/demo-policies.toml``, then
``gateway demo-peer`` invites, joins and knocks, each answered as the policies decide.

The demo runs as a subprocess exactly as a new user starts it; the peer commands too. What
they print is checked, and so is what reached the homeserver (alice's ``/sync``, the
restricted room's members).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from gateway.demo.synapse import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "demo-policies.toml"
TIMEOUT = httpx.Timeout(30.0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data_dir = tmp_path_factory.mktemp("demo-peer") / "demo-data"
    command = [sys.executable, "-m", "gateway", "demo", "--data-dir", str(data_dir)]
    command += ["--port", str(free_port()), "--config", str(EXAMPLE)]
    # Started from elsewhere: the example's relative ban list must resolve next to it.
    process = subprocess.Popen(
        command,
        cwd=data_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    demo_file = data_dir / "demo.json"
    try:
        deadline = time.monotonic() + 150
        while not demo_file.exists():
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            assert time.monotonic() < deadline, "the demo did not start in time"
            time.sleep(0.5)
        info: dict[str, Any] = json.loads(demo_file.read_text())
        info["data_dir"] = str(data_dir)
        yield info
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def peer(demo: dict[str, Any], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo-peer", *args, "--data-dir", demo["data_dir"]],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def results(output: str) -> list[str]:
    return re.findall(r"^  result: (.*)$", output, flags=re.MULTILINE)


def alice_token(demo: dict[str, Any]) -> str:
    login = httpx.post(
        f"{demo['gateway_url']}/_matrix/client/v3/login",
        json={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "alice"},
            "password": "alice-password",
        },
        timeout=TIMEOUT,
    )
    assert login.status_code == 200, login.text
    token: str = login.json()["access_token"]
    return token


def invited_rooms(demo: dict[str, Any]) -> set[str]:
    sync = httpx.get(
        f"{demo['gateway_url']}/_matrix/client/v3/sync",
        params={"timeout": "0"},
        headers={"Authorization": f"Bearer {alice_token(demo)}"},
        timeout=TIMEOUT,
    )
    assert sync.status_code == 200, sync.text
    return set(sync.json().get("rooms", {}).get("invite", {}))


def peer_name(output: str) -> str:
    match = re.search(r"^demo peer (localhost:\d+): ", output, re.MULTILINE)
    assert match, output
    return match.group(1)


def invite_room(output: str) -> str:
    match = re.search(r" to (!\S+) \(room version", output)
    assert match, output
    return match.group(1)


def test_v3_invite_is_delivered_unless_a_policy_refuses_it(demo: dict[str, Any]) -> None:
    alice = f"@alice:{demo['server_name']}"
    delivered = peer(demo, "invite", "--to", alice)
    assert re.search(r"PUT /_matrix/federation/v3/invite/\S+ -> 200$", delivered, re.MULTILINE)
    assert "policies: every policy allowed invite" in delivered
    signers = ", ".join(sorted([demo["server_name"], peer_name(delivered)]))
    assert results(delivered) == [f"delivered to the homeserver (signed by {signers})"]

    banned = peer(demo, "invite", "--to", alice, "--from", "spammer")
    assert re.search(
        r"-> 403 M_FORBIDDEN: user @spammer:localhost:\d+ is banned by this server's policy"
        r" list: known spammer \(demo rule\)$",
        banned,
        re.MULTILINE,
    )
    assert "policy policy_lists: deny at invite: user @spammer:" in banned
    assert results(banned) == ["refused by policy policy_lists (403 M_FORBIDDEN)"]

    old_room = peer(demo, "invite", "--to", alice, "--room-version", "6")
    assert "-> 400 M_INCOMPATIBLE_ROOM_VERSION" in old_room
    assert results(old_room) == [
        "refused by policy min_room_version (400 M_INCOMPATIBLE_ROOM_VERSION)"
    ]

    # Only the delivered invite reached alice.
    invites = invited_rooms(demo)
    assert invite_room(delivered) in invites
    assert invite_room(banned) not in invites
    assert invite_room(old_room) not in invites


def test_restricted_join_needs_the_allowed_room_and_a_banned_user_is_refused(
    demo: dict[str, Any],
) -> None:
    output = peer(demo, "join")
    # Not yet in the allowed room: the room's rule refuses (no policy does); then bob joins
    # the public room, and after that the restricted one, authorised by alice.
    assert results(output) == ["refused (403 M_FORBIDDEN), not by a policy", "joined", "joined"]
    assert f"(the join is authorised via @alice:{demo['server_name']}" in output
    match = re.search(r"the restricted room (!\S+), which", output)
    assert match, output
    members = httpx.get(
        f"{demo['gateway_url']}/_matrix/client/v3/rooms/{quote(match.group(1))}/joined_members",
        headers={"Authorization": f"Bearer {alice_token(demo)}"},
        timeout=TIMEOUT,
    )
    assert members.status_code == 200, members.text
    assert f"@bob:{peer_name(output)}" in members.json()["joined"]

    banned = peer(demo, "join", "--from", "spammer")
    assert results(banned) == ["refused by policy policy_lists (403 M_FORBIDDEN)"] * 2
    assert "policy policy_lists: deny at make_join: user @spammer:" in banned


def test_knock_goes_through_unless_a_policy_refuses_it(demo: dict[str, Any]) -> None:
    knocked = peer(demo, "knock")
    bob = f"@bob:{peer_name(knocked)}"
    assert "make_knock -> 200" in knocked and "send_knock -> 200" in knocked
    assert results(knocked) == [
        f"knocked: the homeserver shows {bob}'s knock to the room's members"
    ]
    match = re.search(r"knocks on (!\S+),", knocked)
    assert match, knocked
    member = httpx.get(
        f"{demo['gateway_url']}/_matrix/client/v3/rooms/{quote(match.group(1))}"
        f"/state/m.room.member/{quote(bob)}",
        headers={"Authorization": f"Bearer {alice_token(demo)}"},
        timeout=TIMEOUT,
    )
    assert member.status_code == 200, member.text
    assert member.json()["membership"] == "knock"

    banned = peer(demo, "knock", "--from", "spammer")
    assert "make_knock -> 403 M_FORBIDDEN" in banned
    assert "send_knock" not in banned
    assert results(banned) == ["refused by policy policy_lists (403 M_FORBIDDEN)"]
