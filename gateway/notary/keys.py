"""The notary's own signing key and the delegation keys it vouches for.

A delegation key lets the gateway sign a translated request *as the remote origin* X: the
homeserver asks the notary (its ``trusted_key_servers`` entry) for X's key, and the notary
answers with an extra short-lived key for X, self-signed and notary-signed.

Delegation keys are derived, not stored: the seed for (origin, period) is an HMAC of a secret
every worker reads from the same file. All workers therefore hold the same key for the same
origin and period without writing private key material anywhere. What *is* shared through
the store is the record that the gateway authenticated X, because the notary must vouch a
key only for origins it has authenticated itself.

Periods are half a lifetime long and each key is valid for a whole lifetime from the start
of its period, so the key in use always has at least half its lifetime left: the homeserver
never sees a key that expires while a request signed with it is in flight.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import signedjson.key
from nacl.signing import SigningKey as Ed25519SigningKey
from signedjson.types import SigningKey
from unpaddedbase64 import encode_base64

from gateway.matrix.signing import sign_json

#: Key ids of delegation keys start with this version prefix (``ed25519:mxgw_<id>``).
DELEGATION_KEY_PREFIX = "ed25519:mxgw_"


def is_delegation_key_id(key_id: str) -> bool:
    return key_id.startswith(DELEGATION_KEY_PREFIX)


def server_keys_carry_delegation_key(server_keys: Any) -> bool:
    """Whether a server-keys object names a delegation key anywhere (keys or signatures)."""
    if not isinstance(server_keys, dict):
        return False
    for field in ("verify_keys", "old_verify_keys"):
        keys = server_keys.get(field)
        if isinstance(keys, dict) and any(
            isinstance(k, str) and is_delegation_key_id(k) for k in keys
        ):
            return True
    signatures = server_keys.get("signatures")
    if isinstance(signatures, dict):
        for by_key in signatures.values():
            if isinstance(by_key, dict) and any(
                isinstance(k, str) and is_delegation_key_id(k) for k in by_key
            ):
                return True
    return False


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class NotaryKey:
    """The notary's identity: the name the homeserver knows it by and its signing key."""

    server_name: str
    signing_key: SigningKey

    @property
    def key_id(self) -> str:
        return f"{self.signing_key.alg}:{self.signing_key.version}"

    @property
    def verify_key_base64(self) -> str:
        return str(
            signedjson.key.encode_verify_key_base64(signedjson.key.get_verify_key(self.signing_key))
        )

    def sign(self, obj: dict[str, Any]) -> dict[str, Any]:
        return sign_json(obj, self.server_name, cast(Ed25519SigningKey, self.signing_key))

    @classmethod
    def load_or_create(cls, path: Path, server_name: str) -> NotaryKey:
        """Reads a Synapse-format key file (``ed25519 <version> <seed>``), making one if absent."""
        if not path.exists():
            version = "notary_" + secrets.token_hex(3)
            key = signedjson.key.generate_signing_key(version)
            line = f"{key.alg} {key.version} {signedjson.key.encode_signing_key_base64(key)}\n"
            _write_private(path, line.encode())
        with path.open() as f:
            keys = signedjson.key.read_signing_keys(f)
        if not keys:
            raise ValueError(f"{path}: no signing key in the file")
        return cls(server_name=server_name, signing_key=keys[0])


def load_or_create_secret(path: Path) -> bytes:
    """The secret delegation keys are derived from; 32 random bytes made on first start."""
    if not path.exists():
        _write_private(path, secrets.token_bytes(32).hex().encode())
    data = bytes.fromhex(path.read_text().strip())
    if len(data) < 32:
        raise ValueError(f"{path}: the delegation secret must hold at least 32 bytes")
    return data


@dataclass(frozen=True)
class DelegationKey:
    origin: str
    key_id: str
    signing_key: SigningKey
    valid_until_ts: int

    @property
    def verify_key_base64(self) -> str:
        return str(
            signedjson.key.encode_verify_key_base64(signedjson.key.get_verify_key(self.signing_key))
        )


class DelegationKeys:
    """Derives the delegation key of an origin for a point in time."""

    def __init__(self, secret: bytes, *, lifetime_ms: int) -> None:
        if lifetime_ms < 2000:
            raise ValueError("the delegation key lifetime must be at least 2 seconds")
        self._secret = secret
        self.lifetime_ms = lifetime_ms
        self.period_ms = lifetime_ms // 2

    def period_at(self, now_ms: int) -> int:
        return now_ms // self.period_ms

    def for_period(self, origin: str, period: int) -> DelegationKey:
        material = hmac.new(
            self._secret, f"mxgw-delegation\x00{origin}\x00{period}".encode(), hashlib.sha256
        ).digest()
        # The key id must not let anyone link keys to origins or periods; it is a tag of
        # the same derivation, URL-safe so it fits the key id grammar ([a-zA-Z0-9_]).
        tag = hmac.new(
            self._secret, f"mxgw-key-id\x00{origin}\x00{period}".encode(), hashlib.sha256
        ).digest()
        version = "mxgw_" + base64.b32encode(tag[:10]).decode().lower()
        key = signedjson.key.decode_signing_key_base64("ed25519", version, encode_base64(material))
        return DelegationKey(
            origin=origin,
            key_id=f"ed25519:{version}",
            signing_key=key,
            valid_until_ts=period * self.period_ms + self.lifetime_ms,
        )

    def current(self, origin: str, now_ms: int) -> DelegationKey:
        return self.for_period(origin, self.period_at(now_ms))

    def still_valid(self, origin: str, now_ms: int) -> list[DelegationKey]:
        """The keys of ``origin`` that have not expired at ``now_ms`` (current and previous)."""
        period = self.period_at(now_ms)
        keys = [self.for_period(origin, p) for p in (period - 1, period)]
        return [k for k in keys if k.valid_until_ts > now_ms]


def delegation_server_keys(key: DelegationKey, notary: NotaryKey) -> dict[str, Any]:
    """The server-keys object vouching ``key`` for its origin: self-signed, then notary-signed."""
    obj: dict[str, Any] = {
        "server_name": key.origin,
        "valid_until_ts": key.valid_until_ts,
        "verify_keys": {key.key_id: {"key": key.verify_key_base64}},
        "old_verify_keys": {},
    }
    obj = sign_json(obj, key.origin, cast(Ed25519SigningKey, key.signing_key))
    return notary.sign(obj)
