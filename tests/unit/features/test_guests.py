"""The guest edge: who is a guest (the homeserver's whoami, cached safely), rate limits on
guests' state events and sends, and the guest module's endpoint list."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from gateway.config import GUEST_ENDPOINTS, GuestsConfig, TokenBucket
from gateway.errors import MatrixError
from gateway.features.guests import (
    WHOAMI_PATH,
    EndpointSet,
    GuestEdge,
    Identity,
    MemoryBuckets,
    RefusedUnread,
    TokenError,
    WhoamiCache,
    access_token,
    client_api_segments,
    send_kind,
)
from gateway.logging import configure_logging
from gateway.metrics import Metrics
from gateway.policy.ratelimit import StoreBuckets
from gateway.store import open_store

GUEST = "tok-guest-1234567890"
USER = "tok-user-1234567890"
TOKENS = {GUEST: ("@g1:hs.test", True), USER: ("@u:hs.test", False)}


def scope(
    method: str,
    path: str,
    *,
    token: str | None = GUEST,
    query: str = "",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> dict[str, Any]:
    all_headers = list(headers or [])
    if token is not None:
        all_headers.append((b"authorization", f"Bearer {token}".encode()))
    return {
        "type": "http",
        "method": method,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": all_headers,
        "client": ("203.0.113.7", 5000),
    }


def segments(path: str) -> list[bytes]:
    found = client_api_segments(path.encode())
    assert found is not None
    return found


# --- reading requests -----------------------------------------------------------------------


def test_the_token_comes_from_the_header_or_the_query() -> None:
    assert access_token(scope("GET", "/x", token="abc")) == "abc"
    assert access_token(scope("GET", "/x", token=None, query="access_token=q1&x=2")) == "q1"
    # The homeserver decodes parameter names, so the gateway does too.
    assert access_token(scope("GET", "/x", token=None, query="access%5Ftoken=q2")) == "q2"
    assert access_token(scope("GET", "/x", token=None, query="a=1")) is None
    basic = [(b"authorization", b"Basic dTpw")]
    assert access_token(scope("GET", "/x", token=None, headers=basic)) is None
    lower = [(b"authorization", b"bearer low")]
    assert access_token(scope("GET", "/x", token=None, headers=lower)) == "low"
    same_twice = "access_token=q&access_token=q"
    assert access_token(scope("GET", "/x", token=None, query=same_twice)) == "q"


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("access_token=other", []),  # header and query: which one would the homeserver use?
        ("", [(b"authorization", b"Bearer second")]),
    ],
)
def test_ambiguous_credentials_are_refused(query: str, headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(TokenError) as info:
        access_token(scope("GET", "/x", query=query, headers=headers))
    assert (info.value.status, info.value.errcode) == (401, "M_MISSING_TOKEN")
    with pytest.raises(TokenError):
        access_token(scope("GET", "/x", token=None, query="access_token=a&access_token=b"))


def test_client_api_segments_skip_the_version() -> None:
    assert client_api_segments(b"/_matrix/client/v3/sync") == [b"sync"]
    assert client_api_segments(b"/_matrix/client/r0/rooms/%21r%3Ax/send/m.text/1") == [
        b"rooms",
        b"%21r%3Ax",
        b"send",
        b"m.text",
        b"1",
    ]
    # Synapse still routes /_matrix/client/api/v1/...
    assert client_api_segments(b"/_matrix/client/api/v1/rooms/r/state/t") == [
        b"rooms",
        b"r",
        b"state",
        b"t",
    ]
    assert client_api_segments(b"/_matrix/client/versions") is None
    assert client_api_segments(b"/_matrix/federation/v1/send/1") is None


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("PUT", "/_matrix/client/v3/rooms/!r:x/state/m.room.topic/", "state"),
        ("PUT", "/_matrix/client/v3/rooms/!r:x/state/m.room.topic", "state"),
        ("PUT", "/_matrix/client/api/v1/rooms/!r:x/state/m.room.topic/k", "state"),
        ("PUT", "/_matrix/client/v3/rooms/!r:x/%73tate/m.room.topic/k", "state"),
        ("PUT", "/_matrix/client/v3/rooms/!r:x/send/m.room.message/t1", "send"),
        ("POST", "/_matrix/client/r0/rooms/!r:x/send/m.room.message", "send"),
        ("PUT", "/_matrix/client/unstable/rooms/!r:x/redact/$e/t2", "send"),
        ("GET", "/_matrix/client/v3/rooms/!r:x/state/m.room.topic/", None),
        ("PUT", "/_matrix/client/v3/rooms/!r:x/typing/@g:hs", None),
        ("PUT", "/_matrix/client/v3/sendToDevice/m.x/t", None),
    ],
)
def test_send_kind(method: str, path: str, kind: str | None) -> None:
    assert send_kind(method, segments(path)) == kind


def test_the_default_endpoints_are_the_guest_modules() -> None:
    allowed = EndpointSet(GUEST_ENDPOINTS)
    ok = [
        ("GET", "/_matrix/client/v3/sync"),
        ("HEAD", "/_matrix/client/v3/sync"),
        ("GET", "/_matrix/client/v3/rooms/!r:x/state/m.room.name/"),
        ("GET", "/_matrix/client/v3/rooms/!r:x/messages"),
        ("PUT", "/_matrix/client/v3/rooms/!r:x/state/m.room.name/"),
        ("PUT", "/_matrix/client/v3/rooms/!r:x/send/m.reaction/t"),
        ("PUT", "/_matrix/client/v3/profile/@g:hs/displayname"),
        ("DELETE", "/_matrix/client/v3/profile/@g:hs/displayname"),
        ("GET", "/_matrix/client/v1/media/download/hs/abc/file.png"),
        ("POST", "/_matrix/client/v3/keys/claim"),
        ("GET", "/_matrix/client/v3/account/whoami"),
        ("GET", "/_matrix/client/v3/%73ync"),  # literals compare decoded
    ]
    refused = [
        ("PUT", "/_matrix/client/v3/profile/@g:hs/avatar_url"),  # only the display name
        ("POST", "/_matrix/client/v3/createRoom"),
        ("GET", "/_matrix/client/v3/rooms/!r:x/state/m.room.name/k/extra"),
        ("POST", "/_matrix/client/v3/sync"),
        ("PUT", "/_matrix/client/v3/rooms/!r:x/redact/$e/t"),
        ("GET", "/_matrix/client/v3/sync/"),
        ("GET", "/_matrix/client/v3/account/3pid"),
    ]
    for method, path in ok:
        assert allowed.allows(method, segments(path)), (method, path)
    for method, path in refused:
        assert not allowed.allows(method, segments(path)), (method, path)


# --- the whoami cache -----------------------------------------------------------------------


async def test_the_cache_forgets_after_its_ttl_and_beyond_its_size(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = WhoamiCache(ttl=30, size=2)
    keys = [cache.key(t) for t in ("t1", "t2", "t3")]
    assert GUEST.encode() not in cache.key(GUEST)
    assert cache.key("t1") == keys[0] != WhoamiCache(ttl=1, size=1).key("t1")  # keyed per cache
    cache.put(keys[0], Identity("@a:hs", True))
    cache.put(keys[1], Identity("@b:hs", False))
    assert cache.get(keys[0]) == Identity("@a:hs", True)  # now the most recently used
    cache.put(keys[2], Identity("@c:hs", False))
    assert len(cache) == 2
    assert cache.get(keys[1]) is None  # the least recently used went
    await trio.sleep(29.5)
    assert cache.get(keys[0]) is not None
    await trio.sleep(1)
    assert cache.get(keys[0]) is None
    assert cache.get(keys[2]) is None


# --- the edge against a homeserver ----------------------------------------------------------


class Whoami:
    """The homeserver's whoami, counting the questions."""

    def __init__(self, tokens: dict[str, tuple[str, bool]] = TOKENS) -> None:
        self.tokens = tokens
        self.asked: list[httpx.Request] = []
        self.status: int | None = None
        self.delay = 0.0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == WHOAMI_PATH
        self.asked.append(request)
        if self.delay:
            await trio.sleep(self.delay)
        if self.status is not None:
            return httpx.Response(self.status, json={"errcode": "M_UNKNOWN", "error": "x"})
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token not in self.tokens:
            return httpx.Response(401, json={"errcode": "M_UNKNOWN_TOKEN", "error": "no"})
        user, guest = self.tokens[token]
        return httpx.Response(200, json={"user_id": user, "is_guest": guest, "device_id": "D"})


