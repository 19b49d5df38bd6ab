"""A share of the hostile requests against the gateway in front of the real Synapse.

The session's stack (``tests.support.stack_fixtures``), a remote server of this module's
own as the origin the gateway can authenticate. Synapse answers whatever is passed through,
so a 5xx may be Synapse's own: the gateway's failures are read from its log (every request
line has an ``outcome``, ``exception`` when the gateway failed).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from gateway.config import load_config
from gateway.demo.stack import Stack
from tests.integration.test_v3_invites import invite_in_sync, send_v3_invite, v3_invite_body
from tests.robustness.harness import make_samples, owned_routes
from tests.robustness.hostile import CLASSES, Target, generate
from tests.robustness.wire import send_all, summary_lines
from tests.support.pdus import make_remote_room
from tests.support.remote_server import RemoteServer

pytestmark = pytest.mark.integration

SEED = 20261204
REQUESTS = 1500


@pytest.fixture(scope="module")
def origin() -> Iterator[RemoteServer]:
    with RemoteServer() as server:
        yield server


def log_events_since(stack: Stack, offset: int) -> list[dict[str, Any]]:
    with stack.gateway_log_path.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf8", errors="replace").splitlines()
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            events.append({"event": line, "unparsed": True})
    return events


def test_hostile_share_against_synapse_leaves_the_gateway_serving(
    stack: Stack, origin: RemoteServer, register_user: Any
) -> None:
    invitee = register_user()
    config = load_config(stack.gateway_config_path)
    address = urlsplit(stack.gateway_url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    target = Target(
        host=f"{host}:{port}",
        server_name=stack.server_name,
        origin=origin.server_name,
        signing_key=origin.signing_key,
        local_user=invitee.user_id,
        remote_user=f"@bob:{origin.server_name}",
        samples=make_samples(
            origin.server_name, origin.signing_key, invitee.user_id, f"@bob:{origin.server_name}"
        ),
        routes=owned_routes(),
        max_body_size=config.public.max_body_size,
        request_timeout=config.public.request_timeout,
    )
    requests = generate(target, REQUESTS, SEED)
    offset = stack.gateway_log_path.stat().st_size
    figures = trio.run(lambda: send_all(host, port, requests, concurrency=8, exchange_seconds=90))
    report = summary_lines(figures)
    print(report)
    events = log_events_since(stack, offset)
    failed = [e for e in events if e.get("event") == "request" and e.get("outcome") == "exception"]
    tracebacks = [
        e
        for e in events
        if e.get("exception")
        or e.get("level") in ("error", "critical")
        or (e.get("unparsed") and "Traceback" in str(e.get("event")))
    ]
    server_errors = Counter(
        (e.get("route"), e.get("status"), e.get("outcome"))
        for e in events
        if e.get("event") == "request" and e.get("status", 0) >= 500
    )
    print(f"5xx in the gateway's request lines (route, status, outcome): {dict(server_errors)}")
    assert figures.requests == REQUESTS and set(figures.by_class) == set(CLASSES), report
    assert failed == [], failed[:3]
    # Owned routes pass nothing on that makes the homeserver fail; a passthrough 5xx is the
    # homeserver's own answer to what it was sent (or 502 when it dropped the connection).
    classes = {"passthrough", "admin", "admin_blocked", "not_found", "key_query"}
    owned_5xx = {k: n for k, n in server_errors.items() if k[0] not in classes}
    assert owned_5xx == {}, owned_5xx
    assert tracebacks == [], tracebacks[:3]
    assert figures.resets == 0 and figures.timeouts == 0, report
    assert figures.outcomes["closed"] == 0 and figures.outcomes["cut_short"] == 0, report

    # Still serving: a valid v3 invite reaches the invitee, a client request, /health.
    room = make_remote_room("11", origin.server_name, origin.signing_key)
    body = v3_invite_body(room, room.make_invite(invitee.user_id))
    with httpx.Client(base_url=stack.gateway_url, timeout=30) as client:
        answer = send_v3_invite(origin, client, stack, room.room_id, body)
        assert answer.status_code == 200, answer.text
        assert invite_in_sync(client, invitee, room.room_id) is not None
        assert client.get("/_matrix/client/versions").status_code == 200
    health = httpx.get(f"{stack.internal_url}/health", verify=False, timeout=10)
    assert health.status_code == 200, health.text
