"""Operator commands: ``gateway decisions`` and ``gateway policy test``.

Each command comes as a pair for an argparse sub-command (``add_*_arguments(parser)`` and
``run_*(args, ...) -> int``) and as a ``*_main(argv, ...) -> int`` that parses ``argv`` itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

import trio

from gateway.policy.api import (
    Allow,
    Decision,
    Deny,
    Drop,
    InviteContext,
    JoinContext,
    MemoryTools,
)
from gateway.policy.audit import AuditRecord, query_decisions
from gateway.policy.fixtures import FixtureError, load_fixture
from gateway.policy.loading import (
    HOOK_NAMES,
    DecisionPoint,
    PolicyLoadError,
    PolicySpec,
    load_policy_set,
)

__all__ = [
    "StoreSettings",
    "add_decisions_arguments",
    "add_policy_test_arguments",
    "decisions_main",
    "parse_since",
    "policy_test_main",
    "run_decisions",
    "run_policy_test",
]

EXIT_OK = 0
EXIT_ERROR = 1
#: ``policy test --expect`` and the decision differ.
EXIT_UNEXPECTED = 3


class StoreSettings(Protocol):
    """What ``gateway.config.StoreConfig`` provides."""

    @property
    def backend(self) -> str: ...
    @property
    def sqlite_path(self) -> Path | str: ...
    @property
    def postgres_dsn(self) -> str: ...


# --- gateway decisions --------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, *, now: float | None = None) -> int:
    """``90s``, ``15m``, ``1h``, ``2d``, ``1w`` ago, or an ISO 8601 time; milliseconds."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        return int((now - float(m.group(1)) * _UNITS[m.group(2)]) * 1000)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--since: expected a duration like 1h, 30m, 2d or an ISO time, got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def add_decisions_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since", metavar="WHEN", help="only decisions since WHEN (1h, 30m, 2d, or ISO time)"
    )
    parser.add_argument("--decision", choices=("allow", "deny", "drop"))
    parser.add_argument(
        "--point", choices=("invite", "make_join", "send_join", "make_knock", "send_knock")
    )
    parser.add_argument("--mode", choices=("enforce", "shadow"))
    parser.add_argument("--limit", type=int, default=100, help="at most this many (newest)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def _format_record(r: AuditRecord) -> str:
    when = datetime.fromtimestamp(r.ts / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    users = r.sender if r.target is None else f"{r.sender} -> {r.target}"
    code = f" {r.status} {r.errcode}" if r.errcode else ""
    shadow = " (shadow)" if r.mode == "shadow" else ""
    policy = r.policy or "-"
    return (
        f"{when[:-4]}Z {r.point} {r.decision}{shadow}{code} policy={policy} origin={r.origin}"
        f" room={r.room_id} {users} reason={r.reason!r} request={r.request_id}"
    )


async def _query(store_settings: StoreSettings, args: argparse.Namespace) -> list[AuditRecord]:
    from gateway.store import open_store

    store = await open_store(
        store_settings.backend,
        sqlite_path=str(store_settings.sqlite_path),
        postgres_dsn=store_settings.postgres_dsn or None,
    )
    try:
        return await query_decisions(
            store,
            since_ts=args.since_ts,
            decision=args.decision,
            point=args.point,
            mode=args.mode,
            limit=args.limit,
        )
    finally:
        await store.aclose()


def run_decisions(
    args: argparse.Namespace, store_settings: StoreSettings, *, out: TextIO | None = None
) -> int:
    """Lists audit rows from the configured store, oldest first."""
    out = out if out is not None else sys.stdout
    try:
        args.since_ts = parse_since(args.since) if args.since else None
    except ValueError as e:
        print(e, file=sys.stderr)
        return EXIT_ERROR
    if args.limit < 1:
        print("--limit: must be at least 1", file=sys.stderr)
        return EXIT_ERROR
    from gateway.store import StoreError

    try:
        records = trio.run(_query, store_settings, args)
    except StoreError as e:
        print(f"cannot read decisions from the store: {e}", file=sys.stderr)
        return EXIT_ERROR
    for record in records:
        if args.json:
            print(json.dumps(record.to_json(), sort_keys=True), file=out)
        else:
            print(_format_record(record), file=out)
    if not records and not args.json:
        # Said on standard error, so that the listing itself stays empty for scripts.
        print("no decisions match", file=sys.stderr)
    return EXIT_OK


def decisions_main(
    argv: Sequence[str], store_settings: StoreSettings, *, out: TextIO | None = None
) -> int:
    """``gateway decisions [--since 1h] [--decision deny] [--json] ...``."""
    parser = argparse.ArgumentParser(prog="gateway decisions", description="List decisions.")
    add_decisions_arguments(parser)
    return run_decisions(parser.parse_args(list(argv)), store_settings, out=out)


# --- gateway policy test ------------------------------------------------------------------


def add_policy_test_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("module", help="dotted module name (policies.server_rules) or .py path")
    parser.add_argument(
        "--fixture", required=True, type=Path, help="JSON file describing the request"
    )
    parser.add_argument(
        "--options", default="{}", help="the policy's options as a JSON object (default {})"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument(
        "--expect",
        choices=("allow", "deny", "drop"),
        help=f"exit with status {EXIT_UNEXPECTED} unless the decision is this",
    )
    parser.add_argument("--json", action="store_true", help="print the decision as JSON")


def _describe(decision: Decision) -> dict[str, Any]:
    if isinstance(decision, Deny):
        body: dict[str, Any] = {
            "decision": "deny",
            "status": decision.status,
            "errcode": decision.errcode,
            "reason": decision.reason,
        }
        if decision.retry_after_ms is not None:
            body["retry_after_ms"] = decision.retry_after_ms
        return body
    if isinstance(decision, Drop):
        return {"decision": "drop", "reason": decision.reason}
    return {"decision": "allow"}


def run_policy_test(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Runs one policy's hook on a recorded request and prints its decision.

    Unlike the engine, a failing hook is reported with its traceback (exit status 1) rather
    than turned into a deny, so an author sees what went wrong.
    """
    out = out if out is not None else sys.stdout
    err = sys.stderr
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as e:
        print(f"--options: not valid JSON: {e}", file=err)
        return EXIT_ERROR
    if not isinstance(options, dict):
        print("--options: must be a JSON object", file=err)
        return EXIT_ERROR
    try:
        ctx = load_fixture(args.fixture)
    except (FixtureError, OSError) as e:
        print(f"{args.fixture}: {e}", file=err)
        return EXIT_ERROR
    spec = PolicySpec(
        module=args.module, name="policy", options=options, key="policy", base_dir=Path.cwd()
    )
    try:
        (policy,) = load_policy_set([spec]).policies
    except PolicyLoadError as e:
        for problem in e.problems:
            print(problem.replace("policy.", "", 1), file=err)
        return EXIT_ERROR
    point: DecisionPoint = (
        "invite"
        if isinstance(ctx, InviteContext)
        else "join"
        if isinstance(ctx, JoinContext)
        else "knock"
    )
    hook = policy.hooks.get(point)
    if hook is None:
        print(f"{args.module} has no {HOOK_NAMES[point]} hook: it allows every {point}", file=out)
        return _expect(Allow(), args.expect)
    ctx = dataclasses.replace(ctx, tools=MemoryTools())

    async def run() -> Any:
        with trio.fail_after(args.timeout):
            return await hook(ctx, policy.options)

    try:
        decision = trio.run(run)
    except trio.TooSlowError:
        print(f"{HOOK_NAMES[point]} did not decide within {args.timeout:g}s", file=err)
        return EXIT_ERROR
    except Exception:
        traceback.print_exc(file=err)
        return EXIT_ERROR
    if not isinstance(decision, Allow | Deny | Drop):
        print(f"{HOOK_NAMES[point]} returned {decision!r}, not a decision", file=err)
        return EXIT_ERROR
    if isinstance(decision, Drop) and point != "invite":
        print(f"{HOOK_NAMES[point]} returned drop, which is for invites only", file=err)
        return EXIT_ERROR
    described = _describe(decision)
    if args.json:
        print(json.dumps(described, sort_keys=True), file=out)
    else:
        extra = "".join(f" {described[k]}" for k in ("status", "errcode") if k in described)
        reason = f": {described['reason']}" if "reason" in described else ""
        print(f"{described['decision']}{extra}{reason}", file=out)
    return _expect(decision, args.expect)


def _expect(decision: Decision, expected: str | None) -> int:
    if expected is not None and decision.kind != expected:
        print(f"expected {expected}, got {decision.kind}", file=sys.stderr)
        return EXIT_UNEXPECTED
    return EXIT_OK


def policy_test_main(argv: Sequence[str], *, out: TextIO | None = None) -> int:
    """``gateway policy test MODULE --fixture FILE.json [--options JSON] [--expect D]``."""
    parser = argparse.ArgumentParser(
        prog="gateway policy test", description="Run a policy on a recorded request."
    )
    add_policy_test_arguments(parser)
    return run_policy_test(parser.parse_args(list(argv)), out=out)
