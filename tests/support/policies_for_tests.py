"""An admission policy for the integration tests: it decides by the user's localpart.

With ``options.prefix`` (default ``""``) the policy only looks at users whose localpart
starts with the prefix, and decides on the rest of the localpart:

* ``deny-*`` (and the other words in ``DENY_WORDS``): deny, 403 ``M_FORBIDDEN``;
* ``drop-*``: drop (invites only);
* ``slow-*``: sleep far past any configured timeout;
* ``boom-*``: raise;
* anything else: allow.

Joins (make_join and send_join) are denied for ``deny-*`` users; knocks are not looked at.
So one running gateway shows deny, drop, allow, timeouts and failures side by side, each
chosen by the name of the user a test registers. Tests copy this file next to their gateway
configuration and edit the copy to show reloads; ``DENY_WORDS`` is on a line of its own for
that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from gateway.policy.api import (
    Decision,
    InviteContext,
    JoinContext,
    OptionsError,
    allow,
    deny,
    drop,
)

DENY_WORDS = ("deny-",)

#: What the peer is told on a deny; tests look for it to know who answered.
DENY_REASON = "test policy: this user does not take invites"
JOIN_DENY_REASON = "test policy: this user may not join"
SLOW_SECONDS = 30.0


def validate_options(options: Mapping[str, Any]) -> str:
    prefix = options.get("prefix", "")
    if not isinstance(prefix, str):
        raise OptionsError("prefix", "must be a string")
    unknown = set(options) - {"prefix"}
    if unknown:
        raise OptionsError(sorted(unknown)[0], "unknown option")
    return prefix


def _localpart(user_id: str) -> str:
    return user_id[1:].partition(":")[0]


def _word(user_id: str, prefix: str) -> str | None:
    """The part of the localpart after ``prefix``, or None if it does not start with it."""
    localpart = _localpart(user_id)
    if not localpart.startswith(prefix):
        return None
    return localpart[len(prefix) :]


async def on_invite(ctx: InviteContext, prefix: str) -> Decision:
    word = _word(ctx.invitee, prefix)
    if word is None:
        return allow()
    if word.startswith(DENY_WORDS):
        return deny(DENY_REASON)
    if word.startswith("drop-"):
        return drop("test policy: dropped")
    if word.startswith("slow-"):
        await trio.sleep(SLOW_SECONDS)
        return allow()
    if word.startswith("boom-"):
        raise RuntimeError("test policy: boom")
    return allow()


async def on_join(ctx: JoinContext, prefix: str) -> Decision:
    word = _word(ctx.user, prefix)
    if word is not None and word.startswith(DENY_WORDS):
        return deny(JOIN_DENY_REASON)
    return allow()
