"""Room versions as data.

Each room version is a frozen `RoomVersion` made of small rule groups (event format,
redaction, authorisation, signatures). A version is written as the version it builds on,
``dataclasses.replace``-d with exactly what the specification changed in it, so the table
reads like the "Room Versions" part of the spec. Section references below name the spec's
``content/rooms/vN.md`` pages and the fragments they include.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum


class UnknownRoomVersion(ValueError):
    """A room version identifier that this implementation does not know."""

    def __init__(self, identifier: object) -> None:
        super().__init__(f"unknown room version {identifier!r}; known: {', '.join(ROOM_VERSIONS)}")
        self.identifier = identifier


class Disposition(Enum):
    STABLE = "stable"
    UNSTABLE = "unstable"


class EventIdFormat(Enum):
    """How an event gets its ID."""

    # v1, v2 "Event IDs": `$opaque_id:domain`, carried in the event's `event_id` field.
    DOMAIN = "domain"
    # v3 "Event IDs": `$` + unpadded standard base64 of the reference hash.
    BASE64 = "base64"
    # v4 "Event IDs": `$` + unpadded URL-safe base64 of the reference hash.
    URL_SAFE_BASE64 = "url_safe_base64"


class StateResolution(Enum):
    V1 = "v1"  # v1 "State resolution"
    V2 = "v2"  # v2 "State resolution"
    V2_1 = "v2.1"  # v12 "State resolution" (empty starting map, conflicted state subgraph)


@dataclass(frozen=True, slots=True)
class EventFormatRules:
    # v1/v2 carry `event_id`; v3 and v4 change how IDs are derived ("Event IDs").
    event_id_format: EventIdFormat
    # v3 "Event format": `prev_events`/`auth_events` are plain lists of event IDs rather
    # than `[event_id, hashes]` pairs.
    reference_lists_are_ids: bool
    # v11 "Event format": `m.room.create` no longer has `content.creator`.
    create_has_creator: bool
    # v11 "Event format": `redacts` moved from the top level into `content`.
    redacts_in_content: bool
    # v12 "Event format": the room ID is the create event's reference hash with sigil `!`,
    # and the create event itself carries no `room_id`.
    room_id_from_create_event: bool


@dataclass(frozen=True, slots=True)
class RedactionRules:
    # v11 "Redactions": `origin`, `membership` and `prev_state` stop being protected
    # top-level keys (kept in v1..v10).
    keep_origin_membership_prev_state: bool
    # v6 "Redactions": `m.room.aliases` no longer keeps `aliases` (kept in v1..v5).
    keep_aliases_content: bool
    # v8 "Redactions": `m.room.join_rules` keeps `allow` (also the unstable MSC3083 room).
    keep_join_rules_allow: bool
    # v9 "Redactions": `m.room.member` keeps `join_authorised_via_users_server`.
    keep_join_authorised_via_users_server: bool
    # v11 "Redactions": `m.room.create` keeps its whole `content` (not only `creator`).
    keep_all_create_content: bool
    # v11 "Redactions": `m.room.power_levels` keeps `invite`.
    keep_power_levels_invite: bool
    # v11 "Redactions": `m.room.redaction` keeps `content.redacts`.
    keep_redaction_redacts: bool
    # v11 "Redactions": `m.room.member` keeps `third_party_invite.signed`.
    keep_third_party_invite_signed: bool
    # MSC3760 (state sub-keys, unstable): the top-level key that carries a state event's
    # sub-key and survives redaction, or None. The MSC needs a new room version and none
    # has one yet, so it is None everywhere: in today's rooms the key is an ordinary
    # unprotected top-level key (covered by the content hash, removed by redaction).
    state_subkey_key: str | None


@dataclass(frozen=True, slots=True)
class AuthorizationRules:
    # v1 "Authorisation rules" (the `m.room.aliases` rule), dropped in v6.
    special_case_aliases: bool
    # v6 "Authorisation rules": `notifications` power levels are checked like `events`.
    limit_notifications_power_levels: bool
    # v7 "Authorisation rules": the `knock` join rule and membership.
    knock: bool
    # v8 "Authorisation rules": the `restricted` join rule (and MSC3083's unstable room).
    restricted_join: bool
    # v10 "Authorisation rules": the `knock_restricted` join rule.
    knock_restricted: bool
    # v10 "Values in m.room.power_levels events must be integers".
    integer_only_power_levels: bool
    # v11 "Authorisation rules": the creator is the create event's `sender`, not
    # `content.creator`.
    creator_is_sender: bool
    # v12 "Authorisation rules": creators are the create `sender` plus
    # `content.additional_creators`, with infinite power level.
    additional_creators: bool
    # v12 "Authorisation rules": `m.room.create` MUST NOT be listed in `auth_events`.
    create_event_in_auth_events: bool


@dataclass(frozen=True, slots=True)
class SignatureRules:
    # v5 "Signing key validity period": a key's `valid_until_ts` must be at least the
    # event's `origin_server_ts`.
    enforce_key_validity: bool
    # server-server "Validating hashes and signatures": v1/v2 also require a signature
    # from the server named in `event_id`.
    check_event_id_server: bool
    # v8 "Authorisation rules" 4.2: a join with `join_authorised_via_users_server` must
    # be signed by that user's server.
    check_join_authorised_via_users_server: bool


@dataclass(frozen=True, slots=True)
class RoomVersion:
    identifier: str
    disposition: Disposition
    event_format: EventFormatRules
    redaction: RedactionRules
    authorization: AuthorizationRules
    signatures: SignatureRules
    # v6 "Canonical JSON": servers MUST strictly enforce canonical JSON (integers only,
    # within +-(2**53 - 1)); v1..v5 MUST NOT.
    strict_canonical_json: bool
    state_resolution: StateResolution

    # Flat names for the flags callers ask about most.
    @property
    def event_id_format(self) -> EventIdFormat:
        return self.event_format.event_id_format

    @property
    def enforce_key_validity(self) -> bool:
        return self.signatures.enforce_key_validity

    @property
    def restricted_join(self) -> bool:
        return self.authorization.restricted_join

    @property
    def knock(self) -> bool:
        return self.authorization.knock

    @property
    def knock_restricted(self) -> bool:
        return self.authorization.knock_restricted

    @property
    def integer_only_power_levels(self) -> bool:
        return self.authorization.integer_only_power_levels

    @property
    def room_id_from_create_event(self) -> bool:
        return self.event_format.room_id_from_create_event

    def __str__(self) -> str:
        return self.identifier


_replace = dataclasses.replace

V1 = RoomVersion(
    identifier="1",
    disposition=Disposition.STABLE,
    event_format=EventFormatRules(
        event_id_format=EventIdFormat.DOMAIN,
        reference_lists_are_ids=False,
        create_has_creator=True,
        redacts_in_content=False,
        room_id_from_create_event=False,
    ),
    redaction=RedactionRules(
        keep_origin_membership_prev_state=True,
        keep_aliases_content=True,
        keep_join_rules_allow=False,
        keep_join_authorised_via_users_server=False,
        keep_all_create_content=False,
        keep_power_levels_invite=False,
        keep_redaction_redacts=False,
        keep_third_party_invite_signed=False,
        state_subkey_key=None,
    ),
    authorization=AuthorizationRules(
        special_case_aliases=True,
        limit_notifications_power_levels=False,
        knock=False,
        restricted_join=False,
        knock_restricted=False,
        integer_only_power_levels=False,
        creator_is_sender=False,
        additional_creators=False,
        create_event_in_auth_events=True,
    ),
    signatures=SignatureRules(
        enforce_key_validity=False,
        check_event_id_server=True,
        check_join_authorised_via_users_server=False,
    ),
    strict_canonical_json=False,
    state_resolution=StateResolution.V1,
)

# v2: only the state resolution algorithm changed.
V2 = _replace(V1, identifier="2", state_resolution=StateResolution.V2)

# v3: event IDs are reference hashes (standard base64); events no longer carry them.
V3 = _replace(
    V2,
    identifier="3",
    event_format=_replace(
        V2.event_format, event_id_format=EventIdFormat.BASE64, reference_lists_are_ids=True
    ),
    signatures=_replace(V2.signatures, check_event_id_server=False),
)

# v4: URL-safe base64 event IDs.
V4 = _replace(
    V3,
    identifier="4",
    event_format=_replace(V3.event_format, event_id_format=EventIdFormat.URL_SAFE_BASE64),
)

# v5: signing key validity periods are enforced.
V5 = _replace(V4, identifier="5", signatures=_replace(V4.signatures, enforce_key_validity=True))

# v6: strict canonical JSON, no aliases special case, `notifications` power levels
# limited, `m.room.aliases` loses its redaction exemption.
V6 = _replace(
    V5,
    identifier="6",
    strict_canonical_json=True,
    redaction=_replace(V5.redaction, keep_aliases_content=False),
    authorization=_replace(
        V5.authorization, special_case_aliases=False, limit_notifications_power_levels=True
    ),
)

# v7: knocking.
V7 = _replace(V6, identifier="7", authorization=_replace(V6.authorization, knock=True))

# v8: restricted join rule; join_rules keeps `allow` on redaction; the authorising
# server signs restricted joins.
V8 = _replace(
    V7,
    identifier="8",
    authorization=_replace(V7.authorization, restricted_join=True),
    redaction=_replace(V7.redaction, keep_join_rules_allow=True),
    signatures=_replace(V7.signatures, check_join_authorised_via_users_server=True),
)

# v9: member events keep `join_authorised_via_users_server` on redaction.
V9 = _replace(
    V8,
    identifier="9",
    redaction=_replace(V8.redaction, keep_join_authorised_via_users_server=True),
)

# v10: `knock_restricted` join rule; power levels must be integers.
V10 = _replace(
    V9,
    identifier="10",
    authorization=_replace(V9.authorization, knock_restricted=True, integer_only_power_levels=True),
)

# v11: redaction clarified; `creator` removed from create content; `redacts` in content.
V11 = _replace(
    V10,
    identifier="11",
    event_format=_replace(V10.event_format, create_has_creator=False, redacts_in_content=True),
    redaction=_replace(
        V10.redaction,
        keep_origin_membership_prev_state=False,
        keep_all_create_content=True,
        keep_power_levels_invite=True,
        keep_redaction_redacts=True,
        keep_third_party_invite_signed=True,
    ),
    authorization=_replace(V10.authorization, creator_is_sender=True),
)

# v12: room IDs are create-event hashes; creators with infinite power; state res v2.1.
V12 = _replace(
    V11,
    identifier="12",
    event_format=_replace(V11.event_format, room_id_from_create_event=True),
    authorization=_replace(
        V11.authorization, additional_creators=True, create_event_in_auth_events=False
    ),
    state_resolution=StateResolution.V2_1,
)

# MSC3083 (restricted rooms), the unstable room version later stabilised as v8. It was
# built on v6 (no knocking): restricted join rule, `allow` kept on redaction, and the
# authorising server's signature required.
MSC3083_V2 = _replace(
    V6,
    identifier="org.matrix.msc3083.v2",
    disposition=Disposition.UNSTABLE,
    authorization=_replace(V6.authorization, restricted_join=True),
    redaction=_replace(V6.redaction, keep_join_rules_allow=True),
    signatures=_replace(V6.signatures, check_join_authorised_via_users_server=True),
)

ROOM_VERSIONS: dict[str, RoomVersion] = {
    v.identifier: v for v in (V1, V2, V3, V4, V5, V6, V7, V8, V9, V10, V11, V12, MSC3083_V2)
}


def get_room_version(version: str | RoomVersion) -> RoomVersion:
    """The rules for ``version`` (an identifier or an already-resolved `RoomVersion`)."""
    if isinstance(version, RoomVersion):
        return version
    try:
        return ROOM_VERSIONS[version]
    except (KeyError, TypeError):
        raise UnknownRoomVersion(version) from None
