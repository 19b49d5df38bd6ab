"""Signing and verifying JSON objects and events (ed25519).

Spec: appendices "Signing JSON", "Checking for a Signature"; server-server "Signing Events"
and "Validating hashes and signatures on received events"; room v5 "Signing key validity
period". No I/O: callers pass the keys they already hold and the current time.

Error hierarchy::

    SignatureError(ValueError)        (server_name, key_id)
    ├── MissingSignature              a required server did not sign
    ├── InvalidSignature              a signature does not verify
    ├── NoUsableKey                   none of a server's key IDs is known and valid
    └── KeyIdError                    a signing key without a usable key ID
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from gateway.matrix.canonical_json import encode_canonical_json
from gateway.matrix.events import (
    JsonDict,
    _redact_shallow,
    add_content_hash,
    check_content_hash,
    redact,
)
from gateway.matrix.identifiers import server_name_of
from gateway.matrix.room_versions import EventIdFormat, RoomVersion, get_room_version
from gateway.matrix.unpadded_base64 import decode_base64, encode_base64

# Room v5 "Signing key validity period": use the lesser of valid_until_ts and 7 days ahead.
MAX_KEY_VALIDITY_MS = 7 * 24 * 60 * 60 * 1000


class SignatureError(ValueError):
    """A signature check failed; says which server and (when known) which key."""

    def __init__(self, message: str, *, server_name: str, key_id: str | None = None) -> None:
        super().__init__(message)
        self.server_name = server_name
        self.key_id = key_id


class MissingSignature(SignatureError):
    pass


class InvalidSignature(SignatureError):
    pass


class NoUsableKey(SignatureError):
    pass


class KeyIdError(SignatureError):
    pass


@dataclass(frozen=True, slots=True)
class ServerKey:
    """A server's verify key as the key store knows it.

    ``valid_until_ts`` is the key's ``valid_until_ts`` (or an old key's ``expired_ts``), in
    milliseconds; None when the caller does not track validity.
    """

    verify_key: VerifyKey
    valid_until_ts: int | None = None


# What the key store hands in: a mapping or a lookup function keyed by (server, key_id).
Keys = Mapping[tuple[str, str], ServerKey] | Callable[[str, str], ServerKey | None]


def _lookup(keys: Keys, server_name: str, key_id: str) -> ServerKey | None:
    if isinstance(keys, Mapping):
        return keys.get((server_name, key_id))
    return keys(server_name, key_id)


def key_id_of(signing_key: SigningKey) -> str:
    """``alg:version`` of a key made by signedjson (``decode_signing_key_base64`` etc.)."""
    alg = getattr(signing_key, "alg", None)
    version = getattr(signing_key, "version", None)
    if not isinstance(alg, str) or not isinstance(version, str):
        raise KeyIdError("signing key has no alg/version; pass key_id explicitly", server_name="")
    return f"{alg}:{version}"


def signing_input(obj: Mapping[str, Any]) -> bytes:
    """The bytes a JSON signature covers: canonical JSON without signatures and unsigned."""
    return encode_canonical_json(
        {k: v for k, v in obj.items() if k != "signatures" and k != "unsigned"}
    )


def sign_json(
    obj: Mapping[str, Any],
    server_name: str,
    signing_key: SigningKey,
    *,
    key_id: str | None = None,
) -> JsonDict:
    """A copy of ``obj`` with ``signatures[server_name][key_id]`` added."""
    key_id = key_id or key_id_of(signing_key)
    signature = signing_key.sign(signing_input(obj)).signature
    result = dict(obj)
    signatures = {name: dict(sigs) for name, sigs in result.get("signatures", {}).items()}
    signatures.setdefault(server_name, {})[key_id] = encode_base64(signature)
    result["signatures"] = signatures
    return result


def verify_signature(
    message: bytes, signature_b64: object, verify_key: VerifyKey, server_name: str, key_id: str
) -> None:
    """Checks an unpadded-base64 ed25519 signature over ``message``; raises
    `InvalidSignature` naming ``server_name`` and ``key_id``."""
    if not isinstance(signature_b64, str):
        raise InvalidSignature(
            f"signature by {server_name} with {key_id} is not a string",
            server_name=server_name,
            key_id=key_id,
        )
    try:
        signature = decode_base64(signature_b64)
    except ValueError:
        raise InvalidSignature(
            f"signature by {server_name} with {key_id} is not valid base64",
            server_name=server_name,
            key_id=key_id,
        ) from None
    try:
        verify_key.verify(message, signature)
    except (BadSignatureError, ValueError, TypeError):
        raise InvalidSignature(
            f"signature by {server_name} with {key_id} does not verify",
            server_name=server_name,
            key_id=key_id,
        ) from None


def verify_json(
    obj: Mapping[str, Any], server_name: str, key_id: str, verify_key: VerifyKey
) -> None:
    """Checks ``signatures[server_name][key_id]`` over ``obj``; raises a `SignatureError`."""
    signature = _signature_of(obj, server_name, key_id)
    verify_signature(signing_input(obj), signature, verify_key, server_name, key_id)


def _signature_of(obj: Mapping[str, Any], server_name: str, key_id: str) -> object:
    signatures = obj.get("signatures")
    by_server = signatures.get(server_name) if isinstance(signatures, dict) else None
    if not isinstance(by_server, dict) or key_id not in by_server:
        raise MissingSignature(
            f"no signature by {server_name} with {key_id}",
            server_name=server_name,
            key_id=key_id,
        )
    return by_server[key_id]


def sign_event(
    event: Mapping[str, Any],
    room_version: str | RoomVersion,
    server_name: str,
    signing_key: SigningKey,
    *,
    key_id: str | None = None,
) -> JsonDict:
    """A copy of ``event`` with its content hash and ``server_name``'s signature added.

    Existing signatures are kept; an existing ``hashes`` is replaced.
    """
    version = get_room_version(room_version)
    key_id = key_id or key_id_of(signing_key)
    hashed = add_content_hash(dict(event))
    redacted = _redact_shallow(hashed, version)
    signature = signing_key.sign(signing_input(redacted)).signature
    old = hashed.get("signatures")
    signatures = {n: dict(s) for n, s in old.items()} if isinstance(old, dict) else {}
    signatures.setdefault(server_name, {})[key_id] = encode_base64(signature)
    hashed["signatures"] = signatures
    return hashed


def _domain_of(identifier: object, field: str) -> str:
    server_name = server_name_of(identifier)
    if server_name is None:
        raise MissingSignature(
            f"cannot tell which server must sign: {field} {identifier!r} has no server name",
            server_name="",
        )
    return server_name


def required_signers(event: Mapping[str, Any], room_version: str | RoomVersion) -> list[str]:
    """Server names whose signatures an event must carry, in check order.

    server-server "Validating hashes and signatures on received events": the sender's
    server (except for an invite made from a third-party invite, which any server may
    send); in v1/v2 also the server in ``event_id``; from v8 (restricted joins) also the
    server of ``content.join_authorised_via_users_server`` on joins (v8 auth rule 4.2).
    """
    version = get_room_version(room_version)
    content = event.get("content")
    content = content if isinstance(content, dict) else {}
    servers: list[str] = []
    is_3pid_invite = (
        event.get("type") == "m.room.member"
        and content.get("membership") == "invite"
        and "third_party_invite" in content
    )
    if not is_3pid_invite:
        servers.append(_domain_of(event.get("sender"), "sender"))
    if version.signatures.check_event_id_server and version.event_id_format is (
        EventIdFormat.DOMAIN
    ):
        servers.append(_domain_of(event.get("event_id"), "event_id"))
    if (
        version.signatures.check_join_authorised_via_users_server
        and event.get("type") == "m.room.member"
        and content.get("membership") == "join"
        and "join_authorised_via_users_server" in content
    ):
        servers.append(
            _domain_of(
                content["join_authorised_via_users_server"],
                "content.join_authorised_via_users_server",
            )
        )
    return list(dict.fromkeys(servers))


def _verify_server(
    message: bytes,
    signed: Mapping[str, Any],
    server_name: str,
    keys: Keys,
    minimum_valid_until_ts: int | None,
    now_ms: int | None,
) -> None:
    signatures = signed.get("signatures")
    by_server = signatures.get(server_name) if isinstance(signatures, dict) else None
    if not isinstance(by_server, dict) or not by_server:
        raise MissingSignature(f"event is not signed by {server_name}", server_name=server_name)
    verified = 0
    skipped: list[str] = []
    for key_id, signature in by_server.items():
        # "Removes any signing key identifiers ... with algorithms it doesn't understand."
        if not isinstance(key_id, str) or not key_id.startswith("ed25519:"):
            continue
        key = _lookup(keys, server_name, key_id)
        if key is None:
            # Unknown keys are skipped (e.g. a policy server's unpublished key).
            skipped.append(f"{key_id} (unknown)")
            continue
        if minimum_valid_until_ts is not None and key.valid_until_ts is not None:
            valid_until = key.valid_until_ts
            if now_ms is not None:
                valid_until = min(valid_until, now_ms + MAX_KEY_VALIDITY_MS)
            if valid_until < minimum_valid_until_ts:
                skipped.append(f"{key_id} (valid until {valid_until})")
                continue
        verify_signature(message, signature, key.verify_key, server_name, key_id)
        verified += 1
    if not verified:
        detail = ", ".join(skipped) if skipped else "no ed25519 signatures"
        raise NoUsableKey(
            f"no signature by {server_name} with a known, valid key: {detail}",
            server_name=server_name,
        )


@dataclass(frozen=True, slots=True)
class VerifiedEvent:
    """The outcome of `verify_event`.

    ``event`` is what to process further: the event itself, or its redacted form when the
    content hash did not match (server-server "Validating hashes and signatures").
    """

    event: JsonDict
    content_hash_ok: bool
    signers: tuple[str, ...]


def verify_event_signatures(
    event: Mapping[str, Any],
    room_version: str | RoomVersion,
    keys: Keys,
    *,
    now_ms: int | None = None,
    signers: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Checks the signatures every required server (or each of ``signers``, when given)
    made over the redacted event.

    From room v5 (``enforce_key_validity``) a key counts only if its ``valid_until_ts``
    (capped at ``now_ms`` + 7 days when ``now_ms`` is given) is at least the event's
    ``origin_server_ts``; other keys are skipped, and unknown keys are skipped. Every
    signature made with a usable key must verify, and each required server needs at least
    one. Returns the servers checked; raises a `SignatureError` subclass.
    """
    version = get_room_version(room_version)
    redacted = _redact_shallow(event, version)
    message = signing_input(redacted)
    minimum: int | None = None
    if version.enforce_key_validity:
        ts = event.get("origin_server_ts")
        minimum = ts if isinstance(ts, int) and not isinstance(ts, bool) else 0
    if signers is None:
        signers = required_signers(event, version)
    for server_name in signers:
        _verify_server(message, redacted, server_name, keys, minimum, now_ms)
    return tuple(signers)


def verify_event(
    event: Mapping[str, Any],
    room_version: str | RoomVersion,
    keys: Keys,
    *,
    now_ms: int | None = None,
) -> VerifiedEvent:
    """Signature check, then content hash check, as on receipt of a PDU.

    Raises a `SignatureError` subclass if signatures fail (the PDU is to be dropped). A
    content hash mismatch is not an error: the result carries the redacted event instead.
    """
    version = get_room_version(room_version)
    signers = verify_event_signatures(event, version, keys, now_ms=now_ms)
    as_dict = dict(event)
    if check_content_hash(as_dict):
        return VerifiedEvent(event=as_dict, content_hash_ok=True, signers=signers)
    return VerifiedEvent(event=redact(as_dict, version), content_hash_ok=False, signers=signers)
