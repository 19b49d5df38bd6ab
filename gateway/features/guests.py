"""Guests at the client edge (client-server API, "Guest Access" module; MSC3419).

Since MSC3419 guests may send state events and any event type the power levels allow, and
the module says homeservers "may want to put stricter rate limits on guest accounts,
particularly for sending state events". With ``[guests] enabled = true`` the gateway does
that in front of the homeserver, on the public listener's client API:

* **Who is a guest.** Only the homeserver knows. The gateway asks its
  ``GET /_matrix/client/v3/account/whoami`` with the request's access token (``is_guest`` in
  the answer) and remembers the answer for ``whoami_cache_seconds``: keyed by a keyed hash of
  the token (the token itself is never stored or logged), at most ``whoami_cache_size``
  tokens, the least recently used forgotten first. A token the homeserver does not know
  (401/403) is simply not a guest's: the request goes on and the homeserver refuses it.
  Concurrent requests with one token wait for one lookup. The lookup carries the client's
  address and user agent, so the homeserver's record of where a device was last seen stays
  right.
* **Rate limits.** Guests' state events (``PUT``/``POST /rooms/{roomId}/state/...``) draw
  from ``state_rate``, their other sends (``/rooms/{roomId}/send/...``, ``/redact/...``) from
  ``send_rate``: token buckets per guest in the store, shared by every worker and replica.
  Over the limit: 429 ``M_LIMIT_EXCEEDED`` with ``retry_after_ms``.
* **Endpoints.** With ``restrict_endpoints`` a guest may only use ``allowed_endpoints``
  (default: the module's list), for homeservers that let guests do more; anything else is
  403 ``M_GUEST_ACCESS_FORBIDDEN``. Requests to the listed endpoints that are not rate
  limited need no lookup at all.

Paths are judged segment by segment on the raw path, as the homeserver routes them, after
``/_matrix/client/<version>/`` (``api/v1`` counts as one version). Literal segments are
compared percent-decoded, so encoding a letter does not dodge a limit; a path the gateway
cannot place is not on the allowed list, so odd spellings fail closed.

The token comes from ``Authorization: Bearer`` or the ``access_token`` query parameter. A
request carrying both, several ``Authorization`` headers or several different
``access_token`` values is refused (401 ``M_MISSING_TOKEN``, as Synapse does), so the gateway
never judges one token while the homeserver acts on another.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import parse_qs, unquote_to_bytes

import httpx
import trio

from gateway.config import GuestsConfig, TokenBucket
from gateway.errors import Codes, MatrixError
from gateway.http import Headers, Scope
from gateway.logging import get_logger
from gateway.metrics import Metrics
from gateway.policy.api import RateLimitResult, take_tokens
from gateway.policy.ratelimit import StoreBuckets
from gateway.store import Store

__all__ = [
    "WHOAMI_PATH",
    "EndpointSet",
    "GuestEdge",
    "Identity",
    "RefusedUnread",
    "TokenError",
    "WhoamiCache",
    "access_token",
    "client_api_segments",
    "send_kind",
]

WHOAMI_PATH = "/_matrix/client/v3/account/whoami"
CLIENT_PREFIX = b"/_matrix/client/"
#: Bucket names in the store's rate-limit table; policies' buckets are "<entry name>/...".
_BUCKET_PREFIX = "[guests]"

SendKind = Literal["state", "send"]

_log = get_logger("gateway.guests")


class RefusedUnread(MatrixError):
    """A refusal made before the request's body was read: on HTTP/1 the rest of the body is
    still on the wire, so the connection closes after the answer."""

    @classmethod
    def of(cls, error: MatrixError) -> RefusedUnread:
        refused = cls(
            error.status,
            error.errcode,
            error.message,
            retry_after_ms=error.retry_after_ms,
            extra=error.extra,
        )
        refused.kind = getattr(error, "kind", error.errcode)
        return refused

    kind: str = ""


class TokenError(MatrixError):
    """The request's credentials are ambiguous."""

    def __init__(self, message: str) -> None:
        super().__init__(401, Codes.MISSING_TOKEN, message)


# --- reading the request --------------------------------------------------------------------


def client_api_segments(raw_path: bytes) -> list[bytes] | None:
    """The raw path segments after ``/_matrix/client/<version>/``, or None when the path is
    not the client API. ``api/v1`` (Synapse still routes it) is one version."""
    if not raw_path.startswith(CLIENT_PREFIX):
        return None
    segments = raw_path[len(CLIENT_PREFIX) :].split(b"/")
    if len(segments) >= 2 and _decoded(segments[0]) == b"api" and _decoded(segments[1]) == b"v1":
        return segments[2:]
    return segments[1:] if len(segments) > 1 else None


def _decoded(segment: bytes) -> bytes:
    return unquote_to_bytes(segment) if b"%" in segment else segment


