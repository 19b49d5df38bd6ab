"""The embedded SQLite backend.

One connection per store object, used by one worker thread at a time (a Trio lock orders
the calls). Several worker processes may open the same file: WAL mode lets readers run next
to a writer, writes take the database lock up front (``BEGIN IMMEDIATE``) and wait for it up
to ``busy_timeout`` instead of failing at once.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio

from ._interface import Dialect, StoreError, Transaction
from ._sql import SqlStore, apply_migrations

T = TypeVar("T")

#: How long a statement waits for another process's write lock, in milliseconds.
BUSY_TIMEOUT_MS = 10_000


class _SqliteTransaction:
    dialect: Dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, tuple(params)).rowcount

    def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self._conn.execute(sql, tuple(params)).fetchall()]

    def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row = self._conn.execute(sql, tuple(params)).fetchone()
        return None if row is None else tuple(row)


def _journal_mode_wal(conn: sqlite3.Connection) -> Any:
    """Switches to WAL. Two processes opening a new database at once (workers starting
    together) can get "database is locked" at once here: SQLite does not always wait on
    its busy handler for this lock. So ask again, up to the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: the module never opens transactions behind our back.
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = _journal_mode_wal(conn)
        if path != ":memory:" and (mode is None or str(mode[0]).lower() != "wal"):
            raise StoreError(f"SQLite refused WAL mode (journal_mode is {mode!r})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteStore(SqlStore):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._lock = trio.Lock()

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        try:
            conn = await trio.to_thread.run_sync(_connect, path)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open SQLite database: {e}") from e
        store = cls(conn)
        try:
            await store.run_transaction(apply_migrations)
        except BaseException:
            await store.aclose()
            raise
        return store

    @property
    def dialect(self) -> Dialect:
        return "sqlite"

    async def run_transaction(self, work: Callable[[Transaction], T], *, write: bool = True) -> T:
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError("store is closed")
            try:
                return await trio.to_thread.run_sync(_run, conn, work, write)
            except sqlite3.Error as e:
                raise StoreError(f"SQLite: {e}") from e

    async def aclose(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await trio.to_thread.run_sync(conn.close)


def _run(conn: sqlite3.Connection, work: Callable[[Transaction], T], write: bool) -> T:
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        result = work(_SqliteTransaction(conn))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result
