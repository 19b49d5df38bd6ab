"""Event redaction, content hashes, reference hashes, event IDs and v12 room IDs.

Spec: client-server "Redactions" and the per-version "Redactions" sections of the room
versions; server-server "Calculating the reference hash for an event" and "Calculating the
content hash for an event"; room versions "Event IDs"; room v12 "Event format".
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from gateway.matrix.canonical_json import encode_canonical_json
from gateway.matrix.room_versions import EventIdFormat, RoomVersion, get_room_version
from gateway.matrix.unpadded_base64 import decode_base64, encode_base64

JsonDict = dict[str, Any]

#: MSC3760 state sub-keys: the field as the MSC names it while unstable, and once stable. No
#: room version gives it a meaning yet (see ``RedactionRules.state_subkey_key``).
STATE_SUBKEY_UNSTABLE = "org.matrix.mscxxxx.state_subkey"
STATE_SUBKEY = "state_subkey"


class InvalidEvent(ValueError):
    """An event that lacks what an operation needs; ``field`` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# Top-level keys every room version keeps ("Redactions", v11 list).
_KEPT_TOP_LEVEL = frozenset(
    {
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
)
# Kept in v1..v10 only.
_KEPT_TOP_LEVEL_BEFORE_V11 = _KEPT_TOP_LEVEL | {"origin", "membership", "prev_state"}

_POWER_LEVELS_KEPT = (
    "ban",
    "events",
    "events_default",
    "kick",
    "redact",
    "state_default",
    "users",
    "users_default",
)


def _kept_content_keys(event_type: object, version: RoomVersion) -> tuple[str, ...] | None:
    """Content keys that survive redaction, or None for "all of them"."""
    rules = version.redaction
    if event_type == "m.room.member":
        if rules.keep_join_authorised_via_users_server:
            return ("membership", "join_authorised_via_users_server")
        return ("membership",)
    if event_type == "m.room.create":
        return None if rules.keep_all_create_content else ("creator",)
    if event_type == "m.room.join_rules":
        return ("join_rule", "allow") if rules.keep_join_rules_allow else ("join_rule",)
    if event_type == "m.room.power_levels":
        if rules.keep_power_levels_invite:
            return (*_POWER_LEVELS_KEPT, "invite")
        return _POWER_LEVELS_KEPT
    if event_type == "m.room.history_visibility":
        return ("history_visibility",)
    if event_type == "m.room.aliases" and rules.keep_aliases_content:
        return ("aliases",)
    if event_type == "m.room.redaction" and rules.keep_redaction_redacts:
        return ("redacts",)
    return ()


def _redact_shallow(event: Mapping[str, Any], version: RoomVersion) -> JsonDict:
    """Redaction sharing nested values with ``event`` (for hashing and verifying only)."""
    kept = (
        _KEPT_TOP_LEVEL_BEFORE_V11
        if version.redaction.keep_origin_membership_prev_state
        else _KEPT_TOP_LEVEL
    )
    result = {key: value for key, value in event.items() if key in kept}
    subkey = version.redaction.state_subkey_key
    if subkey is not None and subkey in event and "state_key" in event:
        result[subkey] = event[subkey]
    content = event.get("content")
    if not isinstance(content, dict):
        # Not a valid event; there is nothing in `content` to keep.
        if "content" in result:
            result["content"] = {}
        return result
    event_type = event.get("type")
    keys = _kept_content_keys(event_type, version)
    if keys is None:
        new_content = dict(content)
    else:
        new_content = {key: content[key] for key in keys if key in content}
    if event_type == "m.room.member" and version.redaction.keep_third_party_invite_signed:
        # "The third_party_invite key ... is no longer redacted, but will only contain the
        # signed key": an object is kept, reduced to `signed` (possibly to `{}`).
        invite = content.get("third_party_invite")
        if isinstance(invite, dict):
            new_content["third_party_invite"] = (
                {"signed": invite["signed"]} if "signed" in invite else {}
            )
    result["content"] = new_content
    return result


def json_copy(value: Any) -> Any:
    """A deep copy of a JSON value (much faster than `copy.deepcopy` for JSON)."""
    if isinstance(value, dict):
        return {key: json_copy(sub) for key, sub in value.items()}
    if isinstance(value, list):
        return [json_copy(sub) for sub in value]
    return value


def redact(event: JsonDict, room_version: str | RoomVersion) -> JsonDict:
    """The event after the redaction algorithm of ``room_version``, as a new, independent dict.

    Keys not protected by the room version are removed, including ``unsigned`` (the spec's
    list does not keep it; Synapse keeps ``unsigned.age_ts`` and ``replaces_state`` in its
    own redacted copies, which are not what hashes and signatures cover).
    """
    redacted: JsonDict = json_copy(_redact_shallow(event, get_room_version(room_version)))
    return redacted


def _content_hash_input(event: JsonDict) -> JsonDict:
    # Spec: remove `unsigned`, `signatures` and `hashes`. Synapse also drops its
    # internal `age_ts`, `outlier` and `destinations` keys; the spec does not.
    return {k: v for k, v in event.items() if k not in ("unsigned", "signatures", "hashes")}


def compute_content_hash(event: JsonDict) -> bytes:
    """SHA-256 over the canonical JSON of the full event minus unsigned/signatures/hashes."""
    return hashlib.sha256(encode_canonical_json(_content_hash_input(event))).digest()


def add_content_hash(event: JsonDict) -> JsonDict:
    """A copy of ``event`` with ``hashes`` set to ``{"sha256": <content hash>}``."""
    result = dict(event)
    result["hashes"] = {"sha256": encode_base64(compute_content_hash(event))}
    return result


def check_content_hash(event: JsonDict) -> bool:
    """Whether ``hashes.sha256`` matches the event's content hash.

    A missing or undecodable hash counts as a mismatch. The spec's answer to a mismatch
    is to use the redacted event, not to drop it.
    """
    hashes = event.get("hashes")
    if not isinstance(hashes, dict):
        return False
    claimed = hashes.get("sha256")
    if not isinstance(claimed, str):
        return False
    try:
        claimed_bytes = decode_base64(claimed)
    except ValueError:
        return False
    return claimed_bytes == compute_content_hash(event)


def _reference_hash(event: JsonDict, version: RoomVersion) -> bytes:
    redacted = _redact_shallow(event, version)
    redacted.pop("signatures", None)
    redacted.pop("unsigned", None)
    return hashlib.sha256(encode_canonical_json(redacted)).digest()


def compute_reference_hash(event: JsonDict, room_version: str | RoomVersion) -> bytes:
    """SHA-256 of the redacted event without ``signatures`` and ``unsigned``."""
    return _reference_hash(event, get_room_version(room_version))


def compute_event_id(event: JsonDict, room_version: str | RoomVersion) -> str:
    """The event's ID under ``room_version``'s event ID format.

    v1/v2: the event's own ``event_id`` (`InvalidEvent` if missing); v3: ``$`` + unpadded
    standard base64 of the reference hash; v4+: ``$`` + unpadded URL-safe base64.
    """
    version = get_room_version(room_version)
    fmt = version.event_id_format
    if fmt is EventIdFormat.DOMAIN:
        event_id = event.get("event_id")
        if not isinstance(event_id, str):
            raise InvalidEvent(
                "event_id", f"room version {version.identifier} events must carry an event_id"
            )
        return event_id
    url_safe = fmt is EventIdFormat.URL_SAFE_BASE64
    return "$" + encode_base64(_reference_hash(event, version), url_safe=url_safe)


def compute_room_id(create_event: JsonDict, room_version: str | RoomVersion | None = None) -> str:
    """The room ID that a v12-style ``m.room.create`` event defines.

    ``!`` + unpadded URL-safe base64 of the create event's reference hash. The room version
    defaults to the create event's ``content.room_version``; it must be one whose room IDs
    come from the create event (`InvalidEvent` otherwise, or if ``room_id`` is present:
    such create events are rejected by the v12 authorisation rules).
    """
    if create_event.get("type") != "m.room.create":
        raise InvalidEvent("type", "room IDs are derived from m.room.create events only")
    if room_version is None:
        content = create_event.get("content")
        declared = content.get("room_version", "1") if isinstance(content, dict) else "1"
        room_version = declared if isinstance(declared, str) else "1"
    version = get_room_version(room_version)
    if not version.room_id_from_create_event:
        raise InvalidEvent(
            "content.room_version",
            f"room version {version.identifier} does not derive room IDs from the create event",
        )
    if "room_id" in create_event:
        raise InvalidEvent(
            "room_id", f"a room version {version.identifier} create event must not have one"
        )
    return "!" + encode_base64(_reference_hash(create_event, version), url_safe=True)
