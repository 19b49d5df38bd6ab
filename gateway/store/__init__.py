"""Persistence shared across worker processes: SQLite (embedded) or PostgreSQL.

Usage::

    store = await open_store("sqlite", sqlite_path="gateway.db")
    try:
        await store.upsert_server_keys([...])
    finally:
        await store.aclose()

New tables come from migrations appended to ``gateway.store._migrations.MIGRATIONS``; new
queries run through ``Store.run_transaction`` with portable SQL (``?`` placeholders).
"""

from ._interface import Dialect, ServerKeyRecord, Store, StoreError, Transaction
from ._migrations import MIGRATIONS, Migration
from ._open import open_store

__all__ = [
    "MIGRATIONS",
    "Dialect",
    "Migration",
    "ServerKeyRecord",
    "Store",
    "StoreError",
    "Transaction",
    "open_store",
]