def edge(
    whoami: Whoami,
    *,
    clock_ms: Callable[[], int] = lambda: 1_000_000,
    buckets: Any = None,
    **config: Any,
) -> GuestEdge:
    settings = {
        "enabled": True,
        "state_rate": TokenBucket(2, 0.5),
        "send_rate": TokenBucket(3, 1.0),
        **config,
    }
    client = httpx.AsyncClient(transport=httpx.MockTransport(whoami), base_url="http://hs.invalid")
    return GuestEdge(
        GuestsConfig(**settings),
        homeserver=client,
        buckets=buckets if buckets is not None else MemoryBuckets(),
        metrics=Metrics(),
        forwarded_headers=lambda s: [
            (b"x-forwarded-for", s["client"][0].encode()),
            (b"user-agent", b"browser/1"),
            (b"cookie", b"not-passed-on"),
        ],
        clock_ms=clock_ms,
    )


STATE = "/_matrix/client/v3/rooms/!r:hs.test/state/m.room.topic/"
SEND = "/_matrix/client/v3/rooms/!r:hs.test/send/m.room.message/"


async def admit(guests: GuestEdge, method: str, path: str, **kwargs: Any) -> MatrixError | None:
    try:
        await guests.admit(scope(method, path, **kwargs), segments(path))
    except MatrixError as e:
        return e
    return None