def access_token(scope: Scope) -> str | None:
    """The access token the homeserver will act on, or None when there is none.

    Raises :class:`TokenError` when the request carries more than one credential."""
    headers: Headers = scope.get("headers", [])
    authorizations = [v for k, v in headers if k == b"authorization"]
    query: bytes = scope.get("query_string", b"")
    tokens: list[str] = []
    if b"access" in query or b"%" in query:
        tokens = parse_qs(query.decode("latin-1"), keep_blank_values=True).get("access_token", [])
    if authorizations:
        if tokens:
            raise TokenError("Mixing Authorization headers and access_token query parameters")
        if len(authorizations) > 1:
            raise TokenError("Too many Authorization headers")
        scheme, _, credentials = authorizations[0].decode("latin-1").partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            return None  # not an access token (the homeserver refuses what it cannot use)
        return credentials
    if len(set(tokens)) > 1:
        raise TokenError("Too many access_token query parameters")
    return tokens[0] if tokens and tokens[0] else None


def send_kind(method: str, segments: Sequence[bytes]) -> SendKind | None:
    """``"state"`` for a state event, ``"send"`` for another event a client sends
    (``send`` and ``redact``, with or without a transaction ID), else None."""
    if method not in ("PUT", "POST") or len(segments) not in (4, 5):
        return None
    if _decoded(segments[0]) != b"rooms":
        return None
    action = _decoded(segments[2])
    if action == b"state":
        return "state"
    if action in (b"send", b"redact"):
        return "send"
    return None


@dataclass(frozen=True, slots=True)
class _Template:
    method: str
    #: literal segment (encoded as UTF-8), or None for a parameter
    literals: tuple[bytes | None, ...]


class EndpointSet:
    """Endpoints as ``"METHOD /path/{param}"`` relative to ``/_matrix/client/<version>``.
    A parameter spans exactly one segment (an empty one too); ``HEAD`` counts as ``GET``."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        self._by_length: dict[int, list[_Template]] = {}
        for endpoint in endpoints:
            method, _, path = endpoint.partition(" ")
            literals = tuple(
                None if s.startswith("{") and s.endswith("}") else s.encode("utf8")
                for s in path[1:].split("/")
            )
            self._by_length.setdefault(len(literals), []).append(_Template(method, literals))

    def allows(self, method: str, segments: Sequence[bytes]) -> bool:
        method = "GET" if method == "HEAD" else method
        candidates = self._by_length.get(len(segments))
        if not candidates:
            return False
        decoded = [_decoded(s) for s in segments]
        for template in candidates:
            if template.method == method and all(
                literal is None or literal == segment
                for literal, segment in zip(template.literals, decoded, strict=True)
            ):
                return True
        return False


# --- who is a guest -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """What the homeserver said about a token: its user (None for a token it does not
    know) and whether that user is a guest."""

    user_id: str | None
    is_guest: bool


class WhoamiCache:
    """Answers by token, for ``ttl`` seconds of ``trio.current_time()``, at most ``size``.

    Keys are BLAKE2b of the token with a key made at start, so what is kept in memory
    cannot be matched against tokens known elsewhere."""

    def __init__(self, *, ttl: float, size: int) -> None:
        self.ttl = ttl
        self.size = size
        self._salt = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, tuple[float, Identity]] = OrderedDict()

    def key(self, token: str) -> bytes:
        return hashlib.blake2b(token.encode("utf8"), key=self._salt, digest_size=16).digest()

    def get(self, key: bytes) -> Identity | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= trio.current_time():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: bytes, identity: Identity) -> None:
        self._entries[key] = (trio.current_time() + self.ttl, identity)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class Buckets(Protocol):
    async def take(
        self, bucket: str, *, now_ms: int, capacity: float, per_second: float, cost: float = 1.0
    ) -> RateLimitResult: ...


class MemoryBuckets:
    """Token buckets in this process, for a gateway opened without a store."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, int]] = {}

    async def take(
        self, bucket: str, *, now_ms: int, capacity: float, per_second: float, cost: float = 1.0
    ) -> RateLimitResult:
        tokens, updated = self._buckets.get(bucket, (capacity, now_ms))
        result, tokens = take_tokens(
            tokens, updated, now_ms, capacity=capacity, per_second=per_second, cost=cost
        )
        self._buckets[bucket] = (tokens, max(updated, now_ms))
        return result


_FORWARDED_TO_WHOAMI = (b"x-forwarded-for", b"x-forwarded-proto", b"user-agent")


