"""Properties of every owned handler's parsing: whatever comes in, the answer is a Matrix
error or a valid answer, never an exception.

Two levels:

* the parsers themselves (X-Matrix headers, JSON bodies, route matching and path classes,
  Content-Length, the invite, join and knock event checks, the key-answer filter), each
  with any input: a documented error type or a result, nothing else;
* each owned route through the public app (an ASGI call, no sockets), with drawn path
  parameters, headers and bodies, signed by a server whose key the gateway knows (so the
  handler gets past authentication) or not: every answer is below 500 with a Matrix error
  body when it is an error, and no unhandled exception is logged.
"""

from __future__ import annotations

import json
import queue
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import PUBLIC_ROUTES, PublicApp, route_path
from gateway.errors import MatrixError
from gateway.features.invites import _find_create_event, _legacy_invite_parts, _room_version_of
from gateway.features.joins import MakeJoinRecord, verify_join_event
from gateway.features.keys import filter_key_query_body
from gateway.features.knocks import check_knock_event
from gateway.features.restricted_joins import allowed_room_ids
from gateway.http import Message, Router, content_length
from gateway.matrix.canonical_json import InvalidJson, parse_json
from gateway.matrix.room_versions import ROOM_VERSIONS
from gateway.matrix.xmatrix import MalformedXMatrix, parse_x_matrix
from gateway.services import Services, open_services
from tests.robustness.harness import (
    LOCAL_USER,
    REMOTE_USER,
    OneServerKeyring,
    RealisticHomeserver,
    make_samples,
    robustness_config,
    watching_logs,
)
from tests.robustness.hostile import mutate
from tests.support.inprocess_gateway import HS, REMOTE, REMOTE_KEY, serve_fake_homeserver
from tests.support.remote_server import x_matrix_authorization

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- strategies ----------------------------------------------------------------------------

SAMPLES = make_samples(REMOTE, REMOTE_KEY, LOCAL_USER, REMOTE_USER)

ids = st.sampled_from(
    [
        SAMPLES.room_id,
        SAMPLES.invite_event_id,
        LOCAL_USER,
        REMOTE_USER,
        f"@x:{HS}",
        "!a:b",
        "$e",
        "@u",
        "",
        "m.room.member",
        "m.room.create",
        "invite",
        "join",
        "knock",
    ]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | ids
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | ids, children, max_size=4)
    ),
    max_leaves=20,
)
EVENT_KEYS = [
    "type",
    "state_key",
    "sender",
    "room_id",
    "content",
    "origin_server_ts",
    "auth_events",
    "prev_events",
    "depth",
    "hashes",
    "signatures",
    "unsigned",
    "origin",
]
events = st.dictionaries(st.sampled_from(EVENT_KEYS), json_values | ids, max_size=len(EVENT_KEYS))
member_content = st.fixed_dictionaries(
    {},
    optional={
        "membership": st.sampled_from(["invite", "join", "knock", "leave"]) | json_values,
        "join_authorised_via_users_server": json_values,
        "room_version": st.sampled_from(sorted(ROOM_VERSIONS)) | json_values,
    },
)
member_events = st.fixed_dictionaries(
    {},
    optional={
        "type": st.just("m.room.member") | json_values,
        "state_key": ids | json_values,
        "sender": ids | json_values,
        "room_id": st.just(SAMPLES.room_id) | json_values,
        "content": member_content | json_values,
        "origin_server_ts": st.integers() | json_values,
        "auth_events": st.lists(ids | json_values, max_size=4) | json_values,
        "signatures": json_values,
        "hashes": json_values,
    },
)
#: A valid body with random changes, drawn through hypothesis's own randomness.
seeds = st.integers(min_value=0, max_value=2**32)


def mutated(value: Any) -> st.SearchStrategy[Any]:
    return st.builds(lambda seed: mutate(random.Random(seed), value), seeds)


# --- the parsers -------------------------------------------------------------------------


quoted = st.text(max_size=30).map(lambda s: '"' + s + '"')
xmatrix_params = st.lists(
    st.tuples(
        st.sampled_from(["origin", "destination", "key", "sig", "signature", "x", ""]),
        quoted | st.text(max_size=30),
    ),
    max_size=6,
).map(lambda ps: "X-Matrix " + ",".join(f"{k}={v}" for k, v in ps))


@SETTINGS
@given(header=st.text(max_size=200) | xmatrix_params)
def test_any_authorization_header_parses_or_is_malformed(header: str) -> None:
    try:
        auth = parse_x_matrix(header)
    except MalformedXMatrix:
        return
    assert auth.origin and ":" in auth.key_id


