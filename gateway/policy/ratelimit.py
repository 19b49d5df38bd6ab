"""The tools the engine lends policies in a running gateway: token buckets in the shared
store, so every worker and replica draws from the same bucket, and room state read through
the homeserver.

A take is one transaction: make sure the row exists, lock it (PostgreSQL ``FOR UPDATE``;
SQLite write transactions already hold the database lock), refill, take, write back. Two
workers racing for the last token therefore cannot both get it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from gateway.matrix.room_state import RoomState
from gateway.policy.api import PolicyTools, RateLimitResult, take_tokens
from gateway.store import Store, Transaction

__all__ = ["RoomStateReader", "StoreBuckets", "StoreTools"]


class RoomStateReader(Protocol):
    """Room state as the homeserver knows it (``gateway.homeserver.state.HomeserverStateReader``
    in a gateway, ``services.room_state``)."""

    async def room_state(self, room_id: str) -> RoomState | None:
        """The room's current state; None when the homeserver is not in the room."""
        ...


#: Rows whose bucket has been full for this long are deleted now and then.
_PURGE_EVERY = 1000


class StoreBuckets:
    """Token buckets in table ``policy_rate_limits`` of ``store``."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._takes = 0

    async def take(
        self,
        bucket: str,
        *,
        now_ms: int,
        capacity: float,
        per_second: float,
        cost: float = 1.0,
    ) -> RateLimitResult:
        if capacity <= 0 or per_second < 0 or cost < 0:
            raise ValueError("rate limit needs capacity > 0, per_second >= 0 and cost >= 0")
        self._takes += 1
        purge = self._takes % _PURGE_EVERY == 0
        lock = " FOR UPDATE" if self._store.dialect == "postgres" else ""

        def work(tx: Transaction) -> RateLimitResult:
            tx.execute(
                "INSERT INTO policy_rate_limits (bucket, tokens, updated_ts, full_ts)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (bucket) DO NOTHING",
                (bucket, float(capacity), now_ms, now_ms),
            )
            row = tx.fetch_one(
                "SELECT tokens, updated_ts FROM policy_rate_limits WHERE bucket = ?" + lock,
                (bucket,),
            )
            assert row is not None
            result, tokens = take_tokens(
                float(row[0]),
                int(row[1]),
                now_ms,
                capacity=capacity,
                per_second=per_second,
                cost=cost,
            )
            # When the bucket will be full again; a full bucket is the same as no row.
            refill_s = (capacity - tokens) / per_second if per_second > 0 else 10 * 365 * 86400
            full_ts = now_ms + math.ceil(refill_s * 1000)
            tx.execute(
                "UPDATE policy_rate_limits SET tokens = ?, updated_ts = ?, full_ts = ?"
                " WHERE bucket = ?",
                (tokens, max(now_ms, int(row[1])), full_ts, bucket),
            )
            if purge:
                tx.execute("DELETE FROM policy_rate_limits WHERE full_ts < ?", (now_ms,))
            return result

        return await self._store.run_transaction(work)


class StoreTools:
    """The :class:`~gateway.policy.api.PolicyTools` the engine lends each policy entry:
    buckets named ``<prefix>/<bucket>`` in the store, the engine's clock, and room state from
    ``state_reader``."""

    def __init__(
        self,
        buckets: StoreBuckets,
        *,
        prefix: str,
        clock: Callable[[], float] = time.time,
        state_reader: RoomStateReader | None = None,
    ) -> None:
        self._buckets = buckets
        self._prefix = prefix
        self._clock = clock
        self._state_reader = state_reader

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def rate_limit(
        self, bucket: str, *, capacity: float, per_second: float, cost: float = 1.0
    ) -> RateLimitResult:
        return await self._buckets.take(
            f"{self._prefix}/{bucket}",
            now_ms=self.now_ms(),
            capacity=capacity,
            per_second=per_second,
            cost=cost,
        )

    async def room_state(self, room_id: str) -> list[Mapping[str, Any]]:
        if self._state_reader is None:
            raise LookupError(
                "room state is not available: the gateway needs the homeserver's signing key"
                " (server.signing_key_path) to read it"
            )
        state = await self._state_reader.room_state(room_id)
        if state is None:
            raise LookupError(f"the homeserver is not in room {room_id}")
        return [dict(event) for event in state.events.values()]


def _check(tools: StoreTools) -> PolicyTools:
    return tools  # StoreTools satisfies the PolicyTools protocol (checked by mypy)
