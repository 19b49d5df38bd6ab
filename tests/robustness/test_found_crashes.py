"""Each crash the hostile-traffic generator found, as a test of its own.

Every test here failed before its fix (the request got a 500, or the gateway logged an
unhandled exception); the generator's seed and class that found it are named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio

from gateway.app import PublicApp
from gateway.http import Message, Router
from gateway.services import open_services
from tests.robustness.harness import (
    LOCAL_USER,
    REMOTE_USER,
    gateway_for_hostile_traffic,
    make_samples,
    q,
    robustness_config,
    watching_logs,
)
from tests.robustness.hostile import wire
from tests.robustness.wire import _Reader
from tests.support.inprocess_gateway import REMOTE, REMOTE_KEY, signed_request


def unhandled(watch: Any) -> list[str]:
    return [t for t in watch.tracebacks() if "unhandled" in t or "ASGI" in t]


# --- seed 3, mutated_signed: stripped state entries whose type is not a string ------------


async def test_v3_invite_with_a_list_as_stripped_state_type_is_a_400_or_delivered(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    samples = make_samples(REMOTE, REMOTE_KEY, LOCAL_USER, REMOTE_USER)
    body = json.loads(json.dumps(samples.v3_invite))
    body["invite_room_state"] = [
        {"type": ["m.room.name"], "state_key": "", "content": {}},
        {"type": "m.room.topic", "state_key": {"x": 1}, "content": {}},
        {"type": "m.room.name", "state_key": "", "sender": "@a:b", "content": {"name": "kept"}},
    ]
    with watching_logs() as watch:
        async with gateway_for_hostile_traffic(nursery, tmp_path) as gateway:
            async with httpx.AsyncClient(base_url=gateway.listening.public_url) as client:
                uri = f"/_matrix/federation/v3/invite/{q(samples.room_id)}"
                answer = await signed_request(client, "PUT", uri, body)
    assert answer.status_code == 200, answer.text
    assert unhandled(watch) == []


# --- seed 3, http_framing: a v3 invite whose body never completes -----------------------


async def test_v3_invite_whose_body_stalls_is_a_408_not_a_504(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The client is slow, not the gateway: 408, as every other owned endpoint answers."""
    samples = make_samples(REMOTE, REMOTE_KEY, LOCAL_USER, REMOTE_USER)
    async with gateway_for_hostile_traffic(nursery, tmp_path) as gateway:
        host, port = gateway.host_port
        path = f"/_matrix/federation/v3/invite/{q(samples.room_id)}"
        body = json.dumps(samples.v3_invite).encode()
        data = wire(
            "PUT",
            path,
            [("Authorization", "X-Matrix x"), ("Content-Length", str(len(body) + 10))],
            body,
            host=f"{host}:{port}",
            length=False,
        )
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(data)
            with trio.fail_after(30):
                answer = await _Reader(stream).answer(head=False)
    assert answer.status == 408, answer.body
    assert json.loads(answer.body)["errcode"] == "M_UNKNOWN"


# --- seed 1, pipelining and json_huge: the connection closes while an answer is sent -----


async def test_an_answer_that_cannot_be_sent_any_more_does_not_escape_the_app(
    tmp_path: Path,
) -> None:
    """Hypercorn closes a connection whose peer broke the framing (a pipelined request after
    a body over the limit, say) while the app may still be answering; its send then raises
    ``trio.BusyResourceError`` (or a closed/broken stream error). The app must treat that as
    a client that went away, not let it escape as "Error in ASGI Framework"."""
    config = robustness_config(tmp_path, "http://127.0.0.1:9")
    async with open_services(config) as services:
        app = PublicApp(services, Router())
        for failure in (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError):
            scope = {
                "type": "http",
                "method": "GET",
                "path": "/nowhere",
                "raw_path": b"/nowhere",
                "query_string": b"",
                "headers": [],
                "http_version": "1.1",
            }

            async def receive() -> Message:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: Message, failure: type[Exception] = failure) -> None:
                raise failure("another task is currently sending data on this SocketStream")

            with watching_logs() as watch:
                await app(scope, receive, send)
            assert unhandled(watch) == []
            [line] = [e for e in watch.events if e.get("event") == "request"]
            assert line["outcome"] == "client_disconnected"