@SETTINGS
@given(body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_body_parses_or_is_invalid_json(body: bytes) -> None:
    for strict in (False, True):
        try:
            parse_json(body, strict=strict)
        except InvalidJson:
            pass


@SETTINGS
@given(depth=st.integers(min_value=1, max_value=50_000), objects=st.booleans())
def test_any_nesting_depth_parses_or_is_invalid_json(depth: int, objects: bool) -> None:
    text = (b'{"a":' * depth + b"1" + b"}" * depth) if objects else (b"[" * depth + b"]" * depth)
    try:
        parse_json(text)
    except InvalidJson:
        pass


def _router() -> Router:
    router = Router()
    for install in PUBLIC_ROUTES:
        install(router, cast(Services, object()))
    return router


ROUTER = _router()
SEGMENTS = [b"_matrix", b"federation", b"v1", b"v2", b"v3", b"invite", b"make_join"]
SEGMENTS += [b"send_join", b"make_knock", b"send_knock", b"key", b"%2F", b"%FF", b"%", b"..", b""]
path_bytes = st.binary(max_size=120) | st.lists(
    st.sampled_from(SEGMENTS),
    max_size=8,
).map(lambda parts: b"/".join(parts))


@SETTINGS
@given(
    method=st.sampled_from(["GET", "PUT", "POST", "HEAD", "DELETE", "OPTIONS"])
    | st.text(max_size=8),
    path=path_bytes,
)
def test_any_path_routes_or_is_a_matrix_error(method: str, path: bytes) -> None:
    raw = b"/" + path
    try:
        match = ROUTER.match(method, raw)
    except MatrixError as e:
        assert e.status in (400, 405)
    else:
        if match is not None:
            assert all(isinstance(v, str) for v in match.params.values())
    assert route_path(raw).startswith(b"/") or route_path(raw) == b""


@SETTINGS
@given(values=st.lists(st.binary(max_size=30), max_size=3))
def test_any_content_length_is_a_number_or_a_matrix_error(values: list[bytes]) -> None:
    try:
        content_length([(b"content-length", v) for v in values], 1000)
    except MatrixError as e:
        assert e.status in (400, 413)


@SETTINGS
@given(body=json_values | mutated(SAMPLES.v3_invite), endpoint=st.sampled_from(["v1", "v2"]))
def test_any_legacy_invite_body_gives_parts_or_none(body: Any, endpoint: str) -> None:
    parts = _legacy_invite_parts(body, endpoint)
    if parts is not None:
        event, version, states = parts
        assert isinstance(event, dict) and isinstance(version, str)
        assert all(isinstance(s, dict) for s in states)


@SETTINGS
@given(state=st.lists(events | member_events | mutated(SAMPLES.v3_invite["state"][0]), max_size=4))
def test_any_invite_state_gives_a_create_event_and_version_or_a_matrix_error(
    state: list[Any],
) -> None:
    try:
        create = _find_create_event(state)
        version = _room_version_of(create)
    except MatrixError as e:
        assert 400 <= e.status < 500
    else:
        assert version.identifier in ROOM_VERSIONS


@SETTINGS
@given(event=json_values | member_events | mutated(SAMPLES.knock_event), origin=ids)
def test_any_knock_event_gives_its_sender_or_a_matrix_error(event: Any, origin: str) -> None:
    try:
        sender = check_knock_event(event, room_id=SAMPLES.room_id, origin=origin)
    except MatrixError as e:
        assert e.status in (400, 403)
    else:
        assert isinstance(sender, str)


@SETTINGS
@given(
    event=json_values | member_events | mutated(SAMPLES.join_event),
    version=st.sampled_from(["6", "10", "11", "12"]),
)
async def test_any_join_event_verifies_or_is_a_matrix_error(event: Any, version: str) -> None:
    try:
        verified = await verify_join_event(
            event,
            room_id=SAMPLES.room_id,
            event_id=SAMPLES.join_event_id,
            origin=REMOTE,
            version=ROOM_VERSIONS[version],
            keys=OneServerKeyring(),
        )
    except MatrixError as e:
        assert e.status in (400, 401, 403)
    else:
        assert verified["sender"] == REMOTE_USER


@SETTINGS
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_key_answer_is_filtered_or_refused(body: bytes) -> None:
    try:
        filtered, removed = filter_key_query_body(body)
    except MatrixError as e:
        assert e.status == 502
    else:
        assert removed >= 0 and isinstance(filtered, bytes)


@SETTINGS
@given(text=st.text(max_size=80) | json_values.map(json.dumps), rules=json_values)
def test_any_stored_record_or_join_rule_reads_or_is_none(text: str, rules: Any) -> None:
    record = MakeJoinRecord.from_json(text)
    assert record is None or isinstance(record, MakeJoinRecord)
    if isinstance(rules, dict):
        assert all(isinstance(r, str) for r in allowed_room_ids(rules))


# --- each owned route through the app ------------------------------------------------------


@dataclass
class AppInThread:
    """The public app of a gateway, running in a Trio loop of its own thread, so that
    hypothesis (synchronous, with shrinking) can send it one request per example."""

    app: PublicApp
    token: trio.lowlevel.TrioToken
    stop: trio.Event

    def request(
        self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, bytes]:
        return trio.from_thread.run(
            call, self.app, method, target, headers, body, trio_token=self.token
        )


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppInThread]:
    ready: queue.Queue[AppInThread | BaseException] = queue.Queue()
    tmp_path = tmp_path_factory.mktemp("properties")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            url = await serve_fake_homeserver(nursery, RealisticHomeserver())
            async with open_services(robustness_config(tmp_path, url)) as services:
                services.keyring = cast(Any, OneServerKeyring())
                stop = trio.Event()
                ready.put(
                    AppInThread(
                        PublicApp(services, _router()), trio.lowlevel.current_trio_token(), stop
                    )
                )
                await stop.wait()
            nursery.cancel_scope.cancel()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:  # reported to the fixture, which fails loudly
            ready.put(e)

    thread = threading.Thread(target=run, name="properties-app", daemon=True)
    thread.start()
    started = ready.get(timeout=60)
    if isinstance(started, BaseException):
        raise started
    try:
        yield started
    finally:
        trio.from_thread.run_sync(started.stop.set, trio_token=started.token)
        thread.join(15)


