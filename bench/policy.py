"""Policy engine throughput, in process, and the chain's added latency on a real invite.

Part 1, in process, on a SQLite store: runs the same invite through

* an engine with no policies (the baseline),
* the built-in chain without store access (server_rules, policy_lists, min_room_version),
* the full built-in chain, adding rate_limit (one store transaction per invite),

and prints decisions per second and per-decision latency (p50, p99) for each, plus the
latency the chain adds over the baseline. A share of the invites is denied so the audit
trail is written too.

Part 2, end to end: starts one real stack (Synapse with the gateway in front) with the full
built-in chain configured (limits high enough that every invite is allowed) and a remote
server on loopback, then sends v3 invites one at a time through the gateway in alternating
phases: chain on, chain off, on, off, ... The chain is switched without a restart: the
gateway's config is rewritten with or without its policies and the gateway gets SIGHUP.
It prints p50/p99 per phase and per setting, and the median latency the chain adds.

Usage: ``python bench/policy.py [--invites 2000] [--concurrency 8] [--stack-invites 80]
[--rounds 3] [--no-stack]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.demo.stack import StackProcesses, prepare_stack, to_toml  # noqa: E402
from gateway.demo.synapse import free_port, register_user  # noqa: E402
from gateway.policy import PolicyEngine, parse_policy_config  # noqa: E402
from gateway.policy.api import InviteContext  # noqa: E402
from gateway.store import open_store  # noqa: E402
from tests.support.pdus import make_remote_room  # noqa: E402
from tests.support.remote_server import RemoteServer  # noqa: E402

ROOM_VERSION = "11"
WARM_UP_INVITES = 10
# The first invites after a switch are not counted: the reload itself re-imports the chain.
SETTLE_INVITES = 2
RELOAD_TIMEOUT = 20.0

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


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def log_count(log_path: Path, event: str) -> int:
    count = 0
    for line in log_path.read_text(encoding="utf8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event:
            count += 1
    return count


def hook_decisions(internal: httpx.Client) -> float:
    """The gateway's count of policy hook decisions so far (all policies and outcomes)."""
    answer = internal.get("/metrics")
    answer.raise_for_status()
    total = 0.0
    for line in answer.text.splitlines():
        if line.startswith("gateway_policy_decisions_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def switch_chain(processes: StackProcesses, policies: list[dict[str, Any]]) -> None:
    """Rewrites gateway.toml with ``policies`` (none: no [[policies]] at all), sends SIGHUP
    to the gateway and waits until it logs the reload."""
    stack = processes.stack
    config = {k: v for k, v in stack.gateway_config.items() if k != "policies"}
    if policies:
        config["policies"] = policies  # type: ignore[assignment]
    stack.gateway_config_path.write_text(to_toml(config), encoding="utf8")
    pid = processes.gateway.pid
    if pid is None:
        raise RuntimeError("the gateway is not running")
    before = log_count(stack.gateway_log_path, "policies reloaded")
    failed_before = log_count(
        stack.gateway_log_path, "policies not reloaded; the previous set stays active"
    )
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while time.monotonic() < deadline:
        if log_count(stack.gateway_log_path, "policies reloaded") > before:
            return
        if (
            log_count(
                stack.gateway_log_path, "policies not reloaded; the previous set stays active"
            )
            > failed_before
        ):
            raise RuntimeError(
                "the gateway refused the new policy set:\n" + processes.gateway.logs()
            )
        time.sleep(0.05)
    raise RuntimeError("no 'policies reloaded' after SIGHUP:\n" + processes.gateway.logs())


def stack_run(stack_invites: int, rounds: int) -> dict[str, list[list[float]]]:
    """Invite latencies (ms) through a real stack: per setting, one list per phase."""
    results: dict[str, list[list[float]]] = {"chain on": [], "chain off": []}
    with tempfile.TemporaryDirectory() as tmp, RemoteServer() as remote:
        banlist = Path(tmp) / "banlist.json"
        banlist.write_text(json.dumps(BANLIST))
        policies = chain(banlist, with_rate_limit=True)
        stack = prepare_stack(
            Path(tmp) / "stack",
            port=free_port(),
            log_format="json",
            user_config={"policies": policies},
        )
        processes = StackProcesses(stack)
        processes.start()
        try:
            invitee = register_user(
                stack.homeserver_url, stack.registration_shared_secret, "bench", "bench-pass"
            ).user_id
            with (
                httpx.Client(base_url=stack.gateway_url, timeout=30) as gateway,
                # The internal listener's certificate is the gateway's own, made for loopback.
                httpx.Client(base_url=stack.internal_url, timeout=10, verify=False) as internal,
            ):

                def invite() -> float:
                    room = make_remote_room(ROOM_VERSION, remote.server_name, remote.signing_key)
                    uri = f"/_matrix/federation/v3/invite/{quote(room.room_id, safe='')}"
                    body = {
                        "event": room.make_invite(invitee),
                        "invite_room_state": [],
                        "state": [room.create],
                    }
                    start = time.perf_counter()
                    answer = remote.federation_request(
                        gateway, "PUT", uri, destination=stack.server_name, content=body
                    )
                    elapsed = (time.perf_counter() - start) * 1000
                    if answer.status_code != 200:
                        raise RuntimeError(f"invite answered {answer.status_code}: {answer.text}")
                    return elapsed

                for _ in range(WARM_UP_INVITES):  # key fetches and caches
                    invite()
                chain_active = True
                for phase in range(rounds * 2):
                    on = phase % 2 == 0
                    if on != chain_active:
                        switch_chain(processes, policies if on else [])
                        chain_active = on
                    for _ in range(SETTLE_INVITES):
                        invite()
                    before = hook_decisions(internal)
                    latencies = [invite() for _ in range(stack_invites)]
                    # Proof that the switch took: every hook decided each invite, or none did.
                    decided = hook_decisions(internal) - before
                    expected = len(policies) * stack_invites if on else 0
                    if decided != expected:
                        raise RuntimeError(
                            f"phase {phase + 1} (chain {'on' if on else 'off'}): "
                            f"{decided:.0f} hook decisions, expected {expected}"
                        )
                    results["chain on" if on else "chain off"].append(latencies)
                    if processes.poll() is not None:
                        raise RuntimeError(
                            f"{processes.poll()} stopped:\n{processes.gateway.logs()}"
                        )
        finally:
            processes.stop()
    return results


def print_in_process(results: dict[str, dict[str, float]], invites: int, concurrency: int) -> None:
    base = results["no policies"]["p50_ms"]
    print(f"In process: {invites} invites, {concurrency} concurrent, SQLite store")
    for label, r in results.items():
        added = r["p50_ms"] - base
        print(
            f"  {label:<27} {r['decisions_per_second']:>9.0f} decisions/s"
            f"  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms"
            f"  (+{added:.3f} ms p50 over no policies)"
        )


def print_stack(results: dict[str, list[list[float]]], stack_invites: int) -> None:
    print(
        f"\nEnd to end: v3 invites through the gateway to Synapse, one at a time, "
        f"{stack_invites} per phase, every one answered 200"
    )
    print(f"  {'phase':<16} {'n':>4} {'p50 ms':>8} {'p99 ms':>8}")
    phases = max(len(v) for v in results.values())
    for i in range(phases):
        for label in ("chain on", "chain off"):
            if i < len(results[label]):
                values = results[label][i]
                print(
                    f"  {label + f' #{i + 1}':<16} {len(values):>4} "
                    f"{statistics.median(values):>8.2f} {percentile(values, 99):>8.2f}"
                )
    medians = {}
    for label, phases_of in results.items():
        values = [v for phase in phases_of for v in phase]
        medians[label] = statistics.median(values)
        print(
            f"  {label + ' (all)':<16} {len(values):>4} "
            f"{medians[label]:>8.2f} {percentile(values, 99):>8.2f}"
        )
    added = medians["chain on"] - medians["chain off"]
    print(f"  added median latency of the chain: {added:+.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--invites", type=int, default=2000, help="in-process invites per setup")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--stack-invites", type=int, default=80, help="end-to-end invites per phase"
    )
    parser.add_argument("--rounds", type=int, default=3, help="pairs of on/off phases")
    parser.add_argument("--no-stack", action="store_true", help="skip the end-to-end part")
    args = parser.parse_args()
    in_process = trio.run(main, args.invites, args.concurrency)
    print_in_process(in_process, args.invites, args.concurrency)
    if not args.no_stack:
        print_stack(stack_run(args.stack_invites, args.rounds), args.stack_invites)
