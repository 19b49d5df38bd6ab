"""Properties of redaction and event signing over generated events, for every room version."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from matrix_strategies import events
from signedjson.key import generate_signing_key

from gateway.matrix.events import redact
from gateway.matrix.room_versions import ROOM_VERSIONS, EventIdFormat
from gateway.matrix.signing import (
    ServerKey,
    SignatureError,
    required_signers,
    sign_event,
    verify_event,
)

VERSIONS = list(ROOM_VERSIONS)
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SERVER_KEYS = {
    name: generate_signing_key("k") for name in ("a.example", "b.example", "c.example:8448")
}
KEYS = {(name, "ed25519:k"): ServerKey(key.verify_key) for name, key in SERVER_KEYS.items()}


def _prepare(event: dict[str, Any], version: str) -> dict[str, Any]:
    if ROOM_VERSIONS[version].event_id_format is not EventIdFormat.DOMAIN:
        event.pop("event_id", None)
    if ROOM_VERSIONS[version].room_id_from_create_event and event["type"] == "m.room.create":
        event.pop("room_id", None)
    return event


def _signed(event: dict[str, Any], version: str) -> dict[str, Any]:
    try:
        signers = required_signers(event, version)
    except SignatureError:
        assume(False)
        raise
    assume(signers)  # invites from third-party invites need no signature at all
    for server in signers:
        assume(server in SERVER_KEYS)
        event = sign_event(event, version, server, SERVER_KEYS[server])
    return event


@pytest.mark.parametrize("version", VERSIONS)
@SETTINGS
@given(event=events())
def test_redaction_is_idempotent(version: str, event: dict[str, Any]) -> None:
    once = redact(event, version)
    assert redact(once, version) == once
    assert set(once) <= set(event)


@pytest.mark.parametrize("version", VERSIONS)
@SETTINGS
@given(event=events())
def test_signed_event_verifies(version: str, event: dict[str, Any]) -> None:
    signed = _signed(_prepare(event, version), version)
    result = verify_event(signed, version, KEYS)
    assert result.content_hash_ok
    assert result.event == signed
    # unsigned is outside both the hash and the signature.
    changed = dict(signed, unsigned={"age": 12345})
    assert verify_event(changed, version, KEYS).content_hash_ok
    # The redacted copy still verifies, with a (correctly) failing content hash unless
    # redaction removed nothing.
    redacted = redact(signed, version)
    assert verify_event(redacted, version, KEYS).content_hash_ok == (
        redacted == {k: v for k, v in signed.items() if k != "unsigned"}
    )


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found: list[tuple[Any, ...]] = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, sub in value.items():
            found.extend(_paths(sub, (*prefix, key)))
    elif isinstance(value, list):
        for index, sub in enumerate(value):
            found.extend(_paths(sub, (*prefix, index)))
    return found


def _set(event: dict[str, Any], path: tuple[Any, ...], new: Any) -> dict[str, Any]:
    event = copy.deepcopy(event)
    target: Any = event
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return event


@pytest.mark.parametrize("version", VERSIONS)
@SETTINGS
@given(event=events(), data=st.data())
def test_changing_a_protected_field_breaks_signature(
    version: str, event: dict[str, Any], data: st.DataObject
) -> None:
    signed = _signed(_prepare(event, version), version)
    protected = redact(signed, version)
    paths = [p for p in _paths(protected) if p[0] != "signatures"]
    path = data.draw(st.sampled_from(paths))
    original: Any = protected
    for step in path:
        original = original[step]
    replacement = data.draw(
        st.sampled_from(["mutated", 7, None, {"x": 1}, []]).filter(lambda v: v != original)
    )
    tampered = _set(signed, path, replacement)
    if redact(tampered, version) == protected:
        # E.g. `content` replaced by a non-object whose redaction is also `{}`: the
        # signature legitimately still holds, the content hash must not.
        assert not verify_event(tampered, version, KEYS).content_hash_ok
        return
    with pytest.raises(SignatureError):
        verify_event(tampered, version, KEYS)


@pytest.mark.parametrize("version", VERSIONS)
@SETTINGS
@given(event=events(), data=st.data())
def test_changing_an_unprotected_field_breaks_content_hash(
    version: str, event: dict[str, Any], data: st.DataObject
) -> None:
    signed = _signed(_prepare(event, version), version)
    protected = redact(signed, version)
    unprotected = [
        (key,) for key in signed if key not in protected and key not in ("unsigned", "hashes")
    ] + [("content", key) for key in signed["content"] if key not in protected["content"]]
    assume(unprotected)
    path = data.draw(st.sampled_from(unprotected))
    tampered = _set(signed, path, "changed-" + str(len(path)))
    assume(tampered != signed)
    result = verify_event(tampered, version, KEYS)
    assert not result.content_hash_ok
    assert result.event == redact(tampered, version)
