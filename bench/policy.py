"""Policy engine throughput and latency, in process, on a SQLite store.

Runs the same invite through:

* an engine with no policies (the baseline),
* the built-in chain without store access (server_rules, policy_lists, min_room_version),
* the full built-in chain, adding rate_limit (one store transaction per invite),

and prints decisions per second and per-decision latency (p50, p99) for each, plus the
latency the chain adds over the baseline. A share of the invites is denied so the audit
trail is written too.

Usage: ``python bench/policy.py [--invites 2000] [--concurrency 8]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.policy import PolicyEngine, parse_policy_config  # noqa: E402
from gateway.policy.api import InviteContext  # noqa: E402
from gateway.store import open_store  # noqa: E402

BANLIST = [
    {
        "type": "m.policy.rule.server",
        "state_key": f"rule{i}",
        "content": {"entity": f"*.spam{i}.example", "recommendation": "m.ban", "reason": "spam"},
    }
    for i in range(200)
] + [
    {
        "type": "m.policy.rule.user",
        "state_key": "user",
        "content": {"entity": "@spammer*:*", "recommendation": "m.ban", "reason": "spam"},
    }
]


def chain(banlist: Path, *, with_rate_limit: bool) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = [
        {
            "module": "policies.server_rules",
            "options": {"deny_origins": ["*.evil.example"], "deny_ip_literals": True},
        },
        {"module": "policies.policy_lists", "options": {"files": [str(banlist)]}},
        {"module": "policies.min_room_version", "options": {"minimum": "6"}},
    ]
    if with_rate_limit:
        entries.append(
            {
                "module": "policies.rate_limit",
                "options": {
                    "invites_per_origin": {"capacity": 1e9, "per_second": 1e6},
                    "invites_per_invitee": {"capacity": 1e9, "per_second": 1e6},
                },
            }
        )
    return entries


def make_invite(i: int) -> InviteContext:
    # One in ten is from a banned user, so denials (and audit rows) are part of the mix.
    inviter = (
        f"@spammer{i}:remote{i % 50}.example" if i % 10 == 0 else f"@u{i}:remote{i % 50}.example"
    )
    invitee = f"@user{i % 100}:our.example"
    room_id = f"!room{i}:remote{i % 50}.example"
    return InviteContext(
        event={
            "type": "m.room.member",
            "state_key": invitee,
            "sender": inviter,
            "room_id": room_id,
            "content": {"membership": "invite"},
        },
        inviter=inviter,
        invitee=invitee,
        origin=inviter.split(":", 1)[1],
        room_id=room_id,
        room_version="10",
        create_event=None,
        create_event_verified=False,
        creator_servers=(inviter.split(":", 1)[1],),
        request_id=f"bench-{i}",
    )


async def measure(engine: PolicyEngine, invites: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < invites:
            i = next_index
            next_index += 1
            ctx = make_invite(i)
            start = time.perf_counter()
            await engine.decide_invite(ctx)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "decisions_per_second": invites / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


async def main(invites: int, concurrency: int) -> dict[str, dict[str, float]]:
    import structlog

    # Logging one line per decision would measure the terminal, not the engine.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        banlist = Path(tmp) / "banlist.json"
        banlist.write_text(json.dumps(BANLIST))
        store = await open_store("sqlite", sqlite_path=str(Path(tmp) / "bench.db"))
        try:
            setups = {
                "no policies": [],
                "built-ins without store": chain(banlist, with_rate_limit=False),
                "built-ins with rate_limit": chain(banlist, with_rate_limit=True),
            }
            for label, entries in setups.items():
                engine = PolicyEngine.from_specs(parse_policy_config(entries), store=store)
                await measure(engine, min(200, invites), concurrency)  # warm up
                results[label] = await measure(engine, invites, concurrency)
        finally:
            await store.aclose()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--invites", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    results = trio.run(main, args.invites, args.concurrency)
    base = results["no policies"]["p50_ms"]
    print(f"{args.invites} invites, {args.concurrency} concurrent, SQLite store")
    for label, r in results.items():
        added = r["p50_ms"] - base
        print(
            f"  {label:<27} {r['decisions_per_second']:>9.0f} decisions/s"
            f"  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms"
            f"  (+{added:.3f} ms p50 over no policies)"
        )