class GuestEdge:
    """Judges client API requests of guests before they are passed through."""

    def __init__(
        self,
        config: GuestsConfig,
        *,
        homeserver: httpx.AsyncClient,
        buckets: Buckets,
        metrics: Metrics,
        forwarded_headers: Callable[[Scope], Headers] | None = None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.config = config
        self._homeserver = homeserver
        self._buckets = buckets
        self._metrics = metrics
        self._forwarded_headers = forwarded_headers
        self._clock_ms = clock_ms
        self._allowed = EndpointSet(config.allowed_endpoints)
        self.cache = WhoamiCache(ttl=config.whoami_cache_seconds, size=config.whoami_cache_size)
        self._pending: dict[bytes, trio.Event] = {}

    @classmethod
    def create(
        cls,
        config: GuestsConfig,
        *,
        homeserver: httpx.AsyncClient,
        store: Store | None,
        metrics: Metrics,
        forwarded_headers: Callable[[Scope], Headers] | None = None,
    ) -> GuestEdge:
        buckets: Buckets = StoreBuckets(store) if store is not None else MemoryBuckets()
        return cls(
            config,
            homeserver=homeserver,
            buckets=buckets,
            metrics=metrics,
            forwarded_headers=forwarded_headers,
        )

    async def admit(self, scope: Scope, segments: Sequence[bytes]) -> None:
        """Raises :class:`RefusedUnread` when a guest may not make this request now (or
        the gateway cannot tell). ``segments`` are the raw path segments after the client
        API version, as :func:`client_api_segments` gives them."""
        try:
            await self._admit(scope, segments)
        except MatrixError as e:
            raise RefusedUnread.of(e) from None

    async def _admit(self, scope: Scope, segments: Sequence[bytes]) -> None:
        method: str = scope["method"]
        kind = send_kind(method, segments)
        restricted = self.config.restrict_endpoints and not self._allowed.allows(method, segments)
        if kind is None and not restricted:
            return
        token = access_token(scope)
        if token is None:
            return
        identity = await self.identify(token, scope)
        if not identity.is_guest or identity.user_id is None:
            return
        if restricted:
            self._metrics.guest_requests.labels("forbidden").inc()
            _log.info("guest.forbidden", user_id=identity.user_id, method=method)
            raise MatrixError(
                403, Codes.GUEST_ACCESS_FORBIDDEN, "Guest access is not allowed for this endpoint"
            )
        if kind is not None:
            await self._rate_limit(kind, identity.user_id)
        self._metrics.guest_requests.labels("allowed").inc()

    async def _rate_limit(self, kind: SendKind, user_id: str) -> None:
        limit: TokenBucket = self.config.state_rate if kind == "state" else self.config.send_rate
        result = await self._buckets.take(
            f"{_BUCKET_PREFIX}/{kind}/{user_id}",
            now_ms=self._clock_ms(),
            capacity=limit.capacity,
            per_second=limit.per_second,
        )
        if result.allowed:
            return
        self._metrics.guest_requests.labels("rate_limited").inc()
        _log.info("guest.rate_limited", user_id=user_id, kind=kind)
        what = "state events" if kind == "state" else "events"
        raise MatrixError(
            429,
            Codes.LIMIT_EXCEEDED,
            f"Too many {what} from this guest; try again later",
            retry_after_ms=result.retry_after_ms,
        )

    async def identify(self, token: str, scope: Scope) -> Identity:
        """The homeserver's answer for ``token``: cached, or asked once for every request
        that needs it at the same time."""
        key = self.cache.key(token)
        while True:
            cached = self.cache.get(key)
            if cached is not None:
                self._metrics.whoami_lookups.labels("cached").inc()
                return cached
            pending = self._pending.get(key)
            if pending is None:
                break
            await pending.wait()  # then the cache has it, unless that lookup failed
        done = self._pending[key] = trio.Event()
        try:
            identity = await self._whoami(token, scope)
        except MatrixError:
            self._metrics.whoami_lookups.labels("failed").inc()
            raise
        finally:
            del self._pending[key]
            done.set()
        self._metrics.whoami_lookups.labels("asked").inc()
        self.cache.put(key, identity)
        return identity

    async def _whoami(self, token: str, scope: Scope) -> Identity:
        headers = {"Authorization": f"Bearer {token}"}
        if self._forwarded_headers is not None:
            for k, v in self._forwarded_headers(scope):
                if k in _FORWARDED_TO_WHOAMI:
                    headers[k.decode("latin-1")] = v.decode("latin-1")
        try:
            answer = await self._homeserver.get(WHOAMI_PATH, headers=headers)
        except httpx.TimeoutException:
            raise _unavailable(504, "Timed out asking the homeserver who this is") from None
        except httpx.HTTPError:
            raise _unavailable(502, "The homeserver could not be asked who this is") from None
        if answer.status_code in (401, 403):
            return Identity(None, False)
        if answer.status_code == 429:
            raise MatrixError(
                429,
                Codes.LIMIT_EXCEEDED,
                "Too many requests; try again later",
                retry_after_ms=_retry_after_ms(answer),
            )
        if answer.status_code == 200:
            try:
                body = answer.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("user_id"), str):
                return Identity(body["user_id"], body.get("is_guest") is True)
        raise _unavailable(502, f"The homeserver's whoami answered {answer.status_code}")


def _retry_after_ms(answer: httpx.Response) -> int:
    try:
        body = answer.json()
    except ValueError:
        body = None
    value = body.get("retry_after_ms") if isinstance(body, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1000


def _unavailable(status: int, message: str) -> MatrixError:
    return MatrixError(status, Codes.UNKNOWN, message, retry_after_ms=5000)
