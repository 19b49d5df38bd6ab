"""v3 invite through the gateway versus the same invite sent as v2 straight to Synapse.

Starts a real Synapse with the gateway in front (the demo's stack) and a remote server on
loopback, registers invitees, then sends N invites each way, one at a time, and prints
latency percentiles, throughput, the ratio, and the gateway's own added time per invite
(median v3 latency minus median v2 latency: validation, key checks, translation).

    .venv/bin/python bench/invite.py [--invites 100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.demo.stack import StackProcesses, prepare_stack
from gateway.demo.synapse import free_port, register_user
from tests.support.pdus import event_id_of, make_remote_room
from tests.support.remote_server import RemoteServer


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--invites", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, RemoteServer() as remote:
        stack = prepare_stack(Path(tmp), port=free_port(), log_format="json")
        processes = StackProcesses(stack)
        processes.start()
        try:
            user = register_user(
                stack.homeserver_url, stack.registration_shared_secret, "bench", "bench-pass"
            )
            invitee = user.user_id
            results: dict[str, list[float]] = {"v3 via gateway": [], "v2 direct": []}
            with (
                httpx.Client(base_url=stack.gateway_url, timeout=30) as gw,
                httpx.Client(base_url=stack.homeserver_url, timeout=30) as hs,
            ):
                for i in range(args.invites * 2 + 10):
                    room = make_remote_room("11", remote.server_name, remote.signing_key)
                    invite = room.make_invite(invitee)
                    if i % 2 == 0:
                        uri = f"/_matrix/federation/v3/invite/{quote(room.room_id, safe='')}"
                        body = {"event": invite, "invite_room_state": [], "state": [room.create]}
                        client, label = gw, "v3 via gateway"
                    else:
                        event_id = event_id_of(invite, "11")
                        uri = (
                            f"/_matrix/federation/v2/invite/{quote(room.room_id, safe='')}/"
                            f"{quote(event_id, safe='')}"
                        )
                        body = {
                            "room_version": "11",
                            "event": invite,
                            "invite_room_state": [room.create],
                        }
                        client, label = hs, "v2 direct"
                    start = time.perf_counter()
                    answer = remote.federation_request(
                        client, "PUT", uri, destination=stack.server_name, content=body
                    )
                    elapsed = time.perf_counter() - start
                    if answer.status_code != 200:
                        print(f"{label}: {answer.status_code} {answer.text}", file=sys.stderr)
                        return 1
                    if i >= 10:  # warm-up: key fetches and caches
                        results[label].append(elapsed * 1000)
        finally:
            processes.stop()
    print(f"{'path':<16} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'invites/s':>10}")
    for label, values in results.items():
        rate = len(values) / (sum(values) / 1000)
        print(
            f"{label:<16} {len(values):>4} {statistics.median(values):>8.2f} "
            f"{percentile(values, 99):>8.2f} {rate:>10.1f}"
        )
    v3, v2 = statistics.median(results["v3 via gateway"]), statistics.median(results["v2 direct"])
    print(f"ratio v3/v2 (median latency): {v3 / v2:.2f}")
    print(f"gateway's own time per invite (median difference): {v3 - v2:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
