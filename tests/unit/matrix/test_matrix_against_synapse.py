"""Redaction, hashes and event IDs compared with Synapse's own implementation.

Synapse is an independent implementation (its redaction is written in Rust). Known,
deliberate differences, where we follow the spec:

- Synapse keeps ``unsigned.age_ts`` / ``unsigned.replaces_state`` in redacted events; the
  spec's redaction list drops ``unsigned``. Hashes and signatures never cover ``unsigned``,
  so the comparison ignores it.
- In room versions with hashed room IDs (v12), Synapse's redaction drops ``room_id`` from
  ``m.room.create``; the spec's list keeps it. Such a create event is invalid anyway (v12
  auth rule 1.2), so the generated v12 create events have no ``room_id``.
- Synapse's content hash also drops its internal top-level keys ``age_ts``, ``outlier`` and
  ``destinations``; the spec does not. The generated events never use those keys.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from matrix_strategies import events
from synapse.api.errors import SynapseError
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.crypto.event_signing import compute_content_hash as synapse_content_hash
from synapse.crypto.event_signing import compute_event_reference_hash
from synapse.events import make_event_from_dict
from synapse.synapse_rust.events import redact_event_dict

from gateway.matrix.events import (
    add_content_hash,
    compute_content_hash,
    compute_event_id,
    compute_reference_hash,
    redact,
)
from gateway.matrix.room_versions import ROOM_VERSIONS

# Every version both sides know. Synapse's other unstable versions (msc3757, hydra) are
# not ours; MSC3083 is ours and no longer Synapse's.
SHARED_VERSIONS = sorted(set(ROOM_VERSIONS) & set(KNOWN_ROOM_VERSIONS), key=int)

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_every_stable_version_is_compared() -> None:
    assert SHARED_VERSIONS == [str(n) for n in range(1, 13)]


def _without_unsigned(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "unsigned"}


def _valid_for(event: dict[str, Any], version: str) -> dict[str, Any]:
    if KNOWN_ROOM_VERSIONS[version].msc4291_room_ids_as_hashes and (
        event["type"] == "m.room.create"
    ):
        event.pop("room_id", None)
    return event


@pytest.mark.parametrize("version", SHARED_VERSIONS)
@SETTINGS
@given(event=events())
def test_redaction_matches_synapse(version: str, event: dict[str, Any]) -> None:
    event = _valid_for(event, version)
    ours = redact(event, version)
    theirs = redact_event_dict(KNOWN_ROOM_VERSIONS[version], copy.deepcopy(event))
    assert ours == _without_unsigned(dict(theirs))


@SETTINGS
@given(event=events())
def test_content_hash_matches_synapse(event: dict[str, Any]) -> None:
    name, digest = synapse_content_hash(copy.deepcopy(event), hashlib.sha256)
    assert name == "sha256"
    assert compute_content_hash(event) == digest


def _synapse_event(event: dict[str, Any], version: str) -> Any:
    try:
        return make_event_from_dict(copy.deepcopy(event), KNOWN_ROOM_VERSIONS[version])
    except SynapseError:
        reject()  # Synapse will not build this event at all: nothing to compare.


@pytest.mark.parametrize("version", SHARED_VERSIONS)
@SETTINGS
@given(data=st.data())
def test_reference_hash_and_event_id_match_synapse(version: str, data: st.DataObject) -> None:
    has_event_id = version in ("1", "2")
    event = data.draw(events(with_event_id=has_event_id))
    event = _valid_for(event, version)
    if event["type"] == "m.room.member":
        # Synapse refuses to build member events without a string membership.
        event["content"]["membership"] = data.draw(st.sampled_from(["join", "invite", "leave"]))
    event = add_content_hash(event)
    event["signatures"] = {"a.example": {"ed25519:k": "c2lnbmF0dXJl"}}
    theirs = _synapse_event(event, version)
    _, their_hash = compute_event_reference_hash(theirs)
    assert compute_reference_hash(event, version) == their_hash
    assert compute_event_id(event, version) == theirs.event_id
