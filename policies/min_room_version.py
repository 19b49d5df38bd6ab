"""Refuse rooms older than a minimum room version.

Options::

    [[policies]]
    module = "policies.min_room_version"
    options.minimum = "10"                 # required: a stable (numeric) room version
    options.allow_unstable = []            # unstable versions to accept, e.g. ["org.example.v13"]
    options.points = ["invite", "join", "knock"]   # where to apply (default: all three)

Stable versions compare as numbers. Unstable versions (any identifier that is not a number)
are refused unless listed. Refusals are 400 ``M_INCOMPATIBLE_ROOM_VERSION``, the code the
federation API uses for a room version a server will not take part in.
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
    allow,
    deny,
)

from ._options import check_known

_POINTS = ("invite", "join", "knock")


@dataclass(frozen=True)
class Options:
    minimum: int
    allow_unstable: frozenset[str]
    points: frozenset[str]


def validate_options(options: Mapping[str, Any]) -> Options:
    check_known(options, {"minimum", "allow_unstable", "points"})
    minimum = options.get("minimum")
    if isinstance(minimum, int) and not isinstance(minimum, bool):
        minimum = str(minimum)
    if not isinstance(minimum, str) or not minimum.isdigit():
        raise OptionsError("minimum", f'must be a stable room version like "10", got {minimum!r}')
    unstable = options.get("allow_unstable", [])
    if not isinstance(unstable, list) or not all(isinstance(v, str) for v in unstable):
        raise OptionsError("allow_unstable", "must be a list of room version identifiers")
    points = options.get("points", list(_POINTS))
    if not isinstance(points, list) or not points or not set(points) <= set(_POINTS):
        raise OptionsError("points", f"must be a non-empty list of {', '.join(_POINTS)}")
    return Options(int(minimum), frozenset(unstable), frozenset(points))


def _check(options: Options, point: str, room_version: str) -> Decision:
    if point not in options.points or room_version in options.allow_unstable:
        return allow()
    if room_version.isdigit() and int(room_version) >= options.minimum:
        return allow()
    return deny(
        f"room version {room_version} is not accepted here (minimum {options.minimum})",
        "M_INCOMPATIBLE_ROOM_VERSION",
        400,
    )


async def on_invite(ctx: InviteContext, options: Options) -> Decision:
    return _check(options, "invite", ctx.room_version)


async def on_join(ctx: JoinContext, options: Options) -> Decision:
    return _check(options, "join", ctx.room_version)


async def on_knock(ctx: KnockContext, options: Options) -> Decision:
    return _check(options, "knock", ctx.room_version)
