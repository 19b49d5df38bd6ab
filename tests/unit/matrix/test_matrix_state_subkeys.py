"""MSC3760 state sub-keys: kept through redaction only where a room version says so (none
today), kept by stripped state, and visible to policies."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matrix_strategies import events

from gateway.matrix.events import (
    STATE_SUBKEY,
    STATE_SUBKEY_UNSTABLE,
    compute_content_hash,
    compute_reference_hash,
    redact,
)
from gateway.matrix.room_versions import ROOM_VERSIONS, V11, RoomVersion
from gateway.matrix.stripped_state import strip_event
from gateway.policy.api import state_subkey
from tests.unit.policy.contexts import invite

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SUBKEY_NAMES = (STATE_SUBKEY_UNSTABLE, STATE_SUBKEY)

#: A room version as the MSC would have one: v11 with the unstable sub-key protected.
WITH_SUBKEYS = dataclasses.replace(
    V11,
    identifier="test.msc3760",
    redaction=dataclasses.replace(V11.redaction, state_subkey_key=STATE_SUBKEY_UNSTABLE),
)


def beacon(**extra: Any) -> dict[str, Any]:
    return {
        "type": "m.beacon_info",
        "state_key": "@stefan:a.example",
        "sender": "@stefan:a.example",
        "room_id": "!room:a.example",
        "content": {"description": "live location"},
        "origin_server_ts": 1,
        "depth": 5,
        "prev_events": [],
        "auth_events": [],
        **extra,
    }


def test_the_unstable_name_is_the_one_the_msc_gives() -> None:
    assert STATE_SUBKEY_UNSTABLE == "org.matrix.mscxxxx.state_subkey"


@pytest.mark.parametrize("version", sorted(ROOM_VERSIONS))
def test_no_room_version_protects_a_state_subkey(version: str) -> None:
    assert ROOM_VERSIONS[version].redaction.state_subkey_key is None
    for name in SUBKEY_NAMES:
        assert name not in redact(beacon(**{name: "asset1"}), version)


def test_a_version_that_says_so_keeps_its_subkey_through_redaction() -> None:
    event = beacon(**{STATE_SUBKEY_UNSTABLE: "asset1", STATE_SUBKEY: "other"})
    redacted = redact(event, WITH_SUBKEYS)
    assert redacted[STATE_SUBKEY_UNSTABLE] == "asset1"
    assert STATE_SUBKEY not in redacted  # only the key the version names
    assert redacted["content"] == {}
    # The sub-key belongs to state events only.
    message = beacon(**{STATE_SUBKEY_UNSTABLE: "asset1"})
    del message["state_key"]
    assert STATE_SUBKEY_UNSTABLE not in redact(message, WITH_SUBKEYS)


def test_the_subkey_counts_in_hashes_as_its_room_version_says() -> None:
    a = beacon(**{STATE_SUBKEY_UNSTABLE: "asset1"})
    b = beacon(**{STATE_SUBKEY_UNSTABLE: "asset2"})
    # The content hash covers every key, in every version.
    assert compute_content_hash(a) != compute_content_hash(b)
    # The reference hash (event ID) covers the redacted event: the sub-key only where kept.
    assert compute_reference_hash(a, "11") == compute_reference_hash(b, "11")
    assert compute_reference_hash(a, WITH_SUBKEYS) != compute_reference_hash(b, WITH_SUBKEYS)


def test_stripped_state_keeps_either_name() -> None:
    event = beacon(**{STATE_SUBKEY_UNSTABLE: "asset1", STATE_SUBKEY: "asset2"})
    stripped = strip_event(event)
    assert stripped == {
        "type": "m.beacon_info",
        "state_key": "@stefan:a.example",
        "sender": "@stefan:a.example",
        "content": {"description": "live location"},
        STATE_SUBKEY_UNSTABLE: "asset1",
        STATE_SUBKEY: "asset2",
    }
    assert strip_event(beacon()).keys() == {"type", "state_key", "sender", "content"}


def test_policies_see_the_subkey_in_stripped_state() -> None:
    stripped = strip_event(beacon(**{STATE_SUBKEY_UNSTABLE: "asset1"}))
    ctx = invite(stripped_state_untrusted=(stripped,))
    assert [state_subkey(e) for e in ctx.stripped_state_untrusted] == ["asset1"]
    assert state_subkey(beacon(**{STATE_SUBKEY: "stable"})) == "stable"
    # Missing (or not a string): "", as the MSC says a missing sub-key means.
    assert state_subkey(beacon()) == ""
    assert state_subkey(beacon(**{STATE_SUBKEY_UNSTABLE: 5})) == ""


subkeys = st.text(max_size=6)
versions = st.sampled_from([*ROOM_VERSIONS.values(), WITH_SUBKEYS])


@SETTINGS
@given(event=events(), subkey=subkeys, name=st.sampled_from(SUBKEY_NAMES), version=versions)
def test_redaction_keeps_a_subkey_exactly_when_the_version_names_it(
    event: dict[str, Any], subkey: str, name: str, version: RoomVersion
) -> None:
    event[name] = subkey
    once = redact(event, version)
    kept = version.redaction.state_subkey_key == name and "state_key" in event
    assert (name in once) is kept
    if kept:
        assert once[name] == subkey
    assert redact(once, version) == once  # still idempotent
    assert strip_event(event).get(name) == subkey
