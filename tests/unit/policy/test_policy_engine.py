"""The engine: chain order, decisions, failure modes, shadow mode, metrics, logs, reload."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from gateway.errors import MatrixError
from gateway.policy import (
    FAILED_CLOSED_REASON,
    PolicyEngine,
    PolicyLoadError,
    parse_policy_config,
)
from gateway.policy.api import Deny, Drop, deny
from tests.unit.policy.contexts import invite, join, knock

WritePolicy = Callable[[str, str], Path]

# A policy whose decision comes from its options; it records every call in CALLS.
CONFIGURABLE = """
from gateway.policy.api import allow, deny, drop

CALLS = []

def validate_options(options):
    return dict(options)

async def _decide(point, ctx, options):
    CALLS.append((point, ctx.request_id))
    what = options.get(point, options.get("all", "allow"))
    if what == "deny":
        return deny(options.get("reason", "no"), **options.get("deny_args", {}))
    if what == "drop":
        return drop("dropped")
    return allow()

async def on_invite(ctx, options):
    return await _decide("invite", ctx, options)

async def on_join(ctx, options):
    return await _decide("join", ctx, options)

async def on_knock(ctx, options):
    return await _decide("knock", ctx, options)
"""

FAILING = """
import trio
from gateway.policy.api import allow

async def on_invite(ctx, options):
    if options.get("how") == "slow":
        await trio.sleep(3600)
    if options.get("how") == "raise":
        raise RuntimeError("database password is hunter2")
    if options.get("how") == "bogus":
        return "allow"
    return allow()
