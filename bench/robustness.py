"""Hostile requests against the gateway, and what came of them.

Runs the seeded generator of ``tests/robustness/hostile.py`` (malformed, truncated, deeply
nested, huge, non-UTF-8 and non-canonical JSON; forged and garbage X-Matrix headers; odd
IDs and percent-encodings; wrong methods; raw-socket HTTP abuse) against a gateway and
prints the figures: requests sent, by class, statuses, 5xx, resets, timeouts, time; then
whether the gateway still serves a valid v3 invite, a client request and ``/health``, and
how many tracebacks its log holds.

Two targets:

* default: the gateway in a process of its own in front of a fake homeserver that
  answers like a real one (``tests/robustness/harness.py``);
* ``--stack``: the gateway in front of a real Synapse (the demo's stack), with a remote
  server on loopback as the origin; Synapse's own 5xx are told apart from the gateway's by
  the gateway's request log.

    .venv/bin/python bench/robustness.py [--requests 10000] [--seed 20261203]
                                         [--concurrency 16] [--stack] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import load_config
from gateway.demo.stack import StackProcesses, prepare_stack
from gateway.demo.synapse import free_port, register_user
from tests.robustness.harness import (
    LOCAL_USER,
    REMOTE_USER,
    fake_homeserver_target,
    gateway_process,
    make_samples,
    owned_routes,
    q,
)
from tests.robustness.hostile import Target, generate
from tests.robustness.wire import Figures, send_all, summary_lines
from tests.support.inprocess_gateway import HS, REMOTE
from tests.support.remote_server import RemoteServer, x_matrix_authorization


def _log_events(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    with path.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf8", errors="replace").splitlines()
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            events.append({"event": line, "unparsed": True})
    return events


def _tracebacks(events: list[dict[str, Any]]) -> int:
    return sum(
        1
        for e in events
        if e.get("exception")
        or e.get("level") in ("error", "critical")
        or (e.get("unparsed") and "Traceback" in str(e.get("event")))
    )


def _gateway_5xx(events: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    return Counter(
        (e.get("route"), e.get("status"), e.get("outcome"))
        for e in events
        if e.get("event") == "request" and int(e.get("status") or 0) >= 500
    )


def _send(host: str, port: int, target: Target, args: argparse.Namespace) -> Figures:
    started = time.perf_counter()
    requests = generate(target, args.requests, args.seed)
    print(f"generated {len(requests)} requests in {time.perf_counter() - started:.1f} s")
    return trio.run(
        lambda: send_all(
            host, port, requests, concurrency=args.concurrency, exchange_seconds=args.exchange
        )
    )


def _signed_put(url: str, uri: str, origin: str, destination: str, key: Any, body: Any) -> int:
    auth = x_matrix_authorization(
        method="PUT",
        uri=uri,
        origin=origin,
        destination=destination,
        signing_key=key,
        content=body,
    )
    with httpx.Client(base_url=url, timeout=30) as client:
        request = client.build_request(
            "PUT", uri, headers={"Authorization": auth}, content=json.dumps(body).encode()
        )
        request.url = request.url.copy_with(raw_path=uri.encode())
        return client.send(request).status_code


def _still_serving(public_url: str, internal_url: str, invite_status: int) -> str:
    client = httpx.get(f"{public_url}/_matrix/client/versions", timeout=30).status_code
    health = httpx.get(f"{internal_url}/health", verify=False, timeout=30).status_code
    return f"afterwards: v3 invite {invite_status}, client request {client}, /health {health}"


def against_fake_homeserver(args: argparse.Namespace, directory: Path) -> None:
    with gateway_process(directory) as gateway:
        url = urlsplit(gateway.public_url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        target = fake_homeserver_target(f"{host}:{port}", gateway.routes, gateway.remote_key)
        figures = _send(host, port, target, args)
        print(summary_lines(figures, examples=not args.quiet))
        samples = make_samples(REMOTE, gateway.remote_key, LOCAL_USER, REMOTE_USER)
        status = _signed_put(
            gateway.public_url,
            f"/_matrix/federation/v3/invite/{q(samples.room_id)}",
            REMOTE,
            HS,
            gateway.remote_key,
            samples.v3_invite,
        )
        print(_still_serving(gateway.public_url, gateway.internal_url, status))
        events = _log_events(gateway.log_path)
        errors = dict(_gateway_5xx(events))
        print(f"5xx in the gateway's request lines (route, status, outcome): {errors}")
        print(f"tracebacks in the gateway log: {_tracebacks(events)}")


def against_synapse(args: argparse.Namespace, directory: Path) -> None:
    with RemoteServer() as origin:
        stack = prepare_stack(directory, port=free_port(), log_format="json")
        processes = StackProcesses(stack)
        processes.start()
        try:
            invitee = register_user(
                stack.homeserver_url, stack.registration_shared_secret, "victim", "victim-pass"
            )
            config = load_config(stack.gateway_config_path)
            url = urlsplit(stack.gateway_url)
            host, port = url.hostname or "127.0.0.1", url.port or 80
            remote_user = f"@bob:{origin.server_name}"
            target = Target(
                host=f"{host}:{port}",
                server_name=stack.server_name,
                origin=origin.server_name,
                signing_key=origin.signing_key,
                local_user=invitee.user_id,
                remote_user=remote_user,
                samples=make_samples(
                    origin.server_name, origin.signing_key, invitee.user_id, remote_user
                ),
                routes=owned_routes(),
                max_body_size=config.public.max_body_size,
                request_timeout=config.public.request_timeout,
            )
            offset = stack.gateway_log_path.stat().st_size
            figures = _send(host, port, target, args)
            print(summary_lines(figures, examples=not args.quiet))
            samples = make_samples(
                origin.server_name, origin.signing_key, invitee.user_id, remote_user
            )
            status = _signed_put(
                stack.gateway_url,
                f"/_matrix/federation/v3/invite/{q(samples.room_id)}",
                origin.server_name,
                stack.server_name,
                origin.signing_key,
                samples.v3_invite,
            )
            print(_still_serving(stack.gateway_url, stack.internal_url, status))
            events = _log_events(stack.gateway_log_path, offset)
            print(
                "5xx in the gateway's request lines (route, status, outcome; no outcome: "
                f"the homeserver's own answer): {dict(_gateway_5xx(events))}"
            )
            print(f"tracebacks in the gateway log: {_tracebacks(events)}")
        finally:
            processes.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--exchange", type=float, default=90.0, help="seconds per exchange")
    parser.add_argument("--stack", action="store_true", help="in front of a real Synapse")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument("--quiet", action="store_true", help="no example requests")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="robustness-"))
    try:
        if args.stack:
            against_synapse(args, directory)
        else:
            against_fake_homeserver(args, directory)
    finally:
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
