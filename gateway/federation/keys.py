"""The keyring: remote servers' verify keys, fetched, verified and cached in the store.

Keys come from the server itself (``GET /_matrix/key/v2/server``) or, failing that, from
the configured notaries (``POST /_matrix/key/v2/query``, the notary's ``trusted_key_servers``).
Every response must carry a valid self-signature from one of its own ``verify_keys``; a
notary's answer must also carry the notary's signature by a key from our configuration.
Verified responses are cached in the store, shared by all workers, with the complete signed
JSON kept so the internal notary can serve it again with its signatures intact.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import canonicaljson
import signedjson.key
import structlog
import trio
from nacl.signing import VerifyKey
from unpaddedbase64 import decode_base64

from gateway.errors import Codes, MatrixError
from gateway.matrix.signing import SignatureError, verify_json
from gateway.store import ServerKeyRecord, Store

from .client import FederationClient
from .errors import FederationError, KeyFetchError

log = structlog.get_logger(__name__)

SERVER_KEYS_PATH = "/_matrix/key/v2/server"
KEY_QUERY_PATH = "/_matrix/key/v2/query"
#: "Servers MUST use the lesser of [valid_until_ts] and 7 days into the future when
#: determining if a key is valid" (server-server API, key publication). We count the seven
#: days from when we fetched the response, so a cached response is refetched after a week.
MAX_KEY_VALIDITY_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class VerifyKeyWithExpiry:
    key_id: str
    verify_key: VerifyKey
    #: Until when signatures by this key are acceptable: for a current key the lesser of
    #: ``valid_until_ts`` and seven days after fetching; for an old key its ``expired_ts``.
    valid_until_ts: int
    #: Set when the key is one of the server's ``old_verify_keys``.
    expired_ts: int | None = None


@dataclass(frozen=True, slots=True)
class TrustedKeyServer:
    """A notary from ``trusted_key_servers``: its name and its verify keys (base64)."""

    server_name: str
    verify_keys: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, entry: Mapping[str, Any]) -> TrustedKeyServer:
        return cls(str(entry["server_name"]), dict(entry.get("verify_keys") or {}))


class KeySource(Protocol):
    """Where other servers' verify keys come from: the :class:`Keyring`, or anything that
    answers the same way (the notary's "only our homeserver" source, a test's stand-in).

    Raises :class:`MatrixError` (the keyring: :class:`KeyUnavailableError`, 401) when it has
    no such key usable for signatures made at ``minimum_valid_until_ts``.
    """

    async def get_verify_key(
        self, server_name: str, key_id: str, *, minimum_valid_until_ts: int
    ) -> VerifyKeyWithExpiry: ...


#: A server's keys are fetched again for an unknown key id at most this often (per worker).
MIN_REFETCH_INTERVAL_MS = 5_000


class KeyUnavailableError(MatrixError):
    """No verified key satisfies the request; callers answer 401 to the peer."""

    def __init__(self, server_name: str, key_id: str, minimum_valid_until_ts: int) -> None:
        super().__init__(
            401,
            Codes.UNAUTHORIZED,
            f"Failed to find key {key_id} of {server_name} valid until {minimum_valid_until_ts}",
        )


def decode_verify_key(key_id: str, key_base64: str) -> VerifyKey:
    """Raises :class:`KeyFetchError` for unsupported algorithms and malformed keys."""
    if not key_id.startswith("ed25519:"):
        raise KeyFetchError(f"unsupported key algorithm in {key_id!r}")
    try:
        # signedjson's keys are nacl keys that also carry ``alg`` and ``version``.
        return cast(
            VerifyKey, signedjson.key.decode_verify_key_bytes(key_id, decode_base64(key_base64))
        )
    except Exception as e:
        raise KeyFetchError(f"malformed key {key_id}: {e}") from None


def _signed_by(obj: dict[str, Any], signer: str, keys: Mapping[str, VerifyKey]) -> None:
    """At least one signature by ``signer`` with one of ``keys``, and every such one valid."""
    signatures = obj.get("signatures")
    signer_sigs = signatures.get(signer) if isinstance(signatures, dict) else None
    key_ids = [k for k in signer_sigs if k in keys] if isinstance(signer_sigs, dict) else []
    if not key_ids:
        raise KeyFetchError(f"key response is not signed by {signer} with a known key")
    for key_id in key_ids:
        try:
            verify_json(obj, signer, key_id, keys[key_id])
        except (SignatureError, ValueError) as e:  # ValueError: no canonical form
            raise KeyFetchError(f"bad signature by {signer} ({key_id}): {e}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def verify_server_keys_response(response: Any, server_name: str) -> dict[str, Any]:
    """Check a key response for ``server_name``: shape, name and self-signature.

    Returns the response; raises :class:`KeyFetchError`. Keys of algorithms other than
    ed25519 are ignored, as is the rest of the response beyond what is checked here.
    """
    if not isinstance(response, dict):
        raise KeyFetchError("key response is not a JSON object")
    if response.get("server_name") != server_name:
        raise KeyFetchError(
            f"key response names {response.get('server_name')!r}, expected {server_name!r}"
        )
    if not _is_int(response.get("valid_until_ts")):
        raise KeyFetchError("key response has no integer valid_until_ts")
    verify_keys = response.get("verify_keys")
    if not isinstance(verify_keys, dict):
        raise KeyFetchError("key response has no verify_keys object")
    keys: dict[str, VerifyKey] = {}
    for key_id, entry in verify_keys.items():
        if not key_id.startswith("ed25519:"):
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise KeyFetchError(f"verify key {key_id} has no key string")
        keys[key_id] = decode_verify_key(key_id, entry["key"])
    old = response.get("old_verify_keys", {})
    if not isinstance(old, dict):
        raise KeyFetchError("old_verify_keys is not an object")
    for key_id, entry in old.items():
        if not key_id.startswith("ed25519:"):
            continue
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("key"), str)
            and _is_int(entry.get("expired_ts"))
        ):
            raise KeyFetchError(f"old verify key {key_id} needs key and expired_ts")
        decode_verify_key(key_id, entry["key"])
    _signed_by(response, server_name, keys)
    return response


def _records(response: dict[str, Any], *, source: str, fetched_ts: int) -> list[ServerKeyRecord]:
    server_name = response["server_name"]
    key_json = canonicaljson.encode_canonical_json(response).decode("utf-8")
    valid_until = response["valid_until_ts"]
    records = [
        ServerKeyRecord(
            server_name, key_id, entry["key"], valid_until, None, fetched_ts, source, key_json
        )
        for key_id, entry in response["verify_keys"].items()
        if key_id.startswith("ed25519:")
    ]
    records += [
        ServerKeyRecord(
            server_name,
            key_id,
            entry["key"],
            valid_until,
            entry["expired_ts"],
            fetched_ts,
            source,
            key_json,
        )
        for key_id, entry in response.get("old_verify_keys", {}).items()
        if key_id.startswith("ed25519:") and key_id not in response["verify_keys"]
    ]
    return records


def usable_until(record: ServerKeyRecord) -> int:
    """Until when a cached key may be used (see :class:`VerifyKeyWithExpiry`)."""
    if record.expired_ts is not None:
        return record.expired_ts
    return min(record.valid_until_ts, record.fetched_ts + MAX_KEY_VALIDITY_MS)


@dataclass(eq=False)
class _Fetch:
    done: trio.Event = field(default_factory=trio.Event)
    finished: bool = False


class Keyring:
    """Finds verify keys of remote servers; one fetch per server at a time per process."""

    def __init__(
        self,
        *,
        store: Store,
        client: FederationClient,
        trusted_key_servers: Sequence[TrustedKeyServer] = (),
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        fetch_timeout: float | None = None,
    ) -> None:
        """``fetch_timeout`` bounds one whole refresh (direct, then each notary); by default
        twice the client's request timeout."""
        self._store = store
        self._client = client
        self._notaries = tuple(trusted_key_servers)
        self._notary_keys = {
            n.server_name: {k: decode_verify_key(k, v) for k, v in n.verify_keys.items()}
            for n in self._notaries
        }
        self._clock_ms = clock_ms
        self._fetch_timeout = (
            2 * client.http.request_timeout if fetch_timeout is None else fetch_timeout
        )
        self._in_flight: dict[str, _Fetch] = {}
        self._refreshed_at: dict[str, int] = {}

    async def get_verify_key(
        self, server_name: str, key_id: str, *, minimum_valid_until_ts: int
    ) -> VerifyKeyWithExpiry:
        """A verified key of ``server_name`` usable for signatures made at
        ``minimum_valid_until_ts``; fetched when the cache has none.

        Raises :class:`KeyUnavailableError` (401 ``M_UNAUTHORIZED``).
        """
        record = await self._store.get_server_key(server_name, key_id)
        if record is None or usable_until(record) < minimum_valid_until_ts:
            # Anyone can name any server and key id in an X-Matrix header before a signature
            # is checked; refetching a server's keys at most every few seconds keeps the
            # gateway from being turned into a request cannon against it (or the notaries).
            now = self._clock_ms()
            last = self._refreshed_at.get(server_name)
            if (
                server_name in self._in_flight
                or last is None
                or now - last >= MIN_REFETCH_INTERVAL_MS
            ):
                if len(self._refreshed_at) > 10_000:
                    self._refreshed_at.clear()
                self._refreshed_at[server_name] = now
                await self._refresh(server_name, {key_id: minimum_valid_until_ts})
                record = await self._store.get_server_key(server_name, key_id)
        if record is None or usable_until(record) < minimum_valid_until_ts:
            raise KeyUnavailableError(server_name, key_id, minimum_valid_until_ts)
        return VerifyKeyWithExpiry(
            key_id=key_id,
            verify_key=decode_verify_key(key_id, record.verify_key),
            valid_until_ts=usable_until(record),
            expired_ts=record.expired_ts,
        )

    async def get_server_keys(
        self, server_name: str, *, minimum_valid_until_ts: int | None = None
    ) -> list[dict[str, Any]]:
        """The signed key responses cached for ``server_name``, newest first.

        Refreshes first unless a cached response is valid until ``minimum_valid_until_ts``
        (default: now). Each is the complete JSON as signed by the server (and, if it came
        through a notary, by that notary too). Empty if nothing could be fetched.
        """
        minimum = self._clock_ms() if minimum_valid_until_ts is None else minimum_valid_until_ts
        records = await self._store.get_server_keys(server_name)
        if not any(r.expired_ts is None and usable_until(r) >= minimum for r in records):
            await self._refresh(server_name, {})
            records = await self._store.get_server_keys(server_name)
        seen: set[str] = set()
        responses: list[dict[str, Any]] = []
        for record in sorted(records, key=lambda r: r.fetched_ts, reverse=True):
            if record.key_json not in seen:
                seen.add(record.key_json)
                responses.append(json.loads(record.key_json))
        return responses

    async def _refresh(self, server_name: str, wanted: dict[str, int]) -> None:
        """Fetch and store keys, or wait for the fetch already under way for this server."""
        while (current := self._in_flight.get(server_name)) is not None:
            await current.done.wait()
            if current.finished:
                return
            # The fetching task was cancelled before it finished: take over.
        fetch = _Fetch()
        self._in_flight[server_name] = fetch
        try:
            with trio.move_on_after(self._fetch_timeout):
                await self._fetch_and_store(server_name, wanted)
            fetch.finished = True
        finally:
            del self._in_flight[server_name]
            fetch.done.set()

    def _satisfied(self, records: Sequence[ServerKeyRecord], wanted: dict[str, int]) -> bool:
        by_id = {r.key_id: r for r in records}
        if not wanted:
            return any(r.expired_ts is None for r in records)
        return all(k in by_id and usable_until(by_id[k]) >= m for k, m in wanted.items())

    async def _fetch_and_store(self, server_name: str, wanted: dict[str, int]) -> None:
        try:
            records = await self._fetch_direct(server_name)
            await self._store.upsert_server_keys(records)
            if self._satisfied(records, wanted):
                return
        except FederationError as e:
            log.info("key_fetch_direct_failed", server_name=server_name, error=str(e))
        for notary in self._notaries:
            try:
                records = await self._fetch_from_notary(notary, server_name, wanted)
                await self._store.upsert_server_keys(records)
                if self._satisfied(records, wanted):
                    return
            except FederationError as e:
                log.info(
                    "key_fetch_notary_failed",
                    server_name=server_name,
                    notary=notary.server_name,
                    error=str(e),
                )

    async def _fetch_direct(self, server_name: str) -> list[ServerKeyRecord]:
        response = await self._client.get_json(server_name, SERVER_KEYS_PATH)
        verify_server_keys_response(response, server_name)
        return _records(response, source=server_name, fetched_ts=self._clock_ms())

    async def _fetch_from_notary(
        self, notary: TrustedKeyServer, server_name: str, wanted: dict[str, int]
    ) -> list[ServerKeyRecord]:
        query = {k: {"minimum_valid_until_ts": m} for k, m in wanted.items()}
        body = await self._client.post_json(
            notary.server_name, KEY_QUERY_PATH, {"server_keys": {server_name: query}}
        )
        entries = body.get("server_keys") if isinstance(body, dict) else None
        if not isinstance(entries, list):
            raise KeyFetchError(f"notary {notary.server_name} answered without server_keys")
        records: list[ServerKeyRecord] = []
        fetched_ts = self._clock_ms()
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("server_name") != server_name:
                continue
            try:
                _signed_by(entry, notary.server_name, self._notary_keys[notary.server_name])
                verify_server_keys_response(entry, server_name)
            except KeyFetchError as e:
                log.warning(
                    "notary_key_response_rejected",
                    server_name=server_name,
                    notary=notary.server_name,
                    error=str(e),
                )
                continue
            records += _records(entry, source=notary.server_name, fetched_ts=fetched_ts)
        return records
