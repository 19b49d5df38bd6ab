"""The PostgreSQL backend, for several gateway replicas sharing state.

psycopg's synchronous connections run in Trio worker threads (its async mode needs
asyncio). A small pool keeps idle connections; a broken connection is dropped, not reused.
A pooled connection the server ended while it sat idle (a restart, an administrator's
``pg_terminate_backend``) fails at BEGIN, before any work ran: the work then runs once on a
new connection, so a restart costs no request. A connection that breaks later fails its
transaction (its outcome is unknown, so it is not repeated).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
import trio

from ._interface import Dialect, StoreError, Transaction
from ._sql import SqlStore, apply_migrations

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10
STATEMENT_TIMEOUT_MS = 30_000
#: Arbitrary constant naming the advisory lock that serialises schema migrations.
_MIGRATION_LOCK_ID = 0x6D786777


class _PostgresTransaction:
    dialect: Dialect = "postgres"

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor

    def _run(self, sql: str, params: Sequence[Any]) -> None:
        self._cursor.execute(sql.replace("?", "%s"), tuple(params))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._run(sql, params)
        return self._cursor.rowcount

    def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._run(sql, params)
        return [tuple(row) for row in self._cursor.fetchall()]

    def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        self._run(sql, params)
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)


class _EndedWhileIdle(Exception):
    """A pooled connection failed its BEGIN: it was dead before any of the work ran."""


def _migrate(tx: Transaction) -> int:
    tx.fetch_one(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_ID})")
    return apply_migrations(tx)


class PostgresStore(SqlStore):
    def __init__(self, dsn: str, *, max_connections: int = 4) -> None:
        self._dsn = dsn
        self._idle: list[psycopg.Connection[Any]] = []
        self._limiter = trio.CapacityLimiter(max_connections)
        self._closed = False

    @classmethod
    async def open(cls, dsn: str, *, max_connections: int = 4) -> PostgresStore:
        store = cls(dsn, max_connections=max_connections)
        try:
            await store.run_transaction(_migrate)
        except BaseException:
            await store.aclose()
            raise
        return store

    @property
    def dialect(self) -> Dialect:
        return "postgres"

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self._dsn,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        )

    def _run(
        self, conn: psycopg.Connection[Any] | None, work: Callable[[Transaction], T]
    ) -> tuple[T, psycopg.Connection[Any]]:
        if conn is not None and not conn.closed:
            try:
                return self._attempt(conn, work, pooled=True)
            except _EndedWhileIdle:
                # The server ended the pooled connection while it was idle (a restart,
                # pg_terminate_backend): nothing ran on it, so a new one runs the work.
                pass
        return self._attempt(self._connect(), work, pooled=False)

    def _attempt(
        self, conn: psycopg.Connection[Any], work: Callable[[Transaction], T], *, pooled: bool
    ) -> tuple[T, psycopg.Connection[Any]]:
        began = False
        try:
            with conn.transaction():
                began = True
                with conn.cursor() as cursor:
                    return work(_PostgresTransaction(cursor)), conn
        except BaseException as e:
            if conn.broken or conn.closed:
                conn.close()
                if pooled and not began and isinstance(e, psycopg.OperationalError):
                    raise _EndedWhileIdle() from e
            else:
                # Still usable: hand it back to the pool through the exception.
                self._idle.append(conn)
            raise

    async def run_transaction(self, work: Callable[[Transaction], T], *, write: bool = True) -> T:
        async with self._limiter:
            if self._closed:
                raise StoreError("store is closed")
            idle = self._idle.pop() if self._idle else None
            try:
                result, conn = await trio.to_thread.run_sync(self._run, idle, work)
            except psycopg.Error as e:
                raise StoreError(f"PostgreSQL: {e}") from e
            if self._closed:
                await trio.to_thread.run_sync(conn.close)
            else:
                self._idle.append(conn)
            return result

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.to_thread.run_sync(conn.close)
