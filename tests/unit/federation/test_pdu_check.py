"""The one check of received PDUs (gateway.federation.pdu_check), events signed with
Synapse's event code, keys from a stand-in key source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import signedjson.key

from gateway.errors import MatrixError
from gateway.federation.keys import VerifyKeyWithExpiry
from gateway.federation.pdu_check import MAX_KEYS_PER_SERVER, PduProblem, PduRejected, check_pdu
from gateway.matrix.room_versions import get_room_version
from gateway.matrix.signing import InvalidSignature, MissingSignature, NoUsableKey
from tests.support.pdus import sign_pdu

REMOTE = "remote.example"
HERE = "here.example"
REMOTE_KEY = signedjson.key.generate_signing_key("r1")
NOW = 1_700_000_000_000


@dataclass
class Keys:
    """Knows the keys it was given, valid until ``valid_until_ts``; records each lookup."""

    known: dict[tuple[str, str], Any]
    valid_until_ts: int = 4_000_000_000_000
    lookups: list[tuple[str, str, int]] = field(default_factory=list)

    async def get_verify_key(
        self, server_name: str, key_id: str, *, minimum_valid_until_ts: int
    ) -> VerifyKeyWithExpiry:
        self.lookups.append((server_name, key_id, minimum_valid_until_ts))
        key = self.known.get((server_name, key_id))
        if key is None:
            raise MatrixError(401, "M_UNAUTHORIZED", "no such key")
        return VerifyKeyWithExpiry(key_id, signedjson.key.get_verify_key(key), self.valid_until_ts)


def remote_keys(**kwargs: Any) -> Keys:
    return Keys({(REMOTE, f"ed25519:{REMOTE_KEY.version}"): REMOTE_KEY}, **kwargs)


def join(version: str = "10", **content: Any) -> dict[str, Any]:
    event = {
        "type": "m.room.member",
        "state_key": f"@joiner:{REMOTE}",
        "sender": f"@joiner:{REMOTE}",
        "room_id": f"!room:{HERE}",
        "content": {"membership": "join", **content},
        "origin_server_ts": NOW - 1000,
        "depth": 3,
        "prev_events": [],
        "auth_events": [],
    }
    return sign_pdu(event, version, REMOTE, REMOTE_KEY)


async def rejected(event: dict[str, Any], keys: Keys, **kwargs: Any) -> PduRejected:
    with pytest.raises(PduRejected) as info:
        await check_pdu(event, get_room_version("10"), keys, now_ms=NOW, **kwargs)
    return info.value


async def test_a_correctly_signed_event_passes_with_a_key_valid_when_it_was_sent() -> None:
    keys = remote_keys()
    await check_pdu(join(), get_room_version("10"), keys, now_ms=NOW)
    assert keys.lookups == [(REMOTE, f"ed25519:{REMOTE_KEY.version}", NOW - 1000)]


async def test_the_authorising_server_is_required_unless_the_caller_names_the_signers() -> None:
    event = join(join_authorised_via_users_server=f"@alice:{HERE}")
    failure = await rejected(event, remote_keys())
    assert failure.problem is PduProblem.SIGNATURE
    assert isinstance(failure.signature_error, MissingSignature)
    assert failure.signature_error.server_name == HERE
    await check_pdu(event, get_room_version("10"), remote_keys(), now_ms=NOW, signers=[REMOTE])


async def test_each_check_names_its_problem() -> None:
    changed = dict(join(), content={"membership": "leave"})
    assert (await rejected(changed, remote_keys())).problem is PduProblem.CONTENT_HASH
    floats = sign_pdu(
        dict(join(), content={"membership": "join", "x": 1.5}), "10", REMOTE, REMOTE_KEY
    )
    assert (await rejected(floats, remote_keys())).problem is PduProblem.NOT_CANONICAL
    nobody = sign_pdu(dict(join(), sender="nobody"), "10", REMOTE, REMOTE_KEY)
    assert (await rejected(nobody, remote_keys())).problem is PduProblem.UNKNOWN_SIGNERS
    unknown = await rejected(join(), Keys({}))
    assert isinstance(unknown.signature_error, NoUsableKey)
    other_key = signedjson.key.generate_signing_key(REMOTE_KEY.version)
    forged = Keys({(REMOTE, f"ed25519:{REMOTE_KEY.version}"): other_key})
    assert isinstance((await rejected(join(), forged)).signature_error, InvalidSignature)


async def test_a_key_that_expired_before_the_event_was_sent_does_not_count() -> None:
    failure = await rejected(join(), remote_keys(valid_until_ts=NOW - 2000))
    assert isinstance(failure.signature_error, NoUsableKey)


async def test_only_a_few_key_ids_per_server_are_looked_up() -> None:
    event = join()
    extra = {f"ed25519:k{i}": "AAAA" for i in range(10)}
    event["signatures"][REMOTE] = {**extra, **event["signatures"][REMOTE]}
    keys = remote_keys()
    failure = await rejected(event, keys)
    assert isinstance(failure.signature_error, NoUsableKey)
    assert len(keys.lookups) == MAX_KEYS_PER_SERVER
