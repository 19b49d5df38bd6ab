"""Checking a PDU received from another server: canonical JSON, content hash, signatures.

Server-server API "Validating hashes and signatures on received events", with the room
version's rules: strict canonical JSON from room version 6, and from version 5 a signing
key counts only if it was valid when the event was sent (``origin_server_ts``). The keys
come from a :class:`~gateway.federation.keys.KeySource` (the keyring); everything else is
:mod:`gateway.matrix`.

Every owned endpoint that receives PDUs (v3 invites and their ``state``, v1/v2 invites under
policy, send_join) checks them here and words the failure for its own endpoint: a
:class:`PduRejected` says which check failed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

from gateway.errors import MatrixError
from gateway.matrix.canonical_json import CanonicalJsonError, encode_canonical_json
from gateway.matrix.events import check_content_hash
from gateway.matrix.room_versions import RoomVersion
from gateway.matrix.signing import (
    ServerKey,
    SignatureError,
    required_signers,
    verify_event_signatures,
)

from .keys import KeySource

__all__ = ["MAX_KEYS_PER_SERVER", "PduProblem", "PduRejected", "check_pdu", "fetch_event_keys"]

#: Signatures by more key ids of one server than this are not looked up: each may cost a
#: key fetch, and no server signs with more than a few keys at once.
MAX_KEYS_PER_SERVER = 4


class PduProblem(Enum):
    #: Not strict canonical JSON where the room version demands it.
    NOT_CANONICAL = "not_canonical"
    #: ``hashes.sha256`` does not match the event.
    CONTENT_HASH = "content_hash"
    #: The event does not say which servers must sign it (a sender without a server name).
    UNKNOWN_SIGNERS = "unknown_signers"
    #: A required server's signature is missing, does not verify, or is by no usable key;
    #: ``signature_error`` says which (``MissingSignature``, ``InvalidSignature``,
    #: ``NoUsableKey``).
    SIGNATURE = "signature"


class PduRejected(ValueError):
    """A received PDU failed a check; ``problem`` says which, ``detail`` how."""

    def __init__(
        self, problem: PduProblem, detail: str, *, signature_error: SignatureError | None = None
    ) -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail
        self.signature_error = signature_error


def _minimum_valid_until(event: Mapping[str, Any], version: RoomVersion) -> int:
    ts = event.get("origin_server_ts")
    if version.enforce_key_validity and isinstance(ts, int) and not isinstance(ts, bool):
        return ts
    return 0


async def fetch_event_keys(
    event: Mapping[str, Any], version: RoomVersion, keys: KeySource, servers: Sequence[str]
) -> dict[tuple[str, str], ServerKey]:
    """The verify keys for the signatures ``servers`` made on ``event``.

    From room v5 a key must have been valid when the event was sent; a key the source does
    not have is left out, so the signature check names what is missing.
    """
    minimum = _minimum_valid_until(event, version)
    signatures = event.get("signatures")
    found_keys: dict[tuple[str, str], ServerKey] = {}
    for server in servers:
        by_key = signatures.get(server) if isinstance(signatures, dict) else None
        if not isinstance(by_key, dict):
            continue
        key_ids = [k for k in by_key if isinstance(k, str) and k.startswith("ed25519:")]
        for key_id in key_ids[:MAX_KEYS_PER_SERVER]:
            try:
                found = await keys.get_verify_key(server, key_id, minimum_valid_until_ts=minimum)
            except MatrixError:
                continue
            found_keys[(server, key_id)] = ServerKey(found.verify_key, found.valid_until_ts)
    return found_keys


async def check_pdu(
    event: Mapping[str, Any],
    version: RoomVersion,
    keys: KeySource,
    *,
    now_ms: int,
    signers: Sequence[str] | None = None,
) -> None:
    """Checks a received PDU; raises :class:`PduRejected`.

    In order: strict canonical JSON (room versions that require it), the content hash, then
    the signatures of ``signers`` (default: every server the room version requires, see
    :func:`gateway.matrix.signing.required_signers`). A caller that knows a required
    signature comes later (send_join: the resident server's, for a restricted join) names
    the servers that must have signed already.
    """
    if version.strict_canonical_json:
        try:
            encode_canonical_json(event, strict=True)
        except CanonicalJsonError as e:
            raise PduRejected(PduProblem.NOT_CANONICAL, str(e)) from None
    if not check_content_hash(dict(event)):
        raise PduRejected(PduProblem.CONTENT_HASH, "the content hash does not match")
    if signers is None:
        try:
            signers = required_signers(event, version)
        except SignatureError as e:
            raise PduRejected(PduProblem.UNKNOWN_SIGNERS, str(e)) from None
    found = await fetch_event_keys(event, version, keys, signers)
    try:
        verify_event_signatures(event, version, found, now_ms=now_ms, signers=signers)
    except SignatureError as e:
        raise PduRejected(PduProblem.SIGNATURE, str(e), signature_error=e) from None
