"""The built-in policies in ``policies/``, hook by hook."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.policy.api import (
    Allow,
    Deny,
    Drop,
    GlobSet,
    MemoryTools,
    OptionsError,
    claimed_creator_servers,
    creator_servers_of,
    is_ip_literal,
)
from policies import min_room_version, policy_lists, rate_limit, server_rules
from tests.unit.policy.contexts import FIXTURES, invite, join, knock

# --- api helpers --------------------------------------------------------------------------


def test_globs() -> None:
    g = GlobSet(["*.evil.example", "spam?.org", "exact.example"])
    assert g.match("a.b.evil.example") == "*.evil.example"
    assert g.match("evil.example") is None
    assert g.match("spam1.org") == "spam?.org"
    assert g.match("spam12.org") is None
    assert g.match("exact.example") == "exact.example"
    assert g.match("EXACT.example") is None  # server names are case-sensitive
    assert GlobSet(["a.b"]).match("aXb") is None  # '.' is literal
    assert not GlobSet([])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("1.2.3.4", True),
        ("1.2.3.4:8448", True),
        ("[::1]", True),
        ("[2001:db8::1]:8448", True),
        ("example.org", False),
        ("example.org:8448", False),
        ("1.2.3.4.example", False),
    ],
)
def test_is_ip_literal(name: str, expected: bool) -> None:
    assert is_ip_literal(name) is expected


def test_creator_servers_of() -> None:
    create = {
        "sender": "@a:one.example",
        "content": {"additional_creators": ["@b:two.example", "@c:one.example", 5, "x"]},
    }
    assert creator_servers_of(create, "12") == ("one.example", "two.example")
    # Before v12 additional_creators mean nothing.
    assert creator_servers_of(create, "11") == ("one.example",)


def test_claimed_creator_servers() -> None:
    state = [
        {"type": "m.room.name", "state_key": "", "sender": "@x:n.example", "content": {}},
        {"type": "m.room.create", "state_key": "", "sender": "@c:claimed.example", "content": {}},
    ]
    assert claimed_creator_servers(state, "!r:room.example", "10") == ("claimed.example",)
    assert claimed_creator_servers(state[:1], "!r:room.example", "10") == ("room.example",)
    assert claimed_creator_servers([], "!" + "A" * 43, "12") == ()


# --- server_rules -------------------------------------------------------------------------


async def test_server_rules_origin_and_inviter_lists() -> None:
    rules = server_rules.validate_options(
        {"deny_origins": ["*.spam.example"], "allow_inviter_servers": ["remote.example", "ok.*"]}
    )
    assert await server_rules.on_invite(invite(), rules) == Allow()
    denied = await server_rules.on_invite(invite(origin="x.spam.example"), rules)
    assert isinstance(denied, Deny) and "x.spam.example" in denied.reason
    assert isinstance(await server_rules.on_invite(invite(inviter="@u:other.example"), rules), Deny)
    assert await server_rules.on_join(join(user="@u:ok.example"), rules) == Allow()
    assert isinstance(await server_rules.on_knock(knock(user="@u:nope.example"), rules), Deny)


async def test_server_rules_creator_servers() -> None:
    rules = server_rules.validate_options(
        {"deny_creator_servers": ["evil.example"], "invite_action": "drop"}
    )
    verified = invite(create_event_verified=True, creator_servers=("evil.example",))
    assert isinstance(await server_rules.on_invite(verified, rules), Drop)
    # A deny rule also applies to unverified claims.
    claimed = invite(creator_servers=("good.example", "evil.example"))
    assert isinstance(await server_rules.on_invite(claimed, rules), Drop)
    assert await server_rules.on_invite(invite(), rules) == Allow()

    allow_rules = server_rules.validate_options({"allow_creator_servers": ["trusted.example"]})
    ok = invite(create_event_verified=True, creator_servers=("trusted.example",))
    assert await server_rules.on_invite(ok, allow_rules) == Allow()
    # An allow rule needs a verified create event: a v2 invite only claims its creator.
    unverified = invite(create_event_verified=False, creator_servers=("trusted.example",))
    assert isinstance(await server_rules.on_invite(unverified, allow_rules), Deny)
    # A v12 create event may name additional creators nobody on their servers agreed to:
    # only the sender's server (signer of the create event) can earn an allow.
    named = invite(create_event_verified=True, creator_servers=("evil.example", "trusted.example"))
    assert isinstance(await server_rules.on_invite(named, allow_rules), Deny)


async def test_server_rules_ip_literals() -> None:
    rules = server_rules.validate_options({"deny_ip_literals": True})
    ip_invite = invite(inviter="@u:203.0.113.9:8448")
    decision = await server_rules.on_invite(ip_invite, rules)
    assert isinstance(decision, Deny) and "IP address" in decision.reason
    assert isinstance(await server_rules.on_join(join(user="@u:[::1]"), rules), Deny)
    assert await server_rules.on_join(join(), rules) == Allow()
    off = server_rules.validate_options({})
    assert await server_rules.on_invite(ip_invite, off) == Allow()


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"deny_origins": "evil.example"}, "deny_origins"),
        ({"deny_origins": [""]}, "deny_origins"),
        ({"deny_ip_literals": "yes"}, "deny_ip_literals"),
        ({"invite_action": "explode"}, "invite_action"),
        ({"deny_orgins": []}, "deny_orgins"),
    ],
)
def test_server_rules_bad_options(options: dict[str, Any], key: str) -> None:
    with pytest.raises(OptionsError) as e:
        server_rules.validate_options(options)
    assert e.value.key == key


# --- policy_lists -------------------------------------------------------------------------


def banlist_options(**extra: Any) -> policy_lists.Options:
    return policy_lists.validate_options({"files": [str(FIXTURES / "banlist.json")], **extra})


async def test_policy_lists_rules() -> None:
    options = banlist_options()
    assert len(options.bans) == 4  # the rule with empty content is ignored
    assert await policy_lists.on_invite(invite(), options) == Allow()

    by_server = await policy_lists.on_invite(invite(inviter="@a:x.spam.example"), options)
    assert isinstance(by_server, Deny) and by_server.reason.endswith(": invite spam")
    by_user = await policy_lists.on_invite(invite(inviter="@troll42:friends.example"), options)
    assert isinstance(by_user, Deny) and "harassment" in by_user.reason
    by_room = await policy_lists.on_invite(invite(room_id="!badroom:remote.example"), options)
    assert isinstance(by_room, Deny)
    by_creator = await policy_lists.on_invite(invite(creator_servers=("spam.example",)), options)
    assert isinstance(by_creator, Deny) and "creator" in by_creator.reason
    # Ports are ignored when matching server rules.
    with_port = await policy_lists.on_invite(invite(inviter="@a:spam.example:8448"), options)
    assert isinstance(with_port, Deny)

    assert isinstance(
        await policy_lists.on_join(join(user="@troll:friends.example"), options), Deny
    )
    assert await policy_lists.on_join(join(user="@friend:friends.example"), options) == Allow()
    assert isinstance(
        await policy_lists.on_knock(knock(room_id="!badroom:our.example"), options), Deny
    )

    dropping = banlist_options(invite_action="drop")
    assert isinstance(
        await policy_lists.on_invite(invite(inviter="@a:spam.example"), dropping), Drop
    )


async def test_policy_lists_replace_and_legacy_types() -> None:
    bans = policy_lists.BanList()
    assert bans.match("user", "@a:b.example") is None
    bans.replace(
        [
            {
                "type": "org.matrix.mjolnir.rule.user",
                "state_key": "x",
                "content": {"entity": "@a:*", "recommendation": "org.matrix.mjolnir.ban"},
            },
            {
                "type": "m.policy.rule.user",
                "state_key": "y",
                "content": {"entity": "@b:*", "recommendation": "org.example.mute"},
            },
        ]
    )
    rule = bans.match("user", "@a:b.example")
    assert rule is not None and rule.entity == "@a:*"
    assert bans.match("user", "@b:b.example") is None  # not an m.ban


def test_policy_lists_bad_files(tmp_path: Path) -> None:
    with pytest.raises(OptionsError) as e:
        policy_lists.validate_options({"files": [str(tmp_path / "missing.json")]})
    assert e.value.key == "files[0]"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(OptionsError) as e:
        policy_lists.validate_options({"files": [str(FIXTURES / "banlist.json"), str(bad)]})
    assert e.value.key == "files[1]"


# --- rate_limit ---------------------------------------------------------------------------


async def test_rate_limit_per_origin_and_per_invitee() -> None:
    now = [1000.0]
    tools = MemoryTools(lambda: now[0])
    limits = rate_limit.validate_options(
        {
            "invites_per_origin": {"capacity": 10, "per_second": 1},
            "invites_per_invitee": {"capacity": 2, "per_second": 0.1},
        }
    )
    alice = invite(tools=tools)
    assert await rate_limit.on_invite(alice, limits) == Allow()
    assert await rate_limit.on_invite(alice, limits) == Allow()
    third = await rate_limit.on_invite(alice, limits)
    assert isinstance(third, Deny)
    assert (third.errcode, third.status) == ("M_LIMIT_EXCEEDED", 429)
    assert third.retry_after_ms == 10_001
    # Another invitee from the same origin still gets through.
    assert await rate_limit.on_invite(
        invite(invitee="@carol:our.example", tools=tools), limits
    ) == (Allow())
    now[0] += 10
    assert await rate_limit.on_invite(alice, limits) == Allow()


async def test_rate_limit_joins_count_each_stage() -> None:
    tools = MemoryTools(lambda: 0.0)
    limits = rate_limit.validate_options({"joins_per_origin": {"capacity": 1, "per_second": 0}})
    assert await rate_limit.on_join(join(tools=tools), limits) == Allow()
    assert await rate_limit.on_join(join(stage="send_join", tools=tools), limits) == Allow()
    assert isinstance(await rate_limit.on_join(join(tools=tools), limits), Deny)
    assert isinstance(await rate_limit.on_join(join(stage="send_join", tools=tools), limits), Deny)
    # No knock limit configured.
    assert await rate_limit.on_knock(knock(tools=tools), limits) == Allow()


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"invites_per_origin": 5}, "invites_per_origin"),
        ({"invites_per_origin": {"capacity": 0, "per_second": 1}}, "invites_per_origin.capacity"),
        ({"invites_per_origin": {"capacity": 1}}, "invites_per_origin.per_second"),
        (
            {"invites_per_origin": {"capacity": 1, "per_second": -1}},
            "invites_per_origin.per_second",
        ),
        ({"invites_per_origin": {"capacity": 1, "per_second": 1, "x": 1}}, "invites_per_origin.x"),
        ({"per_origin": {}}, "per_origin"),
    ],
)
def test_rate_limit_bad_options(options: dict[str, Any], key: str) -> None:
    with pytest.raises(OptionsError) as e:
        rate_limit.validate_options(options)
    assert e.value.key == key


# --- min_room_version ---------------------------------------------------------------------


async def test_min_room_version() -> None:
    options = min_room_version.validate_options(
        {"minimum": "10", "allow_unstable": ["org.example.v13"], "points": ["invite", "join"]}
    )
    assert await min_room_version.on_invite(invite(room_version="10"), options) == Allow()
    assert await min_room_version.on_invite(invite(room_version="12"), options) == Allow()
    old = await min_room_version.on_invite(invite(room_version="9"), options)
    assert isinstance(old, Deny)
    assert (old.errcode, old.status) == ("M_INCOMPATIBLE_ROOM_VERSION", 400)
    assert isinstance(await min_room_version.on_join(join(room_version="1"), options), Deny)
    assert isinstance(
        await min_room_version.on_join(join(room_version="org.matrix.msc3083.v2"), options), Deny
    )
    assert (
        await min_room_version.on_invite(invite(room_version="org.example.v13"), options) == Allow()
    )
    # Knocks were not listed in points.
    assert await min_room_version.on_knock(knock(room_version="7"), options) == Allow()
    assert min_room_version.validate_options({"minimum": 11}).minimum == 11


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "minimum"),
        ({"minimum": "org.example.v1"}, "minimum"),
        ({"minimum": "10", "points": ["leave"]}, "points"),
        ({"minimum": "10", "allow_unstable": "x"}, "allow_unstable"),
    ],
)
def test_min_room_version_bad_options(options: dict[str, Any], key: str) -> None:
    with pytest.raises(OptionsError) as e:
        min_room_version.validate_options(options)
    assert e.value.key == key
