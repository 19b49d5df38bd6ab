"""The internal notary and the delegation keys it vouches for (see DESIGN.md, trust model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.notary.certificate import ensure_self_signed_certificate
from gateway.notary.keys import (
    DELEGATION_KEY_PREFIX,
    DelegationKey,
    DelegationKeys,
    NotaryKey,
    is_delegation_key_id,
    load_or_create_secret,
    server_keys_carry_delegation_key,
)
from gateway.notary.service import Notary

__all__ = [
    "DELEGATION_KEY_PREFIX",
    "DelegationKey",
    "DelegationKeys",
    "Notary",
    "NotaryFiles",
    "NotaryKey",
    "is_delegation_key_id",
    "prepare_notary_files",
    "server_keys_carry_delegation_key",
]


@dataclass(frozen=True)
class NotaryFiles:
    key_path: Path
    secret_path: Path
    certificate_path: Path
    private_key_path: Path


def prepare_notary_files(state_dir: Path) -> NotaryFiles:
    """Creates what the notary needs on first start. Called once, before workers start, so
    that every worker reads the same key, secret and certificate."""
    # resolve(): a link to a directory not made yet (the container image links state_dir
    # into its data volume, which starts empty) gets its target made.
    state_dir.resolve().mkdir(parents=True, exist_ok=True)
    key_path = state_dir / "notary.signing.key"
    secret_path = state_dir / "delegation.secret"
    NotaryKey.load_or_create(key_path, "unused")
    load_or_create_secret(secret_path)
    cert, key = ensure_self_signed_certificate(state_dir, "localhost")
    return NotaryFiles(key_path, secret_path, cert, key)
