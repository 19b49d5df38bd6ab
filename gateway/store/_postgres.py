"""The PostgreSQL backend (PostgreSQL 13 or newer), for several gateway replicas sharing state.

psycopg's synchronous connections run in Trio worker threads (its async mode needs
asyncio). A small pool keeps idle connections; a broken connection is dropped, not reused.

The server may end a connection at any moment (a restart, a failover, an administrator's
``pg_terminate_backend``). What then happened to the transaction decides what comes next:

* ended before COMMIT was sent: PostgreSQL rolled the transaction back, so the work runs
  again on a new connection;
* ended while COMMIT was under way: the transaction's id, asked for just before COMMIT, is
  looked up on a new connection (``pg_xact_status``). Committed: the work's result stands.
  Rolled back: the work runs again. Still unknown after ``OUTCOME_WAIT_S``: the transaction
  fails, and is not repeated, since it may yet have committed.

At most ``ATTEMPTS`` connections are tried for one transaction, so a restart costs no
request and a server that keeps ending connections fails it quickly.
"""

from __future__ import annotations

import time
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
#: How many connections one transaction is tried on when the server keeps ending them.
ATTEMPTS = 3
#: How long a transaction whose connection ended during COMMIT waits for its outcome.
OUTCOME_WAIT_S = 2.0
#: A failed connect this quick is tried again (a backend ended while starting); a slower
#: one (a timeout, a server that is away) is not, so an outage fails fast.
QUICK_CONNECT_FAILURE_S = 1.0


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


class _RolledBack(Exception):
    """The connection ended and the server rolled the transaction back: run it again."""


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
    ) -> tuple[T, psycopg.Connection[Any] | None]:
        for attempt in range(1, ATTEMPTS + 1):
            last = attempt == ATTEMPTS
            if conn is None or conn.closed:
                conn = self._connect_or_retry(last=last)
                if conn is None:
                    continue
            try:
                return self._attempt(conn, work, last=last)
            except _RolledBack:
                conn = None
        raise AssertionError("unreachable: the last attempt raises what it meets")

    def _connect_or_retry(self, *, last: bool) -> psycopg.Connection[Any] | None:
        started = time.monotonic()
        try:
            return self._connect()
        except psycopg.OperationalError:
            if last or time.monotonic() - started > QUICK_CONNECT_FAILURE_S:
                raise
            return None

    def _attempt(
        self, conn: psycopg.Connection[Any], work: Callable[[Transaction], T], *, last: bool
    ) -> tuple[T, psycopg.Connection[Any] | None]:
        xid: str | None = None
        committing = False
        try:
            with conn.transaction():
                with conn.cursor() as cursor:
                    result = work(_PostgresTransaction(cursor))
                    # NULL when the work wrote nothing (no id was assigned).
                    row = cursor.execute("SELECT pg_current_xact_id_if_assigned()::text").fetchone()
                    xid = None if row is None else row[0]
                committing = True
            return result, conn
        except BaseException as e:
            if not (conn.broken or conn.closed):
                # Still usable: hand it back to the pool through the exception.
                self._idle.append(conn)
                raise
            conn.close()
            if last or not isinstance(e, psycopg.OperationalError):
                raise
            if not committing:
                raise _RolledBack() from e
            if xid is None:
                return result, None  # nothing was written: the reads stand
            committed = self._outcome(xid)
            if committed is None:
                raise
            if not committed:
                raise _RolledBack() from e
            return result, None

    def _outcome(self, xid: str) -> bool | None:
        """Whether transaction ``xid`` committed; None while that is unknown."""
        deadline = time.monotonic() + OUTCOME_WAIT_S
        try:
            with self._connect() as conn:
                while True:
                    row = conn.execute("SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone()
                    status: str | None = None if row is None else row[0]
                    if status in ("committed", "aborted"):
                        return status == "committed"
                    # "in progress": the ended backend has not finished yet.
                    if status != "in progress" or time.monotonic() > deadline:
                        return None
                    time.sleep(0.02)
        except psycopg.OperationalError:
            return None

    async def run_transaction(self, work: Callable[[Transaction], T], *, write: bool = True) -> T:
        async with self._limiter:
            if self._closed:
                raise StoreError("store is closed")
            idle = self._idle.pop() if self._idle else None
            try:
                result, conn = await trio.to_thread.run_sync(self._run, idle, work)
            except psycopg.Error as e:
                raise StoreError(f"PostgreSQL: {e}") from e
            if conn is not None and self._closed:
                await trio.to_thread.run_sync(conn.close)
            elif conn is not None:
                self._idle.append(conn)
            return result

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.to_thread.run_sync(conn.close)
