"""Queries shared by both SQL backends; a backend only supplies transactions."""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._interface import Dialect, ServerKeyRecord, StoreError, Transaction
from ._migrations import MIGRATIONS, Migration

T = TypeVar("T")

_KEY_COLUMNS = (
    "server_name, key_id, verify_key, valid_until_ts, expired_ts, fetched_ts, source, key_json"
)


def _key_record(row: tuple[Any, ...]) -> ServerKeyRecord:
    return ServerKeyRecord(
        server_name=row[0],
        key_id=row[1],
        verify_key=row[2],
        valid_until_ts=int(row[3]),
        expired_ts=None if row[4] is None else int(row[4]),
        fetched_ts=int(row[5]),
        source=row[6],
        key_json=row[7],
    )


def apply_migrations(tx: Transaction, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the schema up to date inside ``tx``; returns the resulting version.

    The caller holds a lock that serialises concurrent openers (SQLite: ``BEGIN IMMEDIATE``;
    PostgreSQL: an advisory transaction lock), so two workers never apply the same step.
    """
    tx.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_ts BIGINT NOT NULL)"
    )
    row = tx.fetch_one("SELECT MAX(version) FROM schema_version")
    current = 0 if row is None or row[0] is None else int(row[0])
    if current > len(migrations):
        raise StoreError(
            f"database schema version {current} is newer than this gateway knows"
            f" ({len(migrations)}); refusing to use it"
        )
    for migration in migrations[current:]:
        for statement in migration.statements_for(tx.dialect):
            tx.execute(statement)
        tx.execute(
            "INSERT INTO schema_version (version, description, applied_ts) VALUES (?, ?, ?)",
            (migration.version, migration.description, int(time.time() * 1000)),
        )
        current = migration.version
    return current


class SqlStore(abc.ABC):
    """Implements :class:`~gateway.store.Store` on top of :meth:`run_transaction`."""

    @property
    @abc.abstractmethod
    def dialect(self) -> Dialect: ...

    @abc.abstractmethod
    async def run_transaction(
        self, work: Callable[[Transaction], T], *, write: bool = True
    ) -> T: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def schema_version(self) -> int:
        row = await self.run_transaction(
            lambda tx: tx.fetch_one("SELECT MAX(version) FROM schema_version"), write=False
        )
        return 0 if row is None or row[0] is None else int(row[0])

    # -- cached server keys -------------------------------------------------------------

    async def upsert_server_keys(self, records: Sequence[ServerKeyRecord]) -> None:
        def work(tx: Transaction) -> None:
            for r in records:
                tx.execute(
                    f"INSERT INTO server_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (server_name, key_id) DO UPDATE SET"
                    " verify_key = excluded.verify_key,"
                    " valid_until_ts = excluded.valid_until_ts,"
                    " expired_ts = excluded.expired_ts,"
                    " fetched_ts = excluded.fetched_ts,"
                    " source = excluded.source,"
                    " key_json = excluded.key_json"
                    " WHERE server_keys.fetched_ts <= excluded.fetched_ts",
                    (
                        r.server_name,
                        r.key_id,
                        r.verify_key,
                        r.valid_until_ts,
                        r.expired_ts,
                        r.fetched_ts,
                        r.source,
                        r.key_json,
                    ),
                )

        await self.run_transaction(work)

    async def get_server_key(self, server_name: str, key_id: str) -> ServerKeyRecord | None:
        row = await self.run_transaction(
            lambda tx: tx.fetch_one(
                f"SELECT {_KEY_COLUMNS} FROM server_keys WHERE server_name = ? AND key_id = ?",
                (server_name, key_id),
            ),
            write=False,
        )
        return None if row is None else _key_record(row)

    async def get_server_keys(self, server_name: str) -> list[ServerKeyRecord]:
        rows = await self.run_transaction(
            lambda tx: tx.fetch_all(
                f"SELECT {_KEY_COLUMNS} FROM server_keys WHERE server_name = ? ORDER BY key_id",
                (server_name,),
            ),
            write=False,
        )
        return [_key_record(row) for row in rows]

    # -- key-value with expiry ----------------------------------------------------------

    async def kv_get(self, namespace: str, key: str, *, now_ts: int) -> str | None:
        row = await self.run_transaction(
            lambda tx: tx.fetch_one(
                "SELECT value FROM kv WHERE namespace = ? AND key = ?"
                " AND (expires_ts IS NULL OR expires_ts > ?)",
                (namespace, key, now_ts),
            ),
            write=False,
        )
        return None if row is None else str(row[0])

    async def kv_set(self, namespace: str, key: str, value: str, *, expires_ts: int | None) -> None:
        await self.run_transaction(
            lambda tx: tx.execute(
                "INSERT INTO kv (namespace, key, value, expires_ts) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (namespace, key) DO UPDATE SET"
                " value = excluded.value, expires_ts = excluded.expires_ts",
                (namespace, key, value, expires_ts),
            )
        )

    async def kv_add(
        self, namespace: str, key: str, value: str, *, expires_ts: int | None, now_ts: int
    ) -> bool:
        changed = await self.run_transaction(
            lambda tx: tx.execute(
                "INSERT INTO kv (namespace, key, value, expires_ts) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (namespace, key) DO UPDATE SET"
                " value = excluded.value, expires_ts = excluded.expires_ts"
                " WHERE kv.expires_ts IS NOT NULL AND kv.expires_ts <= ?",
                (namespace, key, value, expires_ts, now_ts),
            )
        )
        return changed > 0

    async def kv_delete(self, namespace: str, key: str) -> bool:
        changed = await self.run_transaction(
            lambda tx: tx.execute(
                "DELETE FROM kv WHERE namespace = ? AND key = ?", (namespace, key)
            )
        )
        return changed > 0

    async def kv_purge_expired(self, *, now_ts: int) -> int:
        return await self.run_transaction(
            lambda tx: tx.execute(
                "DELETE FROM kv WHERE expires_ts IS NOT NULL AND expires_ts <= ?", (now_ts,)
            )
        )
