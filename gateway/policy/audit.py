"""The audit trail: one row per policy decision worth keeping, in the shared store.

Every deny and drop is written, enforced or shadowed (``mode`` says which), and every allow
when the engine is told to (``audit_allows``). Rows are written by whichever worker decided;
``gateway decisions`` reads them back with :func:`query_decisions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gateway.store import Store, Transaction

__all__ = ["AuditRecord", "purge_decisions", "query_decisions", "write_decisions"]

_COLUMNS = (
    "ts, point, origin, room_id, sender, target, policy, decision, reason, errcode, status,"
    " request_id, mode"
)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    #: When the decision was made, milliseconds since the epoch.
    ts: int
    #: ``invite``, ``make_join``, ``send_join``, ``make_knock`` or ``send_knock``.
    point: str
    origin: str
    room_id: str
    #: The inviter (invites) or the joining/knocking user.
    sender: str
    #: The invitee (invites), else None.
    target: str | None
    #: The configured name of the deciding policy ("" for the chain's overall allow).
    policy: str
    #: ``allow``, ``deny`` or ``drop``.
    decision: str
    reason: str
    errcode: str | None
    status: int | None
    request_id: str
    #: ``enforce`` (it happened) or ``shadow`` (it would have happened).
    mode: str
    #: Row id, set when read back from the store.
    id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def write_decisions(store: Store, records: Sequence[AuditRecord]) -> None:
    """Appends ``records`` in one transaction."""
    if not records:
        return

    def work(tx: Transaction) -> None:
        for r in records:
            tx.execute(
                f"INSERT INTO policy_audit ({_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.ts,
                    r.point,
                    r.origin,
                    r.room_id,
                    r.sender,
                    r.target,
                    r.policy,
                    r.decision,
                    r.reason,
                    r.errcode,
                    r.status,
                    r.request_id,
                    r.mode,
                ),
            )

    await store.run_transaction(work)


async def query_decisions(
    store: Store,
    *,
    since_ts: int | None = None,
    decision: str | None = None,
    point: str | None = None,
    mode: str | None = None,
    limit: int = 100,
) -> list[AuditRecord]:
    """The newest ``limit`` rows matching the filters, returned oldest first."""
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("ts >=", since_ts), ("decision =", decision), ("point =", point)):
        if value is not None:
            where.append(f"{column} ?")
            params.append(value)
    if mode is not None:
        where.append("mode = ?")
        params.append(mode)
    sql = f"SELECT id, {_COLUMNS} FROM policy_audit"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY ts DESC, id DESC LIMIT ?"
    params.append(int(limit))
    rows = await store.run_transaction(lambda tx: tx.fetch_all(sql, params), write=False)
    return [
        AuditRecord(
            id=int(row[0]),
            ts=int(row[1]),
            point=row[2],
            origin=row[3],
            room_id=row[4],
            sender=row[5],
            target=row[6],
            policy=row[7],
            decision=row[8],
            reason=row[9],
            errcode=row[10],
            status=None if row[11] is None else int(row[11]),
            request_id=row[12],
            mode=row[13],
        )
        for row in reversed(rows)
    ]


async def purge_decisions(store: Store, *, before_ts: int) -> int:
    """Deletes rows older than ``before_ts``; returns how many. For a retention job."""
    return await store.run_transaction(
        lambda tx: tx.execute("DELETE FROM policy_audit WHERE ts < ?", (before_ts,))
    )
