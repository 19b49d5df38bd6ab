"""Is the configuration about this homeserver? (``gateway check``)

The gateway acts as the homeserver: it names it ``server.server_name`` and signs as it with a
copy of its key (``server.signing_key_path``). A wrong value fails far from its cause: the
notary refuses the homeserver's key queries, translated requests are addressed to a server
that is not there, and every one of those looks like "the homeserver does not use the
notary". The homeserver publishes both facts at ``GET /_matrix/key/v2/server``, so the check
compares them first and names the key to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import signedjson.key
from signedjson.types import SigningKey

__all__ = ["HomeserverKeys", "identity_problems", "parse_server_keys"]

#: Where a homeserver publishes its name and verify keys.
SERVER_KEYS_PATH = "/_matrix/key/v2/server"


@dataclass(frozen=True)
class HomeserverKeys:
    server_name: str
    #: key id -> unpadded base64 public key
    verify_keys: Mapping[str, str]
    #: keys the homeserver signed with before (key id -> unpadded base64 public key)
    old_verify_keys: Mapping[str, str]


def _keys(answer: Mapping[str, object], field: str) -> dict[str, str]:
    keys = answer.get(field, {})
    if not isinstance(keys, Mapping):
        raise ValueError(f"{field} is not an object")
    out: dict[str, str] = {}
    for key_id, entry in keys.items():
        key = entry.get("key") if isinstance(entry, Mapping) else None
        if not isinstance(key_id, str) or not isinstance(key, str):
            raise ValueError(f"{field} must map key ids to {{'key': base64}}")
        out[key_id] = key
    return out


def parse_server_keys(answer: object) -> HomeserverKeys:
    """The name and keys of a ``/_matrix/key/v2/server`` answer (raises ValueError)."""
    if not isinstance(answer, Mapping):
        raise ValueError("the answer is not a JSON object")
    name = answer.get("server_name")
    if not isinstance(name, str) or not name:
        raise ValueError("the answer has no server_name")
    return HomeserverKeys(
        server_name=name,
        verify_keys=_keys(answer, "verify_keys"),
        old_verify_keys=_keys(answer, "old_verify_keys"),
    )


def _describe(keys: Mapping[str, str]) -> str:
    return ", ".join(f"{key_id} with public key {key}" for key_id, key in sorted(keys.items()))


def identity_problems(
    keys: HomeserverKeys,
    *,
    server_name: str,
    homeserver_url: str,
    signing_key: SigningKey | None = None,
    signing_key_path: Path | None = None,
) -> list[str]:
    """One ``"key: reason"`` line for each configured value that is not the homeserver's."""
    problems = []
    if keys.server_name != server_name:
        problems.append(
            f'server.server_name: is "{server_name}", but the homeserver at {homeserver_url} '
            f'(homeserver.url) is named "{keys.server_name}"; set server.server_name = '
            f'"{keys.server_name}", or point homeserver.url at the homeserver of "{server_name}"'
        )
    if signing_key is not None:
        key_id = f"{signing_key.alg}:{signing_key.version}"
        public = str(
            signedjson.key.encode_verify_key_base64(signedjson.key.get_verify_key(signing_key))
        )
        if keys.verify_keys.get(key_id) != public:
            copy = f"the signing key copy {signing_key_path}" if signing_key_path else "the key"
            current = _describe(keys.verify_keys) or "none"
            retired = keys.old_verify_keys.get(key_id) == public
            problems.append(
                f"server.signing_key_path: {copy} ({key_id} with public key {public}) does not "
                f"match the homeserver's key ({current})"
                + ("; it is a key the homeserver used before" if retired else "")
                + "; copy the file that signing_key_path in homeserver.yaml names"
            )
    return problems
