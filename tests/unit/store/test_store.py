from __future__ import annotations

import sqlite3
from functools import partial
from pathlib import Path

import pytest
import trio

from gateway.store import (
    MIGRATIONS,
    Migration,
    ServerKeyRecord,
    Store,
    StoreError,
    Transaction,
    open_store,
)
from gateway.store._migrations import check_migrations
from gateway.store._sql import SqlStore, apply_migrations
from gateway.store._sqlite import SqliteStore


def key(key_id: str = "ed25519:a", *, fetched_ts: int = 1000, **kw: object) -> ServerKeyRecord:
    fields: dict[str, object] = {
        "server_name": "remote.example",
        "key_id": key_id,
        "verify_key": "VGhpcyBzaG91bGQgYmUgYSByZWFsIGVkMjU1MTkgcGF5bG9hZA",
        "valid_until_ts": 5000,
        "expired_ts": None,
        "fetched_ts": fetched_ts,
        "source": "remote.example",
        "key_json": '{"server_name":"remote.example"}',
    }
    fields.update(kw)
    return ServerKeyRecord(**fields)  # type: ignore[arg-type]


async def test_schema_is_migrated_on_open(store: Store) -> None:
    assert isinstance(store, SqlStore)
    assert await store.schema_version() == len(MIGRATIONS)
    rows = await store.run_transaction(
        lambda tx: tx.fetch_all("SELECT version, description FROM schema_version"), write=False
    )
    assert [r[0] for r in rows] == list(range(1, len(MIGRATIONS) + 1))


async def test_reopen_does_not_rerun_migrations(store_config: dict[str, str]) -> None:
    first = await open_store(**store_config)
    await first.upsert_server_keys([key()])
    await first.aclose()
    second = await open_store(**store_config)
    try:
        assert await second.get_server_key("remote.example", "ed25519:a") == key()
    finally:
        await second.aclose()


async def test_server_keys_round_trip(store: Store) -> None:
    old = key("ed25519:old", expired_ts=1500, valid_until_ts=4000)
    new = key("ed25519:new")
    other = key("ed25519:x", server_name="other.example")
    await store.upsert_server_keys([new, old, other])
    assert await store.get_server_key("remote.example", "ed25519:new") == new
    assert await store.get_server_key("remote.example", "ed25519:missing") is None
    assert await store.get_server_keys("remote.example") == [new, old]
    assert await store.get_server_keys("nobody.example") == []


async def test_later_fetch_replaces_earlier_but_not_the_reverse(store: Store) -> None:
    await store.upsert_server_keys([key(fetched_ts=2000, valid_until_ts=9000)])
    await store.upsert_server_keys([key(fetched_ts=1000, valid_until_ts=3000)])
    record = await store.get_server_key("remote.example", "ed25519:a")
    assert record is not None and record.valid_until_ts == 9000
    await store.upsert_server_keys([key(fetched_ts=3000, valid_until_ts=3000, expired_ts=2500)])
    record = await store.get_server_key("remote.example", "ed25519:a")
    assert record is not None
    assert (record.valid_until_ts, record.expired_ts, record.fetched_ts) == (3000, 2500, 3000)


async def test_kv_with_expiry(store: Store) -> None:
    assert await store.kv_get("ns", "k", now_ts=0) is None
    await store.kv_set("ns", "k", "v1", expires_ts=100)
    assert await store.kv_get("ns", "k", now_ts=99) == "v1"
    assert await store.kv_get("ns", "k", now_ts=100) is None
    assert await store.kv_get("other", "k", now_ts=0) is None
    await store.kv_set("ns", "k", "v2", expires_ts=None)
    assert await store.kv_get("ns", "k", now_ts=10**15) == "v2"
    assert await store.kv_delete("ns", "k") is True
    assert await store.kv_delete("ns", "k") is False
    assert await store.kv_get("ns", "k", now_ts=0) is None


async def test_kv_add_only_when_absent_or_expired(store: Store) -> None:
    assert await store.kv_add("claims", "x", "a", expires_ts=100, now_ts=0) is True
    assert await store.kv_add("claims", "x", "b", expires_ts=200, now_ts=50) is False
    assert await store.kv_get("claims", "x", now_ts=50) == "a"
    assert await store.kv_add("claims", "x", "c", expires_ts=None, now_ts=100) is True
    assert await store.kv_add("claims", "x", "d", expires_ts=None, now_ts=10**15) is False
    assert await store.kv_get("claims", "x", now_ts=10**15) == "c"


