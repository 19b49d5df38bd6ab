from __future__ import annotations

import pytest

from gateway.matrix.identifiers import (
    EventID,
    HostKind,
    InvalidIdentifier,
    RoomID,
    ServerName,
    UserID,
    is_valid_server_name,
    parse_event_id,
    parse_room_alias,
    parse_room_id,
    parse_server_name,
    parse_user_id,
)

HASH_URL = "Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3a5lr5Zg"
HASH_STD = "acR1l0raoZnm60CBwAVgqbZqoO/mYU81xysh1u7XcJk"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("matrix.org", ServerName("matrix.org", None, HostKind.DNS)),
        ("matrix.org:8888", ServerName("matrix.org", 8888, HostKind.DNS)),
        ("1.2.3.4", ServerName("1.2.3.4", None, HostKind.IPV4)),
        ("1.2.3.4:1234", ServerName("1.2.3.4", 1234, HostKind.IPV4)),
        ("[1234:5678::abcd]", ServerName("[1234:5678::abcd]", None, HostKind.IPV6)),
        ("[1234:5678::abcd]:5678", ServerName("[1234:5678::abcd]", 5678, HostKind.IPV6)),
        ("[::ffff:1.2.3.4]", ServerName("[::ffff:1.2.3.4]", None, HostKind.IPV6)),
        ("localhost", ServerName("localhost", None, HostKind.DNS)),
        ("MATRIX.ORG", ServerName("MATRIX.ORG", None, HostKind.DNS)),  # case kept
        ("a-b.example:1", ServerName("a-b.example", 1, HostKind.DNS)),
        ("x.example:65535", ServerName("x.example", 65535, HostKind.DNS)),
        ("a" * 255, ServerName("a" * 255, None, HostKind.DNS)),
    ],
)
def test_server_names_accepted(text: str, expected: ServerName) -> None:
    assert parse_server_name(text) == expected
    assert str(parse_server_name(text)) == text
    assert is_valid_server_name(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        (":8448", "empty hostname"),
        ("matrix.org:", "port"),
        ("matrix.org:0", "1-65535"),
        ("matrix.org:65536", "1-65535"),
        ("matrix.org:123456", "1 to 5 digits"),
        ("matrix.org:\uff18\uff10", "1 to 5 digits"),
        ("matrix.org:80:80", "port"),
        ("under_score.org", "hostname must be"),
        ("space .org", "hostname must be"),
        ("ünicode.org", "hostname must be"),
        ("a" * 256, "hostname must be"),
        ("1.2.3.256", "IPv4 octets"),
        ("[1234:5678::abcd", "missing ']'"),
        ("[::1]x", "after IPv6"),
        ("[::1]:", "port"),
        ("[g::1]", "IPv6 literal must be"),
        ("[1:2:3]", "not a valid IPv6"),
        ("[]", "IPv6 literal must be"),
        ("::1", "empty hostname"),
    ],
)
def test_server_names_rejected(text: str, reason: str) -> None:
    with pytest.raises(InvalidIdentifier, match=reason) as info:
        parse_server_name(text)
    assert info.value.kind == "server name"
    assert not is_valid_server_name(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("@alice:example.org", UserID("alice", "example.org")),
        ("@a.b_c=d-e/f+g:example.org:8448", UserID("a.b_c=d-e/f+g", "example.org:8448")),
        ("@0:[::1]:1", UserID("0", "[::1]:1")),
    ],
)
def test_user_ids_strict(text: str, expected: UserID) -> None:
    assert parse_user_id(text, historical=False) == expected
    assert parse_user_id(text) == expected
    assert expected.is_compliant
    assert str(expected) == text


