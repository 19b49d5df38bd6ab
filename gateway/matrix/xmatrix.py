"""The ``X-Matrix`` Authorization scheme (server-server "Request Authentication").

Header grammar (RFC 9110 section 11.4 as the spec adopts it)::

    credentials = "X-Matrix" 1*SP auth-param *( OWS "," OWS auth-param )
    auth-param  = token BWS "=" BWS ( token / quoted-string )

The scheme and parameter names are case-insensitive, quoted values may contain
backslash escapes, empty list elements are allowed (RFC 9110 section 5.6.1), unknown
parameters are ignored, and, for older senders, unquoted values may contain ``:``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from nacl.signing import SigningKey, VerifyKey

from gateway.matrix.identifiers import InvalidIdentifier, parse_server_name
from gateway.matrix.signing import (
    InvalidSignature,
    key_id_of,
    signing_input,
    verify_signature,
)
from gateway.matrix.unpadded_base64 import encode_base64

SCHEME = "X-Matrix"


class MalformedXMatrix(ValueError):
    """An Authorization header that is not a well-formed X-Matrix credential."""


class DestinationMismatch(ValueError):
    """The header names a different destination than this server (spec: deny with 401)."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"X-Matrix destination {got!r} is not this server ({expected!r})")
        self.expected = expected
        self.got = got


@dataclass(frozen=True, slots=True)
class XMatrixAuth:
    origin: str
    destination: str | None
    key_id: str
    signature: str


_TCHAR = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
# qdtext is any character but controls (except HTAB), DQUOTE and backslash; the quoted
# string is written as an unrolled loop so that common, escape-free values match in one go.
_QDTEXT = r'[^"\\\x00-\x08\x0a-\x1f\x7f]'
_PARAM = re.compile(
    r"[ \t]*([" + _TCHAR + r"]+)[ \t]*=[ \t]*"
    r'(?:"(' + _QDTEXT + r"*(?:\\[^\x00-\x08\x0a-\x1f\x7f]" + _QDTEXT + r'*)*)"'
    r"|([" + _TCHAR + r":]+))"
    r"[ \t]*"
)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_SEPARATORS = re.compile(r"[ \t,]*")


# What `format_x_matrix` and most servers send: one space, lower-case names in the usual
# order, every value quoted, no escapes. Matched in one go before the general parser.
_COMMON = re.compile(
    r'X-Matrix origin="([^"\\\x00-\x1f\x7f]+)",(?:destination="([^"\\\x00-\x1f\x7f]+)",)?'
    r'key="([^"\\\x00-\x1f\x7f]+)",sig="([^"\\\x00-\x1f\x7f]+)"'
)


