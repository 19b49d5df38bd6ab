"""Server names, user IDs, room IDs, room aliases and event IDs (spec appendices,
"Identifier Grammar").

Server names are case-sensitive (spec "Server Name"): nothing here changes their case.
Comparing or resolving them case-insensitively is a DNS matter for server discovery.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from gateway.matrix.room_versions import EventIdFormat, RoomVersion, get_room_version

MAX_IDENTIFIER_BYTES = 255


class InvalidIdentifier(ValueError):
    """An identifier the grammar rejects; ``reason`` says why."""

    def __init__(self, kind: str, value: object, reason: str) -> None:
        super().__init__(f"invalid {kind} {value!r}: {reason}")
        self.kind = kind
        self.value = value
        self.reason = reason


class HostKind(Enum):
    DNS = "dns"
    IPV4 = "ipv4"
    IPV6 = "ipv6"


@dataclass(frozen=True, slots=True)
class ServerName:
    """``hostname [":" port]``; ``host`` keeps the brackets of an IPv6 literal."""

    host: str
    port: int | None
    kind: HostKind

    def __str__(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


_IPV4 = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")
_DNS_NAME = re.compile(r"[0-9A-Za-z.\-]{1,255}")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_PORT = re.compile(r"[0-9]{1,5}")


@functools.lru_cache(maxsize=4096)
def parse_server_name(text: str) -> ServerName:
    """Parses ``text`` per the "Server Name" grammar; raises `InvalidIdentifier`.

    Results are cached: the same few origins are parsed on every request.
    """
    kind_name = "server name"
    if not isinstance(text, str) or not text:
        raise InvalidIdentifier(kind_name, text, "empty")
    port_text: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InvalidIdentifier(kind_name, text, "IPv6 literal is missing ']'")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise InvalidIdentifier(kind_name, text, "unexpected text after IPv6 literal")
            port_text = rest[1:]
        literal = host[1:-1]
        if not _IPV6_CHARS.fullmatch(literal):
            raise InvalidIdentifier(
                kind_name, text, "IPv6 literal must be 2-45 characters of 0-9, A-F, a-f, ':', '.'"
            )
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise InvalidIdentifier(kind_name, text, "not a valid IPv6 address") from None
        kind = HostKind.IPV6
    else:
        host, sep, port_part = text.partition(":")
        if sep:
            port_text = port_part
        if not host:
            raise InvalidIdentifier(kind_name, text, "empty hostname")
        if _IPV4.fullmatch(host):
            if any(int(octet) > 255 for octet in host.split(".")):
                raise InvalidIdentifier(kind_name, text, "IPv4 octets must be 0-255")
            kind = HostKind.IPV4
        elif _DNS_NAME.fullmatch(host):
            kind = HostKind.DNS
        else:
            raise InvalidIdentifier(
                kind_name,
                text,
                "hostname must be an IPv4 literal, a [IPv6] literal, or at most 255 "
                "characters of A-Z, a-z, 0-9, '-' and '.'",
            )
    port: int | None = None
    if port_text is not None:
        if not _PORT.fullmatch(port_text):
            raise InvalidIdentifier(kind_name, text, "port must be 1 to 5 digits")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise InvalidIdentifier(kind_name, text, "port must be 1-65535")
    return ServerName(host=host, port=port, kind=kind)


def is_valid_server_name(text: str) -> bool:
    try:
        parse_server_name(text)
    except InvalidIdentifier:
        return False
    return True


def _check_length(kind: str, text: str) -> None:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_IDENTIFIER_BYTES:
        raise InvalidIdentifier(kind, text, f"longer than {MAX_IDENTIFIER_BYTES} bytes")


def _split_sigil(kind: str, text: object, sigil: str) -> tuple[str, str]:
    if not isinstance(text, str):
        raise InvalidIdentifier(kind, text, "not a string")
    if not text.startswith(sigil):
        raise InvalidIdentifier(kind, text, f"must start with {sigil!r}")
    _check_length(kind, text)
    local, sep, domain = text[1:].partition(":")
    if not sep:
        raise InvalidIdentifier(kind, text, "missing ':' and server name")
    try:
        parse_server_name(domain)
    except InvalidIdentifier as e:
        raise InvalidIdentifier(kind, text, f"bad server name: {e.reason}") from None
    return local, domain


_SURROGATE_OR_NUL = re.compile("[\x00\ud800-\udfff]")
_USER_LOCALPART = re.compile(r"[a-z0-9._=\-/+]+")


def _check_opaque(kind: str, text: str, local: str) -> None:
    if _SURROGATE_OR_NUL.search(local):
        raise InvalidIdentifier(kind, text, "contains NUL or a surrogate code point")


@dataclass(frozen=True, slots=True)
class UserID:
    localpart: str
    server_name: str

    def __str__(self) -> str:
        return f"@{self.localpart}:{self.server_name}"

    @property
    def is_compliant(self) -> bool:
        """Whether the localpart follows the current grammar (not only the historical one)."""
        return _USER_LOCALPART.fullmatch(self.localpart) is not None


def parse_user_id(text: str, *, historical: bool = True) -> UserID:
    """Parses ``@localpart:server_name``.

    With ``historical=True`` (the default, for IDs found in events over federation) the
    localpart may be any non-surrogate code points except ``:`` and NUL, even empty, as
    "Historical User IDs" says servers MUST accept. With ``historical=False`` it must be
    ``1*(a-z / 0-9 / . _ = - / +)``.
    """
    kind = "user ID"
    local, domain = _split_sigil(kind, text, "@")
    if historical:
        _check_opaque(kind, text, local)
    elif not _USER_LOCALPART.fullmatch(local):
        raise InvalidIdentifier(
            kind,
            text,
            "localpart must be non-empty and only a-z, 0-9, '.', '_', '=', '-', '/', '+'",
        )
    return UserID(localpart=local, server_name=domain)


@dataclass(frozen=True, slots=True)
class RoomAlias:
    localpart: str
    server_name: str

    def __str__(self) -> str:
        return f"#{self.localpart}:{self.server_name}"


def parse_room_alias(text: str) -> RoomAlias:
    kind = "room alias"
    local, domain = _split_sigil(kind, text, "#")
    _check_opaque(kind, text, local)
    return RoomAlias(localpart=local, server_name=domain)


_HASH_STANDARD = re.compile(r"[A-Za-z0-9+/]{43}")
_HASH_URL_SAFE = re.compile(r"[A-Za-z0-9\-_]{43}")


@dataclass(frozen=True, slots=True)
class RoomID:
    """``!opaque:server_name`` (room versions 1-11) or ``!hash`` (v12: no server name)."""

    opaque: str
    server_name: str | None

    def __str__(self) -> str:
        if self.server_name is None:
            return f"!{self.opaque}"
        return f"!{self.opaque}:{self.server_name}"


def parse_room_id(text: str, room_version: str | RoomVersion | None = None) -> RoomID:
    """Parses a room ID; with a room version, only that version's form is accepted.

    Without one, a ``:`` decides: domain form, or else the v12 form (``!`` + 43 URL-safe
    base64 characters of a SHA-256 reference hash).
    """
    kind = "room ID"
    if not isinstance(text, str) or not text.startswith("!"):
        raise InvalidIdentifier(kind, text, "must start with '!'")
    hashed: bool
    if room_version is not None:
        hashed = get_room_version(room_version).room_id_from_create_event
    else:
        hashed = ":" not in text
    if hashed:
        _check_length(kind, text)
        if not _HASH_URL_SAFE.fullmatch(text[1:]):
            raise InvalidIdentifier(
                kind, text, "must be '!' and 43 URL-safe base64 characters (create event hash)"
            )
        return RoomID(opaque=text[1:], server_name=None)
    local, domain = _split_sigil(kind, text, "!")
    _check_opaque(kind, text, local)
    return RoomID(opaque=local, server_name=domain)


@dataclass(frozen=True, slots=True)
class EventID:
    """``$opaque:server_name`` (room versions 1, 2) or ``$hash`` (v3 and later)."""

    opaque: str
    server_name: str | None

    def __str__(self) -> str:
        if self.server_name is None:
            return f"${self.opaque}"
        return f"${self.opaque}:{self.server_name}"


def parse_event_id(text: str, room_version: str | RoomVersion | None = None) -> EventID:
    """Parses an event ID; with a room version, only that version's format is accepted."""
    kind = "event ID"
    if not isinstance(text, str) or not text.startswith("$"):
        raise InvalidIdentifier(kind, text, "must start with '$'")
    fmt: EventIdFormat | None = (
        get_room_version(room_version).event_id_format if room_version is not None else None
    )
    if fmt is EventIdFormat.DOMAIN or (fmt is None and ":" in text):
        local, domain = _split_sigil(kind, text, "$")
        _check_opaque(kind, text, local)
        return EventID(opaque=local, server_name=domain)
    _check_length(kind, text)
    body = text[1:]
    if fmt is EventIdFormat.BASE64:
        ok = _HASH_STANDARD.fullmatch(body) is not None
        expected = "43 standard base64 characters"
    elif fmt is EventIdFormat.URL_SAFE_BASE64:
        ok = _HASH_URL_SAFE.fullmatch(body) is not None
        expected = "43 URL-safe base64 characters"
    else:
        ok = _HASH_STANDARD.fullmatch(body) is not None or bool(_HASH_URL_SAFE.fullmatch(body))
        expected = "43 base64 characters"
    if not ok:
        raise InvalidIdentifier(kind, text, f"must be '$' and {expected} (reference hash)")
    return EventID(opaque=body, server_name=None)


def server_name_of(identifier: object) -> str | None:
    """The server name in a user ID, room alias, or room or event ID of the domain form
    (``@alice:example.org:8448`` gives ``example.org:8448``); None for anything that is not
    a valid identifier of those kinds, and for IDs without a server name (v12 room IDs,
    event IDs from room version 3). Case is kept (server names are case-sensitive)."""
    if not isinstance(identifier, str) or not identifier:
        return None
    parse = _PARSERS_BY_SIGIL.get(identifier[0])
    if parse is None:
        return None
    try:
        return parse(identifier).server_name
    except InvalidIdentifier:
        return None


def user_server_name(user_id: object) -> str | None:
    """The server name of a user ID (historical localparts allowed); None for anything that
    is not a valid user ID."""
    if isinstance(user_id, str) and user_id.startswith("@"):
        return server_name_of(user_id)
    return None


_PARSERS_BY_SIGIL: dict[str, Callable[[str], UserID | RoomAlias | RoomID | EventID]] = {
    "@": parse_user_id,
    "#": parse_room_alias,
    "!": parse_room_id,
    "$": parse_event_id,
}
