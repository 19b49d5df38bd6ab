"""Canonical JSON (spec appendices, "Canonical JSON") and a careful parser for bodies.

Encoding is the shortest UTF-8 JSON with object keys sorted by code point. Room versions 6
and later MUST enforce the number rules strictly (integers within +-(2**53 - 1), no
floats); older versions MUST NOT, so the lenient encoder keeps what `canonicaljson` (and
therefore Synapse) emits for out-of-range integers and floats there.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

from canonicaljson import encode_canonical_json as _encode

MAX_SAFE_INTEGER = 2**53 - 1
MIN_SAFE_INTEGER = -(2**53 - 1)

_SURROGATE = re.compile("[\ud800-\udfff]")


class CanonicalJsonError(ValueError):
    """A value that canonical JSON cannot represent; ``path`` says where (``$.a[0].b``)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class InvalidJson(ValueError):
    """A body that is not acceptable JSON (syntax, NaN/Infinity, duplicate keys, ...)."""


def _child(path: str, key: object) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}"


def check_canonical(value: object, path: str = "$") -> None:
    """Raises `CanonicalJsonError` unless ``value`` is representable in strict canonical JSON.

    Rejects floats, integers outside +-(2**53 - 1), non-string keys, lone surrogates and
    non-JSON types.
    """
    stack: list[tuple[str, object]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise CanonicalJsonError(where, "string contains a lone surrogate")
        elif isinstance(item, int):
            if not MIN_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                raise CanonicalJsonError(
                    where, f"integer {item} is outside the range +-(2**53 - 1)"
                )
        elif isinstance(item, float):
            raise CanonicalJsonError(where, f"float {item!r} is not allowed (integers only)")
        elif isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise CanonicalJsonError(where, f"object key {key!r} is not a string")
                if _SURROGATE.search(key):
                    raise CanonicalJsonError(where, f"object key {key!r} has a lone surrogate")
                stack.append((_child(where, key), sub))
        elif isinstance(item, list | tuple):
            stack.extend((_child(where, i), sub) for i, sub in enumerate(item))
        else:
            raise CanonicalJsonError(where, f"{type(item).__name__} is not a JSON type")


def encode_canonical_json(value: object, *, strict: bool = False) -> bytes:
    """The canonical JSON bytes of ``value``.

    With ``strict=True`` (room versions 6+, see ``RoomVersion.strict_canonical_json``) the
    value is checked first and a `CanonicalJsonError` names the offending path.
    """
    if strict:
        check_canonical(value)
    try:
        return _encode(value)
    except (TypeError, ValueError) as e:
        # Floats NaN/Infinity, unknown types, lone surrogates (UnicodeEncodeError).
        raise CanonicalJsonError("$", str(e)) from e


def _reject_constant(name: str) -> Any:
    raise InvalidJson(f"{name} is not valid JSON")


def _parse_number_with_fraction(text: str) -> int | float:
    # The appendix gives `1e10` -> `10000000000` as a canonical transformation, so a
    # number literal with a fraction or exponent whose value is an integer is an integer.
    # (Synapse instead keeps it a float and rejects it in strict room versions; we follow
    # the spec.) Non-integral values stay floats; the strict check rejects them.
    number = Decimal(text)
    if number == number.to_integral_value() and abs(number) <= 10**400:
        return int(number)
    return float(text)


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidJson(f"duplicate object key {key!r}")
        result[key] = value
    return result


_decoder = json.JSONDecoder(
    parse_constant=_reject_constant,
    parse_float=_parse_number_with_fraction,
    object_pairs_hook=_object_without_duplicates,
)


def parse_json(data: bytes | str, *, strict: bool = False, max_depth: int | None = None) -> Any:
    """Parses a request or event body.

    Always rejects what is not JSON (NaN, Infinity, trailing data, invalid UTF-8, lone
    surrogates) and duplicate object keys (RFC 8259 says names SHOULD be unique; two
    parsers disagreeing on which one wins is a classic smuggling vector). With
    ``strict=True`` the result must also satisfy strict canonical JSON (room v6+). With
    ``max_depth``, objects and arrays may nest that deep at most.
    Raises `InvalidJson`, whose message names the offending path for strict failures.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidJson(f"body is not UTF-8: {e}") from None
    else:
        text = data
    try:
        value = _decoder.decode(text)
    except json.JSONDecodeError as e:
        raise InvalidJson(f"not JSON: {e}") from None
    except RecursionError:
        raise InvalidJson("JSON nested too deeply") from None
    if strict:
        try:
            check_canonical(value)
        except CanonicalJsonError as e:
            raise InvalidJson(str(e)) from None
    elif _SURROGATE.search(text) or "\\ud" in text.lower():
        # Cheap pre-filter first; the walk only runs when an escape might be a surrogate.
        _check_no_surrogates(value)
    if max_depth is not None and text.count("[") + text.count("{") > max_depth:
        _check_depth(value, max_depth)
    return value


def _check_depth(value: object, max_depth: int) -> None:
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                raise InvalidJson(f"JSON nested deeper than {max_depth} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _check_no_surrogates(value: object) -> None:
    stack: list[tuple[str, object]] = [("$", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise InvalidJson(f"{where}: string contains a lone surrogate")
        elif isinstance(item, dict):
            for key, sub in item.items():
                if _SURROGATE.search(key):
                    raise InvalidJson(f"{where}: object key contains a lone surrogate")
                stack.append((_child(where, key), sub))
        elif isinstance(item, list):
            stack.extend((_child(where, i), sub) for i, sub in enumerate(item))
