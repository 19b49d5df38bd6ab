"""The store interface every backend implements, and the records it holds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

T = TypeVar("T")

Dialect = Literal["sqlite", "postgres"]


class StoreError(Exception):
    """The store could not be opened or migrated, or a query failed."""


@dataclass(frozen=True, slots=True)
class ServerKeyRecord:
    """One verify key of a remote server, as cached from a verified key response.

    ``key_json`` is the complete signed key response the key came in (canonical JSON, with
    every signature it carried), so it can be served again exactly as its server signed it.
    """

    server_name: str
    key_id: str
    #: Unpadded base64 of the public key.
    verify_key: str
    #: The response's ``valid_until_ts`` (milliseconds).
    valid_until_ts: int
    #: Set when the key came from ``old_verify_keys``: the time it stopped being used.
    expired_ts: int | None
    #: When the gateway fetched the response (milliseconds).
    fetched_ts: int
    #: The server name the response came from: the server itself or a notary.
    source: str
    key_json: str


class Transaction(Protocol):
    """A database transaction as seen by code running inside :meth:`Store.run_transaction`.

    SQL uses ``?`` placeholders in both dialects (the PostgreSQL backend rewrites them), so
    statements must not contain a literal ``?`` or ``%``.
    """

    dialect: Dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        ...

    def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None: ...


class Store(Protocol):
    """Persistence shared by every worker process (and, with PostgreSQL, every replica).

    All timestamps are milliseconds since the epoch and are passed in by the caller: the store
    never reads a clock, so tests control time.
    """

    @property
    def dialect(self) -> Dialect: ...

    async def run_transaction(self, work: Callable[[Transaction], T], *, write: bool = True) -> T:
        """Run ``work`` in a worker thread inside one transaction; commit if it returns.

        This is how features add queries on tables their own migration created. ``work``
        may run more than once (on PostgreSQL, when the server ends the connection before
        COMMIT and so rolls the transaction back), so it keeps its effects in the database.
        """
        ...

    # -- cached server keys -------------------------------------------------------------

    async def upsert_server_keys(self, records: Sequence[ServerKeyRecord]) -> None:
        """Insert or replace keys; a record never replaces one that was fetched later."""
        ...

    async def get_server_key(self, server_name: str, key_id: str) -> ServerKeyRecord | None: ...

    async def get_server_keys(self, server_name: str) -> list[ServerKeyRecord]:
        """Every cached key of ``server_name``, ordered by key id."""
        ...

    # -- key-value with expiry ----------------------------------------------------------

    async def kv_get(self, namespace: str, key: str, *, now_ts: int) -> str | None:
        """The value, or None if absent or expired (``expires_ts <= now_ts``)."""
        ...

    async def kv_set(
        self, namespace: str, key: str, value: str, *, expires_ts: int | None
    ) -> None: ...

    async def kv_add(
        self, namespace: str, key: str, value: str, *, expires_ts: int | None, now_ts: int
    ) -> bool:
        """Set the value only if no unexpired value exists; True if it was set.

        Atomic across workers, so it can serve as a claim or a once-only marker.
        """
        ...

    async def kv_delete(self, namespace: str, key: str) -> bool: ...

    async def kv_purge_expired(self, *, now_ts: int) -> int:
        """Delete every expired entry; returns how many were deleted."""
        ...

    async def aclose(self) -> None: ...
