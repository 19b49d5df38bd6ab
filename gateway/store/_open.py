from __future__ import annotations

from ._interface import Store, StoreError


async def open_store(
    backend: str, *, sqlite_path: str | None = None, postgres_dsn: str | None = None
) -> Store:
    """Open the configured backend and bring its schema up to date.

    ``backend`` is ``"sqlite"`` (needs ``sqlite_path``) or ``"postgres"`` (needs
    ``postgres_dsn``). Close the result with ``await store.aclose()``.
    """
    if backend == "sqlite":
        if not sqlite_path:
            raise StoreError("store backend 'sqlite' needs sqlite_path")
        from ._sqlite import SqliteStore

        return await SqliteStore.open(sqlite_path)
    if backend == "postgres":
        if not postgres_dsn:
            raise StoreError("store backend 'postgres' needs postgres_dsn")
        from ._postgres import PostgresStore

        return await PostgresStore.open(postgres_dsn)
    raise StoreError(f"unknown store backend {backend!r} (expected 'sqlite' or 'postgres')")
