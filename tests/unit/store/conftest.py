"""Store fixtures: every store test runs against SQLite and against a real PostgreSQL.

PostgreSQL must answer on 127.0.0.1:5432 (user ``postgres``, trust authentication). A fresh
database is created for the test session and dropped afterwards. If the server cannot be
reached the tests fail: a silently skipped backend would hide regressions.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from gateway.store import Store, open_store

PG_ADMIN_DSN = os.environ.get(
    "GATEWAY_TEST_POSTGRES_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    name = f"gateway_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL is required for the store tests ({PG_ADMIN_DSN}): {e}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(PG_ADMIN_DSN, dbname=name)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def clean_postgres(postgres_dsn: str) -> str:
    """The session database, emptied so every test starts from an unmigrated schema."""
    with psycopg.connect(postgres_dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return postgres_dsn


@pytest.fixture(params=["sqlite", "postgres"])
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Arguments for ``open_store``; two stores opened with them share one database."""
    if request.param == "sqlite":
        return {"backend": "sqlite", "sqlite_path": str(tmp_path / "gateway.db")}
    dsn = request.getfixturevalue("clean_postgres")
    return {"backend": "postgres", "postgres_dsn": dsn}


@pytest.fixture
async def store(store_config: dict[str, str]) -> AsyncIterator[Store]:
    s = await open_store(**store_config)
    try:
        yield s
    finally:
        await s.aclose()