# --- seed 4, mutated_signed: a 70,000-character room version, echoed back in full ------


async def test_an_error_quoting_what_the_peer_sent_stays_short(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Not a crash but an amplifier: the refusal quoted the peer's room version whole, in
    the answer and in the log line, so each request of 1 MB cost 2 MB out and 1 MB of log."""
    samples = make_samples(REMOTE, REMOTE_KEY, LOCAL_USER, REMOTE_USER)
    huge = "x" * 70_000
    body = json.loads(json.dumps(samples.v3_invite))
    body["state"][0]["content"]["room_version"] = huge
    v2 = {"room_version": huge, "event": samples.v3_invite["event"]}
    with watching_logs() as watch:
        async with gateway_for_hostile_traffic(nursery, tmp_path) as gateway:
            async with httpx.AsyncClient(base_url=gateway.listening.public_url) as client:
                v3_uri = f"/_matrix/federation/v3/invite/{q(samples.room_id)}"
                v3_answer = await signed_request(client, "PUT", v3_uri, body)
                v2_uri = (
                    f"/_matrix/federation/v2/invite/{q(samples.room_id)}"
                    f"/{q(samples.invite_event_id)}"
                )
                v2_answer = await signed_request(client, "PUT", v2_uri, v2)
    for answer in (v3_answer, v2_answer):
        assert answer.status_code == 400, answer.text[:200]
        assert answer.json()["errcode"] == "M_INCOMPATIBLE_ROOM_VERSION"
        assert len(answer.content) < 1024
    assert all(len(repr(e)) < 2048 for e in watch.events)


# --- seed 20261204 against Synapse: owned routes passed on what made Synapse fail --------


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


async def test_owned_routes_keep_what_made_synapse_fail_from_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Synapse answered 500 to v1/v2 invites without a room version or an event, to bodies
    with escaped lone surrogates (it cannot encode them again to check the signature), and
    to signed bodies nested about 950 levels deep (out of stack). The gateway owns these
    routes and now refuses all of them itself; the homeserver sees none."""
    samples = make_samples(REMOTE, REMOTE_KEY, LOCAL_USER, REMOTE_USER)
    event = samples.v3_invite["event"]
    v2_uri = f"/_matrix/federation/v2/invite/{q(samples.room_id)}/{q(samples.invite_event_id)}"
    v1_uri = v2_uri.replace("/v2/", "/v1/")
    knock_uri = (
        f"/_matrix/federation/v1/send_knock/{q(samples.room_id)}/{q(samples.knock_event_id)}"
    )
    deep_knock = {**samples.knock_event, "content": {**samples.knock_event["content"]}}
    deep_knock["content"]["x"] = _nested(300)
    async with gateway_for_hostile_traffic(nursery, tmp_path, policies=[]) as gateway:
        async with httpx.AsyncClient(base_url=gateway.listening.public_url) as client:
            seen_before = gateway.homeserver.requests
            answers = [
                await signed_request(client, "PUT", v2_uri, {"event": event}),
                await signed_request(client, "PUT", v2_uri, {"room_version": "11"}),
                await signed_request(
                    client, "PUT", v2_uri, body=b'{"room_version":"11","event":{"x":"\\ud800"}}'
                ),
                await signed_request(client, "PUT", v1_uri, {"content": {}}),
                await signed_request(
                    client, "PUT", v2_uri, {"room_version": "11", "event": event, "x": _nested(300)}
                ),
                await signed_request(client, "PUT", knock_uri, deep_knock),
            ]
            seen_after = gateway.homeserver.requests
    assert [a.status_code for a in answers] == [400] * len(answers), [a.text for a in answers]
    assert {a.json()["errcode"] for a in answers} <= {"M_BAD_JSON", "M_NOT_JSON"}
    assert seen_after == seen_before
