from __future__ import annotations

import base64
import copy
import hashlib
import json
from typing import Any

import pytest
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.events import make_event_from_dict

from gateway.matrix.events import (
    InvalidEvent,
    add_content_hash,
    check_content_hash,
    compute_content_hash,
    compute_event_id,
    compute_reference_hash,
    compute_room_id,
    redact,
)
from gateway.matrix.room_versions import ROOM_VERSIONS, UnknownRoomVersion, get_room_version

ALL = list(ROOM_VERSIONS)
BEFORE_V11 = [v for v in ALL if v not in ("11", "12")]


def _event(event_type: str, content: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": event_type,
        "room_id": "!r:example.org",
        "sender": "@u:example.org",
        "state_key": "",
        "content": content,
        "depth": 5,
        "origin_server_ts": 1_700_000_000_000,
        "prev_events": ["$p"],
        "auth_events": ["$a"],
        "hashes": {"sha256": "x"},
        "signatures": {"example.org": {"ed25519:1": "y"}},
        **extra,
    }


# --- top-level keys -------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL)
def test_top_level_keys(version: str) -> None:
    event = _event(
        "m.room.message",
        {"body": "hi"},
        event_id="$e:example.org",
        origin="example.org",
        membership="join",
        prev_state=[],
        redacts="$other",
        unsigned={"age_ts": 1},
        something_else=1,
    )
    redacted = redact(event, version)
    always = {
        "event_id",
        "type",
        "room_id",
        "sender",
        "state_key",
        "content",
        "hashes",
        "signatures",
        "depth",
        "prev_events",
        "auth_events",
        "origin_server_ts",
    }
    if version in BEFORE_V11:
        assert set(redacted) == always | {"origin", "membership", "prev_state"}
    else:
        assert set(redacted) == always
    assert redacted["content"] == {}


# --- content, per event type and version -----------------------------------------------

CASES: list[tuple[str, dict[str, Any], dict[str, set[str]]]] = [
    (
        "m.room.member",
        {
            "membership": "join",
            "displayname": "U",
            "join_authorised_via_users_server": "@x:example.org",
            "third_party_invite": {"signed": {"mxid": "@u:example.org"}, "display_name": "d"},
        },
        {
            "1..8": {"membership"},
            "9..10": {"membership", "join_authorised_via_users_server"},
            "11..12": {"membership", "join_authorised_via_users_server", "third_party_invite"},
        },
    ),
    (
        "m.room.create",
        {"creator": "@u:example.org", "room_version": "9", "m.federate": False},
        {"1..10": {"creator"}, "11..12": {"creator", "room_version", "m.federate"}},
    ),
    (
        "m.room.join_rules",
        {"join_rule": "restricted", "allow": [{"type": "m.room_membership"}], "x": 1},
        {"1..7": {"join_rule"}, "8..12": {"join_rule", "allow"}},
    ),
    (
        "m.room.power_levels",
        {
            "ban": 50,
            "events": {},
            "events_default": 0,
            "kick": 50,
            "redact": 50,
            "state_default": 50,
            "users": {},
            "users_default": 0,
            "invite": 0,
            "notifications": {"room": 50},
        },
        {
            "1..10": {
                "ban",
                "events",
                "events_default",
                "kick",
                "redact",
                "state_default",
                "users",
                "users_default",
            },
            "11..12": {
                "ban",
                "events",
                "events_default",
                "kick",
                "redact",
                "state_default",
                "users",
                "users_default",
                "invite",
            },
        },
    ),
    (
        "m.room.history_visibility",
        {"history_visibility": "shared", "x": 1},
        {"1..12": {"history_visibility"}},
    ),
    (
        "m.room.aliases",
        {"aliases": ["#a:example.org"], "x": 1},
        {"1..5": {"aliases"}, "6..12": set()},
    ),
    (
        "m.room.redaction",
        {"redacts": "$e", "reason": "spam"},
        {"1..10": set(), "11..12": {"redacts"}},
    ),
    ("m.room.message", {"body": "hi", "msgtype": "m.text"}, {"1..12": set()}),
]


