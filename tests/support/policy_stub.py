"""A stand-in for the policy engine (``services.policy``) in handler tests.

Plain async functions decide joins or knocks: they see the context and raise
``MatrixError`` to refuse, which becomes a deny with that status, errcode and message, as a
policy's ``deny(...)`` would. Decision points without a function are asked of ``otherwise``
(the engine the gateway already had), or allowed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from gateway.errors import MatrixError
from gateway.policy.api import Deny, JoinContext, KnockContext, allow
from gateway.policy.engine import Outcome, PolicyEngine

__all__ = ["HookPolicy"]


async def _decide(hook: Callable[[Any], Awaitable[None]], ctx: Any) -> Outcome:
    try:
        await hook(ctx)
    except MatrixError as e:
        deny = Deny(
            reason=e.message, errcode=e.errcode, status=e.status, retry_after_ms=e.retry_after_ms
        )
        return Outcome(decision=deny, policy="test hook")
    return Outcome(decision=allow())


class HookPolicy:
    """``services.policy`` for a test: ``join`` and ``knock`` decide those points."""

    def __init__(
        self,
        *,
        join: Callable[[JoinContext], Awaitable[None]] | None = None,
        knock: Callable[[KnockContext], Awaitable[None]] | None = None,
        otherwise: PolicyEngine | None = None,
    ) -> None:
        self._join = join
        self._knock = knock
        self._otherwise = otherwise

    async def decide_join(self, ctx: JoinContext) -> Outcome:
        if self._join is not None:
            return await _decide(self._join, ctx)
        if self._otherwise is not None:
            return await self._otherwise.decide_join(ctx)
        return Outcome(decision=allow())

    async def decide_knock(self, ctx: KnockContext) -> Outcome:
        if self._knock is not None:
            return await _decide(self._knock, ctx)
        if self._otherwise is not None:
            return await self._otherwise.decide_knock(ctx)
        return Outcome(decision=allow())

    def __getattr__(self, name: str) -> Any:
        # Invites, outbound requests: the engine the gateway had, if any.
        if self._otherwise is None:
            raise AttributeError(name)
        return getattr(self._otherwise, name)
