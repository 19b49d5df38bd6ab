from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix_strategies import json_values

from gateway.matrix.canonical_json import (
    CanonicalJsonError,
    InvalidJson,
    check_canonical,
    encode_canonical_json,
    parse_json,
)

# Appendices, "Canonical JSON" > "Examples": input text -> canonical output.
SPEC_EXAMPLES = [
    ("{}", "{}"),
    ('{\n    "one": 1,\n    "two": "Two"\n}', '{"one":1,"two":"Two"}'),
    ('{\n    "b": "2",\n    "a": "1"\n}', '{"a":"1","b":"2"}'),
    ('{"b":"2","a":"1"}', '{"a":"1","b":"2"}'),
    (
        '{"auth": {"success": true, "mxid": "@john.doe:example.com", "profile": '
        '{"display_name": "John Doe", "three_pids": [{"medium": "email", "address": '
        '"john.doe@example.org"}, {"medium": "msisdn", "address": "123456789"}]}}}',
        '{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe",'
        '"three_pids":[{"address":"john.doe@example.org","medium":"email"},'
        '{"address":"123456789","medium":"msisdn"}]},"success":true}}',
    ),
    ('{"a": "日本語"}', '{"a":"日本語"}'),
    ('{"本": 2, "日": 1}', '{"日":1,"本":2}'),
    ('{"a": "\\u65E5"}', '{"a":"日"}'),
    ('{"a": null}', '{"a":null}'),
    ('{"a": -0, "b": 1e10}', '{"a":0,"b":10000000000}'),
]


@pytest.mark.parametrize(("given_text", "canonical"), SPEC_EXAMPLES)
def test_spec_examples(given_text: str, canonical: str) -> None:
    value = parse_json(given_text, strict=True)
    assert encode_canonical_json(value, strict=True) == canonical.encode("utf-8")


def test_escapes_follow_the_grammar() -> None:
    value = {"s": '\b\t\n\f\r"\\\x00\x1f\x7f/é'}
    assert (
        encode_canonical_json(value)
        == '{"s":"\\b\\t\\n\\f\\r\\"\\\\\\u0000\\u001f\x7f/é"}'.encode()
    )


@pytest.mark.parametrize(
    ("value", "path", "what"),
    [
        ({"a": 1.5}, "$.a", "float 1.5"),
        ({"a": [1, 2**53]}, "$.a[1]", "9007199254740992"),
        ({"a": {"b": -(2**53)}}, "$.a.b", "-9007199254740992"),
        ({"a": float("nan")}, "$.a", "float nan"),
        ({1: "x"}, "$", "not a string"),
        ({"a": object()}, "$.a", "not a JSON type"),
        ({"a": "\ud800"}, "$.a", "surrogate"),
    ],
)
def test_strict_rejects_with_path(value: Any, path: str, what: str) -> None:
    with pytest.raises(CanonicalJsonError, match=what) as info:
        encode_canonical_json(value, strict=True)
    assert info.value.path == path


def test_limits_are_inclusive() -> None:
    check_canonical({"a": 2**53 - 1, "b": -(2**53) + 1})


def test_lenient_mode_keeps_old_room_quirks() -> None:
    # Room versions 1-5 must not enforce the number rules.
    assert encode_canonical_json({"a": 2**60, "b": 1.5}) == b'{"a":1152921504606846976,"b":1.5}'
    with pytest.raises(CanonicalJsonError):
        encode_canonical_json({"a": float("inf")})
    with pytest.raises(CanonicalJsonError):
        encode_canonical_json({"a": "\udc00"})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"a": NaN}', "NaN"),
        (b'{"a": Infinity}', "Infinity"),
        (b'{"a": -Infinity}', "Infinity"),
        (b'{"a": 1, "a": 2}', "duplicate object key 'a'"),
        (b'{"a": 1} x', "not JSON"),
        (b"\xff", "not UTF-8"),
        (b'{"a": "\\ud800"}', "surrogate"),
        (b'{"\\udfff": 1}', "surrogate"),
        (b"[" * 100000, "nested too deeply|not JSON"),
    ],
)
def test_parse_rejects(body: bytes, message: str) -> None:
    with pytest.raises(InvalidJson, match=message):
        parse_json(body)


def test_parse_strict_rejects_floats_and_big_ints() -> None:
    assert parse_json(b'{"a": 1.5}') == {"a": 1.5}
    with pytest.raises(InvalidJson, match=r"\$\.a: float 1.5"):
        parse_json(b'{"a": 1.5}', strict=True)
    with pytest.raises(InvalidJson, match="outside the range"):
        parse_json(b'{"a": [9007199254740992]}', strict=True)
    assert parse_json('{"a": 2.0e3, "b": "\\ud83d\\ude00"}', strict=True) == {
        "a": 2000,
        "b": "\U0001f600",
    }


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_round_trip_and_independent_encoder(value: Any) -> None:
    encoded = encode_canonical_json(value, strict=True)
    assert parse_json(encoded, strict=True) == value
    # The appendix's reference snippet is an independent implementation.
    reference = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    assert encoded == reference.encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(value=json_values, indent=st.sampled_from([None, 1, 4]))
def test_encoding_ignores_input_formatting(value: Any, indent: int | None) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=True)
    assert encode_canonical_json(parse_json(text)) == encode_canonical_json(value)