async def test_kv_purge_expired(store: Store) -> None:
    await store.kv_set("ns", "gone1", "v", expires_ts=10)
    await store.kv_set("ns", "gone2", "v", expires_ts=20)
    await store.kv_set("ns", "stays", "v", expires_ts=30)
    await store.kv_set("ns", "forever", "v", expires_ts=None)
    assert await store.kv_purge_expired(now_ts=20) == 2
    assert await store.kv_get("ns", "stays", now_ts=20) == "v"
    assert await store.kv_get("ns", "forever", now_ts=20) == "v"


async def test_two_store_objects_see_each_others_writes(store_config: dict[str, str]) -> None:
    # What two worker processes do: each opens its own store on the same database.
    a = await open_store(**store_config)
    b = await open_store(**store_config)
    try:
        await a.upsert_server_keys([key()])
        assert await b.get_server_key("remote.example", "ed25519:a") == key()
        assert await b.kv_add("claims", "k", "b", expires_ts=None, now_ts=0) is True
        assert await a.kv_add("claims", "k", "a", expires_ts=None, now_ts=0) is False
        assert await a.kv_get("claims", "k", now_ts=0) == "b"
    finally:
        await a.aclose()
        await b.aclose()


async def test_concurrent_writers_from_two_stores(store_config: dict[str, str]) -> None:
    a = await open_store(**store_config)
    b = await open_store(**store_config)
    try:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                s = a if i % 2 else b
                nursery.start_soon(partial(s.kv_set, "ns", f"k{i}", str(i), expires_ts=None))
        count = await a.run_transaction(lambda tx: tx.fetch_one("SELECT COUNT(*) FROM kv"))
        assert count == (20,)
    finally:
        await a.aclose()
        await b.aclose()


async def test_failed_transaction_is_rolled_back(store: Store) -> None:
    def work(tx: Transaction) -> None:
        tx.execute("INSERT INTO kv (namespace, key, value) VALUES (?, ?, ?)", ("ns", "k", "v"))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await store.run_transaction(work)
    assert await store.kv_get("ns", "k", now_ts=0) is None
    # The store still works afterwards (the connection went back to a clean state).
    await store.kv_set("ns", "k", "v", expires_ts=None)
    assert await store.kv_get("ns", "k", now_ts=0) == "v"


async def test_sql_errors_become_store_errors(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.run_transaction(lambda tx: tx.execute("SELECT * FROM no_such_table"))


async def test_appended_migration_runs_once(store_config: dict[str, str]) -> None:
    extra = (
        *MIGRATIONS,
        Migration(
            version=len(MIGRATIONS) + 1,
            description="test table",
            statements=("CREATE TABLE extra_test (id INTEGER PRIMARY KEY, note BLOB)",),
            postgres_statements=("CREATE TABLE extra_test (id INTEGER PRIMARY KEY, note BYTEA)",),
        ),
    )
    check_migrations(extra)
    store = await open_store(**store_config)
    try:
        assert isinstance(store, SqlStore)
        version = await store.run_transaction(lambda tx: apply_migrations(tx, extra))
        assert version == len(extra)
        # A second run finds nothing to do (CREATE TABLE would fail if it ran again).
        assert await store.run_transaction(lambda tx: apply_migrations(tx, extra)) == len(extra)
        await store.run_transaction(
            lambda tx: tx.execute("INSERT INTO extra_test (id) VALUES (?)", (1,))
        )
        # Opening with the shorter list now refuses the newer database.
        with pytest.raises(StoreError, match="newer"):
            await store.run_transaction(apply_migrations)
    finally:
        await store.aclose()


def test_migration_versions_must_be_contiguous() -> None:
    with pytest.raises(ValueError, match="expected 2"):
        check_migrations((MIGRATIONS[0], Migration(3, "gap", ())))


async def test_sqlite_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    store = await open_store("sqlite", sqlite_path=str(path))
    await store.aclose()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()


async def test_sqlite_concurrent_open_migrates_once(tmp_path: Path) -> None:
    path = str(tmp_path / "race.db")
    stores: list[SqliteStore] = []

    async def opener() -> None:
        stores.append(await SqliteStore.open(path))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(opener)
    try:
        rows = await stores[0].run_transaction(
            lambda tx: tx.fetch_all("SELECT version FROM schema_version")
        )
        assert rows == [(v,) for v in range(1, len(MIGRATIONS) + 1)]
    finally:
        for s in stores:
            await s.aclose()


async def test_closed_store_refuses_work(store_config: dict[str, str]) -> None:
    store = await open_store(**store_config)
    await store.aclose()
    with pytest.raises(StoreError, match="closed"):
        await store.kv_get("ns", "k", now_ts=0)


async def test_open_store_rejects_bad_configuration() -> None:
    with pytest.raises(StoreError, match="unknown"):
        await open_store("mysql")
    with pytest.raises(StoreError, match="sqlite_path"):
        await open_store("sqlite")
    with pytest.raises(StoreError, match="postgres_dsn"):
        await open_store("postgres")
