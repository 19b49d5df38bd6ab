"""Audit rows and shared rate limits, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from gateway.policy import PolicyEngine, parse_policy_config, query_decisions
from gateway.policy.audit import AuditRecord, purge_decisions
from gateway.policy.ratelimit import StoreBuckets
from gateway.store import Store, open_store
from tests.unit.policy.contexts import invite, join, knock

WritePolicy = Callable[[str, str], Path]

T0 = 1_767_000_000.0  # seconds


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


DECIDER = """
from gateway.policy.api import allow, deny, drop

async def on_invite(ctx, options):
    if ctx.inviter.startswith("@spammer"):
        return drop("spam")
    if ctx.origin == "bad.example":
        return deny("bad origin")
    return allow()

async def on_join(ctx, options):
    return deny("no joins", "M_FORBIDDEN", 403) if ctx.origin == "bad.example" else allow()
"""


async def test_audit_rows_written_and_queried(store: Store, write_policy: WritePolicy) -> None:
    path = write_policy("decider", DECIDER)
    shadow = write_policy(
        "shadowed",
        "from gateway.policy.api import deny\n"
        "async def on_knock(ctx, options):\n    return deny('would refuse')\n",
    )
    clock = FakeClock()
    engine = PolicyEngine.from_specs(
        parse_policy_config(
            [{"module": str(path)}, {"module": str(shadow), "name": "sh", "mode": "shadow"}]
        ),
        store=store,
        clock=clock,
    )
    assert (await engine.decide_invite(invite(origin="bad.example", request_id="r1"))).denied
    clock.now += 60
    assert (
        await engine.decide_invite(invite(inviter="@spammer:remote.example", request_id="r2"))
    ).dropped
    clock.now += 60
    assert (await engine.decide_invite(invite(request_id="r3"))).allowed  # not audited
    assert (await engine.decide_join(join(user="@x:bad.example", request_id="r4"))).denied
    assert (await engine.decide_knock(knock(request_id="r5"))).allowed

    rows = await query_decisions(store)
    assert [(r.request_id, r.point, r.decision, r.mode, r.policy) for r in rows] == [
        ("r1", "invite", "deny", "enforce", "decider"),
        ("r2", "invite", "drop", "enforce", "decider"),
        ("r4", "make_join", "deny", "enforce", "decider"),
        ("r5", "make_knock", "deny", "shadow", "sh"),
    ]
    first = rows[0]
    assert first == AuditRecord(
        id=first.id,
        ts=int(T0 * 1000),
        point="invite",
        origin="bad.example",
        room_id="!room:remote.example",
        sender="@bob:remote.example",
        target="@alice:our.example",
        policy="decider",
        decision="deny",
        reason="bad origin",
        errcode="M_FORBIDDEN",
        status=403,
        request_id="r1",
        mode="enforce",
    )
    assert rows[1].errcode is None and rows[1].status is None and rows[1].reason == "spam"
    assert rows[2].sender == "@x:bad.example" and rows[2].target is None

    denies = await query_decisions(store, decision="deny", mode="enforce")
    assert [r.request_id for r in denies] == ["r1", "r4"]
    recent = await query_decisions(store, since_ts=int((T0 + 60) * 1000))
    assert [r.request_id for r in recent] == ["r2", "r4", "r5"]
    assert [r.request_id for r in await query_decisions(store, limit=2)] == ["r4", "r5"]
    assert [r.request_id for r in await query_decisions(store, point="make_join")] == ["r4"]

    assert await purge_decisions(store, before_ts=int((T0 + 60) * 1000)) == 1
    assert len(await query_decisions(store)) == 3


async def test_audit_allows_when_configured(store: Store, write_policy: WritePolicy) -> None:
    engine = PolicyEngine.from_specs(
        parse_policy_config([{"module": str(write_policy("decider", DECIDER))}]),
        store=store,
        audit_allows=True,
    )
    await engine.decide_invite(invite(request_id="ok-1"))
    (row,) = await query_decisions(store)
    assert (row.request_id, row.decision, row.policy, row.reason) == ("ok-1", "allow", "", "")


async def test_rate_limits_shared_by_two_workers(
    store_config: dict[str, str],
) -> None:
    """Two store objects on one database stand for two gateway workers (or replicas)."""
    specs = parse_policy_config(
        [
            {
                "module": "policies.rate_limit",
                "options": {
                    "invites_per_origin": {"capacity": 3, "per_second": 0.5},
                    "invites_per_invitee": {"capacity": 100, "per_second": 1},
                },
            }
        ]
    )
    clock = FakeClock()
    store_a = await open_store(**store_config)
    store_b = await open_store(**store_config)
    try:
        worker_a = PolicyEngine.from_specs(specs, store=store_a, clock=clock)
        worker_b = PolicyEngine.from_specs(specs, store=store_b, clock=clock)
        results = [
            (await worker_a.decide_invite(invite())).allowed,
            (await worker_b.decide_invite(invite())).allowed,
            (await worker_a.decide_invite(invite())).allowed,
            (await worker_b.decide_invite(invite())).allowed,
        ]
        assert results == [True, True, True, False]
        refused = await worker_a.decide_invite(invite())
        error = refused.error()
        assert (error.status, error.errcode) == (429, "M_LIMIT_EXCEEDED")
        assert error.retry_after_ms is not None and 0 < error.retry_after_ms <= 2001
        # Another origin has its own bucket.
        assert (await worker_b.decide_invite(invite(inviter="@c:other.example"))).allowed

        clock.now += 2  # 0.5 tokens per second: one token back
        assert (await worker_b.decide_invite(invite())).allowed
        assert not (await worker_a.decide_invite(invite())).allowed
    finally:
        await store_a.aclose()
        await store_b.aclose()


async def test_bucket_updates_are_atomic_across_workers(store_config: dict[str, str]) -> None:
    stores = [await open_store(**store_config) for _ in range(2)]
    try:
        buckets = [StoreBuckets(s) for s in stores]
        granted: list[bool] = []

        async def take(b: StoreBuckets) -> None:
            r = await b.take("race", now_ms=1000, capacity=5, per_second=0)
            granted.append(r.allowed)

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(take, buckets[i % 2])
        assert sorted(granted) == [False] * 11 + [True] * 5
    finally:
        for s in stores:
            await s.aclose()


async def test_bucket_refill_and_capacity(store: Store) -> None:
    buckets = StoreBuckets(store)
    take = buckets.take
    r = await take("b", now_ms=0, capacity=2, per_second=1, cost=2)
    assert r.allowed and r.remaining == 0
    r = await take("b", now_ms=500, capacity=2, per_second=1)
    assert not r.allowed and r.retry_after_ms == 501
    r = await take("b", now_ms=1000, capacity=2, per_second=1)
    assert r.allowed and r.remaining == 0
    # A long pause refills only up to capacity.
    r = await take("b", now_ms=100_000, capacity=2, per_second=1)
    assert r.allowed and r.remaining == 1
