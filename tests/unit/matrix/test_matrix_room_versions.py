from __future__ import annotations

import dataclasses
import itertools

import pytest

from gateway.matrix.room_versions import (
    ROOM_VERSIONS,
    EventIdFormat,
    RoomVersion,
    StateResolution,
    UnknownRoomVersion,
    get_room_version,
)


def test_known_identifiers() -> None:
    assert list(ROOM_VERSIONS) == [str(n) for n in range(1, 13)] + ["org.matrix.msc3083.v2"]
    for identifier, version in ROOM_VERSIONS.items():
        assert version.identifier == identifier
        assert str(version) == identifier


def test_get_room_version_accepts_ids_and_objects() -> None:
    v9 = get_room_version("9")
    assert isinstance(v9, RoomVersion)
    assert get_room_version(v9) is v9


@pytest.mark.parametrize("bad", ["13", "", "v1", " 1", "org.matrix.msc3083"])
def test_unknown_room_version(bad: str) -> None:
    with pytest.raises(UnknownRoomVersion, match=repr(bad)) as info:
        get_room_version(bad)
    assert isinstance(info.value, ValueError)
    assert info.value.identifier == bad


def test_versions_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_room_version("1").identifier = "x"  # type: ignore[misc]


def _versions_where(flag: str) -> set[str]:
    return {v for v, rules in ROOM_VERSIONS.items() if getattr(rules, flag)}


def _numbered(first: int, last: int = 12) -> set[str]:
    return {str(n) for n in range(first, last + 1)}


MSC3083 = "org.matrix.msc3083.v2"


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("strict_canonical_json", _numbered(6) | {MSC3083}),
        ("enforce_key_validity", _numbered(5) | {MSC3083}),
        ("restricted_join", _numbered(8) | {MSC3083}),
        ("knock", _numbered(7)),
        ("knock_restricted", _numbered(10)),
        ("integer_only_power_levels", _numbered(10)),
        ("room_id_from_create_event", {"12"}),
    ],
)
def test_flag_tables(flag: str, expected: set[str]) -> None:
    assert _versions_where(flag) == expected


def test_event_id_formats() -> None:
    formats = {v: r.event_id_format for v, r in ROOM_VERSIONS.items()}
    assert {v for v, f in formats.items() if f is EventIdFormat.DOMAIN} == {"1", "2"}
    assert {v for v, f in formats.items() if f is EventIdFormat.BASE64} == {"3"}
    assert {v for v, f in formats.items() if f is EventIdFormat.URL_SAFE_BASE64} == (
        _numbered(4) | {MSC3083}
    )


def test_redaction_rule_tables() -> None:
    def where(flag: str) -> set[str]:
        return {v for v, r in ROOM_VERSIONS.items() if getattr(r.redaction, flag)}

    assert where("keep_origin_membership_prev_state") == _numbered(1, 10) | {MSC3083}
    assert where("keep_aliases_content") == _numbered(1, 5)
    assert where("keep_join_rules_allow") == _numbered(8) | {MSC3083}
    assert where("keep_join_authorised_via_users_server") == _numbered(9)
    for flag in (
        "keep_all_create_content",
        "keep_power_levels_invite",
        "keep_redaction_redacts",
        "keep_third_party_invite_signed",
    ):
        assert where(flag) == {"11", "12"}


def test_event_format_and_authorisation_changes() -> None:
    v10, v11, v12 = (get_room_version(v) for v in ("10", "11", "12"))
    assert v10.event_format.create_has_creator and not v11.event_format.create_has_creator
    assert not v10.event_format.redacts_in_content and v11.event_format.redacts_in_content
    assert v12.authorization.additional_creators and not v11.authorization.additional_creators
    assert v11.authorization.create_event_in_auth_events
    assert not v12.authorization.create_event_in_auth_events
    assert get_room_version("1").signatures.check_event_id_server
    assert not get_room_version("3").signatures.check_event_id_server
    assert get_room_version("1").state_resolution is StateResolution.V1
    assert get_room_version("2").state_resolution is StateResolution.V2
    assert v12.state_resolution is StateResolution.V2_1


def test_each_version_differs_from_its_predecessor() -> None:
    order = [str(n) for n in range(1, 13)]
    for before, after in itertools.pairwise(order):
        a = dataclasses.replace(ROOM_VERSIONS[before], identifier="x")
        b = dataclasses.replace(ROOM_VERSIONS[after], identifier="x")
        assert a != b, f"v{after} is identical to v{before}"
