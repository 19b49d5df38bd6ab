"""The outbound edge against the real Synapse: the stack's homeserver sends all its
federation traffic through the gateway (``outbound_federation_restricted_to``).

The remote servers here are test servers on loopback that record what reaches them; the
complete picture with a second Synapse behind its own gateway is in
``test_outbound_federation.py``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from signedjson.key import decode_signing_key_base64, get_verify_key
from signedjson.sign import verify_signed_json

from gateway.demo.stack import Stack, prepare_stack, to_toml
from gateway.demo.synapse import RegisteredUser, free_port, synapse_process
from gateway.matrix.events import check_content_hash, redact
from gateway.matrix.signing import sign_event
from gateway.matrix.xmatrix import parse_x_matrix, verify_request
from tests.support.client_api import create_room
from tests.support.remote_server import ReceivedRequest, RemoteServer

pytestmark = pytest.mark.integration

TIMEOUT = httpx.Timeout(30.0)
V3_PREFIX = "/_matrix/federation/v3/invite/"
V2_PREFIX = "/_matrix/federation/v2/invite/"


class InviteAnsweringRemote(RemoteServer):
    """Signs and returns the invites it gets, on v2 and, if ``speaks_v3``, on v3."""

    def __init__(self, *, speaks_v3: bool) -> None:
        super().__init__()
        self.speaks_v3 = speaks_v3

    def _handle(self, request: ReceivedRequest) -> tuple[int, Any]:
        path = urlsplit(request.uri).path
        is_v3 = path.startswith(V3_PREFIX) and self.speaks_v3
        if request.method == "PUT" and (path.startswith(V2_PREFIX) or is_v3):
            with self._lock:
                self.requests.append(request)
            body = request.json()
            if is_v3:
                create = body["state"][0]
                version = create["content"].get("room_version", "1")
            else:
                version = body["room_version"]
            event = body["event"]
            signed = sign_event(event, version, self.server_name, self.signing_key)
            signed["hashes"] = event["hashes"]
            return 200, {"event": signed}
        return super()._handle(request)

    def invite_requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return [r for r in self.requests if "/invite/" in r.uri and r.method == "PUT"]


def homeserver_verify_key(stack: Stack) -> tuple[str, Any]:
    with open(stack.synapse.signing_key_path) as f:
        alg, version, seed = f.read().split()
    return f"{alg}:{version}", get_verify_key(decode_signing_key_base64(alg, version, seed))


def invite(stack: Stack, user: RegisteredUser, room_id: str, invitee: str) -> httpx.Response:
    return httpx.post(
        f"{stack.gateway_url}/_matrix/client/v3/rooms/{quote(room_id, safe='')}/invite",
        json={"user_id": invitee},
        headers={"Authorization": f"Bearer {user.access_token}"},
        timeout=TIMEOUT,
    )


def membership(stack: Stack, user: RegisteredUser, room_id: str, member: str) -> str | None:
    response = httpx.get(
        f"{stack.homeserver_url}/_matrix/client/v3/rooms/{quote(room_id, safe='')}"
        f"/state/m.room.member/{quote(member, safe='')}",
        headers={"Authorization": f"Bearer {user.access_token}"},
        timeout=TIMEOUT,
    )
    if response.status_code != 200:
        return None
    value: str | None = response.json().get("membership")
    return value


def metric(stack: Stack, name: str, **labels: str) -> float:
    text = httpx.get(f"{stack.internal_url}/metrics", verify=False, timeout=TIMEOUT).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def raw_proxy_request(stack: Stack, head: bytes) -> tuple[int, dict[str, Any]]:
    """Send one request head to the outbound listener; (status, JSON body)."""
    assert stack.outbound_url is not None
    address = urlsplit(stack.outbound_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as s:
        s.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    if b"transfer-encoding: chunked" in rest.lower():
        size, _, tail = body.partition(b"\r\n")
        body = tail[: int(size, 16)]
    return int(status_line.split()[1]), json.loads(body)


@pytest.fixture(scope="module")
def alice(register_user: Any) -> RegisteredUser:
    user: RegisteredUser = register_user()
    return user


@pytest.fixture(scope="module")
def v3_remote() -> Any:
    with InviteAnsweringRemote(speaks_v3=True) as server:
        yield server


@pytest.fixture(scope="module")
def v2_remote() -> Any:
    with InviteAnsweringRemote(speaks_v3=False) as server:
        yield server


# --- the listener ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "errcode"),
    [(b"", "M_MISSING_TOKEN"), (b"Proxy-Authorization: Bearer wrong-secret\r\n", "M_UNAUTHORIZED")],
)
def test_missing_or_wrong_bearer_is_refused(stack: Stack, auth: bytes, errcode: str) -> None:
    head = (
        b"GET matrix-federation://matrix.org/_matrix/federation/v1/version HTTP/1.1\r\n"
        b"Host: matrix.org\r\n" + auth + b"Connection: close\r\n\r\n"
    )
    status, body = raw_proxy_request(stack, head)
    assert status == 401
    assert body["errcode"] == errcode
    assert isinstance(body["error"], str)


def test_right_bearer_but_not_a_federation_request_is_400(stack: Stack) -> None:
    secret = stack.gateway_config["outbound"]["secret"]
    head = (
        b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: x\r\n"
        b"Proxy-Authorization: Bearer " + secret.encode() + b"\r\nConnection: close\r\n\r\n"
    )
    status, body = raw_proxy_request(stack, head)
    assert status == 400
    assert body["errcode"] == "M_UNRECOGNIZED"


def test_the_notary_is_asked_through_the_outbound_listener_and_answered_locally(
    stack: Stack,
) -> None:
    # `gateway check` makes the homeserver ask the notary for a key it has never seen.
    before = metric(
        stack, "gateway_outbound_requests_total", kind="keys", destination_class="notary"
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(stack.gateway_config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "outbound: ok" in result.stdout
    after = metric(
        stack,
        "gateway_outbound_requests_total",
        kind="keys",
        destination_class="notary",
        outcome="2xx",
    )
    assert after > before


# --- our invites ------------------------------------------------------------------------


def test_invite_to_a_v3_server_goes_out_as_v3_with_the_verified_create_event(
    stack: Stack, alice: RegisteredUser, v3_remote: InviteAnsweringRemote
) -> None:
    room_id = create_room(stack, alice, room_version="10")
    invitee = f"@bob:{v3_remote.server_name}"
    before = metric(stack, "gateway_outbound_invites_total", version="v3")
    answer = invite(stack, alice, room_id, invitee)
    assert answer.status_code == 200, answer.text
    requests = v3_remote.invite_requests()
    assert [urlsplit(r.uri).path for r in requests] == [V3_PREFIX + quote(room_id, safe="")]
    sent = requests[0]
    body = sent.json()
    # The create event is the room's, a full PDU signed by our homeserver.
    (create,) = body["state"]
    assert create["type"] == "m.room.create" and create["room_id"] == room_id
    key_id, verify_key = homeserver_verify_key(stack)
    assert check_content_hash(create)
    verify_signed_json(redact(create, "10"), stack.server_name, verify_key)
    # The invite is Synapse's own, and the stripped state has no create event left.
    assert body["event"]["state_key"] == invitee
    assert body["event"]["sender"] == alice.user_id
    assert not any(e.get("type") == "m.room.create" for e in body["invite_room_state"])
    # Signed as our server, for the destination, over the v3 request.
    auth = parse_x_matrix(sent.headers["authorization"])
    assert (auth.origin, auth.destination, auth.key_id) == (
        stack.server_name,
        v3_remote.server_name,
        key_id,
    )
    verify_request(
        auth,
        method="PUT",
        uri=sent.uri,
        destination=v3_remote.server_name,
        content=body,
        verify_key=verify_key,
    )
    # Synapse took the v3 answer as its v2 answer: the invite is in the room.
    assert membership(stack, alice, room_id, invitee) == "invite"
    assert metric(stack, "gateway_outbound_invites_total", version="v3") == before + 1


def test_invite_to_a_v2_only_server_falls_back_and_the_fallback_is_remembered(
    stack: Stack, alice: RegisteredUser, v2_remote: InviteAnsweringRemote
) -> None:
    room_id = create_room(stack, alice, room_version="11")
    fallbacks = metric(stack, "gateway_outbound_invite_fallbacks_total")
    first = f"@carol:{v2_remote.server_name}"
    assert invite(stack, alice, room_id, first).status_code == 200
    paths = [urlsplit(r.uri).path for r in v2_remote.invite_requests()]
    assert paths[0] == V3_PREFIX + quote(room_id, safe="")
    assert paths[1].startswith(V2_PREFIX + quote(room_id, safe=""))
    assert len(paths) == 2
    assert membership(stack, alice, room_id, first) == "invite"
    assert metric(stack, "gateway_outbound_invite_fallbacks_total") == fallbacks + 1
    # The original v2 request went out as Synapse signed it.
    v2 = v2_remote.invite_requests()[1]
    assert parse_x_matrix(v2.headers["authorization"]).origin == stack.server_name

    second = f"@dave:{v2_remote.server_name}"
    assert invite(stack, alice, room_id, second).status_code == 200
    paths = [urlsplit(r.uri).path for r in v2_remote.invite_requests()]
    assert len(paths) == 3 and paths[2].startswith(V2_PREFIX)  # no second v3 attempt
    assert membership(stack, alice, room_id, second) == "invite"


def test_room_version_1_invites_always_go_as_v2(stack: Stack, alice: RegisteredUser) -> None:
    with InviteAnsweringRemote(speaks_v3=True) as remote:
        room_id = create_room(stack, alice, room_version="1")
        invitee = f"@erin:{remote.server_name}"
        assert invite(stack, alice, room_id, invitee).status_code == 200
        paths = [urlsplit(r.uri).path for r in remote.invite_requests()]
        assert len(paths) == 1 and paths[0].startswith(V2_PREFIX)


def test_unreachable_destination_is_reported_to_the_inviter_in_bounded_time(
    stack: Stack, alice: RegisteredUser
) -> None:
    # A port nothing listens on: the gateway answers Synapse 502, Synapse fails the invite.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead_port = probe.getsockname()[1]
    probe.close()
    room_id = create_room(stack, alice, room_version="10")
    started = time.monotonic()
    answer = invite(stack, alice, room_id, f"@nobody:localhost:{dead_port}")
    assert answer.status_code >= 400
    assert "errcode" in answer.json()
    assert time.monotonic() - started < 30


@pytest.fixture(scope="module")
def unrouted_homeserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A Synapse that sends its federation traffic itself, not through the gateway."""
    stack = prepare_stack(
        tmp_path_factory.mktemp("unrouted"), port=free_port(), log_format="json", outbound=False
    )
    synapse = synapse_process(stack.synapse)
    synapse.start()
    try:
        synapse.wait_until_ready(timeout=90)
        yield stack
    finally:
        synapse.stop()


def test_check_says_when_the_homeserver_does_not_send_through_the_gateway(
    unrouted_homeserver: Stack,
) -> None:
    stack = unrouted_homeserver
    config = tomllib.loads(stack.gateway_config_path.read_text(encoding="utf8"))
    config["outbound"] = {"enabled": True, "bind": "127.0.0.1:0", "secret": "x" * 24}
    path = stack.data_dir / "with-outbound.toml"
    path.write_text(to_toml(config), encoding="utf8")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=stack.data_dir,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "notary: ok" in result.stdout
    assert "outbound: the homeserver does not send its federation requests" in result.stderr
    assert "outbound_federation_restricted_to" in result.stderr
