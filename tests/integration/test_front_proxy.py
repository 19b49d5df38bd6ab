"""Front-proxy mode: a real nginx, HAProxy and Caddy (Debian's packages), each configured
with `gateway proxy-config --for <proxy>`, in front of the gateway and a real Synapse.

The stack of this module is the demo's, with ``public.x_forwarded = true`` (what the mode
needs); every test runs once per proxy, each proxy in turn in front of the same stack, on
loopback and plain HTTP. Each proxy's own log names the upstream that answered each request
(nginx's access log, HAProxy's request log, the upstream roundtrips in Caddy's debug log),
so every test can see which way a request went; the gateway's own public listener answers
the same requests directly, and the two answers must agree (front-proxy mode behaves as
standalone mode).
"""

from __future__ import annotations

import http.client
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest

from gateway.demo.stack import Stack, StackProcesses, prepare_stack, to_toml
from gateway.demo.synapse import RegisteredUser, ServiceProcess, free_port
from gateway.demo.synapse import register_user as register
from tests.conformance.test_v3_invites import delegation_key_ids
from tests.integration.test_restricted_joins import (
    AUTHORISING_USER,
    assert_signed_by,
    homeserver_verify_key,
    join,
    joined_members,
    make_join,
    restricted_room,
)
from tests.integration.test_v3_invites import invite_in_sync, send_v3_invite, v3_invite_body
from tests.support import client_api
from tests.support.caddy import CADDY_MISSING, caddy_binary, caddy_service
from tests.support.caddy import log_entries as caddy_log_entries
from tests.support.haproxy import HAPROXY_MISSING, haproxy_binary, haproxy_service
from tests.support.haproxy import log_entries as haproxy_log_entries
from tests.support.nginx import NGINX_MISSING, access_log_lines, nginx_binary, nginx_service
from tests.support.pdus import make_remote_room
from tests.support.remote_server import RemoteServer

pytestmark = [pytest.mark.integration]

TIMEOUT = httpx.Timeout(30.0)
#: The address the clients of these tests connect from (loopback, but not the proxy's own).
CLIENT_ADDRESS = "127.0.0.3"
SPOOFED = "203.0.113.9"


#: The proxies run for real, each in front of the same stack.
PROXY_KINDS = ("nginx", "haproxy", "caddy")


@dataclass
class FrontProxy:
    kind: str
    stack: Stack
    url: str
    directory: Path
    snippet: str
    #: (upstream as the proxy logged it, request line) for each request so far
    log_entries: Callable[[], list[tuple[str, str]]]
    #: the logged upstream of each route: {"gateway": ..., "homeserver": ...}
    upstreams: dict[str, str]

    def upstream_of(self, request_line: str) -> str:
        """Which upstream the proxy sent ``request_line`` to: "gateway", "homeserver", or
        the raw value. Waits a moment for the log line."""
        names = {logged: name for name, logged in self.upstreams.items()}
        deadline = time.monotonic() + 5
        while True:
            for upstream, logged_line in reversed(self.log_entries()):
                if logged_line == request_line:
                    return names.get(upstream, upstream)
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.kind} logged no {request_line!r}")
            time.sleep(0.05)


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def _nginx_log_entries(directory: Path) -> list[tuple[str, str]]:
    entries = []
    for line in access_log_lines(directory):
        upstream, _, rest = line.partition(" ")
        entries.append((upstream, rest.split(" ", 1)[1].removeprefix('"').removesuffix('"')))
    return entries


@pytest.fixture(scope="module")
def front_proxy_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The session's Synapse and a gateway configured for front-proxy mode, running."""
    stack = prepare_stack(tmp_path_factory.mktemp("front-proxy"), port=free_port())
    # What front-proxy mode needs: the proxy's X-Forwarded-* are the client's.
    config = dict(stack.gateway_config)
    config["public"] = {**config["public"], "x_forwarded": True}
    # The client API straight to Synapse (with [cors] or [guests] on it goes through the
    # gateway; tests/unit/app/test_proxy_config.py shows that routing).
    config["cors"] = {"enabled": False}
    stack.gateway_config_path.write_text(to_toml(config), encoding="utf8")
    processes = StackProcesses(stack)
    try:
        processes.start()
        yield stack
    finally:
        processes.stop()


