"""The notary's vouch records on both store backends (PostgreSQL text cannot hold NUL)."""

from __future__ import annotations

from gateway.notary.vouches import StoreVouchRecords
from gateway.store import Store


async def test_vouch_records_round_trip_and_expire(store: Store) -> None:
    vouches = StoreVouchRecords(store)
    await vouches.record("remote.example:8448", 42, until_ms=10_000)
    assert await vouches.exists("remote.example:8448", 42, now_ms=5_000)
    assert not await vouches.exists("remote.example:8448", 43, now_ms=5_000)
    assert not await vouches.exists("remote.example", 42, now_ms=5_000)
    assert not await vouches.exists("remote.example:8448", 42, now_ms=10_000)


async def test_vouch_records_for_ipv6_literal_origins(store: Store) -> None:
    vouches = StoreVouchRecords(store)
    await vouches.record("[::1]:8448", 7, until_ms=10_000)
    assert await vouches.exists("[::1]:8448", 7, now_ms=1)
