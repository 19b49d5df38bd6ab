"""Server names and user IDs with mixed case, wherever the gateway compares them.

The spec (appendices, "Server Name"): server names are case-sensitive, ``@user:matrix.org``
and ``@user:MATRIX.ORG`` are different people. So identity checks (is this sender a user of
the origin? is this invitee ours? did this server sign?) compare exactly. User ID
localparts are case-sensitive too; only the grammar for new IDs forbids upper case.

Globs over server names are the exception: server ACL globs are case-insensitive, and DNS
resolves ``EVIL.example`` to the same host as ``evil.example``, so allow and deny lists of
servers ignore the case of ASCII letters.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import MatrixError
from gateway.features.invites import _check_invite_event
from gateway.features.joins import verify_join_event
from gateway.features.knocks import check_knock_event
from gateway.federation.keys import KeyFetchError, verify_server_keys_response
from gateway.matrix.events import compute_event_id
from gateway.matrix.identifiers import parse_server_name, parse_user_id
from gateway.matrix.power_levels import users_who_can_invite
from gateway.matrix.room_state import RoomState
from gateway.matrix.room_versions import get_room_version
from gateway.policy.api import Allow, Deny, Drop, GlobSet, MemoryTools, server_of
from policies import policy_lists, server_rules
from tests.unit.policy.contexts import invite, join, knock

# --- identifiers keep their case ------------------------------------------------------------


def test_parsing_keeps_the_case_of_server_names_and_localparts() -> None:
    assert str(parse_server_name("Matrix.ORG:8448")) == "Matrix.ORG:8448"
    user = parse_user_id("@Alice:Matrix.ORG")
    assert (user.localpart, user.server_name) == ("Alice", "Matrix.ORG")
    # Historical IDs (upper case included) are accepted; the current grammar is not met.
    assert not user.is_compliant
    assert server_of("@alice:Example.ORG:8448") == "Example.ORG:8448"


def test_user_ids_that_differ_only_in_case_are_different_users() -> None:
    assert parse_user_id("@alice:example.org") != parse_user_id("@Alice:example.org")
    assert parse_user_id("@alice:example.org") != parse_user_id("@alice:EXAMPLE.org")


# --- identity checks are exact ---------------------------------------------------------------


def _knock(sender: str) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "state_key": sender,
        "sender": sender,
        "room_id": "!room:hs.example",
        "content": {"membership": "knock"},
    }


@pytest.mark.parametrize("sender", ["@bob:Remote.example", "@bob:REMOTE.EXAMPLE"])
def test_a_knocking_user_of_another_case_is_not_a_user_of_the_origin(sender: str) -> None:
    with pytest.raises(MatrixError) as info:
        check_knock_event(_knock(sender), room_id="!room:hs.example", origin="remote.example")
    assert (info.value.status, info.value.errcode) == (403, "M_FORBIDDEN")


def test_a_mixed_case_origin_knocks_for_its_own_users() -> None:
    sender = "@Bob:Remote.example"
    assert (
        check_knock_event(_knock(sender), room_id="!room:hs.example", origin="Remote.example")
        == sender
    )


def _invite(sender: str, invitee: str) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "state_key": invitee,
        "sender": sender,
        "room_id": "!room:remote.example",
        "content": {"membership": "invite"},
    }


@pytest.mark.parametrize(
    ("sender", "invitee"),
    [
        ("@bob:Remote.example", "@alice:hs.example"),  # sender of another case than origin
        ("@bob:remote.example", "@alice:HS.example"),  # invitee of another case than ours
    ],
)
def test_invites_need_the_exact_origin_and_our_exact_server_name(sender: str, invitee: str) -> None:
    with pytest.raises(MatrixError) as info:
        _check_invite_event(
            _invite(sender, invitee),
            room_id="!room:remote.example",
            origin="remote.example",
            our_server="hs.example",
        )
    assert (info.value.status, info.value.errcode) == (400, "M_INVALID_PARAM")
    _check_invite_event(
        _invite("@bob:remote.example", "@Alice:hs.example"),  # a historical local user
        room_id="!room:remote.example",
        origin="remote.example",
        our_server="hs.example",
    )


async def test_a_joining_user_of_another_case_is_not_a_user_of_the_origin() -> None:
    version = get_room_version("10")
    event = {
        "type": "m.room.member",
        "state_key": "@bob:Remote.example",
        "sender": "@bob:Remote.example",
        "room_id": "!room:hs.example",
        "content": {"membership": "join"},
        "origin_server_ts": 1,
        "depth": 3,
        "prev_events": [],
        "auth_events": [],
    }

    class NoKeys:
        async def get_verify_key(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("refused before any key is needed")

    with pytest.raises(MatrixError) as info:
        await verify_join_event(
            event,
            room_id="!room:hs.example",
            event_id=compute_event_id(event, version),
            origin="remote.example",
            version=version,
            keys=NoKeys(),
        )
    assert (info.value.status, info.value.message) == (
        403,
        "The joining user does not belong to the origin",
    )


def test_only_users_of_exactly_our_server_name_can_authorise_restricted_joins() -> None:
    version = get_room_version("10")
    room = "!target:hs.example"
    creator = "@creator:hs.example"
    events = [
        {"type": "m.room.create", "state_key": "", "sender": creator, "content": {}},
        {
            "type": "m.room.power_levels",
            "state_key": "",
            "sender": creator,
            "content": {"users": {creator: 100, "@admin:HS.example": 100}, "invite": 50},
        },
    ]
    for user in (creator, "@admin:HS.example"):
        events.append(
            {
                "type": "m.room.member",
                "state_key": user,
                "sender": user,
                "content": {"membership": "join"},
            }
        )
    state = RoomState.from_events(room, [{**e, "room_id": room} for e in events])
    assert users_who_can_invite(state, "hs.example", version) == [creator]
    assert users_who_can_invite(state, "HS.example", version) == ["@admin:HS.example"]


def test_a_key_response_for_another_case_of_the_name_is_refused() -> None:
    with pytest.raises(KeyFetchError, match=r"names 'friend\.example'"):
        verify_server_keys_response(
            {"server_name": "friend.example", "valid_until_ts": 1, "verify_keys": {}},
            "Friend.example",
        )


# --- globs of server names ignore case -------------------------------------------------------


def test_globset_ignores_ascii_case_only_when_asked() -> None:
    globs = GlobSet(["evil.example", "*.spam.example", "ba?.example"], ignore_case=True)
    assert globs.ignore_case
    assert globs.match("EVIL.Example") == "evil.example"
    assert globs.match("a.SPAM.example") == "*.spam.example"
    assert globs.match("BAD.example") == "ba?.example"
    assert globs.match("good.example") is None
    # Only ASCII letters fold: a look-alike (KELVIN SIGN for K) is another name.
    assert GlobSet(["k.example"], ignore_case=True).match("\u212a.example") is None
    assert GlobSet(["*.example"], ignore_case=True).match("\u212a.example") == "*.example"
    exact = GlobSet(["evil.example", "*.spam.example"])
    assert exact.match("EVIL.example") is None
    assert exact.match("a.SPAM.example") is None
    # Patterns are reported as written, whatever the case of the text.
    assert GlobSet(["Evil.Example"], ignore_case=True).match("evil.example") == "Evil.Example"


async def test_server_rules_deny_lists_catch_every_case_of_a_name() -> None:
    rules = server_rules.validate_options(
        {
            "deny_origins": ["evil.example"],
            "deny_inviter_servers": ["*.spam.example"],
            "deny_creator_servers": ["bad.example"],
        }
    )
    refused = await server_rules.on_invite(
        invite(inviter="@bob:EVIL.example", creator_servers=("ok.example",)), rules
    )
    assert isinstance(refused, Deny) and "EVIL.example" in refused.reason
    refused = await server_rules.on_invite(
        invite(
            inviter="@bob:ok.example",
            origin="ok.example",
            creator_servers=("Bad.Example",),
        ),
        rules,
    )
    assert isinstance(refused, Deny)
    refused = await server_rules.on_join(join(user="@u:x.SPAM.example"), rules)
    assert isinstance(refused, Deny)
    refused = await server_rules.on_knock(knock(user="@u:Evil.Example"), rules)
    assert isinstance(refused, Deny)
    assert isinstance(await server_rules.on_join(join(user="@u:fine.example"), rules), Allow)


async def test_server_rules_allow_lists_accept_any_case_of_an_allowed_name() -> None:
    rules = server_rules.validate_options({"allow_origins": ["friend.example"]})
    assert isinstance(await server_rules.on_join(join(user="@u:Friend.Example"), rules), Allow)
    assert isinstance(await server_rules.on_join(join(user="@u:stranger.example"), rules), Deny)


async def test_policy_list_server_bans_ignore_case_and_port_user_bans_do_not() -> None:
    def rule(kind: str, entity: str) -> dict[str, Any]:
        return {
            "type": f"m.policy.rule.{kind}",
            "state_key": entity,
            "content": {"entity": entity, "recommendation": "m.ban", "reason": "spam"},
        }

    bans = policy_lists.BanList([rule("server", "evil.example"), rule("user", "@spam:ok.example")])
    assert bans.match("server", "EVIL.example:8448") is not None
    assert bans.match("server", "Evil.Example") is not None
    assert bans.match("user", "@spam:ok.example") is not None
    # Another user (case-sensitive localpart), on a server that is not banned.
    assert bans.match("user", "@Spam:ok.example") is None
    options = policy_lists.Options(bans, "drop")
    decision = await policy_lists.on_invite(
        invite(inviter="@bob:EVIL.Example", creator_servers=()), options
    )
    assert isinstance(decision, Drop)
    tools = MemoryTools()
    decision = await policy_lists.on_join(join(user="@x:eViL.example", tools=tools), options)
    assert isinstance(decision, Deny)