async def call(
    app: PublicApp, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, bytes]:
    path, _, query = target.partition("?")
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": query.encode("utf-8", "surrogateescape"),
        "headers": [(b"host", HS.encode()), *headers],
        "client": ("127.0.0.1", 1),
    }
    sent: list[Message] = []
    chunks = [body[: len(body) // 2], body[len(body) // 2 :]]

    async def receive() -> Message:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        await trio.sleep_forever()
        raise AssertionError

    async def send(message: Message) -> None:
        sent.append(message)

    with trio.fail_after(30):
        await app(scope, receive, send)
    [start] = [m for m in sent if m["type"] == "http.response.start"]
    return start["status"], b"".join(m.get("body", b"") for m in sent if "body" in m)


def _fill(template: str, params: dict[str, str]) -> str:
    out = []
    for segment in template.split("/"):
        if segment.startswith("{"):
            out.append(params.get(segment[1:-1], "x"))
        else:
            out.append(segment)
    return "/".join(out)


def _valid_params(template: str) -> dict[str, str]:
    event_id = (
        SAMPLES.join_event_id
        if "send_join" in template
        else SAMPLES.knock_event_id
        if "send_knock" in template
        else SAMPLES.invite_event_id
    )
    return {
        "roomId": quote(SAMPLES.room_id, safe=""),
        "eventId": quote(event_id, safe=""),
        "userId": quote(REMOTE_USER, safe=""),
    }


def _body_for(template: str) -> Any:
    if "/v3/" in template or "unstable" in template:
        return SAMPLES.v3_invite
    if "/v2/invite" in template:
        return {"room_version": "11", **{k: SAMPLES.v3_invite[k] for k in ("event",)}}
    if "/v1/invite" in template:
        return SAMPLES.v3_invite["event"]
    if "send_join" in template:
        return SAMPLES.join_event
    if "send_knock" in template:
        return SAMPLES.knock_event
    return None


OWNED = [(r.method, r.template) for r in ROUTER.routes]


@pytest.mark.parametrize(("method", "template"), OWNED, ids=[t for _, t in OWNED])
@settings(SETTINGS, max_examples=100)
@given(
    data=st.data(),
    signed=st.sampled_from(["yes", "yes", "no", "garbage"]),
)
def test_every_owned_route_answers_any_request_with_a_matrix_answer(
    method: str,
    template: str,
    data: st.DataObject,
    signed: str,
    app: AppInThread,
) -> None:
    params = _valid_params(template)
    for name in list(params):
        params[name] = data.draw(
            st.just(params[name])
            | st.text(max_size=30).map(lambda s: quote(s, safe=""))
            | st.sampled_from(["%", "%FF", "%2F", "..", "", "%00"]),
            label=name,
        )
    target = _fill(template, params)
    if method == "GET":
        target += data.draw(st.sampled_from(["", "?ver=11", "?ver=%ZZ", "?ver=1&ver=2"]))
    sample = _body_for(template)
    content: Any = None
    body = b""
    if method != "GET":
        content = data.draw(
            mutated(sample) | json_values | member_events if sample is not None else json_values,
            label="content",
        )
        body = json.dumps(content).encode()
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
    if signed == "yes":
        try:
            auth = x_matrix_authorization(
                method=method,
                uri=target,
                origin=REMOTE,
                destination=HS,
                signing_key=REMOTE_KEY,
                content=content,
            )
        except (ValueError, TypeError, UnicodeError):
            auth = "X-Matrix garbage"
        headers.append((b"authorization", auth.encode()))
    elif signed == "garbage":
        headers.append((b"authorization", data.draw(st.binary(max_size=60), label="header")))
    with watching_logs() as watch:
        status, answer = app.request(method, target, headers, body)
    unhandled = [t for t in watch.tracebacks() if "unhandled" in t]
    assert unhandled == []
    assert status < 500, answer
    if status >= 400:
        error = json.loads(answer)
        assert isinstance(error.get("errcode"), str) and isinstance(error.get("error"), str)