async def test_guests_state_events_are_limited_others_are_not() -> None:
    whoami = Whoami()
    now = [1_000_000]
    guests = edge(whoami, clock_ms=lambda: now[0])
    assert await admit(guests, "PUT", STATE) is None
    assert await admit(guests, "PUT", STATE + "k") is None
    refused = await admit(guests, "PUT", STATE)
    assert isinstance(refused, RefusedUnread)
    assert (refused.status, refused.errcode) == (429, "M_LIMIT_EXCEEDED")
    assert refused.retry_after_ms is not None and 1900 <= refused.retry_after_ms <= 2001
    assert refused.to_json()["retry_after_ms"] == refused.retry_after_ms
    # Sends have a bucket of their own.
    for _ in range(3):
        assert await admit(guests, "PUT", SEND + "t") is None
    assert (await admit(guests, "POST", SEND.rstrip("/"))) is not None
    # A user who is not a guest is never limited by the gateway.
    for _ in range(10):
        assert await admit(guests, "PUT", STATE, token=USER) is None
    # Reads are not limited and need no lookup.
    asked = len(whoami.asked)
    for _ in range(10):
        assert await admit(guests, "GET", STATE) is None
    assert len(whoami.asked) == asked
    # The bucket refills.
    now[0] += 2000
    assert await admit(guests, "PUT", STATE) is None
    # One question per token, the rest from the cache.
    assert [r.headers["authorization"] for r in whoami.asked] == [
        f"Bearer {GUEST}",
        f"Bearer {USER}",
    ]


async def test_each_guest_has_its_own_bucket() -> None:
    tokens = {**TOKENS, "tok-guest-2": ("@g2:hs.test", True)}
    guests = edge(Whoami(tokens))
    for _ in range(2):
        assert await admit(guests, "PUT", STATE) is None
    assert await admit(guests, "PUT", STATE) is not None
    assert await admit(guests, "PUT", STATE, token="tok-guest-2") is None


async def test_the_query_parameter_token_is_judged_too() -> None:
    guests = edge(Whoami())
    for _ in range(2):
        assert await admit(guests, "PUT", STATE, token=None, query=f"access_token={GUEST}") is None
    refused = await admit(guests, "PUT", STATE, token=None, query=f"access_token={GUEST}")
    assert refused is not None and refused.status == 429


