"""Outbound edge cost: Synapse's federation traffic through the gateway versus direct.

    python bench/outbound.py [--destinations 8] [--messages 400] [--latency-rounds 40]
                             [--keep]

Starts, in one run on this machine, two real Synapses (SQLite, loopback): one whose
outbound federation goes through the gateway's outbound listener (the demo's stack with
``outbound_federation_restricted_to``), one sending directly. Both send to the same set of
sink servers on loopback (TLS, each a server name of its own, answering every transaction
at once). The load is to-device messages to users on the sinks (``sendToDevice``), which
Synapse sends as EDUs in federation transactions without any room to set up first.

- throughput: ``--messages`` to-device messages spread over ``--destinations`` servers,
  sent by 8 client threads; the figure is messages delivered per second, from the first
  client call to the last message seen by a sink;
- latency: one message at a time to one destination (``--latency-rounds``), from the
  client call to the sink seeing it; p50 and p90.

It prints both rows, the throughput ratio (gateway / direct) and the median latency the
gateway adds. About a minute in all. Every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.demo.stack import Stack, StackProcesses, prepare_stack
from gateway.demo.synapse import RegisteredUser, free_port, register_user
from gateway.notary.certificate import ensure_self_signed_certificate

CLIENT_THREADS = 8


class Sink:
    """A federation destination that accepts every transaction and notes each to-device
    message's ``n`` with the time it arrived."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.seen: dict[str, float] = {}
        self.transactions = 0
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_PUT(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                now = time.monotonic()
                with sink._lock:
                    sink.transactions += 1
                    for edu in body.get("edus", []):
                        for by_device in edu.get("content", {}).get("messages", {}).values():
                            for message in by_device.values():
                                sink.seen.setdefault(str(message.get("n")), now)
                self._answer(200, {"pdus": {}})

            def do_GET(self) -> None:
                self._answer(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized"})

            do_POST = do_GET

            def _answer(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.name = f"localhost:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def arrival(self, n: str) -> float | None:
        with self._lock:
            return self.seen.get(n)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def running(stack: Stack) -> Iterator[StackProcesses]:
    processes = StackProcesses(stack)
    processes.start()
    try:
        yield processes
    finally:
        processes.stop()


def send_to_device(client: httpx.Client, user: RegisteredUser, target: str, n: str) -> None:
    answer = client.put(
        f"/_matrix/client/v3/sendToDevice/org.example.bench/{secrets.token_hex(8)}",
        json={"messages": {target: {"*": {"n": n}}}},
        headers={"Authorization": f"Bearer {user.access_token}"},
    )
    answer.raise_for_status()


def wait_all(sinks: list[Sink], wanted: dict[str, int], timeout: float) -> float:
    """The time the last wanted message arrived (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        times = [sinks[i].arrival(n) for n, i in wanted.items()]
        if all(t is not None for t in times):
            return max(t for t in times if t is not None)
        time.sleep(0.02)
    missing = sum(1 for n, i in wanted.items() if sinks[i].arrival(n) is None)
    raise SystemExit(f"{missing} of {len(wanted)} messages never arrived")


def measure(
    label: str, stack: Stack, sinks: list[Sink], messages: int, rounds: int
) -> dict[str, float]:
    user = register_user(
        stack.homeserver_url,
        stack.registration_shared_secret,
        f"bench-{secrets.token_hex(3)}",
        secrets.token_urlsafe(12),
    )
    with httpx.Client(base_url=stack.homeserver_url, timeout=60) as client:
        # Warm-up: every destination contacted once (connections, keys, discovery).
        warm = {f"{label}-warm-{i}": i for i in range(len(sinks))}
        for n, i in warm.items():
            send_to_device(client, user, f"@u:{sinks[i].name}", n)
        wait_all(sinks, warm, 60)

        latencies = []
        for r in range(rounds):
            n = f"{label}-lat-{r}"
            started = time.monotonic()
            send_to_device(client, user, f"@u:{sinks[0].name}", n)
            arrived = wait_all(sinks, {n: 0}, 30)
            latencies.append((arrived - started) * 1000)

        wanted = {f"{label}-tp-{k}": k % len(sinks) for k in range(messages)}
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            list(
                pool.map(
                    lambda item: send_to_device(client, user, f"@u:{sinks[item[1]].name}", item[0]),
                    wanted.items(),
                )
            )
        finished = wait_all(sinks, wanted, 120)
    latencies.sort()
    return {
        "throughput": messages / (finished - started),
        "p50": statistics.median(latencies),
        "p90": latencies[int(len(latencies) * 0.9) - 1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--destinations", type=int, default=8)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--latency-rounds", type=int, default=40)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-outbound-"))
    try:
        cert, key = ensure_self_signed_certificate(workdir / "tls", "localhost")
        sinks = [Sink(cert, key) for _ in range(args.destinations)]
        through = prepare_stack(workdir / "through", port=free_port(), log_format="json")
        direct = prepare_stack(
            workdir / "direct", port=free_port(), log_format="json", outbound=False
        )
        results: dict[str, dict[str, float]] = {}
        with ExitStack() as stack:
            for prepared in (direct, through):
                stack.enter_context(running(prepared))
            # Alternate the two, twice, and keep each one's better run.
            for _ in range(2):
                for label, prepared in (("direct", direct), ("gateway", through)):
                    result = measure(
                        label + secrets.token_hex(2),
                        prepared,
                        sinks,
                        args.messages,
                        args.latency_rounds,
                    )
                    best = results.get(label)
                    if best is None or result["throughput"] > best["throughput"]:
                        results[label] = result
        for sink in sinks:
            sink.stop()
        print()
        print(f"to-device messages to {args.destinations} destinations, {args.messages} per run")
        print(f"{'path':<24} {'msg/s':>8} {'p50 ms':>8} {'p90 ms':>8}")
        for label, name in (("direct", "Synapse direct"), ("gateway", "through the gateway")):
            r = results[label]
            print(f"{name:<24} {r['throughput']:>8.1f} {r['p50']:>8.1f} {r['p90']:>8.1f}")
        ratio = results["gateway"]["throughput"] / results["direct"]["throughput"]
        added = results["gateway"]["p50"] - results["direct"]["p50"]
        print(f"throughput gateway/direct: {ratio:.2f}")
        print(f"median latency added by the gateway: {added:+.1f} ms")
        print(f"sink transactions: {sum(s.transactions for s in sinks)}")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