def _parse_params(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    pos = _SEPARATORS.match(text).end()  # type: ignore[union-attr]
    while pos < len(text):
        match = _PARAM.match(text, pos)
        if match is None:
            raise MalformedXMatrix(f"malformed X-Matrix parameter at position {pos}: {text!r}")
        name = match.group(1).lower()
        quoted, bare = match.group(2), match.group(3)
        if quoted is None:
            value = bare
        elif "\\" in quoted:
            value = _ESCAPE.sub(r"\1", quoted)
        else:
            value = quoted
        if name in params:
            raise MalformedXMatrix(f"X-Matrix parameter {name!r} given twice")
        params[name] = value
        pos = match.end()
        if pos < len(text):
            if text[pos] != ",":
                raise MalformedXMatrix(
                    f"expected ',' after X-Matrix parameter {name!r} at position {pos}"
                )
            pos = _SEPARATORS.match(text, pos).end()  # type: ignore[union-attr]
    return params


def parse_x_matrix(header: str) -> XMatrixAuth:
    """Parses an ``Authorization`` header value; raises `MalformedXMatrix`."""
    text = header.strip(" \t")
    common = _COMMON.fullmatch(text)
    if common is not None:
        origin, destination, key_id, signature = common.groups()
        return _checked(origin, destination, key_id, signature)
    scheme, sep, rest = text.partition(" ")
    if scheme.lower() != SCHEME.lower():
        raise MalformedXMatrix(f"authorization scheme is {scheme!r}, not {SCHEME}")
    if not sep or not rest.strip(" \t,"):
        raise MalformedXMatrix("X-Matrix header has no parameters")
    params = _parse_params(rest)
    # The spec's parameter list calls it `signature`, while its example and every
    # implementation send `sig`; accept either, `sig` first.
    if "sig" not in params and "signature" in params:
        params["sig"] = params["signature"]
    missing = [name for name in ("origin", "key", "sig") if not params.get(name)]
    if missing:
        raise MalformedXMatrix(f"X-Matrix header lacks {', '.join(missing)}")
    return _checked(params["origin"], params.get("destination"), params["key"], params["sig"])


def _checked(origin: str, destination: str | None, key_id: str, signature: str) -> XMatrixAuth:
    try:
        parse_server_name(origin)
        if destination is not None:
            parse_server_name(destination)
    except InvalidIdentifier as e:
        raise MalformedXMatrix(f"X-Matrix header: {e}") from None
    if ":" not in key_id:
        raise MalformedXMatrix(f"X-Matrix key {key_id!r} is not of the form algorithm:id")
    return XMatrixAuth(origin=origin, destination=destination, key_id=key_id, signature=signature)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_x_matrix(auth: XMatrixAuth) -> str:
    """The header value, in the conservative form the spec asks senders to use."""
    parts = [f"origin={_quote(auth.origin)}"]
    if auth.destination is not None:
        parts.append(f"destination={_quote(auth.destination)}")
    parts.append(f"key={_quote(auth.key_id)}")
    parts.append(f"sig={_quote(auth.signature)}")
    return f"{SCHEME} " + ",".join(parts)


def request_json(
    method: str, uri: str, origin: str, destination: str, content: Any | None
) -> dict[str, Any]:
    """The object that an X-Matrix signature covers (step 1 of the spec)."""
    obj: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        obj["content"] = content
    return obj


def sign_request(
    method: str,
    uri: str,
    origin: str,
    destination: str,
    content: Any | None,
    signing_key: SigningKey,
    *,
    key_id: str | None = None,
) -> str:
    """An ``Authorization`` header value for a request.

    ``uri`` is the raw request target as sent: path and query, still percent-encoded,
    without scheme and host. ``content`` is the parsed JSON body, or None for no body.
    """
    key_id = key_id or key_id_of(signing_key)
    message = signing_input(request_json(method, uri, origin, destination, content))
    signature = encode_base64(signing_key.sign(message).signature)
    return format_x_matrix(XMatrixAuth(origin, destination, key_id, signature))


def verify_request(
    auth: XMatrixAuth | str,
    *,
    method: str,
    uri: str,
    destination: str,
    content: Any | None,
    verify_key: VerifyKey,
) -> XMatrixAuth:
    """Checks an X-Matrix signature with the origin's key for ``auth.key_id``.

    ``destination`` is this server's name: a header naming another destination raises
    `DestinationMismatch`; a header without one (older senders) is checked as if it named
    this server. Raises `MalformedXMatrix` or `InvalidSignature`; returns the parsed header.
    """
    if isinstance(auth, str):
        auth = parse_x_matrix(auth)
    if auth.destination is not None and auth.destination != destination:
        raise DestinationMismatch(destination, auth.destination)
    message = signing_input(request_json(method, uri, auth.origin, destination, content))
    verify_signature(message, auth.signature, verify_key, auth.origin, auth.key_id)
    return auth


__all__ = [
    "DestinationMismatch",
    "InvalidSignature",
    "MalformedXMatrix",
    "XMatrixAuth",
    "format_x_matrix",
    "parse_x_matrix",
    "request_json",
    "sign_request",
    "verify_request",
]
