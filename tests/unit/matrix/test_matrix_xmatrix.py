from __future__ import annotations

import pytest
from signedjson.key import generate_signing_key
from synapse.federation.transport.server._base import _parse_auth_header

from gateway.matrix.signing import InvalidSignature
from gateway.matrix.xmatrix import (
    DestinationMismatch,
    MalformedXMatrix,
    XMatrixAuth,
    format_x_matrix,
    parse_x_matrix,
    request_json,
    sign_request,
    verify_request,
)

SIG = "ABCdef+/123"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'X-Matrix origin="origin.hs.example.com",destination="destination.hs.example.com",'
            'key="ed25519:key1",sig="ABCDEF..."',
            XMatrixAuth(
                "origin.hs.example.com", "destination.hs.example.com", "ed25519:key1", "ABCDEF..."
            ),
        ),
        # Scheme and names are case-insensitive; order does not matter.
        (
            f'x-matrix SIG="{SIG}",KEY="ed25519:k",Origin=a.example',
            XMatrixAuth("a.example", None, "ed25519:k", SIG),
        ),
        (
            f'X-MATRIX origin="a.example",key="ed25519:k",sig="{SIG}"',
            XMatrixAuth("a.example", None, "ed25519:k", SIG),
        ),
        # Unquoted tokens, colons allowed unquoted for older servers.
        (
            "X-Matrix origin=a.example:8448,destination=b.example,key=ed25519:k,sig=abc",
            XMatrixAuth("a.example:8448", "b.example", "ed25519:k", "abc"),
        ),
        # Several spaces after the scheme; spaces and tabs around commas and '='.
        (
            f'X-Matrix   origin="a.example" ,\tkey = "ed25519:k" ,  sig="{SIG}"',
            XMatrixAuth("a.example", None, "ed25519:k", SIG),
        ),
        # Backslash escapes in quoted values are undone.
        (
            r'X-Matrix origin="a.ex\ample",key="ed25519:\k",sig="a\"b\\c"',
            XMatrixAuth("a.example", None, "ed25519:k", 'a"b\\c'),
        ),
        # Unknown parameters are ignored; empty list elements are allowed.
        (
            f'X-Matrix origin="a.example",,foo="bar, baz",key="ed25519:k",sig="{SIG}",',
            XMatrixAuth("a.example", None, "ed25519:k", SIG),
        ),
        # IPv6 literal origin with port, quoted.
        (
            f'X-Matrix origin="[::1]:8448",key="ed25519:k",sig="{SIG}"',
            XMatrixAuth("[::1]:8448", None, "ed25519:k", SIG),
        ),
        # The spec's parameter list calls it `signature`.
        (
            f'X-Matrix origin="a.example",key="ed25519:k",signature="{SIG}"',
            XMatrixAuth("a.example", None, "ed25519:k", SIG),
        ),
    ],
)
def test_parse_valid(header: str, expected: XMatrixAuth) -> None:
    assert parse_x_matrix(header) == expected


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ('Bearer origin="a.example",key="ed25519:k",sig="x"', "scheme"),
        ('X-Matrixorigin="a.example",key="ed25519:k",sig="x"', "scheme"),
        ("X-Matrix", "no parameters"),
        ("X-Matrix   ", "no parameters"),
        ('X-Matrix key="ed25519:k",sig="x"', "lacks origin"),
        ('X-Matrix origin="a.example",sig="x"', "lacks key"),
        ('X-Matrix origin="a.example",key="ed25519:k"', "lacks sig"),
        ('X-Matrix origin="",key="ed25519:k",sig="x"', "lacks origin"),
        ('X-Matrix origin="a.example",key="ed25519:k",sig="x', "malformed"),
        ('X-Matrix origin="a.example" key="ed25519:k",sig="x"', "expected ','"),
        ('X-Matrix origin=a example,key="ed25519:k",sig="x"', "expected ','"),
        ('X-Matrix origin="a.example",key="ed25519:k",sig=a/b', "expected ','"),
        ('X-Matrix origin="a.example",key="ed25519:k",sig="x",origin="b.example"', "twice"),
        ('X-Matrix origin="a.example",key="k",sig="x"', "algorithm:id"),
        ('X-Matrix origin="a_b.example",key="ed25519:k",sig="x"', "server name"),
        ('X-Matrix origin="a.example",destination="b.ex:0",key="ed25519:k",sig="x"', "port"),
        ('X-Matrix =x,origin="a.example",key="ed25519:k",sig="x"', "malformed"),
        ('X-Matrix origin="a\x01",key="ed25519:k",sig="x"', "malformed"),
    ],
)
def test_parse_rejects(header: str, message: str) -> None:
    with pytest.raises(MalformedXMatrix, match=message):
        parse_x_matrix(header)


