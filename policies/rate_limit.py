"""Token-bucket rate limits per origin server and per invitee, shared by every worker.

Options (each table optional; a missing one means no limit of that kind)::

    [[policies]]
    module = "policies.rate_limit"
    options.invites_per_origin = { capacity = 20, per_second = 0.2 }
    options.invites_per_invitee = { capacity = 5, per_second = 0.05 }
    options.joins_per_origin = { capacity = 50, per_second = 1 }
    options.knocks_per_origin = { capacity = 10, per_second = 0.1 }

``capacity`` is the burst a quiet sender may use at once, ``per_second`` the steady rate
after that. The buckets live in the gateway's store (``ctx.tools.rate_limit``), so all
workers and replicas on one database draw from the same bucket. A refusal is 429
``M_LIMIT_EXCEEDED`` with ``retry_after_ms``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.policy.api import (
    Decision,
    InviteContext,
    JoinContext,
    KnockContext,
    OptionsError,
    PolicyTools,
    allow,
    deny,
)

from ._options import check_known, positive_number

_LIMITS = ("invites_per_origin", "invites_per_invitee", "joins_per_origin", "knocks_per_origin")


@dataclass(frozen=True)
class Limit:
    capacity: float
    per_second: float


@dataclass(frozen=True)
class Limits:
    invites_per_origin: Limit | None = None
    invites_per_invitee: Limit | None = None
    joins_per_origin: Limit | None = None
    knocks_per_origin: Limit | None = None


def _limit(options: Mapping[str, Any], key: str) -> Limit | None:
    table = options.get(key)
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise OptionsError(key, "must be a table like { capacity = 20, per_second = 0.2 }")
    check_known(table, {"capacity", "per_second"}, prefix=f"{key}.")
    return Limit(
        capacity=positive_number(table, "capacity", f"{key}."),
        per_second=positive_number(table, "per_second", f"{key}.", allow_zero=True),
    )


def validate_options(options: Mapping[str, Any]) -> Limits:
    check_known(options, set(_LIMITS))
    return Limits(**{key: _limit(options, key) for key in _LIMITS})


async def _take(tools: PolicyTools, bucket: str, limit: Limit | None, what: str) -> Decision:
    if limit is None:
        return allow()
    result = await tools.rate_limit(bucket, capacity=limit.capacity, per_second=limit.per_second)
    if result.allowed:
        return allow()
    return deny(
        f"too many {what}; try again later",
        "M_LIMIT_EXCEEDED",
        429,
        retry_after_ms=result.retry_after_ms,
    )


async def on_invite(ctx: InviteContext, limits: Limits) -> Decision:
    decision = await _take(
        ctx.tools, f"invite-origin:{ctx.origin}", limits.invites_per_origin, "invites"
    )
    if decision.kind != "allow":
        return decision
    return await _take(
        ctx.tools,
        f"invite-invitee:{ctx.invitee}",
        limits.invites_per_invitee,
        f"invites for {ctx.invitee}",
    )


# make_join and send_join each get their own bucket with the same limit: a normal join uses
# one token of each, and a server that skips make_join still meets the limit at send_join.


async def on_join(ctx: JoinContext, limits: Limits) -> Decision:
    bucket = f"{ctx.stage}-origin:{ctx.origin}"
    return await _take(ctx.tools, bucket, limits.joins_per_origin, "joins")


async def on_knock(ctx: KnockContext, limits: Limits) -> Decision:
    bucket = f"{ctx.stage}-origin:{ctx.origin}"
    return await _take(ctx.tools, bucket, limits.knocks_per_origin, "knocks")