def _proxy_service(kind: str, directory: Path, snippet: str, ready_url: str) -> ServiceProcess:
    if kind == "nginx":
        nginx = nginx_binary()
        if nginx is None:
            pytest.fail(NGINX_MISSING)
        return nginx_service(nginx, directory, snippet, ready_url=ready_url)
    if kind == "haproxy":
        haproxy = haproxy_binary()
        if haproxy is None:
            pytest.fail(HAPROXY_MISSING)
        return haproxy_service(haproxy, directory, snippet, ready_url=ready_url)
    caddy = caddy_binary()
    if caddy is None:
        pytest.fail(CADDY_MISSING)
    return caddy_service(caddy, directory, snippet, ready_url=ready_url)


@pytest.fixture(scope="module", params=PROXY_KINDS)
def front_proxy(request: pytest.FixtureRequest, front_proxy_stack: Stack) -> Iterator[FrontProxy]:
    kind: str = request.param
    port = free_port()
    # Plain HTTP on loopback: Caddy's site address says so with its scheme.
    listen = f"http://127.0.0.1:{port}" if kind == "caddy" else f"127.0.0.1:{port}"
    generated = subprocess.run(
        [
            *(sys.executable, "-m", "gateway", "proxy-config", "--for", kind),
            *("--config", str(front_proxy_stack.gateway_config_path), "--listen", listen),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert generated.returncode == 0, generated.stderr
    directory = Path(tempfile.mkdtemp(prefix=f"front-proxy-{kind}-"))
    ready_url = f"http://127.0.0.1:{port}/_matrix/federation/v1/version"
    proxy: ServiceProcess | None = None
    try:
        proxy = _proxy_service(kind, directory, generated.stdout, ready_url)
        proxy.start()
        proxy.wait_until_ready(timeout=30)
        if kind == "haproxy":
            # HAProxy logs the backend's name, not its address.
            upstreams = {"gateway": "mxgw_gateway", "homeserver": "mxgw_homeserver"}
            entries = partial(haproxy_log_entries, directory)
        else:
            upstreams = {
                "gateway": _host_port(front_proxy_stack.gateway_url),
                "homeserver": _host_port(front_proxy_stack.homeserver_url),
            }
            reader = _nginx_log_entries if kind == "nginx" else caddy_log_entries
            entries = partial(reader, directory)
        yield FrontProxy(
            kind=kind,
            stack=front_proxy_stack,
            url=f"http://127.0.0.1:{port}",
            directory=directory,
            snippet=generated.stdout,
            log_entries=entries,
            upstreams=upstreams,
        )
    finally:
        try:
            if proxy is not None:
                proxy.stop()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def proxy_client(front_proxy: FrontProxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=front_proxy.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def new_user(front_proxy_stack: Stack) -> Callable[[], RegisteredUser]:
    def new_user() -> RegisteredUser:
        return register(
            front_proxy_stack.homeserver_url,
            front_proxy_stack.registration_shared_secret,
            f"fp-{secrets.token_hex(4)}",
            secrets.token_urlsafe(12),
        )

    return new_user


def raw_get(url: str, target: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET with the request target sent exactly as given (no client-side normalising)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(
        parts.hostname or "", parts.port, timeout=30, source_address=(CLIENT_ADDRESS, 0)
    )
    try:
        conn.request("GET", target, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --- routing: every spelling goes where the gateway would take it -------------------------------

ROOM = quote("!room:example.org", safe="")
USER = quote("@someone:example.org", safe="")

SPELLINGS = [
    # (raw target, where the proxy must send it)
    ("/_matrix/federation/v1/version", "homeserver"),
    ("/_matrix/client/versions", "homeserver"),
    ("/_matrix/federation/v1/query/directory?room_alias=%23a%3Aexample.org", "homeserver"),
    ("/_matrix/key/v2/server", "gateway"),
    ("/_matrix/key/v2/server/", "gateway"),
    ("/_matrix/%6Bey/v2/server", "gateway"),
    ("/_matrix/key%2Fv2/server", "gateway"),
    ("/_matrix//key/v2/server", "gateway"),
    ("/_matrix/federation/../key/v2/server", "gateway"),
    ("/_matrix/federation/%2E%2E/key/v2/server", "gateway"),
    ("/_matrix/./key/v2/server", "gateway"),
    (f"/_matrix/federation/v1/make_join/{ROOM}/{USER}?ver=10", "gateway"),
    (f"/_matrix/federation/v1/make_knock/{ROOM}/{USER}?ver=10", "gateway"),
    (f"/_matrix/federation/v1/%6Dake_join/{ROOM}/{USER}", "gateway"),
    (f"/_matrix/federation/v1/make_join%2F{ROOM}/{USER}", "gateway"),
    # A parameter that, decoded and resolved, would carry the path out of the owned area.
    (f"/_matrix/federation/v1/make_join/..%2F..%2F..%2Fclient/{USER}", "gateway"),
    (f"/_matrix/federation/v1/make_join/%2e%2e/{USER}", "gateway"),
    ("/_synapse/admin/v1/server_version", "gateway"),
    ("/_synapse/%61dmin/v1/server_version", "gateway"),
    ("/_matrix/../_synapse/admin/v1/server_version", "gateway"),
    ("/_synapse/metrics", "gateway"),
    # The other two prefixes that go straight to the homeserver (a leading dot is no dot
    # segment).
    ("/.well-known/matrix/server", "homeserver"),
    ("/_synapse/client/nothing-here", "homeserver"),
    ("/elsewhere", "gateway"),
]


@pytest.mark.parametrize(("target", "expected"), SPELLINGS)
def test_each_spelling_goes_where_the_gateway_would_take_it_and_is_answered_alike(
    front_proxy: FrontProxy, target: str, expected: str
) -> None:
    via_proxy, proxied_body = raw_get(front_proxy.url, target)
    assert front_proxy.upstream_of(f"GET {target} HTTP/1.1") == expected
    direct, direct_body = raw_get(front_proxy.stack.gateway_url, target)
    assert via_proxy == direct, (proxied_body, direct_body)
    if target.endswith("server_version"):
        assert via_proxy == 404 and b"M_UNRECOGNIZED" in proxied_body


# --- client traffic ---------------------------------------------------------------------------


def test_client_traffic_reaches_synapse_through_the_front_proxy(
    front_proxy: FrontProxy,
    proxy_client: httpx.Client,
    new_user: Callable[[], RegisteredUser],
) -> None:
    user = new_user()
    login = proxy_client.post(
        "/_matrix/client/v3/login",
        json={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user.localpart},
            "password": user.password,
        },
    )
    assert login.status_code == 200, login.text
    auth = {"Authorization": f"Bearer {login.json()['access_token']}"}
    created = proxy_client.post("/_matrix/client/v3/createRoom", json={}, headers=auth)
    assert created.status_code == 200, created.text
    room_id = created.json()["room_id"]
    txn = secrets.token_hex(4)
    sent = proxy_client.put(
        f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/send/m.room.message/{txn}",
        json={"msgtype": "m.text", "body": f"through {front_proxy.kind}"},
        headers=auth,
    )
    assert sent.status_code == 200, sent.text
    sync = proxy_client.get("/_matrix/client/v3/sync", params={"timeout": "0"}, headers=auth)
    assert sync.status_code == 200, sync.text
    timeline = sync.json()["rooms"]["join"][room_id]["timeline"]["events"]
    assert f"through {front_proxy.kind}" in [e["content"].get("body") for e in timeline]
    # All of that went straight to Synapse ...
    assert front_proxy.upstream_of("POST /_matrix/client/v3/createRoom HTTP/1.1") == "homeserver"
    # ... but the admin API (shared-secret registration, say) stays private.
    blocked = proxy_client.get("/_synapse/admin/v1/register")
    assert blocked.status_code == 404 and blocked.json()["errcode"] == "M_UNRECOGNIZED"


# --- owned endpoints --------------------------------------------------------------------------


def test_v3_invite_through_the_front_proxy(
    front_proxy: FrontProxy,
    proxy_client: httpx.Client,
    remote_server: RemoteServer,
    new_user: Callable[[], RegisteredUser],
) -> None:
    invitee = new_user()
    room = make_remote_room("11", remote_server.server_name, remote_server.signing_key)
    body = v3_invite_body(room, room.make_invite(invitee.user_id))
    answer = send_v3_invite(remote_server, proxy_client, front_proxy.stack, room.room_id, body)
    assert answer.status_code == 200, answer.text
    assert front_proxy.stack.server_name in answer.json()["event"]["signatures"]
    uri = f"/_matrix/federation/v3/invite/{quote(room.room_id, safe='')}"
    assert front_proxy.upstream_of(f"PUT {uri} HTTP/1.1") == "gateway"
    assert invite_in_sync(proxy_client, invitee, room.room_id) is not None


def test_restricted_join_through_the_front_proxy(
    front_proxy: FrontProxy,
    proxy_client: httpx.Client,
    remote_server: RemoteServer,
    new_user: Callable[[], RegisteredUser],
) -> None:
    stack = front_proxy.stack
    alice = new_user()
    public = client_api.create_room(stack, alice, room_version="10", preset="public_chat")
    restricted = restricted_room(stack, alice, [public], "restricted")
    user = f"@fp-joiner:{remote_server.server_name}"

    stranger = f"@fp-stranger:{remote_server.server_name}"
    refused = make_join(remote_server, proxy_client, stack.server_name, restricted, stranger)
    assert refused.status_code == 403, refused.text

    join(remote_server, proxy_client, stack.server_name, public, user)
    template, answer = join(remote_server, proxy_client, stack.server_name, restricted, user)
    assert template["content"][AUTHORISING_USER] == alice.user_id
    assert_signed_by(answer["event"], stack.server_name, homeserver_verify_key(stack))
    assert user in joined_members(stack, alice, restricted)


def test_no_delegation_key_leaks_through_the_front_proxy_in_any_spelling(
    front_proxy: FrontProxy,
    proxy_client: httpx.Client,
    remote_server: RemoteServer,
    new_user: Callable[[], RegisteredUser],
) -> None:
    stack = front_proxy.stack
    invitee = new_user()
    room = make_remote_room("11", remote_server.server_name, remote_server.signing_key)
    body = v3_invite_body(room, room.make_invite(invitee.user_id))
    answer = send_v3_invite(remote_server, proxy_client, stack, room.room_id, body)
    assert answer.status_code == 200, answer.text

    remote = quote(remote_server.server_name, safe="")
    key_id = quote(f"ed25519:{remote_server.key_version}", safe="")
    # Synapse itself re-serves the delegation key it cached: the proxy has something to leak.
    leaky_status, leaky = raw_get(stack.homeserver_url, f"/_matrix/key/v2/query/{remote}/")
    assert leaky_status == 200 and delegation_key_ids(_json(leaky))

    spellings = [
        f"/_matrix/key/v2/query/{remote}",
        f"/_matrix/key/v2/query/{remote}/",
        f"/_matrix/key/v2/query/{remote}/{key_id}",
        f"/_matrix/%6Bey/v2/query/{remote}/",
        f"/_matrix/key%2Fv2/query/{remote}/",
        f"/_matrix//key/v2/query/{remote}/",
        f"/_matrix/key/v2//query/{remote}/",
        f"/_matrix/federation/../key/v2/query/{remote}/",
        f"/_matrix/federation/%2e%2e/key/v2/query/{remote}/",
        f"/_matrix/./key/v2/query/{remote}/",
    ]
    served = 0
    for target in spellings:
        status, body_bytes = raw_get(front_proxy.url, target)
        if status == 200:
            served += 1
            assert delegation_key_ids(_json(body_bytes)) == [], target
        assert front_proxy.upstream_of(f"GET {target} HTTP/1.1") == "gateway", target
    assert served >= 3  # the plain spellings are answered, not just refused

    for uri in ("/_matrix/key/v2/query", "/_matrix/%6Bey/v2/query", "/_matrix//key/v2/query"):
        request = proxy_client.build_request(
            "POST", uri, json={"server_keys": {remote_server.server_name: {}}}
        )
        request.url = request.url.copy_with(raw_path=uri.encode())
        posted = proxy_client.send(request)
        if posted.status_code == 200:
            assert delegation_key_ids(posted.json()) == [], uri
    direct_post = httpx.post(
        f"{stack.homeserver_url}/_matrix/key/v2/query",
        json={"server_keys": {remote_server.server_name: {}}},
        timeout=TIMEOUT,
    )
    proxied_post = proxy_client.post(
        "/_matrix/key/v2/query", json={"server_keys": {remote_server.server_name: {}}}
    )
    assert proxied_post.status_code == 200, proxied_post.text
    assert delegation_key_ids(proxied_post.json()) == []
    servers = {e["server_name"] for e in proxied_post.json()["server_keys"]}
    assert remote_server.server_name in servers
    assert direct_post.status_code == 200


def _json(body: bytes) -> Any:
    import json

    return json.loads(body)


# --- X-Forwarded-For ---------------------------------------------------------------------------


def synapse_client_address(stack: Stack, fragment: str) -> str:
    """The client address Synapse logged for the request whose line contains ``fragment``."""
    deadline = time.monotonic() + 10
    pattern = re.compile(r" - (\S+) - \d+ - \{[^}]*\} Processed request: .*\"[A-Z]+ (\S+) HTTP")
    while True:
        text = Path(stack.synapse.log_path).read_text(encoding="utf8", errors="replace")
        for line in reversed(text.splitlines()):
            match = pattern.search(line)
            if match and fragment in match[2]:
                return match[1]
        if time.monotonic() > deadline:
            raise AssertionError(f"Synapse logged no request with {fragment!r}")
        time.sleep(0.1)


def test_synapse_sees_the_client_address_on_both_routes(
    front_proxy: FrontProxy, remote_server: RemoteServer, new_user: Callable[[], RegisteredUser]
) -> None:
    stack = front_proxy.stack
    spoofed = {"X-Forwarded-For": SPOOFED}
    # Straight to the homeserver.
    marker = secrets.token_hex(6)
    status, _ = raw_get(front_proxy.url, f"/_matrix/client/versions?fp={marker}", spoofed)
    assert status == 200
    assert front_proxy.upstream_of(f"GET /_matrix/client/versions?fp={marker} HTTP/1.1") == (
        "homeserver"
    )
    assert synapse_client_address(stack, f"fp={marker}") == CLIENT_ADDRESS

    # Through the gateway: an owned handler (make_join) forwards to Synapse.
    alice = new_user()
    public = client_api.create_room(stack, alice, room_version="10", preset="public_chat")
    user = f"@fp-{marker}:{remote_server.server_name}"
    transport = httpx.HTTPTransport(local_address=CLIENT_ADDRESS)
    with httpx.Client(
        base_url=front_proxy.url, transport=transport, headers=spoofed, timeout=TIMEOUT
    ) as client:
        made = make_join(remote_server, client, stack.server_name, public, user)
    assert made.status_code == 200, made.text
    path = f"/_matrix/federation/v1/make_join/{quote(public, safe='')}/{quote(user, safe='')}"
    assert front_proxy.upstream_of(f"GET {path}?ver=10 HTTP/1.1") == "gateway"
    assert synapse_client_address(stack, quote(user, safe="")) == CLIENT_ADDRESS

    # A v3 invite: the gateway writes the v2 request Synapse gets, with the same address.
    invitee = new_user()
    room = make_remote_room("11", remote_server.server_name, remote_server.signing_key)
    invite = room.make_invite(invitee.user_id)
    with httpx.Client(
        base_url=front_proxy.url, transport=transport, headers=spoofed, timeout=TIMEOUT
    ) as client:
        answer = send_v3_invite(
            remote_server, client, stack, room.room_id, v3_invite_body(room, invite)
        )
    assert answer.status_code == 200, answer.text
    v2_path = f"/_matrix/federation/v2/invite/{quote(room.room_id, safe='')}"
    assert synapse_client_address(stack, v2_path) == CLIENT_ADDRESS
