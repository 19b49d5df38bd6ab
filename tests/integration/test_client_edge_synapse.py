"""The client API through the gateway against a real Synapse: guests (MSC3419 and the guest
access module), appservice login (MSC2778), fallback keys (MSC2732), and CORS as a real
browser (Debian's Chromium, headless) uses it from another origin.

One stack for the module: Synapse with guest access and an appservice registered, the
gateway with ``[guests]`` on (small state-event bucket, the guest endpoint list enforced)
and ``[cors]`` at its defaults.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml

from gateway.demo.stack import Stack, StackProcesses, prepare_stack
from gateway.demo.synapse import RegisteredUser, free_port, register_user
from tests.support.client_api import create_room

TIMEOUT = httpx.Timeout(30.0)
AS_TOKEN = secrets.token_urlsafe(24)
GUEST_STATE_BURST = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("client-edge")
    registration = data_dir / "bridge-registration.yaml"
    registration.write_text(
        yaml.safe_dump(
            {
                "id": "gateway-test-bridge",
                "url": None,  # the homeserver pushes nothing to it
                "as_token": AS_TOKEN,
                "hs_token": secrets.token_urlsafe(24),
                "sender_localpart": "testbridge",
                "rate_limited": False,
                "namespaces": {
                    "users": [{"exclusive": True, "regex": "@bridge_.*"}],
                    "aliases": [],
                    "rooms": [],
                },
            }
        )
    )
    prepared = prepare_stack(
        data_dir,
        port=free_port(),
        log_format="json",
        outbound=False,
        synapse_extra={
            "allow_guest_access": True,
            "app_service_config_files": [str(registration)],
        },
        user_config={
            "guests": {
                "enabled": True,
                "restrict_endpoints": True,
                "state_rate": {"capacity": GUEST_STATE_BURST, "per_second": 0.001},
            }
        },
    )
    processes = StackProcesses(prepared)
    processes.start()
    try:
        yield prepared
    finally:
        processes.stop()


@pytest.fixture
def gateway(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.gateway_url, timeout=TIMEOUT) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def user(stack: Stack) -> RegisteredUser:
    localpart = f"user-{secrets.token_hex(4)}"
    return register_user(
        stack.homeserver_url,
        stack.registration_shared_secret,
        localpart,
        secrets.token_urlsafe(12),
    )


def guest(gateway: httpx.Client) -> tuple[str, str]:
    """Registers a guest through the gateway; returns (user ID, access token)."""
    answer = gateway.post("/_matrix/client/v3/register", params={"kind": "guest"}, json={})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return body["user_id"], body["access_token"]


def room_guests_may_use(stack: Stack, owner: RegisteredUser) -> str:
    return create_room(
        stack,
        owner,
        preset="public_chat",
        initial_state=[
            {
                "type": "m.room.guest_access",
                "state_key": "",
                "content": {"guest_access": "can_join"},
            }
        ],
        # Guests (power level 0) may send this state event type.
        power_level_content_override={"events": {"org.example.note": 0}},
    )


def q(identifier: str) -> str:
    return quote(identifier, safe="")


# --- guests ----------------------------------------------------------------------------------


def test_guests_state_events_are_rate_limited_by_the_gateway(
    stack: Stack, gateway: httpx.Client
) -> None:
    owner = user(stack)
    room = room_guests_may_use(stack, owner)
    guest_id, token = guest(gateway)
    whoami = gateway.get("/_matrix/client/v3/account/whoami", headers=bearer(token))
    assert whoami.status_code == 200 and whoami.json()["is_guest"] is True
    joined = gateway.post(f"/_matrix/client/v3/rooms/{q(room)}/join", headers=bearer(token))
    assert joined.status_code == 200, joined.text

    state = f"/_matrix/client/v3/rooms/{q(room)}/state/org.example.note/"
    for n in range(GUEST_STATE_BURST):
        answer = gateway.put(state, json={"n": n}, headers=bearer(token))
        assert answer.status_code == 200, answer.text  # MSC3419: guests may send state
    refused = gateway.put(state, json={"n": "over"}, headers=bearer(token))
    assert refused.status_code == 429, refused.text
    assert refused.json()["errcode"] == "M_LIMIT_EXCEEDED"
    assert refused.json()["retry_after_ms"] > 0
    # The refused event never reached Synapse.
    now = httpx.get(
        f"{stack.homeserver_url}{state}", headers=bearer(owner.access_token), timeout=TIMEOUT
    )
    assert now.json() == {"n": GUEST_STATE_BURST - 1}
    # A registered user is not limited by the gateway.
    gateway.post(f"/_matrix/client/v3/rooms/{q(room)}/join", headers=bearer(owner.access_token))
    for n in range(GUEST_STATE_BURST + 2):
        answer = gateway.put(state, json={"owner": n}, headers=bearer(owner.access_token))
        assert answer.status_code == 200, answer.text
    # Guests' messages have their own, larger bucket.
    sent = gateway.put(
        f"/_matrix/client/v3/rooms/{q(room)}/send/m.room.message/t1",
        json={"msgtype": "m.text", "body": f"hello from {guest_id}"},
        headers=bearer(token),
    )
    assert sent.status_code == 200, sent.text


def test_guests_keep_to_the_spec_endpoints_when_the_gateway_enforces_them(
    stack: Stack, gateway: httpx.Client
) -> None:
    _, token = guest(gateway)
    # Synapse lets guests list their joined rooms; the guest module does not list it.
    direct = httpx.get(
        f"{stack.homeserver_url}/_matrix/client/v3/joined_rooms",
        headers=bearer(token),
        timeout=TIMEOUT,
    )
    assert direct.status_code == 200
    answer = gateway.get("/_matrix/client/v3/joined_rooms", headers=bearer(token))
    assert answer.status_code == 403
    assert answer.json()["errcode"] == "M_GUEST_ACCESS_FORBIDDEN"
    assert gateway.get("/_matrix/client/v3/sync", params={"timeout": "0", "access_token": token})
    # A registered user is not a guest.
    registered = user(stack)
    own = gateway.get("/_matrix/client/v3/joined_rooms", headers=bearer(registered.access_token))
    assert own.status_code == 200


# --- appservice login (MSC2778) -------------------------------------------------------------


def test_appservice_login_works_through_the_gateway(stack: Stack, gateway: httpx.Client) -> None:
    flows = gateway.get("/_matrix/client/v3/login").json()["flows"]
    assert {"type": "m.login.application_service"} in [{"type": f["type"]} for f in flows], flows
    localpart = f"bridge_{secrets.token_hex(4)}"
    registered = gateway.post(
        "/_matrix/client/v3/register",
        json={"type": "m.login.application_service", "username": localpart},
        headers=bearer(AS_TOKEN),
    )
    assert registered.status_code == 200, registered.text
    user_id = registered.json()["user_id"]

    login = {
        "type": "m.login.application_service",
        "identifier": {"type": "m.id.user", "user": localpart},
    }
    answer = gateway.post("/_matrix/client/v3/login", json=login, headers=bearer(AS_TOKEN))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["user_id"] == user_id and body["device_id"]
    whoami = gateway.get("/_matrix/client/v3/account/whoami", headers=bearer(body["access_token"]))
    assert whoami.status_code == 200
    assert (whoami.json()["user_id"], whoami.json()["is_guest"]) == (user_id, False)
    assert whoami.json()["device_id"] == body["device_id"]

    # Without the appservice's token, or outside its namespace, there is no login.
    unauthenticated = gateway.post("/_matrix/client/v3/login", json=login)
    assert unauthenticated.status_code == 401, unauthenticated.text
    outside = dict(login, identifier={"type": "m.id.user", "user": f"plain_{localpart}"})
    foreign = gateway.post("/_matrix/client/v3/login", json=outside, headers=bearer(AS_TOKEN))
    assert foreign.status_code in (400, 403), foreign.text


# --- fallback keys (MSC2732) ----------------------------------------------------------------


def _key(n: int, *, fallback: bool = False) -> dict[str, Any]:
    key: dict[str, Any] = {
        "key": f"curve25519-public-key-{n:04d}-" + "A" * 20,
        "signatures": {"@x:y": {"ed25519:DEV": "sig"}},
    }
    if fallback:
        key["fallback"] = True
    return key


def test_fallback_keys_are_uploaded_claimed_and_reported_in_sync(
    stack: Stack, gateway: httpx.Client
) -> None:
    alice, bob = user(stack), user(stack)
    uploaded = gateway.post(
        "/_matrix/client/v3/keys/upload",
        json={
            "one_time_keys": {"signed_curve25519:AAAAAQ": _key(1)},
            "fallback_keys": {"signed_curve25519:AAAAAg": _key(2, fallback=True)},
        },
        headers=bearer(alice.access_token),
    )
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["one_time_key_counts"] == {"signed_curve25519": 1}

    since: list[str] = []

    def sync() -> dict[str, Any]:
        # Incremental syncs: Synapse answers an identical request from its sync cache.
        answer = gateway.get(
            "/_matrix/client/v3/sync",
            params={"timeout": "0", **({"since": since[-1]} if since else {})},
            headers=bearer(alice.access_token),
        )
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        since.append(body["next_batch"])
        return body

    first = sync()
    assert first["device_unused_fallback_key_types"] == ["signed_curve25519"]
    assert first["device_one_time_keys_count"].get("signed_curve25519") == 1

    def claim() -> dict[str, Any]:
        answer = gateway.post(
            "/_matrix/client/v3/keys/claim",
            json={"one_time_keys": {alice.user_id: {alice.device_id: "signed_curve25519"}}},
            headers=bearer(bob.access_token),
        )
        assert answer.status_code == 200, answer.text
        keys: dict[str, Any] = answer.json()["one_time_keys"][alice.user_id][alice.device_id]
        return keys

    assert claim() == {"signed_curve25519:AAAAAQ": _key(1)}  # the one-time key first
    # One-time keys are gone: the fallback key is handed out (again and again).
    assert claim() == {"signed_curve25519:AAAAAg": _key(2, fallback=True)}
    assert claim() == {"signed_curve25519:AAAAAg": _key(2, fallback=True)}
    # Used now: the client learns it should upload a new one.
    assert sync()["device_unused_fallback_key_types"] == []
    again = gateway.post(
        "/_matrix/client/v3/keys/upload",
        json={"fallback_keys": {"signed_curve25519:AAAAAw": _key(3, fallback=True)}},
        headers=bearer(alice.access_token),
    )
    assert again.status_code == 200, again.text
    assert sync()["device_unused_fallback_key_types"] == ["signed_curve25519"]
    assert claim() == {"signed_curve25519:AAAAAw": _key(3, fallback=True)}


def test_synapse_reads_only_the_stable_fallback_key_name(
    stack: Stack, gateway: httpx.Client
) -> None:
    carol = user(stack)
    unstable = gateway.post(
        "/_matrix/client/v3/keys/upload",
        json={
            "org.matrix.msc2732.fallback_keys": {"signed_curve25519:AAAAAQ": _key(1, fallback=True)}
        },
        headers=bearer(carol.access_token),
    )
    synced = gateway.get(
        "/_matrix/client/v3/sync", params={"timeout": "0"}, headers=bearer(carol.access_token)
    )
    assert (unstable.status_code, synced.status_code) == (200, 200), unstable.text
    # Passed through as sent; Synapse 1.163 ignores the unstable name.
    assert synced.json()["device_unused_fallback_key_types"] == []


# --- CORS in a real browser ---------------------------------------------------------------

CHROMIUM_HINT = (
    "the CORS test needs Chromium: apt-get install -y chromium "
    "(scripts/test.sh installs it when missing)"
)


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(CHROMIUM_HINT)


PAGE = """<!doctype html>
<html><head><title>pending</title></head><body><script>
const gateway = %(gateway)s, token = %(token)s, room = %(room)s;
async function call(method, path, body) {
  try {
    const answer = await fetch(gateway + path, {
      method,
      headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"},
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return {status: answer.status, body: await answer.json()};
  } catch (e) {
    return {error: String(e)};
  }
}
(async () => {
  const results = {origin: location.origin};
  results.whoami = await call("GET", "/_matrix/client/v3/account/whoami");
  const state = "/_matrix/client/v3/rooms/" + encodeURIComponent(room) + "/state/org.example.note/";
  results.states = [];
  for (let n = 0; n < %(burst)d + 1; n++) results.states.push(await call("PUT", state, {n}));
  await fetch("/report", {method: "POST", body: JSON.stringify(results)});
  document.title = "done";
})();
</script></body></html>
"""


class _Page(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, html: str) -> None:
        self.html = html.encode()
        self.reports: queue.Queue[Any] = queue.Queue()
        super().__init__(("127.0.0.1", 0), _PageHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _PageHandler(BaseHTTPRequestHandler):
    server: _Page

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/" else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.server.html)))
        self.end_headers()
        self.wfile.write(self.server.html)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.server.reports.put(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def preflights_answered(stack: Stack) -> float:
    metrics = httpx.get(f"{stack.internal_url}/metrics", verify=False, timeout=TIMEOUT).text
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("gateway_requests_total{") and 'route="cors_preflight"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_browser_on_another_origin_uses_the_client_api_through_the_gateway(
    stack: Stack, gateway: httpx.Client, tmp_path: Path
) -> None:
    browser = chromium()
    owner = user(stack)
    room = room_guests_may_use(stack, owner)
    guest_id, token = guest(gateway)
    joined = gateway.post(f"/_matrix/client/v3/rooms/{q(room)}/join", headers=bearer(token))
    assert joined.status_code == 200, joined.text
    page = _Page(
        PAGE
        % {
            "gateway": json.dumps(stack.gateway_url),
            "token": json.dumps(token),
            "room": json.dumps(room),
            "burst": GUEST_STATE_BURST,
        }
    )
    assert page.url.rsplit(":", 1)[1] != stack.gateway_url.rsplit(":", 1)[1]  # another origin
    threading.Thread(target=page.serve_forever, daemon=True).start()
    preflights_before = preflights_answered(stack)
    process = subprocess.Popen(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=30000",
            "--dump-dom",
            page.url + "/",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    try:
        try:
            report = page.reports.get(timeout=90)
        except queue.Empty:
            process.kill()
            _, err = process.communicate(timeout=10)
            pytest.fail(f"the page reported nothing; chromium said:\n{err.decode()[-3000:]}")
        dom, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        page.shutdown()
        page.server_close()

    assert report["origin"] == page.url
    assert report["whoami"] == {
        "status": 200,
        "body": {
            "user_id": guest_id,
            "is_guest": True,
            "device_id": report["whoami"]["body"]["device_id"],
        },
    }
    states = report["states"]
    assert [s.get("status") for s in states] == [200] * GUEST_STATE_BURST + [429], states
    # The gateway's own 429 is readable by the page: it carries the CORS headers too.
    assert states[-1]["body"]["errcode"] == "M_LIMIT_EXCEEDED"
    assert states[-1]["body"]["retry_after_ms"] > 0
    assert b"<title>done</title>" in dom
    # The browser asked first (Authorization is not a simple header) and the gateway answered.
    assert preflights_answered(stack) >= preflights_before + 1