async def test_whoami_carries_the_clients_address_never_its_other_headers() -> None:
    whoami = Whoami()
    guests = edge(whoami)
    await admit(guests, "PUT", STATE, headers=[(b"cookie", b"c=1")])
    (asked,) = whoami.asked
    assert asked.headers["x-forwarded-for"] == "203.0.113.7"
    assert asked.headers["user-agent"] == "browser/1"
    assert "cookie" not in asked.headers
    assert asked.url.query == b""  # the token never goes into a URL


async def test_concurrent_requests_with_one_token_ask_once() -> None:
    whoami = Whoami()
    whoami.delay = 0.05
    guests = edge(whoami, state_rate=TokenBucket(100, 1))
    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(admit, guests, "PUT", STATE)
    assert len(whoami.asked) == 1


async def test_unknown_tokens_are_not_guests_and_a_failing_homeserver_is_502() -> None:
    whoami = Whoami()
    guests = edge(whoami, state_rate=TokenBucket(1, 0.001))
    for _ in range(3):
        assert await admit(guests, "PUT", STATE, token="nobody-knows-me") is None
    assert len(whoami.asked) == 1  # remembered as "not a guest" too
    whoami.status = 500
    failed = await admit(guests, "PUT", STATE, token="another")
    assert failed is not None and (failed.status, failed.errcode) == (502, "M_UNKNOWN")
    whoami.status = None
    assert await admit(guests, "PUT", STATE, token="another") is None  # failures not cached
    whoami.status = 429
    limited = await admit(guests, "PUT", STATE, token="a-third")
    assert limited is not None and limited.status == 429


async def test_restricted_endpoints_forbid_guests_only() -> None:
    whoami = Whoami()
    guests = edge(whoami, restrict_endpoints=True)
    forbidden = await admit(guests, "POST", "/_matrix/client/v3/createRoom")
    assert forbidden is not None
    assert (forbidden.status, forbidden.errcode) == (403, "M_GUEST_ACCESS_FORBIDDEN")
    assert await admit(guests, "POST", "/_matrix/client/v3/createRoom", token=USER) is None
    assert await admit(guests, "POST", "/_matrix/client/v3/createRoom", token=None) is None
    asked = len(whoami.asked)
    assert await admit(guests, "GET", "/_matrix/client/v3/sync", token="unknown-one") is None
    assert len(whoami.asked) == asked  # an allowed endpoint needs no lookup
    redact = "/_matrix/client/v3/rooms/!r:hs.test/redact/$e/t"
    assert (await admit(guests, "PUT", redact)).status == 403  # type: ignore[union-attr]
    # Without restrict_endpoints, only the limits apply.
    assert await admit(edge(Whoami()), "POST", "/_matrix/client/v3/createRoom") is None


async def test_operators_can_allow_more() -> None:
    guests = edge(
        Whoami(), restrict_endpoints=True, allowed_endpoints=("POST /user/{userId}/filter",)
    )
    assert await admit(guests, "POST", "/_matrix/client/v3/user/@g1:hs.test/filter") is None
    assert (await admit(guests, "GET", "/_matrix/client/v3/sync")) is not None


async def test_tokens_never_reach_the_logs() -> None:
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    try:
        guests = edge(Whoami(), restrict_endpoints=True)
        for _ in range(3):
            await admit(guests, "PUT", STATE)
        await admit(guests, "POST", "/_matrix/client/v3/createRoom")
    finally:
        configure_logging("console", "info")
    logged = stream.getvalue()
    assert "guest.rate_limited" in logged and "guest.forbidden" in logged
    assert GUEST not in logged


async def test_store_buckets_are_shared_by_every_worker(tmp_path: Path) -> None:
    store = await open_store("sqlite", sqlite_path=str(tmp_path / "g.db"))
    try:
        first = edge(Whoami(), buckets=StoreBuckets(store))
        second = edge(Whoami(), buckets=StoreBuckets(store))
        assert await admit(first, "PUT", STATE) is None
        assert await admit(second, "PUT", STATE) is None
        refused = await admit(first, "PUT", STATE)
        assert refused is not None and refused.status == 429
        rows = await store.run_transaction(
            lambda tx: tx.fetch_all("SELECT bucket FROM policy_rate_limits"), write=False
        )
        assert rows == [("[guests]/state/@g1:hs.test",)]
    finally:
        await store.aclose()
