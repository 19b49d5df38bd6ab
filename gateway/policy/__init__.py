"""The admission engine: policies that decide invites, joins and knocks, and their audit trail.

Policy authors import :mod:`gateway.policy.api` only. The rest of the gateway uses::

    specs = parse_policy_config(raw_policies_array, base_dir=config_dir)
    engine = PolicyEngine.from_specs(specs, store=store, metrics=PolicyMetrics(registry))
    outcome = await engine.decide_invite(ctx)     # or decide_join / decide_knock
    error = engine.reload(new_specs)              # None, or the error (old set kept)
"""

from gateway.policy.audit import AuditRecord, query_decisions, write_decisions
from gateway.policy.engine import (
    FAILED_CLOSED_REASON,
    Outcome,
    PolicyEngine,
    PolicyMetrics,
    ShadowResult,
)
from gateway.policy.loading import (
    PolicyConfigError,
    PolicyLoadError,
    PolicySet,
    PolicySpec,
    check_policies,
    load_policy_set,
    parse_policy_config,
)

__all__ = [
    "FAILED_CLOSED_REASON",
    "AuditRecord",
    "Outcome",
    "PolicyConfigError",
    "PolicyEngine",
    "PolicyLoadError",
    "PolicyMetrics",
    "PolicySet",
    "PolicySpec",
    "ShadowResult",
    "check_policies",
    "load_policy_set",
    "parse_policy_config",
    "query_decisions",
    "write_decisions",
]