@pytest.mark.parametrize(
    "text", ["@Alice:example.org", "@al ice:example.org", "@:example.org", "@ü:e.org"]
)
def test_historical_user_ids(text: str) -> None:
    # Servers MUST accept these in events over federation ("Historical User IDs").
    user = parse_user_id(text)
    assert not user.is_compliant
    with pytest.raises(InvalidIdentifier, match="localpart"):
        parse_user_id(text, historical=False)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("alice:example.org", "start with '@'"),
        ("@alice", "missing ':'"),
        ("@alice:", "bad server name"),
        ("@alice:exa mple.org", "bad server name"),
        ("@al\x00ice:example.org", "NUL"),
        ("@al\ud800ice:example.org", "surrogate"),
        ("@" + "a" * 250 + ":example.org", "255 bytes"),
        ("@" + "é" * 125 + ":example.org", "255 bytes"),  # bytes, not characters
    ],
)
def test_user_ids_rejected(text: str, reason: str) -> None:
    with pytest.raises(InvalidIdentifier, match=reason):
        parse_user_id(text)


def test_user_id_not_a_string() -> None:
    with pytest.raises(InvalidIdentifier, match="not a string"):
        parse_user_id(None)  # type: ignore[arg-type]


def test_room_ids() -> None:
    assert parse_room_id("!abc:example.org") == RoomID("abc", "example.org")
    assert parse_room_id("!abc:example.org", "11") == RoomID("abc", "example.org")
    assert parse_room_id("!" + HASH_URL) == RoomID(HASH_URL, None)
    assert parse_room_id("!" + HASH_URL, "12") == RoomID(HASH_URL, None)
    assert str(parse_room_id("!" + HASH_URL)) == "!" + HASH_URL
    with pytest.raises(InvalidIdentifier, match="43 URL-safe"):
        parse_room_id("!abc:example.org", "12")
    with pytest.raises(InvalidIdentifier, match="missing ':'"):
        parse_room_id("!" + HASH_URL, "11")
    with pytest.raises(InvalidIdentifier, match="43 URL-safe"):
        parse_room_id("!" + HASH_STD)
    with pytest.raises(InvalidIdentifier, match="start with '!'"):
        parse_room_id("#abc:example.org")
    with pytest.raises(InvalidIdentifier, match="NUL"):
        parse_room_id("!a\x00:example.org")


def test_event_ids() -> None:
    assert parse_event_id("$abc:example.org", "1") == EventID("abc", "example.org")
    assert parse_event_id("$" + HASH_STD, "3") == EventID(HASH_STD, None)
    assert parse_event_id("$" + HASH_URL, "4") == EventID(HASH_URL, None)
    assert parse_event_id("$" + HASH_URL, "12") == EventID(HASH_URL, None)
    assert parse_event_id("$" + HASH_STD) == EventID(HASH_STD, None)
    assert parse_event_id("$abc:example.org") == EventID("abc", "example.org")
    assert str(parse_event_id("$" + HASH_URL)) == "$" + HASH_URL
    with pytest.raises(InvalidIdentifier, match="43 standard"):
        parse_event_id("$" + HASH_URL, "3")
    with pytest.raises(InvalidIdentifier, match="43 URL-safe"):
        parse_event_id("$" + HASH_STD, "4")
    with pytest.raises(InvalidIdentifier, match="missing ':'"):
        parse_event_id("$" + HASH_URL, "2")
    with pytest.raises(InvalidIdentifier, match="43 URL-safe"):
        parse_event_id("$abc:example.org", "10")
    with pytest.raises(InvalidIdentifier, match="43 base64"):
        parse_event_id("$short")
    with pytest.raises(InvalidIdentifier, match="start with"):
        parse_event_id(HASH_URL)


def test_room_aliases() -> None:
    alias = parse_room_alias("#Room Name:example.org")
    assert (alias.localpart, alias.server_name) == ("Room Name", "example.org")
    assert str(alias) == "#Room Name:example.org"
    with pytest.raises(InvalidIdentifier, match="start with '#'"):
        parse_room_alias("!room:example.org")
    with pytest.raises(InvalidIdentifier, match="NUL"):
        parse_room_alias("#a\x00:example.org")
