"""Signing: the spec's appendix test vectors, then verification rules and errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from nacl.signing import SigningKey
from signedjson.key import decode_signing_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import verify_signed_json
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.crypto.event_signing import add_hashes_and_signatures

from gateway.matrix.signing import (
    MAX_KEY_VALIDITY_MS,
    InvalidSignature,
    KeyIdError,
    MissingSignature,
    NoUsableKey,
    ServerKey,
    SignatureError,
    required_signers,
    sign_event,
    sign_json,
    verify_event,
    verify_event_signatures,
    verify_json,
)

# Appendices, "Cryptographic Test Vectors".
SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"
KEY = decode_signing_key_base64("ed25519", "1", SEED)


def test_vector_sign_empty_object() -> None:
    assert sign_json({}, "domain", KEY) == {
        "signatures": {
            "domain": {
                "ed25519:1": "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV"
                "/7Xg4ahLwYGYZzuHGZKM5ZAQ"
            }
        }
    }


def test_vector_sign_object_with_data() -> None:
    assert sign_json({"one": 1, "two": "Two"}, "domain", KEY) == {
        "one": 1,
        "signatures": {
            "domain": {
                "ed25519:1": "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZ"
                "hG6kYdD13EIMJpvhJI+6Bw"
            }
        },
        "two": "Two",
    }


def test_vector_minimal_event() -> None:
    event = {
        "room_id": "!x:domain",
        "sender": "@a:domain",
        "origin": "domain",
        "origin_server_ts": 1000000,
        "signatures": {},
        "hashes": {},
        "type": "X",
        "content": {},
        "prev_events": [],
        "auth_events": [],
        "depth": 3,
        "unsigned": {"age_ts": 1000000},
    }
    assert sign_event(event, "1", "domain", KEY) == {
        "auth_events": [],
        "content": {},
        "depth": 3,
        "hashes": {"sha256": "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos"},
        "origin": "domain",
        "origin_server_ts": 1000000,
        "prev_events": [],
        "room_id": "!x:domain",
        "sender": "@a:domain",
        "signatures": {
            "domain": {
                "ed25519:1": "KxwGjPSDEtvnFgU00fwFz+l6d2pJM6XBIaMEn81SXPTRl16AqLAYqfIReFGZlHi5"
                "KLjAWbOoMszkwsQma+lYAg"
            }
        },
        "type": "X",
        "unsigned": {"age_ts": 1000000},
    }


def test_vector_event_with_redactable_content() -> None:
    event = {
        "content": {"body": "Here is the message content"},
        "event_id": "$0:domain",
        "origin": "domain",
        "origin_server_ts": 1000000,
        "type": "m.room.message",
        "room_id": "!r:domain",
        "sender": "@u:domain",
        "signatures": {},
        "unsigned": {"age_ts": 1000000},
    }
    signed = sign_event(event, "1", "domain", KEY)
    assert signed["hashes"] == {"sha256": "onLKD1bGljeBWQhWZ1kaP9SorVmRQNdN5aM2JYU2n/g"}
    assert signed["signatures"] == {
        "domain": {
            "ed25519:1": "Wm+VzmOUOz08Ds+0NTWb1d4CZrVsJSikkeRxh6aCcUwu6pNC78FunoD7KNWzqFn2"
            "41eYHYMGCA5McEiVPdhzBA"
        }
    }
    assert signed["unsigned"] == {"age_ts": 1000000}
    assert event["signatures"] == {}, "the input is not modified"
    keys = {("domain", "ed25519:1"): ServerKey(KEY.verify_key)}
    result = verify_event(signed, "1", keys)
    assert result.content_hash_ok and result.event == signed and result.signers == ("domain",)


# --- JSON ----------------------------------------------------------------------------


def test_sign_json_keeps_other_signatures_and_unsigned() -> None:
    obj = {"a": 1, "unsigned": {"u": 1}, "signatures": {"other": {"ed25519:x": "s"}}}
    signed = sign_json(obj, "domain", KEY)
    assert signed["signatures"]["other"] == {"ed25519:x": "s"}
    assert signed["unsigned"] == {"u": 1}
    assert obj["signatures"] == {"other": {"ed25519:x": "s"}}
    verify_json(signed, "domain", "ed25519:1", KEY.verify_key)
    # Independent check with signedjson.
    verify_signed_json(copy.deepcopy(signed), "domain", get_verify_key(KEY))
    # unsigned is not covered.
    verify_json(dict(signed, unsigned={"changed": True}), "domain", "ed25519:1", KEY.verify_key)


def test_verify_json_failures() -> None:
    signed = sign_json({"a": 1}, "domain", KEY)
    with pytest.raises(InvalidSignature) as info:
        verify_json(dict(signed, a=2), "domain", "ed25519:1", KEY.verify_key)
    assert (info.value.server_name, info.value.key_id) == ("domain", "ed25519:1")
    with pytest.raises(MissingSignature, match=r"other\.example"):
        verify_json(signed, "other.example", "ed25519:1", KEY.verify_key)
    with pytest.raises(MissingSignature, match="ed25519:2"):
        verify_json(signed, "domain", "ed25519:2", KEY.verify_key)
    bad_b64 = {"a": 1, "signatures": {"domain": {"ed25519:1": "*"}}}
    with pytest.raises(InvalidSignature, match="base64"):
        verify_json(bad_b64, "domain", "ed25519:1", KEY.verify_key)
    wrong_key = generate_signing_key("1")
    with pytest.raises(InvalidSignature, match="does not verify"):
        verify_json(signed, "domain", "ed25519:1", wrong_key.verify_key)


def test_explicit_key_id_for_plain_nacl_keys() -> None:
    plain = SigningKey.generate()
    with pytest.raises(KeyIdError):
        sign_json({}, "domain", plain)
    signed = sign_json({}, "domain", plain, key_id="ed25519:plain")
    verify_json(signed, "domain", "ed25519:plain", plain.verify_key)


# --- events --------------------------------------------------------------------------

REMOTE = generate_signing_key("r1")
OTHER = generate_signing_key("o1")


def _member(sender: str = "@alice:remote.example", **content: Any) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "room_id": "!room:host.example",
        "sender": sender,
        "state_key": sender,
        "content": {"membership": "join", "displayname": "Alice", **content},
        "depth": 10,
        "origin_server_ts": 1_700_000_000_000,
        "prev_events": ["$prev"],
        "auth_events": ["$auth"],
    }


def _keys(valid_until: int | None = None) -> dict[tuple[str, str], ServerKey]:
    return {
        ("remote.example", "ed25519:r1"): ServerKey(REMOTE.verify_key, valid_until),
        ("other.example", "ed25519:o1"): ServerKey(OTHER.verify_key, valid_until),
    }


@pytest.mark.parametrize("version", ["3", "6", "10", "11", "12"])
def test_sign_event_matches_synapse(version: str) -> None:
    event = _member()
    ours = sign_event(event, version, "remote.example", REMOTE)
    theirs = copy.deepcopy(event)
    add_hashes_and_signatures(KNOWN_ROOM_VERSIONS[version], theirs, "remote.example", REMOTE)
    assert ours == theirs


def test_verify_event_with_mapping_or_callable() -> None:
    signed = sign_event(_member(), "10", "remote.example", REMOTE)
    keys = _keys()
    assert verify_event(signed, "10", keys).content_hash_ok
    assert verify_event(signed, "10", lambda s, k: keys.get((s, k))).signers == ("remote.example",)


def test_content_hash_mismatch_yields_redacted_event() -> None:
    signed = sign_event(_member(), "10", "remote.example", REMOTE)
    tampered = copy.deepcopy(signed)
    tampered["content"]["displayname"] = "Mallory"  # not protected by redaction
    result = verify_event(tampered, "10", _keys())
    assert not result.content_hash_ok
    assert result.event["content"] == {"membership": "join"}
    assert "displayname" not in result.event["content"]


def test_protected_change_breaks_signature() -> None:
    signed = sign_event(_member(), "10", "remote.example", REMOTE)
    tampered = copy.deepcopy(signed)
    tampered["content"]["membership"] = "leave"
    with pytest.raises(InvalidSignature) as info:
        verify_event(tampered, "10", _keys())
    assert info.value.server_name == "remote.example"
    assert info.value.key_id == "ed25519:r1"


def test_unsigned_event_and_unknown_keys() -> None:
    with pytest.raises(MissingSignature, match=r"remote\.example"):
        verify_event(_member(), "10", _keys())
    signed = sign_event(_member(), "10", "remote.example", REMOTE)
    with pytest.raises(NoUsableKey, match=r"ed25519:r1 \(unknown\)"):
        verify_event(signed, "10", {})
    # An extra signature with an unknown key (e.g. a policy server) is skipped.
    extra = sign_event(signed, "10", "remote.example", OTHER, key_id="ed25519:policy")
    assert verify_event(extra, "10", _keys()).content_hash_ok
    # An unknown algorithm is ignored entirely.
    weird = copy.deepcopy(signed)
    weird["signatures"]["remote.example"] = {"curve9:x": "abc"}
    with pytest.raises(NoUsableKey, match="no ed25519 signatures"):
        verify_event(weird, "10", _keys())


def test_every_known_key_must_verify() -> None:
    signed = sign_event(_member(), "10", "remote.example", REMOTE)
    signed["signatures"]["remote.example"]["ed25519:o1"] = signed["signatures"]["remote.example"][
        "ed25519:r1"
    ]
    keys = _keys() | {("remote.example", "ed25519:o1"): ServerKey(OTHER.verify_key)}
    with pytest.raises(InvalidSignature, match="ed25519:o1"):
        verify_event(signed, "10", keys)


def test_key_validity_enforced_from_v5() -> None:
    ts = _member()["origin_server_ts"]
    for version in ("5", "10", "12"):
        signed = sign_event(_member(), version, "remote.example", REMOTE)
        verify_event(signed, version, _keys(valid_until=ts))
        with pytest.raises(NoUsableKey, match="valid until") as info:
            verify_event(signed, version, _keys(valid_until=ts - 1))
        assert info.value.server_name == "remote.example"
    for version in ("3", "4"):
        signed = sign_event(_member(), version, "remote.example", REMOTE)
        verify_event(signed, version, _keys(valid_until=ts - 1))


def test_key_validity_capped_at_seven_days_from_now() -> None:
    signed = sign_event(_member(), "10", "remote.example", REMOTE)
    ts = signed["origin_server_ts"]
    far_future = ts + 365 * 24 * 3600 * 1000
    keys = _keys(valid_until=far_future)
    verify_event(signed, "10", keys, now_ms=ts - MAX_KEY_VALIDITY_MS)
    with pytest.raises(NoUsableKey):
        verify_event(signed, "10", keys, now_ms=ts - MAX_KEY_VALIDITY_MS - 1)


def test_required_signers() -> None:
    assert required_signers(_member(), "10") == ["remote.example"]
    v1 = dict(_member(), event_id="$e:other.example")
    assert required_signers(v1, "1") == ["remote.example", "other.example"]
    assert required_signers(dict(_member(), event_id="$e:remote.example"), "2") == [
        "remote.example"
    ]
    restricted = _member(join_authorised_via_users_server="@admin:other.example")
    assert required_signers(restricted, "8") == ["remote.example", "other.example"]
    assert required_signers(restricted, "org.matrix.msc3083.v2") == [
        "remote.example",
        "other.example",
    ]
    assert required_signers(restricted, "7") == ["remote.example"]
    invite_3pid = _member(membership="invite", third_party_invite={"signed": {}})
    assert required_signers(invite_3pid, "10") == []
    with pytest.raises(SignatureError, match="sender"):
        required_signers(_member(sender="nobody"), "10")


def test_restricted_join_needs_authorising_server_signature() -> None:
    event = _member(join_authorised_via_users_server="@admin:other.example")
    signed = sign_event(event, "9", "remote.example", REMOTE)
    with pytest.raises(MissingSignature, match=r"other\.example"):
        verify_event(signed, "9", _keys())
    both = sign_event(signed, "9", "other.example", OTHER)
    assert verify_event(both, "9", _keys()).signers == ("remote.example", "other.example")
    # In v9 the field survives redaction, so the authorising signature covers it.
    forged = copy.deepcopy(both)
    forged["content"]["join_authorised_via_users_server"] = "@admin2:other.example"
    with pytest.raises(InvalidSignature):
        verify_event(forged, "9", _keys())


def test_v1_event_id_server_must_sign() -> None:
    event = dict(_member(), event_id="$abc:other.example")
    signed = sign_event(event, "1", "remote.example", REMOTE)
    with pytest.raises(MissingSignature, match=r"other\.example"):
        verify_event(signed, "1", _keys())
    both = sign_event(signed, "1", "other.example", OTHER)
    assert verify_event(both, "1", _keys()).content_hash_ok


def test_verify_event_signatures_accepts_redacted_copy() -> None:
    from gateway.matrix.events import redact

    signed = sign_event(_member(), "11", "remote.example", REMOTE)
    verify_event_signatures(redact(signed, "11"), "11", _keys())
    result = verify_event(redact(signed, "11"), "11", _keys())
    assert not result.content_hash_ok
