"""The keyring against real TLS key servers and notaries on loopback, with a SQLite store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import signedjson.key
import signedjson.sign
import trio

from gateway.federation import (
    FederationClient,
    KeyFetchError,
    Keyring,
    KeyUnavailableError,
    TrustedKeyServer,
    verify_server_keys_response,
)
from gateway.federation.keys import MAX_KEY_VALIDITY_MS, MIN_REFETCH_INTERVAL_MS
from gateway.store import Store
from tests.support.dns_server import LoopbackDnsServer
from tests.unit.federation.support import (
    HttpsTestServer,
    ReceivedRequest,
    Reply,
    ServerKeys,
    StartHttps,
)

KEY_PATH = "/_matrix/key/v2/server"
QUERY_PATH = "/_matrix/key/v2/query"
T0 = 1_700_000_000_000
HOUR = 3600_000

MakeClient = Callable[..., FederationClient]


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def start_key_server(
    start_https: StartHttps, dns_server: LoopbackDnsServer, host: str = "origin.test"
) -> tuple[HttpsTestServer, ServerKeys]:
    server = await start_https(host)
    dns_server.add(host, "A", "127.0.0.1")
    return server, ServerKeys(f"{host}:{server.port}")


def serve_keys(server: HttpsTestServer, response: dict[str, Any]) -> None:
    server.reply("GET", KEY_PATH, Reply.json(response))


def verify_with(keys: ServerKeys, obj: dict[str, Any]) -> None:
    vk = signedjson.key.get_verify_key(keys.signing_key)
    signedjson.sign.verify_signed_json(obj, keys.server_name, vk)


async def test_direct_fetch_good_keys_cached_in_store(
    make_client: MakeClient,
    dns_server: LoopbackDnsServer,
    start_https: StartHttps,
    sqlite_store: Store,
    clock: Clock,
) -> None:
    server, keys = await start_key_server(start_https, dns_server)
    serve_keys(server, keys.response(T0 + HOUR))
    client = make_client()
    keyring = Keyring(store=sqlite_store, client=client, clock_ms=clock)
    key = await keyring.get_verify_key(keys.server_name, keys.key_id, minimum_valid_until_ts=T0)
    assert key.key_id == keys.key_id
    assert key.valid_until_ts == T0 + HOUR
    assert key.expired_ts is None
    assert key.verify_key.encode() == signedjson.key.get_verify_key(keys.signing_key).encode()
    # Cached: a second keyring on the same store (another worker) does not fetch again.
    other = Keyring(store=sqlite_store, client=client, clock_ms=clock)
    await other.get_verify_key(keys.server_name, keys.key_id, minimum_valid_until_ts=T0 + 10)
    assert len(server.requests_to(KEY_PATH)) == 1
    record = await sqlite_store.get_server_key(keys.server_name, keys.key_id)
    assert record is not None and record.source == keys.server_name
    await client.aclose()


async def test_get_server_keys_returns_raw_signed_json(
    make_client: MakeClient,
    dns_server: LoopbackDnsServer,
    start_https: StartHttps,
    sqlite_store: Store,
    clock: Clock,
) -> None:
    server, keys = await start_key_server(start_https, dns_server)
    published = keys.response(T0 + HOUR)
    serve_keys(server, published)
    keyring = Keyring(store=sqlite_store, client=make_client(), clock_ms=clock)
    (response,) = await keyring.get_server_keys(keys.server_name)
    assert response == published
    verify_with(keys, response)
    await keyring.get_server_keys(keys.server_name)
    assert len(server.requests) == 1


@pytest.mark.parametrize("problem", ["bad_signature", "wrong_server_name", "unsigned"])
async def test_invalid_direct_responses_rejected(
    make_client: MakeClient,
    dns_server: LoopbackDnsServer,
    start_https: StartHttps,
    sqlite_store: Store,
    clock: Clock,
    problem: str,
) -> None:
    server, keys = await start_key_server(start_https, dns_server)
    if problem == "bad_signature":
        response = keys.response(T0 + HOUR, sign_with=signedjson.key.generate_signing_key("k1"))
    elif problem == "wrong_server_name":
        response = keys.response(T0 + HOUR, server_name="impostor.test")
    else:
        response = keys.response(T0 + HOUR)
        del response["signatures"]
    serve_keys(server, response)
    keyring = Keyring(store=sqlite_store, client=make_client(), clock_ms=clock)
    with pytest.raises(KeyUnavailableError) as info:
        await keyring.get_verify_key(keys.server_name, keys.key_id, minimum_valid_until_ts=T0)
    assert info.value.status == 401 and info.value.errcode == "M_UNAUTHORIZED"
    assert await sqlite_store.get_server_keys(keys.server_name) == []
    assert len(server.requests) == 1


def test_tampered_response_fails_verification() -> None:
    keys = ServerKeys("origin.test")
    response = keys.response(T0)
    verify_server_keys_response(response, "origin.test")
    response["valid_until_ts"] += 1
    with pytest.raises(KeyFetchError):
        verify_server_keys_response(response, "origin.test")


async def test_expired_keys_are_refetched(
    make_client: MakeClient,
    dns_server: LoopbackDnsServer,
    start_https: StartHttps,
    sqlite_store: Store,
    clock: Clock,
) -> None:
    server, keys = await start_key_server(start_https, dns_server)
    serve_keys(server, keys.response(T0 + HOUR))
    keyring = Keyring(store=sqlite_store, client=make_client(), clock_ms=clock)
    await keyring.get_verify_key(keys.server_name, keys.key_id, minimum_valid_until_ts=T0)
    clock.now = T0 + 2 * HOUR
    # The server still serves the stale response: it is fetched again and still refused.
    with pytest.raises(KeyUnavailableError):
        await keyring.get_verify_key(
            keys.server_name, keys.key_id, minimum_valid_until_ts=clock.now
        )
    assert len(server.requests) == 2
    serve_keys(server, keys.response(T0 + 5 * HOUR))
    # Asked again at once: no new fetch (a peer naming unknown keys cannot make the gateway
    # hammer a server), so still refused.
    with pytest.raises(KeyUnavailableError):
        await keyring.get_verify_key(
            keys.server_name, keys.key_id, minimum_valid_until_ts=clock.now
        )
    assert len(server.requests) == 2
    clock.now += MIN_REFETCH_INTERVAL_MS
    key = await keyring.get_verify_key(
        keys.server_name, keys.key_id, minimum_valid_until_ts=T0 + 2 * HOUR
    )
    assert key.valid_until_ts == T0 + 5 * HOUR
    assert len(server.requests) == 3


async def test_validity_capped_at_seven_days_after_fetch(
    make_client: MakeClient,
    dns_server: LoopbackDnsServer,
    start_https: StartHttps,
    sqlite_store: Store,
    clock: Clock,
) -> None:
    server, keys = await start_key_server(start_https, dns_server)
    serve_keys(server, keys.response(T0 + 365 * 24 * HOUR))
    keyring = Keyring(store=sqlite_store, client=make_client(), clock_ms=clock)
    key = await keyring.get_verify_key(keys.server_name, keys.key_id, minimum_valid_until_ts=T0)
    assert key.valid_until_ts == T0 + MAX_KEY_VALIDITY_MS
    clock.now = T0 + MAX_KEY_VALIDITY_MS + 1
    await keyring.get_verify_key(keys.server_name, keys.key_id, minimum_valid_until_ts=clock.now)
    assert len(server.requests) == 2


async def test_old_verify_keys_valid_until_expired_ts(
    make_client: MakeClient,
    dns_server: LoopbackDnsServer,
    start_https: StartHttps,
    sqlite_store: Store,
    clock: Clock,
) -> None:
    server, keys = await start_key_server(start_https, dns_server)
    old = signedjson.key.generate_signing_key("old1")
    keys.old_keys["old1"] = (old, T0 - HOUR)
    serve_keys(server, keys.response(T0 + HOUR))
    keyring = Keyring(store=sqlite_store, client=make_client(), clock_ms=clock)
    key = await keyring.get_verify_key(
        keys.server_name, "ed25519:old1", minimum_valid_until_ts=T0 - 2 * HOUR
    )
    assert key.expired_ts == T0 - HOUR and key.valid_until_ts == T0 - HOUR
    assert key.verify_key.encode() == signedjson.key.get_verify_key(old).encode()
    with pytest.raises(KeyUnavailableError):
        await keyring.get_verify_key(keys.server_name, "ed25519:old1", minimum_valid_until_ts=T0)


class Notary:
    def __init__(self, server: HttpsTestServer, keys: ServerKeys) -> None:
        self.server = server
        self.keys = keys
        self.entries: list[dict[str, Any]] = []
        server.route("POST", QUERY_PATH, self.handle)

    async def handle(self, _: ReceivedRequest) -> Reply:
        return Reply.json({"server_keys": self.entries})

    def cosign(self, entry: dict[str, Any], key: Any = None) -> dict[str, Any]:
        return dict(
            signedjson.sign.sign_json(entry, self.keys.server_name, key or self.keys.signing_key)
        )

    @property
    def trusted(self) -> TrustedKeyServer:
        return TrustedKeyServer(
            self.keys.server_name, {self.keys.key_id: self.keys.verify_key_base64()}
        )


async def start_notary(start_https: StartHttps, dns_server: LoopbackDnsServer) -> Notary:
    server, keys = await start_key_server(start_https, dns_server, "notary.test")
    return Notary(server, keys)


async def test_notary_used_when_origin_unreachable(
    make_client: MakeClient,
    dns_server: LoopbackDnsServer,
    start_https: StartHttps,
    sqlite_store: Store,
    clock: Clock,
) -> None:
    notary = await start_notary(start_https, dns_server)
    origin = ServerKeys("gone.test:1")  # no DNS record: the direct fetch fails
    notary.entries = [notary.cosign(origin.response(T0 + HOUR))]
    keyring = Keyring(
        store=sqlite_store,
        client=make_client(),
        clock_ms=clock,
        trusted_key_servers=[notary.trusted],
    )
    key = await keyring.get_verify_key(
        origin.server_name, origin.key_id, minimum_valid_until_ts=T0 + 5
    )
    assert key.valid_until_ts == T0 + HOUR
    (request,) = notary.server.requests
    assert request.json() == {
        "server_keys": {origin.server_name: {origin.key_id: {"minimum_valid_until_ts": T0 + 5}}}
    }
    # The stored JSON keeps the origin's self-signature and the notary's signature.
    (raw,) = await keyring.get_server_keys(origin.server_name)
    verify_with(origin, raw)
    verify_with(notary.keys, raw)
    record = await sqlite_store.get_server_key(origin.server_name, origin.key_id)
    assert record is not None and record.source == notary.keys.server_name


@pytest.mark.parametrize("problem", ["unsigned_by_notary", "wrong_notary_key", "bad_self_sig"])
async def test_notary_responses_need_both_signatures(
    make_client: MakeClient,
    dns_server: LoopbackDnsServer,
    start_https: StartHttps,
    sqlite_store: Store,
    clock: Clock,
    problem: str,
) -> None:
    notary = await start_notary(start_https, dns_server)
    origin = ServerKeys("gone.test:1")
    if problem == "unsigned_by_notary":
        entry = origin.response(T0 + HOUR)
    elif problem == "wrong_notary_key":
        entry = notary.cosign(origin.response(T0 + HOUR), signedjson.key.generate_signing_key("k1"))
    else:
        bad = origin.response(T0 + HOUR, sign_with=signedjson.key.generate_signing_key("k1"))
        entry = notary.cosign(bad)
    notary.entries = [entry]
    keyring = Keyring(
        store=sqlite_store,
        client=make_client(),
        clock_ms=clock,
        trusted_key_servers=[notary.trusted],
    )
    with pytest.raises(KeyUnavailableError):
        await keyring.get_verify_key(origin.server_name, origin.key_id, minimum_valid_until_ts=T0)
    assert len(notary.server.requests) == 1
    assert await sqlite_store.get_server_keys(origin.server_name) == []


async def test_concurrent_fetches_are_deduplicated(
    make_client: MakeClient,
    dns_server: LoopbackDnsServer,
    start_https: StartHttps,
    sqlite_store: Store,
    clock: Clock,
) -> None:
    server, keys = await start_key_server(start_https, dns_server)
    response = keys.response(T0 + HOUR)

    async def slow(_: ReceivedRequest) -> Reply:
        await trio.sleep(0.3)
        return Reply.json(response)

    server.route("GET", KEY_PATH, slow)
    keyring = Keyring(store=sqlite_store, client=make_client(), clock_ms=clock)
    results: list[int] = []

    async def get() -> None:
        key = await keyring.get_verify_key(keys.server_name, keys.key_id, minimum_valid_until_ts=T0)
        results.append(key.valid_until_ts)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(get)
    assert results == [T0 + HOUR] * 10
    assert len(server.requests) == 1


async def test_fetch_bounded_in_time_against_silent_server(
    make_client: MakeClient,
    dns_server: LoopbackDnsServer,
    start_https: StartHttps,
    sqlite_store: Store,
    clock: Clock,
) -> None:
    server, keys = await start_key_server(start_https, dns_server)

    async def never(_: ReceivedRequest) -> Reply:
        await trio.sleep_forever()
        raise AssertionError

    server.route("GET", KEY_PATH, never)
    keyring = Keyring(
        store=sqlite_store,
        client=make_client(request_timeout=5.0),
        clock_ms=clock,
        fetch_timeout=0.5,
    )
    start = trio.current_time()
    with pytest.raises(KeyUnavailableError):
        await keyring.get_verify_key(keys.server_name, keys.key_id, minimum_valid_until_ts=T0)
    assert trio.current_time() - start < 2
    assert len(server.requests) == 1


async def test_loopback_key_server_refused_unless_whitelisted(
    make_client: MakeClient,
    dns_server: LoopbackDnsServer,
    start_https: StartHttps,
    sqlite_store: Store,
    clock: Clock,
) -> None:
    server, keys = await start_key_server(start_https, dns_server)
    serve_keys(server, keys.response(T0 + HOUR))
    guarded = Keyring(store=sqlite_store, client=make_client(ip_range_whitelist=[]), clock_ms=clock)
    with pytest.raises(KeyUnavailableError):
        await guarded.get_verify_key(keys.server_name, keys.key_id, minimum_valid_until_ts=T0)
    assert server.connections == 0
    allowed = Keyring(store=sqlite_store, client=make_client(), clock_ms=clock)
    await allowed.get_verify_key(keys.server_name, keys.key_id, minimum_valid_until_ts=T0)
    assert server.connections == 1