"""


def engine_for(
    write_policy: WritePolicy, entries: list[dict[str, Any]], **kwargs: Any
) -> PolicyEngine:
    path = write_policy("configurable", CONFIGURABLE)
    failing = write_policy("failing", FAILING)
    raw = []
    for entry in entries:
        entry = dict(entry)
        entry["module"] = {"configurable": str(path), "failing": str(failing)}.get(
            entry["module"], entry["module"]
        )
        raw.append(entry)
    return PolicyEngine.from_specs(parse_policy_config(raw), **kwargs)


def calls(engine: PolicyEngine, name: str) -> list[tuple[str, str]]:
    (policy,) = [p for p in engine.policy_set.policies if p.name == name]
    result: list[tuple[str, str]] = policy.module.CALLS
    return result


def sample(engine: PolicyEngine, metric: str, **labels: str) -> float:
    value = engine.metrics.registry.get_sample_value(metric, labels)
    return 0.0 if value is None else float(value)


async def test_empty_chain_allows() -> None:
    engine = PolicyEngine()
    outcome = await engine.decide_invite(invite())
    assert outcome.allowed and outcome.policy is None
    assert (await engine.decide_join(join())).allowed
    assert (await engine.decide_knock(knock())).allowed


async def test_chain_runs_in_order_and_first_non_allow_wins(write_policy: WritePolicy) -> None:
    engine = engine_for(
        write_policy,
        [
            {"module": "configurable", "name": "first", "options": {"all": "allow"}},
            {"module": "configurable", "name": "second", "options": {"invite": "deny"}},
            {"module": "configurable", "name": "third", "options": {"all": "deny"}},
        ],
    )
    outcome = await engine.decide_invite(invite(request_id="r1"))
    assert outcome.denied and outcome.policy == "second"
    assert calls(engine, "first") == [("invite", "r1")]
    assert calls(engine, "second") == [("invite", "r1")]
    assert calls(engine, "third") == []  # the chain stopped at "second"

    outcome = await engine.decide_join(join(request_id="r2"))
    assert outcome.denied and outcome.policy == "third"
    assert [c[1] for c in calls(engine, "first")] == ["r1", "r2"]
    assert calls(engine, "third") == [("join", "r2")]


async def test_deny_defaults_to_403_forbidden(write_policy: WritePolicy) -> None:
    engine = engine_for(
        write_policy, [{"module": "configurable", "options": {"all": "deny", "reason": "go"}}]
    )
    outcome = await engine.decide_invite(invite())
    assert outcome.decision == Deny("go", "M_FORBIDDEN", 403)
    error = outcome.error()
    assert isinstance(error, MatrixError)
    assert (error.status, error.errcode, error.message) == (403, "M_FORBIDDEN", "go")
    assert error.to_json() == {"errcode": "M_FORBIDDEN", "error": "go"}


async def test_deny_with_custom_errcode_status_and_retry(write_policy: WritePolicy) -> None:
    args = {"errcode": "M_LIMIT_EXCEEDED", "status": 429, "retry_after_ms": 1500}
    engine = engine_for(
        write_policy,
        [{"module": "configurable", "options": {"all": "deny", "deny_args": args}}],
    )
    error = (await engine.decide_knock(knock())).error()
    assert (error.status, error.errcode, error.retry_after_ms) == (429, "M_LIMIT_EXCEEDED", 1500)
    with pytest.raises(ValueError):
        deny("bad status", status=200)


async def test_drop_is_for_invites(write_policy: WritePolicy) -> None:
    engine = engine_for(write_policy, [{"module": "configurable", "options": {"all": "drop"}}])
    outcome = await engine.decide_invite(invite())
    assert outcome.dropped and outcome.decision == Drop("dropped")
    with pytest.raises(ValueError):
        outcome.error()


@pytest.mark.parametrize("on_error", ["closed", "open"])
async def test_drop_refused_for_joins_and_knocks(write_policy: WritePolicy, on_error: str) -> None:
    engine = engine_for(
        write_policy,
        [{"module": "configurable", "on_error": on_error, "options": {"all": "drop"}}],
    )
    for outcome, stage in (
        (await engine.decide_join(join()), "make_join"),
        (await engine.decide_join(join(stage="send_join")), "send_join"),
        (await engine.decide_knock(knock()), "make_knock"),
    ):
        assert not outcome.dropped
        if on_error == "closed":
            assert outcome.decision == Deny(FAILED_CLOSED_REASON)
            assert outcome.failure == "drop_not_allowed"
        else:
            assert outcome.allowed and outcome.failure is None
        failures = sample(
            engine,
            "gateway_policy_failures_total",
            policy="configurable",
            point=stage,
            kind="drop_not_allowed",
        )
        assert failures == 1


@pytest.mark.parametrize("how", ["slow", "raise", "bogus"])
async def test_failing_hook_closed_by_default(
    write_policy: WritePolicy, how: str, autojump_clock: trio.testing.MockClock
) -> None:
    engine = engine_for(
        write_policy, [{"module": "failing", "timeout": 0.5, "options": {"how": how}}]
    )
    start = trio.current_time()
    with capture_logs() as logs:
        outcome = await engine.decide_invite(invite(request_id="req-fail"))
    assert outcome.denied and outcome.policy == "failing"
    assert (
        outcome.failure
        == {"slow": "timeout", "raise": "exception", "bogus": "invalid_decision"}[how]
    )
    error = outcome.error()
    assert (error.status, error.errcode) == (403, "M_FORBIDDEN")
    # The peer learns nothing about the failure.
    assert error.message == FAILED_CLOSED_REASON and "hunter2" not in error.message
    if how == "slow":
        assert trio.current_time() - start == pytest.approx(0.5)
    kind = outcome.failure
    assert kind is not None
    assert (
        sample(engine, "gateway_policy_failures_total", policy="failing", point="invite", kind=kind)
        == 1
    )
    assert (
        sample(
            engine,
            "gateway_policy_decisions_total",
            policy="failing",
            point="invite",
            decision="deny",
            mode="enforce",
        )
        == 1
    )
    failure_logs = [e for e in logs if e["event"].startswith("policy.") and e.get("policy")]
    assert any(e["event"] != "policy.decision" for e in failure_logs)
    assert all(e["request_id"] == "req-fail" for e in failure_logs)


@pytest.mark.parametrize("how", ["slow", "raise", "bogus"])
async def test_failing_hook_open_allows_and_chain_continues(
    write_policy: WritePolicy, how: str, autojump_clock: trio.testing.MockClock
) -> None:
    engine = engine_for(
        write_policy,
        [
            {"module": "failing", "timeout": 0.5, "on_error": "open", "options": {"how": how}},
            {"module": "configurable", "options": {"invite": "deny", "reason": "second"}},
        ],
    )
    outcome = await engine.decide_invite(invite())
    # "failing" failed open, so the next policy decided.
    assert outcome.denied and outcome.policy == "configurable" and outcome.failure is None
    assert outcome.error().message == "second"
    kinds = {"slow": "timeout", "raise": "exception", "bogus": "invalid_decision"}
    assert (
        sample(
            engine,
            "gateway_policy_failures_total",
            policy="failing",
            point="invite",
            kind=kinds[how],
        )
        == 1
    )


async def test_shadow_mode_changes_nothing_but_logs(write_policy: WritePolicy) -> None:
    engine = engine_for(
        write_policy,
        [
            {
                "module": "configurable",
                "name": "would_deny",
                "mode": "shadow",
                "options": {"all": "deny", "reason": "shadowed"},
            },
            {"module": "configurable", "name": "allows", "options": {"all": "allow"}},
        ],
    )
    with capture_logs() as logs:
        outcome = await engine.decide_invite(invite(request_id="req-shadow"))
    assert outcome.allowed and outcome.policy is None
    assert [(s.policy, s.decision) for s in outcome.shadow] == [("would_deny", Deny("shadowed"))]
    assert calls(engine, "allows") == [("invite", "req-shadow")]  # the chain went on
    shadow_logs = [e for e in logs if e["event"] == "policy.shadow_decision"]
    assert len(shadow_logs) == 1
    assert shadow_logs[0]["decision"] == "deny" and shadow_logs[0]["request_id"] == "req-shadow"
    final = [e for e in logs if e["event"] == "policy.decision"]
    assert len(final) == 1 and final[0]["decision"] == "allow"
    assert (
        sample(
            engine,
            "gateway_policy_decisions_total",
            policy="would_deny",
            point="invite",
            decision="deny",
            mode="shadow",
        )
        == 1
    )
    assert sample(engine, "gateway_policy_outcomes_total", point="invite", decision="allow") == 1


async def test_shadow_drop_for_join_is_only_logged(write_policy: WritePolicy) -> None:
    engine = engine_for(
        write_policy, [{"module": "configurable", "mode": "shadow", "options": {"all": "drop"}}]
    )
    outcome = await engine.decide_join(join())
    assert outcome.allowed
    assert outcome.shadow[0].failure == "drop_not_allowed"


async def test_one_log_line_per_decision(write_policy: WritePolicy) -> None:
    engine = engine_for(
        write_policy, [{"module": "configurable", "options": {"invite": "deny", "reason": "r"}}]
    )
    with capture_logs() as logs:
        await engine.decide_invite(invite(request_id="req-a"))
        await engine.decide_join(join(request_id="req-b"))
    decisions = [e for e in logs if e["event"] == "policy.decision"]
    assert [(e["request_id"], e["point"], e["decision"]) for e in decisions] == [
        ("req-a", "invite", "deny"),
        ("req-b", "make_join", "allow"),
    ]
    assert decisions[0]["policy"] == "configurable" and decisions[0]["reason"] == "r"


async def test_reload_keeps_old_set_when_new_one_is_broken(write_policy: WritePolicy) -> None:
    path = write_policy(
        "editable",
        """
        from gateway.policy.api import deny

        async def on_invite(ctx, options):
            return deny("version one")
        """,
    )
    specs = parse_policy_config([{"module": str(path)}])
    engine = PolicyEngine.from_specs(specs)
    assert (await engine.decide_invite(invite())).error().message == "version one"
    generation = engine.policy_set.generation

    path.write_text("async def on_invite(ctx, options):\n    return (\n", encoding="utf8")
    with capture_logs() as logs:
        error = engine.reload()
    assert isinstance(error, PolicyLoadError)
    assert error.problems[0].startswith("policies[0].module: cannot import")
    assert "SyntaxError" in error.problems[0]
    assert any(e["event"] == "policy.reload_failed" for e in logs)
    assert engine.policy_set.generation == generation
    assert (await engine.decide_invite(invite())).error().message == "version one"

    # Invalid options also keep the old set.
    bad_options = parse_policy_config([{"module": "policies.rate_limit", "options": {"x": 1}}])
    error = engine.reload(bad_options)
    assert error is not None and error.problems == [
        "policies[0].options.x: unknown option (known: invites_per_invitee,"
        " invites_per_origin, joins_per_origin, knocks_per_origin)"
    ]
    assert (await engine.decide_invite(invite())).error().message == "version one"

    path.write_text(
        "from gateway.policy.api import deny\n\n"
        "async def on_invite(ctx, options):\n    return deny('version two, longer')\n",
        encoding="utf8",
    )
    assert engine.reload() is None
    assert engine.policy_set.generation == generation + 1
    assert (await engine.decide_invite(invite())).error().message == "version two, longer"
    assert (
        engine.metrics.registry.get_sample_value(
            "gateway_policy_reloads_total", {"result": "failed"}
        )
        == 2
    )
    assert (
        engine.metrics.registry.get_sample_value("gateway_policy_reloads_total", {"result": "ok"})
        == 1
    )


async def test_request_in_flight_finishes_with_its_set(write_policy: WritePolicy) -> None:
    path = write_policy(
        "gate",
        """
        import trio
        from gateway.policy.api import deny

        GATE = trio.Event()

        async def on_invite(ctx, options):
            await GATE.wait()
            return deny("old set")
        """,
    )
    engine = PolicyEngine.from_specs(parse_policy_config([{"module": str(path)}]))
    old_module = engine.policy_set.policies[0].module
    results: list[str] = []

    async def decide() -> None:
        results.append((await engine.decide_invite(invite())).error().message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(decide)
        await trio.testing.wait_all_tasks_blocked()
        assert (
            engine.reload(
                parse_policy_config(
                    [{"module": "policies.min_room_version", "options": {"minimum": "1"}}]
                )
            )
            is None
        )
        old_module.GATE.set()
    assert results == ["old set"]
    assert (await engine.decide_invite(invite())).allowed
