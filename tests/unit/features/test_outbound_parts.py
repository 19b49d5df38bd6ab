"""The outbound edge's pure parts: the proxy request line, the bearer, endpoint classes,
headers, the v3 invite body and the egress policies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import ConfigError, parse_config
from gateway.errors import MatrixError
from gateway.features.outbound import (
    _response_headers,
    check_proxy_authorization,
    outbound_kind,
    parse_proxy_target,
)
from gateway.features.outbound_invites import is_missing_endpoint, v3_invite_body
from gateway.policy.api import Allow, Deny, OutboundContext
from gateway.policy.engine import PolicyEngine
from gateway.policy.loading import parse_policy_config
from policies import policy_lists, server_rules

SECRET = "s3cret-s3cret-s3cret"


# --- the request line ----------------------------------------------------------------------


def test_target_keeps_path_and_query_exactly_as_signed() -> None:
    raw = b"matrix-federation://remote.example:8448/_matrix/federation/v2/invite/%21a%3Ab/%24e"
    target = parse_proxy_target(raw, b"x=%2F1")
    assert target.destination == "remote.example:8448"
    assert target.target == "/_matrix/federation/v2/invite/%21a%3Ab/%24e?x=%2F1"
    assert target.path == "/_matrix/federation/v2/invite/!a:b/$e"
    assert target.query == "x=%2F1"


def test_ipv6_literal_destination() -> None:
    target = parse_proxy_target(b"matrix-federation://[::1]:8448/_matrix/key/v2/server")
    assert target.destination == "[::1]:8448"


@pytest.mark.parametrize(
    "raw",
    [
        b"/_matrix/federation/v1/version",  # an origin-form request: not from the homeserver
        b"http://remote.example/_matrix/federation/v1/version",
        b"matrix-federation://remote_example/_matrix/federation/v1/version",
        b"matrix-federation://remote.example:99999/_matrix/federation/v1/version",
        b"matrix-federation://user@remote.example/_matrix/federation/v1/version",
        b"matrix-federation://remote.example/_synapse/admin/v1/users",
        b"matrix-federation://remote.example",
        b"matrix-federation:///_matrix/federation/v1/version",
    ],
)
def test_bad_targets_are_400(raw: bytes) -> None:
    with pytest.raises(MatrixError) as e:
        parse_proxy_target(raw)
    assert e.value.status == 400


@given(st.binary(max_size=200))
def test_any_request_line_is_a_target_or_a_400(raw: bytes) -> None:
    try:
        target = parse_proxy_target(b"matrix-federation://" + raw)
    except MatrixError as e:
        assert e.status == 400
    else:
        assert target.target.startswith("/_matrix/")


# --- the bearer ----------------------------------------------------------------------------


def test_right_bearer_passes() -> None:
    check_proxy_authorization([(b"proxy-authorization", f"Bearer {SECRET}".encode())], SECRET)


@pytest.mark.parametrize(
    ("headers", "errcode"),
    [
        ([], "M_MISSING_TOKEN"),
        ([(b"proxy-authorization", b"Bearer wrong")], "M_UNAUTHORIZED"),
        ([(b"proxy-authorization", f"Bearer {SECRET[:-1]}".encode())], "M_UNAUTHORIZED"),
        ([(b"proxy-authorization", f"Bearer {SECRET}x".encode())], "M_UNAUTHORIZED"),
        ([(b"proxy-authorization", f"Basic {SECRET}".encode())], "M_UNAUTHORIZED"),
        ([(b"authorization", f"Bearer {SECRET}".encode())], "M_MISSING_TOKEN"),
        (
            [(b"proxy-authorization", f"Bearer {SECRET}".encode())] * 2,
            "M_UNAUTHORIZED",
        ),
    ],
)
def test_wrong_or_missing_bearer_is_401(headers: list[tuple[bytes, bytes]], errcode: str) -> None:
    with pytest.raises(MatrixError) as e:
        check_proxy_authorization(headers, SECRET)
    assert (e.value.status, e.value.errcode) == (401, errcode)


def test_an_empty_secret_lets_nothing_through() -> None:
    with pytest.raises(MatrixError):
        check_proxy_authorization([(b"proxy-authorization", b"Bearer ")], "")


# --- endpoint classes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kind", "room"),
    [
        ("/_matrix/federation/v1/send/1700", "send", ""),
        ("/_matrix/federation/v2/invite/!r:a/$e", "invite", "!r:a"),
        ("/_matrix/federation/v1/make_join/!r:a/@u:b", "make_join", "!r:a"),
        ("/_matrix/federation/v2/send_join/!r:a/$e", "send_join", "!r:a"),
        ("/_matrix/federation/v1/query/profile", "query", ""),
        ("/_matrix/federation/v1/state_ids/!r:a", "room", "!r:a"),
        ("/_matrix/federation/v1/event/$e", "room", ""),
        ("/_matrix/key/v2/query", "keys", ""),
        ("/_matrix/key/v2/server", "keys", ""),
        ("/_matrix/media/v3/download/a/b", "media", ""),
        ("/_matrix/federation/v1/media/download/x", "media", ""),
        ("/_matrix/federation/v1/user/devices/@u:a", "user", ""),
        ("/_matrix/federation/v1/version", "other", ""),
    ],
)
def test_outbound_kind(path: str, kind: str, room: str) -> None:
    assert outbound_kind(path) == (kind, room)


def test_hop_by_hop_response_headers_are_dropped() -> None:
    headers = httpx.Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", "2"),
            ("Connection", "keep-alive, X-Private"),
            ("X-Private", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Server", "Synapse"),
        ]
    )
    kept = dict(_response_headers(headers))
    assert kept == {
        b"content-type": b"application/json",
        b"content-length": b"2",
        b"server": b"Synapse",
    }


# --- v3 invites --------------------------------------------------------------------------


def test_v3_body_moves_the_create_event_into_state() -> None:
    create = {"type": "m.room.create", "state_key": "", "content": {"room_version": "10"}}
    stripped = [
        {"type": "m.room.create", "state_key": "", "content": {}, "sender": "@a:x"},
        {"type": "m.room.name", "state_key": "", "content": {"name": "n"}, "sender": "@a:x"},
        "not an event",
    ]
    event = {"type": "m.room.member", "state_key": "@b:y", "content": {"membership": "invite"}}
    body = v3_invite_body(event, stripped, create)
    assert body == {"event": event, "invite_room_state": [stripped[1]], "state": [create]}


@pytest.mark.parametrize(
    ("status", "body", "missing"),
    [
        (404, b"<html>not found</html>", True),
        (405, b"", True),
        (400, json.dumps({"errcode": "M_UNRECOGNIZED", "error": "x"}).encode(), True),
        (404, json.dumps({"errcode": "M_UNRECOGNIZED"}).encode(), True),
        (403, json.dumps({"errcode": "M_FORBIDDEN"}).encode(), False),
        (400, json.dumps({"errcode": "M_INVALID_PARAM"}).encode(), False),
        (200, json.dumps({"event": {}}).encode(), False),
        (500, b"oops", False),
    ],
)
def test_missing_endpoint(status: int, body: bytes, missing: bool) -> None:
    assert is_missing_endpoint(status, body) is missing


# --- configuration -------------------------------------------------------------------------


def _config(outbound: dict[str, Any], tmp_path: Path) -> Any:
    return parse_config(
        {"server": {"server_name": "our.example"}, "outbound": outbound}, base_dir=tmp_path
    )


def test_outbound_is_off_by_default(tmp_path: Path) -> None:
    config = parse_config({"server": {"server_name": "our.example"}}, base_dir=tmp_path)
    assert not config.outbound.enabled


def test_outbound_config_problems_name_their_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _config(
            {"enabled": True, "bind": "0.0.0.0:8450", "request_timeout": 90, "invite_version": 3},
            tmp_path,
        )
    text = "\n".join(e.value.problems)
    for key in (
        "outbound.secret:",
        "outbound.bind:",
        "outbound.request_timeout:",
        "outbound.invite_version:",
    ):
        assert key in text


def test_outbound_secret_from_a_file_and_never_in_repr(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n", encoding="utf8")
    config = _config({"enabled": True, "secret_path": "secret"}, tmp_path)
    assert config.outbound.secret == SECRET
    assert SECRET not in repr(config)


def test_short_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _config({"enabled": True, "secret": "short"}, tmp_path)
    assert any(p.startswith("outbound.secret:") for p in e.value.problems)


# --- egress policies -----------------------------------------------------------------------


def outbound_ctx(**overrides: Any) -> OutboundContext:
    fields: dict[str, Any] = {
        "destination": "remote.example",
        "kind": "invite",
        "method": "PUT",
        "path": "/_matrix/federation/v2/invite/!r:our.example/$e",
        "origin": "our.example",
        "room_id": "!r:our.example",
        "event": {"sender": "@alice:our.example", "state_key": "@bob:remote.example"},
        "request_id": "req-outbound",
    }
    fields.update(overrides)
    return OutboundContext(**fields)


async def test_server_rules_deny_and_allow_destinations() -> None:
    rules = server_rules.validate_options({"deny_destinations": ["*.spam.example"]})
    assert isinstance(await server_rules.on_outbound(outbound_ctx(), rules), Allow)
    refused = await server_rules.on_outbound(outbound_ctx(destination="a.spam.example"), rules)
    assert isinstance(refused, Deny) and "a.spam.example" in refused.reason
    only = server_rules.validate_options({"allow_destinations": ["friend.example"]})
    assert isinstance(await server_rules.on_outbound(outbound_ctx(), only), Deny)
    friend = outbound_ctx(destination="friend.example")
    assert isinstance(await server_rules.on_outbound(friend, only), Allow)


async def test_policy_lists_refuse_outbound_only_when_asked(tmp_path: Path) -> None:
    bans = [
        {
            "type": "m.policy.rule.server",
            "state_key": "1",
            "content": {"entity": "*.banned.example", "recommendation": "m.ban", "reason": "x"},
        }
    ]
    (tmp_path / "bans.json").write_text(json.dumps(bans), encoding="utf8")
    ctx = outbound_ctx(destination="a.banned.example")
    off = policy_lists.validate_options({"files": ["bans.json"]}, base_dir=tmp_path)
    assert isinstance(await policy_lists.on_outbound(ctx, off), Allow)
    on = policy_lists.validate_options(
        {"files": ["bans.json"], "outbound": True}, base_dir=tmp_path
    )
    assert isinstance(await policy_lists.on_outbound(ctx, on), Deny)
    assert isinstance(await policy_lists.on_outbound(outbound_ctx(), on), Allow)


async def test_engine_decides_outbound_and_audits_the_destination(tmp_path: Path) -> None:
    specs = parse_policy_config(
        [
            {
                "module": "policies.server_rules",
                "name": "egress",
                "options": {"deny_destinations": ["remote.example"]},
            }
        ],
        base_dir=tmp_path,
    )
    engine = PolicyEngine.from_specs(specs)
    assert engine.has_outbound_policies()
    outcome = await engine.decide_outbound(outbound_ctx())
    assert outcome.denied and outcome.policy == "egress"
    error = outcome.error()
    assert (error.status, error.errcode) == (403, "M_FORBIDDEN")
    record = engine._record("outbound", outbound_ctx(), "egress", outcome.decision, "enforce")
    assert (record.point, record.sender, record.target) == (
        "outbound",
        "@alice:our.example",
        "remote.example",
    )


async def test_engine_without_outbound_hooks_says_so(tmp_path: Path) -> None:
    specs = parse_policy_config(
        [{"module": "policies.min_room_version", "options": {"minimum": "10"}}], base_dir=tmp_path
    )
    assert not PolicyEngine.from_specs(specs).has_outbound_policies()