def _expected_for(version: int, table: dict[str, set[str]]) -> set[str]:
    for span, keys in table.items():
        low, high = (int(x) for x in span.split(".."))
        if low <= version <= high:
            return keys
    raise AssertionError(f"no expectation for v{version}")


@pytest.mark.parametrize(("event_type", "content", "table"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("version", range(1, 13))
def test_content_kept_per_version(
    version: int, event_type: str, content: dict[str, Any], table: dict[str, set[str]]
) -> None:
    redacted = redact(_event(event_type, content), str(version))
    assert set(redacted["content"]) == _expected_for(version, table)
    for key in redacted["content"]:
        if key != "third_party_invite":
            assert redacted["content"][key] == content[key]


def test_v11_third_party_invite_keeps_only_signed() -> None:
    content = {"membership": "invite", "third_party_invite": {"signed": {"a": 1}, "x": 2}}
    redacted = redact(_event("m.room.member", content), "11")
    assert redacted["content"]["third_party_invite"] == {"signed": {"a": 1}}
    no_signed = {"membership": "invite", "third_party_invite": {"display_name": "d"}}
    assert redact(_event("m.room.member", no_signed), "11")["content"] == {
        "membership": "invite",
        "third_party_invite": {},
    }
    not_object = {"membership": "invite", "third_party_invite": "x"}
    assert redact(_event("m.room.member", not_object), "12")["content"] == {"membership": "invite"}


def test_msc3083_redaction_is_v6_plus_allow() -> None:
    join_rules = _event("m.room.join_rules", {"join_rule": "restricted", "allow": [], "x": 1})
    assert redact(join_rules, "org.matrix.msc3083.v2")["content"] == {
        "join_rule": "restricted",
        "allow": [],
    }
    aliases = _event("m.room.aliases", {"aliases": ["#a:b"]})
    assert redact(aliases, "org.matrix.msc3083.v2")["content"] == {}
    member = _event(
        "m.room.member", {"membership": "join", "join_authorised_via_users_server": "x"}
    )
    assert redact(member, "org.matrix.msc3083.v2")["content"] == {"membership": "join"}


def test_redact_returns_independent_copy() -> None:
    event = _event("m.room.power_levels", {"users": {"@u:example.org": 100}})
    redacted = redact(event, "10")
    redacted["content"]["users"]["@v:example.org"] = 50
    redacted["signatures"]["example.org"]["ed25519:2"] = "z"
    assert event["content"]["users"] == {"@u:example.org": 100}
    assert event["signatures"] == {"example.org": {"ed25519:1": "y"}}


def test_redact_without_object_content() -> None:
    event = _event("m.room.member", {})
    event["content"] = "nonsense"
    assert redact(event, "9")["content"] == {}


def test_redact_unknown_version() -> None:
    with pytest.raises(UnknownRoomVersion):
        redact(_event("m.room.message", {}), "99")


# --- hashes and IDs ---------------------------------------------------------------------


def _sha256_canonical(obj: Any) -> bytes:
    # Independent of our encoder: the appendix's reference snippet.
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(data.encode("utf-8")).digest()


def test_content_hash_covers_everything_but_unsigned_signatures_hashes() -> None:
    event = _event("m.room.message", {"body": "hi"}, unsigned={"age": 5})
    expected = _sha256_canonical(
        {k: v for k, v in event.items() if k not in ("unsigned", "signatures", "hashes")}
    )
    assert compute_content_hash(event) == expected
    changed = dict(event, unsigned={"age": 6}, signatures={}, hashes={"sha256": "q"})
    assert compute_content_hash(changed) == expected


def test_check_content_hash() -> None:
    event = add_content_hash(_event("m.room.message", {"body": "hi"}))
    assert check_content_hash(event)
    padded = dict(event, hashes={"sha256": event["hashes"]["sha256"] + "="})
    assert check_content_hash(padded)
    assert not check_content_hash(dict(event, content={"body": "bye"}))
    assert not check_content_hash(dict(event, hashes={}))
    assert not check_content_hash(dict(event, hashes={"sha256": "!!"}))
    assert not check_content_hash({k: v for k, v in event.items() if k != "hashes"})


def test_reference_hash_is_hash_of_redacted_event() -> None:
    event = _event("m.room.message", {"body": "hi"}, unsigned={"x": 1})
    redacted = {k: v for k, v in redact(event, "5").items() if k != "signatures"}
    assert compute_reference_hash(event, "5") == _sha256_canonical(redacted)


def _b64(data: bytes, url_safe: bool) -> str:
    encoder = base64.urlsafe_b64encode if url_safe else base64.b64encode
    return encoder(data).decode().rstrip("=")


def test_event_id_formats() -> None:
    # Find an event whose hash has both '+' and '/' in standard base64, so the v3 and v4
    # alphabets visibly differ.
    for depth in range(1, 500):
        event = _event("m.room.message", {"body": "x"}, depth=depth)
        digest = compute_reference_hash(event, "3")
        if "+" in _b64(digest, False) and "/" in _b64(digest, False):
            break
    else:
        raise AssertionError("no suitable event found")
    v3 = compute_event_id(event, "3")
    v4 = compute_event_id(event, "4")
    assert v3 == "$" + _b64(digest, url_safe=False)
    assert v4 == "$" + _b64(digest, url_safe=True)
    assert len(v3) == len(v4) == 44
    assert "=" not in v3
    for version in [str(n) for n in range(5, 13)] + ["org.matrix.msc3083.v2"]:
        assert compute_event_id(event, version) == v4
    # Same ID whether or not signatures/unsigned/non-essential content change.
    assert compute_event_id(dict(event, unsigned={"a": 1}, signatures={}), "4") == v4
    assert compute_event_id(dict(event, content={"body": "other"}), "4") == v4


def test_v1_v2_event_ids_are_carried() -> None:
    event = _event("m.room.message", {}, event_id="$abc:example.org")
    assert compute_event_id(event, "1") == "$abc:example.org"
    assert compute_event_id(event, get_room_version("2")) == "$abc:example.org"
    del event["event_id"]
    with pytest.raises(InvalidEvent, match="event_id") as info:
        compute_event_id(event, "1")
    assert info.value.field == "event_id"


def _v12_create(**content: Any) -> dict[str, Any]:
    event = _event("m.room.create", {"room_version": "12", **content})
    del event["room_id"]
    event["prev_events"] = []
    event["auth_events"] = []
    return event


def test_v12_room_id_is_create_event_hash() -> None:
    create = add_content_hash(_v12_create(additional_creators=["@v:example.org"]))
    room_id = compute_room_id(create)
    assert room_id == "!" + compute_event_id(create, "12")[1:]
    assert room_id == "!" + _b64(compute_reference_hash(create, "12"), url_safe=True)
    theirs = make_event_from_dict(copy.deepcopy(create), KNOWN_ROOM_VERSIONS["12"])
    assert theirs.room_id == room_id
    # The creator list is content, which v11+ redaction keeps: it is part of the ID.
    other = add_content_hash(_v12_create(additional_creators=["@w:example.org"]))
    assert compute_room_id(other) != room_id


def test_compute_room_id_errors() -> None:
    with pytest.raises(InvalidEvent, match="room_version"):
        compute_room_id(_v12_create(room_version="11"))
    with pytest.raises(InvalidEvent, match="room_version"):
        compute_room_id({**_v12_create(), "content": {}})  # defaults to version 1
    with pytest.raises(InvalidEvent, match="room_id"):
        compute_room_id({**_v12_create(), "room_id": "!x:example.org"})
    with pytest.raises(InvalidEvent, match=r"m\.room\.create"):
        compute_room_id({**_v12_create(), "type": "m.room.message"})
    with pytest.raises(UnknownRoomVersion):
        compute_room_id(_v12_create(room_version="77"))
    assert compute_room_id(_v12_create(room_version="11"), "12").startswith("!")
