"""Two complete stacks federating on loopback, each a real Synapse behind its own gateway
(two demos side by side, distinct server names, TLS on the public listeners), plus a plain
Synapse without a gateway.

- A user on A invites a user on B: A's gateway sends the invite as v3, B's gateway verifies
  the create event and hands it to B's Synapse; the user on B joins, both send a message
  and each side reads the other's.
- The same invite towards the plain Synapse falls back to v2 and is delivered; the fallback
  is remembered.
- An egress rule on A refuses invites to one server; Synapse reports it to the inviter.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from gateway.demo.stack import Stack, StackProcesses, prepare_stack
from gateway.demo.synapse import (
    RegisteredUser,
    ServiceProcess,
    SynapseConfig,
    SynapseSettings,
    free_port,
    prepare_synapse,
    register_user,
    synapse_process,
)
from gateway.notary.certificate import ensure_self_signed_certificate
from tests.support.remote_server import RemoteServer

pytestmark = pytest.mark.integration

TIMEOUT = httpx.Timeout(30.0)


def client_call(
    url: str, user: RegisteredUser, method: str, path: str, body: Any = None
) -> httpx.Response:
    return httpx.request(
        method,
        url + path,
        json=body,
        headers={"Authorization": f"Bearer {user.access_token}"},
        timeout=TIMEOUT,
        verify=False,
    )


def new_user(stack_url: str, shared_secret: str, name: str) -> RegisteredUser:
    return register_user(
        stack_url, shared_secret, f"{name}-{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    )


def wait_for(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def log_events(stack: Stack, event: str) -> list[str]:
    text = stack.gateway_log_path.read_text(encoding="utf8", errors="replace")
    return [line for line in text.splitlines() if f'"event": "{event}"' in line]


@pytest.fixture(scope="module")
def denied_remote() -> Iterator[RemoteServer]:
    with RemoteServer() as server:
        yield server


@pytest.fixture(scope="module")
def stacks(
    tmp_path_factory: pytest.TempPathFactory, denied_remote: RemoteServer
) -> Iterator[tuple[Stack, Stack]]:
    egress = {
        "module": "policies.server_rules",
        "name": "egress",
        "options": {"deny_destinations": [denied_remote.server_name]},
    }
    a = prepare_stack(
        tmp_path_factory.mktemp("stack-a"),
        port=free_port(),
        log_format="json",
        public_tls=True,
        user_config={"policies": [egress]},
    )
    b = prepare_stack(
        tmp_path_factory.mktemp("stack-b"), port=free_port(), log_format="json", public_tls=True
    )
    running: list[StackProcesses] = []
    try:
        for stack in (a, b):
            processes = StackProcesses(stack)
            processes.start()
            running.append(processes)
        yield a, b
    finally:
        for processes in running:
            processes.stop()


@pytest.fixture(scope="module")
def plain_synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseConfig]:
    """A Synapse with no gateway: federation over TLS on the port in its name."""
    data_dir = tmp_path_factory.mktemp("plain-synapse")
    federation_port, client_port = free_port(), free_port()
    cert, key = ensure_self_signed_certificate(data_dir / "tls", "localhost")
    listeners = [
        {
            "port": client_port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": False,
            "resources": [{"names": ["client"], "compress": False}],
        },
        {
            "port": federation_port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": True,
            "resources": [{"names": ["federation"], "compress": False}],
        },
    ]
    config = prepare_synapse(
        SynapseSettings(
            data_dir=data_dir / "synapse",
            server_name=f"localhost:{federation_port}",
            port=client_port,
            extra={
                "listeners": listeners,
                "tls_certificate_path": str(cert),
                "tls_private_key_path": str(key),
            },
        )
    )
    process: ServiceProcess = synapse_process(config)
    process.start()
    try:
        process.wait_until_ready(timeout=90)
        yield config
    finally:
        process.stop()


def test_invite_between_gateways_goes_as_v3_and_both_sides_talk(
    stacks: tuple[Stack, Stack],
) -> None:
    a, b = stacks
    alice = new_user(a.homeserver_url, a.registration_shared_secret, "alice")
    bob = new_user(b.homeserver_url, b.registration_shared_secret, "bob")
    created = client_call(
        a.gateway_url, alice, "POST", "/_matrix/client/v3/createRoom", {"room_version": "11"}
    )
    assert created.status_code == 200, created.text
    room_id = created.json()["room_id"]
    room = quote(room_id, safe="")
    delivered_before = len(log_events(b, "invite.v3.delivered"))

    invited = client_call(
        a.gateway_url,
        alice,
        "POST",
        f"/_matrix/client/v3/rooms/{room}/invite",
        {"user_id": bob.user_id},
    )
    assert invited.status_code == 200, invited.text
    # A's gateway sent it as v3; B's gateway received a v3 invite and delivered it.
    assert any(room_id in line for line in log_events(a, "outbound.invite.v3"))
    assert len(log_events(b, "invite.v3.delivered")) == delivered_before + 1

    def bob_invited() -> Any:
        sync = client_call(b.gateway_url, bob, "GET", "/_matrix/client/v3/sync?timeout=0")
        return room_id in sync.json().get("rooms", {}).get("invite", {})

    wait_for("the invite in bob's sync", bob_invited)

    joined = client_call(b.gateway_url, bob, "POST", f"/_matrix/client/v3/join/{room}", {})
    assert joined.status_code == 200, joined.text

    def send(stack: Stack, user: RegisteredUser, text: str) -> None:
        txn = secrets.token_hex(4)
        answer = client_call(
            stack.gateway_url,
            user,
            "PUT",
            f"/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}",
            {"msgtype": "m.text", "body": text},
        )
        assert answer.status_code == 200, answer.text

    def sees(stack: Stack, user: RegisteredUser, text: str) -> Any:
        def check() -> bool:
            answer = client_call(
                stack.gateway_url,
                user,
                "GET",
                f"/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50",
            )
            return any(
                e.get("content", {}).get("body") == text for e in answer.json().get("chunk", [])
            )

        return wait_for(f"{text!r} at {stack.server_name}", check)

    send(a, alice, "hello from A")
    send(b, bob, "hello from B")
    sees(b, bob, "hello from A")
    sees(a, alice, "hello from B")


def test_invite_to_a_plain_synapse_falls_back_to_v2_and_is_remembered(
    stacks: tuple[Stack, Stack], plain_synapse: SynapseConfig
) -> None:
    a, _ = stacks
    alice = new_user(a.homeserver_url, a.registration_shared_secret, "alice")
    created = client_call(
        a.gateway_url, alice, "POST", "/_matrix/client/v3/createRoom", {"room_version": "10"}
    )
    room_id = created.json()["room_id"]
    room = quote(room_id, safe="")
    invitees = [
        new_user(plain_synapse.url, plain_synapse.registration_shared_secret, name)
        for name in ("carol", "dave")
    ]
    fallbacks_before = len(log_events(a, "outbound.invite.fallback"))
    for invitee in invitees:
        invited = client_call(
            a.gateway_url,
            alice,
            "POST",
            f"/_matrix/client/v3/rooms/{room}/invite",
            {"user_id": invitee.user_id},
        )
        assert invited.status_code == 200, invited.text

        def invited_there(user: RegisteredUser = invitee) -> Any:
            sync = client_call(plain_synapse.url, user, "GET", "/_matrix/client/v3/sync?timeout=0")
            return room_id in sync.json().get("rooms", {}).get("invite", {})

        wait_for("the invite at the plain Synapse", invited_there)
    # Only the first invite tried v3; the second went straight to v2.
    assert len(log_events(a, "outbound.invite.fallback")) == fallbacks_before + 1


def test_egress_rule_refuses_the_invite_and_synapse_tells_the_inviter(
    stacks: tuple[Stack, Stack], denied_remote: RemoteServer, tmp_path: Path
) -> None:
    a, _ = stacks
    alice = new_user(a.homeserver_url, a.registration_shared_secret, "alice")
    created = client_call(a.gateway_url, alice, "POST", "/_matrix/client/v3/createRoom", {})
    room = quote(created.json()["room_id"], safe="")
    invited = client_call(
        a.gateway_url,
        alice,
        "POST",
        f"/_matrix/client/v3/rooms/{room}/invite",
        {"user_id": f"@eve:{denied_remote.server_name}"},
    )
    assert invited.status_code >= 400
    assert invited.json().get("errcode")
    # Nothing reached the denied server but, perhaps, key requests: no invite.
    assert not any("/invite/" in r.uri for r in denied_remote.requests)
    refused = [line for line in log_events(a, "outbound.refused")]
    assert refused, "the gateway did not log the refusal"
    import subprocess
    import sys

    audit = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "decisions",
            "--json",
            "--limit",
            "100",
            "--config",
            str(a.gateway_config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert audit.returncode == 0, audit.stderr
    assert denied_remote.server_name in audit.stdout
    assert '"outbound"' in audit.stdout