def test_malformed_is_value_error() -> None:
    assert issubclass(MalformedXMatrix, ValueError)


@pytest.mark.parametrize(
    "auth",
    [
        XMatrixAuth("a.example", "b.example", "ed25519:k", SIG),
        XMatrixAuth("a.example:8448", None, "ed25519:k", SIG),
        XMatrixAuth("a.example", None, "ed25519:k", 'we"ird\\'),
    ],
)
def test_format_round_trips(auth: XMatrixAuth) -> None:
    header = format_x_matrix(auth)
    assert header.startswith("X-Matrix origin=")
    assert parse_x_matrix(header) == auth


def test_format_matches_spec_example_shape() -> None:
    header = format_x_matrix(XMatrixAuth("o.example", "d.example", "ed25519:key1", "ABC"))
    assert (
        header == 'X-Matrix origin="o.example",destination="d.example",key="ed25519:key1",sig="ABC"'
    )


def test_synapse_parses_our_header() -> None:
    key = generate_signing_key("k1")
    header = sign_request("PUT", "/_matrix/federation/v1/send/1", "a.example", "b.example", {}, key)
    origin, key_id, sig, destination = _parse_auth_header(header.encode())
    assert (origin, key_id, destination) == ("a.example", "ed25519:k1", "b.example")
    assert sig == parse_x_matrix(header).signature


KEY = generate_signing_key("k1")
URI = "/_matrix/federation/v2/invite/%21room%3Ab.example/%24ev?x=1&y=%2F"
BODY = {"event": {"type": "m.room.member"}, "room_version": "10"}


def _verify(header: str, **overrides: object) -> XMatrixAuth:
    args: dict[str, object] = {
        "method": "PUT",
        "uri": URI,
        "destination": "b.example",
        "content": BODY,
        "verify_key": KEY.verify_key,
    }
    args.update(overrides)
    return verify_request(header, **args)  # type: ignore[arg-type]


def test_sign_and_verify_request() -> None:
    header = sign_request("PUT", URI, "a.example", "b.example", BODY, KEY)
    auth = _verify(header)
    assert auth.origin == "a.example" and auth.key_id == "ed25519:k1"
    assert _verify(parse_x_matrix(header)) == auth


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": "POST"},
        {"uri": URI.replace("%2F", "/")},  # the raw URI as sent is what is signed
        {"content": {**BODY, "room_version": "11"}},
        {"content": None},
        {"verify_key": generate_signing_key("k1").verify_key},
    ],
)
def test_verify_request_rejects_changes(overrides: dict[str, object]) -> None:
    header = sign_request("PUT", URI, "a.example", "b.example", BODY, KEY)
    with pytest.raises(InvalidSignature, match=r"a\.example"):
        _verify(header, **overrides)


def test_destination_checks() -> None:
    header = sign_request("PUT", URI, "a.example", "b.example", BODY, KEY)
    with pytest.raises(DestinationMismatch, match=r"c\.example"):
        _verify(header, destination="c.example")
    # An older sender without `destination` signed our name anyway.
    auth = parse_x_matrix(header)
    legacy = format_x_matrix(XMatrixAuth(auth.origin, None, auth.key_id, auth.signature))
    assert _verify(legacy).destination is None
    with pytest.raises(InvalidSignature):
        _verify(legacy, destination="c.example")


def test_request_json_without_content() -> None:
    assert request_json("GET", "/x", "a", "b", None) == {
        "method": "GET",
        "uri": "/x",
        "origin": "a",
        "destination": "b",
    }
    header = sign_request("GET", "/x", "a.example", "b.example", None, KEY)
    verify_request(
        header,
        method="GET",
        uri="/x",
        destination="b.example",
        content=None,
        verify_key=KEY.verify_key,
    )
