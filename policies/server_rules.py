"""Allow and deny lists of servers, with globs (``*``, ``?``).

Options (all optional)::

    [[policies]]
    module = "policies.server_rules"
    options.deny_origins = ["*.spam.example"]      # the requesting server
    options.allow_origins = []                     # if non-empty, only these may ask
    options.deny_inviter_servers = []              # invites: the inviter's server;
    options.allow_inviter_servers = []             # joins/knocks: the user's server
    options.deny_creator_servers = ["evil.example"]   # invites: servers that created the room
    options.allow_creator_servers = []
    options.deny_ip_literals = true                # refuse servers named 1.2.3.4 or [::1]
    options.invite_action = "deny"                 # or "drop": what a refused invite gets
    options.deny_destinations = ["*.spam.example"] # outbound: servers our homeserver may not
    options.allow_destinations = []                # send to; if non-empty, only these

Server names are matched case-insensitively (``evil.example`` also refuses ``EVIL.Example``),
as the spec has it for server ACLs: DNS does not tell the two apart, so whoever runs one can
run the other. Identity checks elsewhere stay exact (a user of ``EVIL.Example`` is not a user
of ``evil.example``).

Destination rules need the outbound edge (``[outbound]``): they refuse every federation
request our homeserver would send to the server (invites, messages, joins, queries).

Creator servers are reliable only for invites that carry a verified create event (v3). A deny
rule applies to whatever the invite claims (a server lying about its room's creator gains
nothing by naming a denied one), but an allow rule is only satisfied by a verified create
event: a v1/v2 invite into a room that is not verifiably created by an allowed server is
refused when ``allow_creator_servers`` is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.policy.api import (
    Decision,
    GlobSet,
    InviteContext,
    JoinContext,
    KnockContext,
    OutboundContext,
    allow,
    deny,
    drop,
    is_ip_literal,
)

from ._options import boolean, check_known, choice, globs


@dataclass(frozen=True)
class Rules:
    deny_origins: GlobSet
    allow_origins: GlobSet
    deny_inviter_servers: GlobSet
    allow_inviter_servers: GlobSet
    deny_creator_servers: GlobSet
    allow_creator_servers: GlobSet
    deny_ip_literals: bool
    invite_action: str
    deny_destinations: GlobSet
    allow_destinations: GlobSet


_GLOB_KEYS = (
    "deny_origins",
    "allow_origins",
    "deny_inviter_servers",
    "allow_inviter_servers",
    "deny_creator_servers",
    "allow_creator_servers",
    "deny_destinations",
    "allow_destinations",
)


def validate_options(options: Mapping[str, Any]) -> Rules:
    check_known(options, {*_GLOB_KEYS, "deny_ip_literals", "invite_action"})
    return Rules(
        **{key: globs(options, key, ignore_case=True) for key in _GLOB_KEYS},
        deny_ip_literals=boolean(options, "deny_ip_literals", False),
        invite_action=choice(options, "invite_action", "deny", "deny", "drop"),
    )


def _server_problem(rules: Rules, origin: str, user_server: str) -> str | None:
    """Why ``origin`` / the user's server is refused, or None."""
    for what, server in (("origin", origin), ("user's server", user_server)):
        if rules.deny_ip_literals and is_ip_literal(server):
            return f"{what} {server} is an IP address; servers here need a DNS name"
    if rules.deny_origins.match(origin):
        return f"requests from {origin} are not accepted"
    if rules.allow_origins and not rules.allow_origins.match(origin):
        return f"requests from {origin} are not accepted"
    if rules.deny_inviter_servers.match(user_server):
        return f"users of {user_server} are not accepted"
    if rules.allow_inviter_servers and not rules.allow_inviter_servers.match(user_server):
        return f"users of {user_server} are not accepted"
    return None


async def on_invite(ctx: InviteContext, rules: Rules) -> Decision:
    problem = _server_problem(rules, ctx.origin, ctx.inviter_server)
    if problem is None:
        for server in ctx.creator_servers:
            if rules.deny_creator_servers.match(server):
                problem = f"rooms created on {server} are not accepted"
                break
    if problem is None and rules.allow_creator_servers:
        # Only the create event's sender signed it: additional creators it names (v12)
        # never vouched for the room, so they cannot earn an allow.
        allowed = (
            ctx.create_event_verified
            and bool(ctx.creator_servers)
            and rules.allow_creator_servers.match(ctx.creator_servers[0])
        )
        if not allowed:
            problem = "only rooms created on approved servers are accepted"
    if problem is None:
        return allow()
    return drop(problem) if rules.invite_action == "drop" else deny(problem)


async def on_join(ctx: JoinContext, rules: Rules) -> Decision:
    problem = _server_problem(rules, ctx.origin, ctx.user_server)
    return allow() if problem is None else deny(problem)


async def on_outbound(ctx: OutboundContext, rules: Rules) -> Decision:
    destination = ctx.destination
    refused = rules.deny_destinations.match(destination) or (
        bool(rules.allow_destinations) and not rules.allow_destinations.match(destination)
    )
    if refused:
        return deny(f"this server does not federate with {destination}")
    return allow()


async def on_knock(ctx: KnockContext, rules: Rules) -> Decision:
    problem = _server_problem(rules, ctx.origin, ctx.user_server)
    return allow() if problem is None else deny(problem)
