"""Records of origins the gateway authenticated, kept in the store so all workers agree."""

from __future__ import annotations

from gateway.store import Store

_NAMESPACE = "notary.vouch"


def _key(origin: str, period: int) -> str:
    # A space cannot occur in a server name. (Not NUL: PostgreSQL text cannot hold it.)
    return f"{origin} {period}"


class StoreVouchRecords:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def record(self, origin: str, period: int, until_ms: int) -> None:
        await self._store.kv_set(_NAMESPACE, _key(origin, period), "1", expires_ts=until_ms)

    async def exists(self, origin: str, period: int, now_ms: int) -> bool:
        value = await self._store.kv_get(_NAMESPACE, _key(origin, period), now_ts=now_ms)
        return value is not None
