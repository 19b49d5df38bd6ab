"""The admission engine: runs the configured chain of policies at each decision point.

Usage by a feature handler::

    outcome = await engine.decide_invite(ctx)
    if outcome.denied:
        raise outcome.error()          # MatrixError with the policy's status and errcode
    if outcome.dropped:
        ...                            # answer 200 with the event signed by us, forward nothing

Rules:

* Policies run in configured order; the first enforced decision that is not allow wins and
  ends the chain.
* Each hook runs under ``trio.fail_after(timeout)``. A hook that raises, times out, returns
  something that is not a decision, or drops a join or knock has *failed*: with
  ``on_error = "closed"`` (the default) that is a deny (403 ``M_FORBIDDEN``, a generic reason
  that tells the peer nothing about the gateway), with ``"open"`` an allow. Failures are
  logged and counted.
* A ``shadow`` policy is run, logged, counted and audited like any other, and then ignored.
* Audit rows are written before the decision is acted on. When the store fails the decision
  stands and its rows wait in memory (up to :data:`MAX_UNWRITTEN_AUDIT_ROWS`), to be written
  first with the next decision's rows, or by :meth:`PolicyEngine.aclose` when the worker
  stops. A row given up (beyond the limit, or still unwritten at the stop) goes to the log
  whole, as a ``policy.audit_row_lost`` event, so the trail can be mended from the log.
* :meth:`PolicyEngine.reload` builds a complete new :class:`PolicySet` and swaps it in with
  one assignment; requests already running finish with the set they started with. If
  anything fails the old set stays.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.errors import Codes, MatrixError
from gateway.policy.api import (
    Allow,
    Decision,
    Deny,
    Drop,
    InviteContext,
    JoinContext,
    KnockContext,
    MemoryTools,
    OutboundContext,
    PolicyTools,
    allow,
)
from gateway.policy.audit import AuditRecord, write_decisions
from gateway.policy.loading import (
    DecisionPoint,
    LoadedPolicy,
    PolicyConfigError,
    PolicyLoadError,
    PolicySet,
    PolicySpec,
    check_policies,
    load_policy_set,
    parse_policy_config,
)
from gateway.policy.ratelimit import RoomStateReader, StoreBuckets, StoreTools
from gateway.store import Store

__all__ = [
    "FAILED_CLOSED_REASON",
    "Outcome",
    "PolicyConfigError",
    "PolicyEngine",
    "PolicyLoadError",
    "PolicyMetrics",
    "PolicySet",
    "PolicySpec",
    "ShadowResult",
    "check_policies",
    "parse_policy_config",
]

#: What a peer is told when a failing policy closes the door. Deliberately says nothing
#: about which policy, or why.
FAILED_CLOSED_REASON = "Refused by this server's admission policy"
FailureKind = Literal["timeout", "exception", "invalid_decision", "drop_not_allowed"]

_log = structlog.get_logger("gateway.policy")
#: Audit rows kept in memory while the store fails; beyond this the oldest are given up.
MAX_UNWRITTEN_AUDIT_ROWS = 10_000
#: How long a stopping worker tries to write the audit rows still waiting.
AUDIT_FLUSH_TIMEOUT_S = 5.0
_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class PolicyMetrics:
    """Prometheus metrics of the policy engine.

    * ``gateway_policy_decisions_total{policy, point, decision, mode}``: each hook's decision
      after its failure mode was applied (``decision`` allow, deny or drop).
    * ``gateway_policy_failures_total{policy, point, kind}``: hooks that timed out, raised,
      returned a non-decision, or dropped where dropping is not possible.
    * ``gateway_policy_outcomes_total{point, decision}``: what the chain as a whole decided.
    * ``gateway_policy_hook_duration_seconds{policy, point}``.
    * ``gateway_policy_reloads_total{result}``: ``ok`` or ``failed``.

    Pass the gateway's registry (``Metrics.registry``) to serve them with the others.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.decisions = Counter(
            "gateway_policy_decisions_total",
            "Policy hook decisions, by policy, decision point, decision and mode.",
            ["policy", "point", "decision", "mode"],
            registry=self.registry,
        )
        self.failures = Counter(
            "gateway_policy_failures_total",
            "Policy hooks that failed (timeout, exception, invalid decision), by kind.",
            ["policy", "point", "kind"],
            registry=self.registry,
        )
        self.outcomes = Counter(
            "gateway_policy_outcomes_total",
            "Decisions of the whole policy chain, by decision point and decision.",
            ["point", "decision"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "gateway_policy_hook_duration_seconds",
            "Time spent in each policy hook.",
            ["policy", "point"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.reloads = Counter(
            "gateway_policy_reloads_total",
            "Policy set reloads, by result.",
            ["result"],
            registry=self.registry,
        )
        self.audit_rows_waiting = Gauge(
            "gateway_policy_audit_rows_waiting",
            "Audit rows not yet written because the store failed; written with the next ones.",
            registry=self.registry,
        )
        self.audit_rows_dropped = Counter(
            "gateway_policy_audit_rows_dropped_total",
            "Audit rows given up while the store failed (beyond the rows kept waiting, or"
            " unwritten when the worker stopped); each is logged as policy.audit_row_lost.",
            registry=self.registry,
        )


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """What a shadow-mode policy would have decided."""

    policy: str
    decision: Decision
    failure: FailureKind | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The chain's decision for one request."""

    #: Allow, Deny or Drop (Drop only for invites).
    decision: Decision
    #: The configured name of the policy that decided; None when every policy allowed.
    policy: str | None = None
    #: Set when ``decision`` came from a failure mode rather than from the hook.
    failure: FailureKind | None = None
    #: What shadow-mode policies would have decided (non-allow results only).
    shadow: tuple[ShadowResult, ...] = ()

    @property
    def allowed(self) -> bool:
        return isinstance(self.decision, Allow)

    @property
    def denied(self) -> bool:
        return isinstance(self.decision, Deny)

    @property
    def dropped(self) -> bool:
        return isinstance(self.decision, Drop)

    def error(self) -> MatrixError:
        """The Matrix error to answer a denied request with."""
        d = self.decision
        if not isinstance(d, Deny):
            raise ValueError(f"outcome is {d.kind}, not deny")
        return MatrixError(d.status, d.errcode, d.reason, retry_after_ms=d.retry_after_ms)


_FAILED_CLOSED = Deny(reason=FAILED_CLOSED_REASON, errcode=Codes.FORBIDDEN.value, status=403)


@dataclass(frozen=True)
class _Active:
    policy_set: PolicySet
    chains: Mapping[DecisionPoint, tuple[LoadedPolicy, ...]]
    tools: Mapping[str, PolicyTools]


class PolicyEngine:
    """Decides invites, joins, knocks and outbound requests with the current :class:`PolicySet`.

    ``store`` holds the audit trail and the shared rate-limit buckets; without one (tests,
    ``gateway policy test``) nothing is audited and buckets live in memory. ``clock`` gives
    seconds since the epoch. ``state_reader`` answers the policies' ``tools.room_state``
    (with a store only; without one, or without a reader, room state is not available).
    """

    def __init__(
        self,
        policy_set: PolicySet | None = None,
        *,
        specs: Sequence[PolicySpec] = (),
        store: Store | None = None,
        metrics: PolicyMetrics | None = None,
        clock: Callable[[], float] = time.time,
        audit_allows: bool = False,
        state_reader: RoomStateReader | None = None,
    ) -> None:
        self._store = store
        self._state_reader = state_reader
        self._buckets = StoreBuckets(store) if store is not None else None
        self.metrics = metrics if metrics is not None else PolicyMetrics()
        self._clock = clock
        self.audit_allows = audit_allows
        self._specs: tuple[PolicySpec, ...] = tuple(specs)
        self._active = self._prepare(policy_set if policy_set is not None else PolicySet())
        #: audit rows whose write failed (the store was down), written with the next ones
        self._unwritten: list[AuditRecord] = []

    @classmethod
    def from_specs(cls, specs: Sequence[PolicySpec], **kwargs: Any) -> PolicyEngine:
        """Loads ``specs`` (raises :class:`PolicyLoadError`) and builds an engine on them."""
        return cls(load_policy_set(specs, generation=1), specs=specs, **kwargs)

    @property
    def policy_set(self) -> PolicySet:
        return self._active.policy_set

    def _prepare(self, policy_set: PolicySet) -> _Active:
        chains: dict[DecisionPoint, tuple[LoadedPolicy, ...]] = {
            "invite": policy_set.for_point("invite"),
            "join": policy_set.for_point("join"),
            "knock": policy_set.for_point("knock"),
            "outbound": policy_set.for_point("outbound"),
        }
        tools: dict[str, PolicyTools] = {}
        for p in policy_set.policies:
            if self._buckets is not None:
                tools[p.name] = StoreTools(
                    self._buckets,
                    prefix=p.name,
                    clock=self._clock,
                    state_reader=self._state_reader,
                )
            else:
                tools[p.name] = MemoryTools(self._clock)
        return _Active(policy_set, chains, tools)

    def reload(self, specs: Sequence[PolicySpec] | None = None) -> PolicyLoadError | None:
        """Loads ``specs`` (default: the specs of the current set, re-imported from source)
        and makes them the active set. Returns None on success; on failure returns the
        error and the old set stays active. Safe to call from a signal handler's task.

        Rate-limit buckets of a policy keep their state across reloads (they are keyed by the
        policy's name), in memory as in the store.
        """
        wanted = self._specs if specs is None else tuple(specs)
        old = self._active
        try:
            new_set = load_policy_set(wanted, generation=old.policy_set.generation + 1)
        except PolicyLoadError as e:
            self.metrics.reloads.labels("failed").inc()
            _log.error(
                "policy.reload_failed",
                problems=e.problems,
                active_generation=old.policy_set.generation,
            )
            return e
        active = self._prepare(new_set)
        if self._buckets is None:
            # Memory buckets: carry each policy's buckets over, as the store does.
            active = _Active(
                active.policy_set,
                active.chains,
                {name: old.tools.get(name, t) for name, t in active.tools.items()},
            )
        self._active = active
        self._specs = wanted
        self.metrics.reloads.labels("ok").inc()
        _log.info(
            "policy.reloaded",
            generation=new_set.generation,
            policies=[p.name for p in new_set.policies],
        )
        return None

    # -- decision points -----------------------------------------------------------------

    async def decide_invite(self, ctx: InviteContext) -> Outcome:
        return await self._decide("invite", "invite", ctx)

    async def decide_join(self, ctx: JoinContext) -> Outcome:
        return await self._decide("join", ctx.stage, ctx)

    async def decide_knock(self, ctx: KnockContext) -> Outcome:
        return await self._decide("knock", ctx.stage, ctx)

    def has_outbound_policies(self) -> bool:
        """Whether any policy has an ``on_outbound`` hook (else every request is allowed
        without logging a decision per transaction)."""
        return bool(self._active.chains["outbound"])

    async def decide_outbound(self, ctx: OutboundContext) -> Outcome:
        return await self._decide("outbound", "outbound", ctx)

    async def _decide(
        self,
        point: DecisionPoint,
        stage: str,
        ctx: InviteContext | JoinContext | KnockContext | OutboundContext,
    ) -> Outcome:
        active = self._active
        shadow: list[ShadowResult] = []
        audit: list[AuditRecord] = []
        outcome = Outcome(allow())
        for policy in active.chains[point]:
            bound = dataclasses.replace(ctx, tools=active.tools[policy.name])
            decision, failure = await self._run_hook(policy, point, stage, bound)
            mode = policy.spec.mode
            self.metrics.decisions.labels(policy.name, stage, decision.kind, mode).inc()
            if mode == "shadow":
                if not isinstance(decision, Allow) or failure is not None:
                    shadow.append(ShadowResult(policy.name, decision, failure))
                    _log.info(
                        "policy.shadow_decision",
                        point=stage,
                        policy=policy.name,
                        decision=decision.kind,
                        reason=_reason(decision),
                        failure=failure,
                        request_id=ctx.request_id,
                        origin=ctx.origin,
                        room_id=ctx.room_id,
                    )
                    audit.append(self._record(stage, ctx, policy.name, decision, "shadow"))
                continue
            if not isinstance(decision, Allow):
                outcome = Outcome(decision, policy.name, failure)
                break
        outcome = dataclasses.replace(outcome, shadow=tuple(shadow))
        self.metrics.outcomes.labels(stage, outcome.decision.kind).inc()
        _log.info(
            "policy.decision",
            point=stage,
            decision=outcome.decision.kind,
            policy=outcome.policy,
            reason=_reason(outcome.decision),
            failure=outcome.failure,
            request_id=ctx.request_id,
            origin=ctx.origin,
            room_id=ctx.room_id,
            generation=active.policy_set.generation,
        )
        if not outcome.allowed or self.audit_allows:
            audit.append(
                self._record(stage, ctx, outcome.policy or "", outcome.decision, "enforce")
            )
        if audit:
            await self._audit(audit, ctx.request_id)
        return outcome

    async def _run_hook(
        self,
        policy: LoadedPolicy,
        point: DecisionPoint,
        stage: str,
        ctx: InviteContext | JoinContext | KnockContext | OutboundContext,
    ) -> tuple[Decision, FailureKind | None]:
        hook = policy.hooks[point]
        failure: FailureKind
        started = time.perf_counter()
        try:
            with trio.fail_after(policy.spec.timeout):
                result = await hook(ctx, policy.options)
        except trio.TooSlowError:
            failure = "timeout"
            _log.warning(
                "policy.hook_timeout",
                policy=policy.name,
                point=stage,
                timeout=policy.spec.timeout,
                on_error=policy.spec.on_error,
                request_id=ctx.request_id,
            )
        except Exception:
            failure = "exception"
            _log.exception(
                "policy.hook_failed",
                policy=policy.name,
                point=stage,
                on_error=policy.spec.on_error,
                request_id=ctx.request_id,
            )
        else:
            if not isinstance(result, Allow | Deny | Drop):
                failure = "invalid_decision"
                detail = f"returned {type(result).__name__}, not a decision"
            elif isinstance(result, Drop) and point != "invite":
                # Only an invite can be answered without the homeserver: a join or knock
                # needs its response. Dropping one is a policy bug, handled as a failure.
                failure = "drop_not_allowed"
                detail = f"drop is for invites only, returned for {stage}"
            else:
                return result, None
            _log.error(
                "policy.invalid_decision",
                policy=policy.name,
                point=stage,
                detail=detail,
                on_error=policy.spec.on_error,
                request_id=ctx.request_id,
            )
        finally:
            self.metrics.duration.labels(policy.name, stage).observe(time.perf_counter() - started)
        self.metrics.failures.labels(policy.name, stage, failure).inc()
        return (_FAILED_CLOSED if policy.spec.on_error == "closed" else allow()), failure

    def _record(
        self,
        stage: str,
        ctx: InviteContext | JoinContext | KnockContext | OutboundContext,
        policy: str,
        decision: Decision,
        mode: str,
    ) -> AuditRecord:
        sender: str
        target: str | None
        if isinstance(ctx, InviteContext):
            sender, target = ctx.inviter, ctx.invitee
        elif isinstance(ctx, OutboundContext):
            # Outbound: our server (or the inviting user) towards the destination.
            sender, target = ctx.sender or ctx.origin, ctx.destination
        else:
            sender, target = ctx.user, None
        return AuditRecord(
            ts=int(self._clock() * 1000),
            point=stage,
            origin=ctx.origin,
            room_id=ctx.room_id,
            sender=sender,
            target=target,
            policy=policy,
            decision=decision.kind,
            reason=_reason(decision),
            errcode=decision.errcode if isinstance(decision, Deny) else None,
            status=decision.status if isinstance(decision, Deny) else None,
            request_id=ctx.request_id,
            mode=mode,
        )

    async def _audit(self, records: list[AuditRecord], request_id: str) -> None:
        if self._store is None:
            return
        # Rows that could not be written before go first, so the trail keeps its order.
        waiting, self._unwritten = [*self._unwritten, *records], []
        try:
            await write_decisions(self._store, waiting)
        except Exception as e:
            # The decision stands (a store outage must not turn into a 500); its rows wait
            # in memory for the next write that succeeds.
            pending = waiting + self._unwritten
            self._unwritten = pending[-MAX_UNWRITTEN_AUDIT_ROWS:]
            dropped = pending[: len(pending) - len(self._unwritten)]
            self.metrics.audit_rows_waiting.set(len(self._unwritten))
            _log.warning(
                "policy.audit_write_failed",
                request_id=request_id,
                error=str(e),
                waiting=len(self._unwritten),
                dropped=len(dropped),
            )
            self._give_up(dropped, str(e))
        else:
            self.metrics.audit_rows_waiting.set(len(self._unwritten))

    async def aclose(self, timeout_s: float = AUDIT_FLUSH_TIMEOUT_S) -> None:
        """The worker is stopping: writes the audit rows still waiting, even while being
        cancelled, starting within ``timeout_s`` (a write under way is not cut short). What
        the store still refuses is logged whole."""
        if self._store is None or not self._unwritten:
            return
        rows, self._unwritten = self._unwritten, []
        error = f"the store did not answer within {timeout_s} s"
        with trio.CancelScope(shield=True), trio.move_on_after(timeout_s):
            try:
                await write_decisions(self._store, rows)
            except Exception as e:
                error = str(e)
            else:
                self.metrics.audit_rows_waiting.set(0)
                _log.info("policy.audit_rows_written_at_stop", rows=len(rows))
                return
        self.metrics.audit_rows_waiting.set(0)
        self._give_up(rows, error)

    def _give_up(self, rows: Sequence[AuditRecord], error: str) -> None:
        if not rows:
            return
        self.metrics.audit_rows_dropped.inc(len(rows))
        for row in rows:
            _log.error("policy.audit_row_lost", error=error, row=row.to_json())


def _reason(decision: Decision) -> str:
    return decision.reason if isinstance(decision, Deny | Drop) else ""
