"""The internal notary: ``/_matrix/key/v2/query`` for our homeserver only.

The homeserver lists the notary in ``trusted_key_servers``. For every server it asks about,
the notary answers with that server's real key responses (fetched and verified directly,
self-signatures intact, notary signature added) and, for an origin the gateway has itself
authenticated recently, the delegation key it signs translated requests with. It never
vouches a key for our own server name, and it answers nobody but our homeserver.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog
import trio

from gateway.errors import Codes, MatrixError
from gateway.notary.keys import DelegationKey, DelegationKeys, NotaryKey, delegation_server_keys

log = structlog.get_logger(__name__)


class RemoteKeys(Protocol):
    """Where the notary gets other servers' real, verified key responses."""

    async def get_server_keys(
        self, server_name: str, *, minimum_valid_until_ts: int | None = None
    ) -> list[dict[str, Any]]: ...


class VouchRecords(Protocol):
    """Which (origin, period) pairs the gateway authenticated, shared by all workers."""

    async def record(self, origin: str, period: int, until_ms: int) -> None: ...

    async def exists(self, origin: str, period: int, now_ms: int) -> bool: ...


# How long the notary waits for one remote server's keys before answering without them.
_FETCH_TIMEOUT_S = 10.0
# How long the notary's own published key is valid; it is only ever fetched by our homeserver.
OWN_KEY_VALIDITY_MS = 60 * 60 * 1000


class Notary:
    def __init__(
        self,
        *,
        key: NotaryKey,
        delegation: DelegationKeys,
        vouches: VouchRecords,
        remote_keys: RemoteKeys,
        homeserver_name: str,
        clock_ms: Callable[[], int],
        fetch_timeout_s: float = _FETCH_TIMEOUT_S,
    ) -> None:
        self.key = key
        self.delegation = delegation
        self.vouches = vouches
        self.remote_keys = remote_keys
        self.homeserver_name = homeserver_name
        self.clock_ms = clock_ms
        self.fetch_timeout_s = fetch_timeout_s

    async def vouch_for(self, origin: str) -> DelegationKey:
        """Records that ``origin`` was authenticated and returns the key to sign as it with."""
        if origin == self.homeserver_name:
            raise ValueError("the notary never vouches a key for our own server name")
        now = self.clock_ms()
        key = self.delegation.current(origin, now)
        await self.vouches.record(origin, self.delegation.period_at(now), key.valid_until_ts)
        return key

    def own_server_keys(self) -> dict[str, Any]:
        """The notary's own key, self-signed, as every server publishes it at
        ``/_matrix/key/v2/server``.

        The homeserver never needs it to trust the notary (``trusted_key_servers`` holds the
        key), but fetching it is a request to the notary that succeeds: Synapse makes such a
        fetch even while it backs off the notary, and its success ends the backoff.
        """
        return self.key.sign(
            {
                "server_name": self.key.server_name,
                "valid_until_ts": self.clock_ms() + OWN_KEY_VALIDITY_MS,
                "verify_keys": {self.key.key_id: {"key": self.key.verify_key_base64}},
                "old_verify_keys": {},
            }
        )

    async def _delegations(self, server_name: str, now: int) -> list[dict[str, Any]]:
        if server_name == self.homeserver_name:
            return []
        out = []
        # The next period too: a worker whose clock runs a little ahead may have vouched it.
        ahead = self.delegation.for_period(server_name, self.delegation.period_at(now) + 1)
        for key in [*self.delegation.still_valid(server_name, now), ahead]:
            period = (key.valid_until_ts - self.delegation.lifetime_ms) // self.delegation.period_ms
            if await self.vouches.exists(server_name, period, now):
                out.append(delegation_server_keys(key, self.key))
        return out

    async def _real_keys(self, server_name: str, minimum: int | None) -> list[dict[str, Any]]:
        with trio.move_on_after(self.fetch_timeout_s):
            try:
                responses = await self.remote_keys.get_server_keys(
                    server_name, minimum_valid_until_ts=minimum
                )
            except Exception as e:  # a peer being unreachable must not fail the whole query
                log.info("notary.remote_keys_unavailable", server_name=server_name, error=str(e))
                return []
            # Expired responses only when nothing fresher exists (old keys are still looked
            # up by them); oldest first, because the homeserver keeps the last answer it
            # reads for a key id.
            floor = minimum if minimum is not None else self.clock_ms()
            fresh = [r for r in responses if _valid_until(r) >= floor]
            chosen = sorted(fresh or responses, key=_valid_until)
            return [self.key.sign(dict(r)) for r in chosen]
        log.info("notary.remote_keys_timeout", server_name=server_name)
        return []

    async def query(self, wanted: Mapping[str, int | None]) -> dict[str, Any]:
        """Answers a key query: server name -> the largest ``minimum_valid_until_ts`` asked
        for any of its keys (None: no criteria)."""
        now = self.clock_ms()
        results: dict[str, list[dict[str, Any]]] = {}

        async def one(name: str) -> None:
            found: list[dict[str, Any]] = []
            # One server's trouble (or the store's) must not fail the whole answer: a
            # homeserver skips a notary that failed for ten minutes.
            try:
                if name != self.homeserver_name:
                    found.extend(await self._real_keys(name, wanted[name]))
                found.extend(await self._delegations(name, now))
            except Exception as e:
                log.warning("notary.query_failed", server_name=name, error=repr(e))
            results[name] = found

        async with trio.open_nursery() as nursery:
            for name in wanted:
                nursery.start_soon(one, name)
        server_keys = [entry for name in wanted for entry in results[name]]
        return {"server_keys": server_keys}


def _valid_until(response: Mapping[str, Any]) -> int:
    ts = response.get("valid_until_ts")
    return ts if isinstance(ts, int) and not isinstance(ts, bool) else 0


def parse_query_body(body: Any) -> dict[str, int | None]:
    """Server name -> largest ``minimum_valid_until_ts`` of a ``POST`` key query body."""
    if not isinstance(body, Mapping):
        raise MatrixError(400, Codes.BAD_JSON, "the request body must be a JSON object")
    server_keys = body.get("server_keys")
    if not isinstance(server_keys, Mapping):
        raise MatrixError(400, Codes.BAD_JSON, "server_keys must be an object of server names")
    wanted: dict[str, int | None] = {}
    for name, by_key in server_keys.items():
        if not isinstance(name, str) or not isinstance(by_key, Mapping):
            raise MatrixError(400, Codes.BAD_JSON, "server_keys entries must be objects")
        minimum: int | None = None
        for criteria in by_key.values():
            ts = criteria.get("minimum_valid_until_ts") if isinstance(criteria, Mapping) else None
            if isinstance(ts, int) and not isinstance(ts, bool):
                minimum = ts if minimum is None else max(minimum, ts)
        wanted[name] = minimum
    return wanted
