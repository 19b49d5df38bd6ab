"""Records of origins the gateway authenticated, kept in the store so all workers agree."""

from __future__ import annotations

from gateway.store import Store

_NAMESPACE = "notary.vouch"


class StoreVouchRecords:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def record(self, origin: str, period: int, until_ms: int) -> None:
        await self._store.kv_set(_NAMESPACE, f"{origin}\x00{period}", "1", expires_ts=until_ms)

    async def exists(self, origin: str, period: int, now_ms: int) -> bool:
        value = await self._store.kv_get(_NAMESPACE, f"{origin}\x00{period}", now_ts=now_ms)
        return value is not None
