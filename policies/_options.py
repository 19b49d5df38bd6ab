"""Small readers for policy options, shared by the built-in policies.

Each raises ``OptionsError`` naming the key, so ``gateway check`` can point at it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.policy.api import GlobSet, OptionsError


def check_known(options: Mapping[str, Any], known: set[str], prefix: str = "") -> None:
    for key in options:
        if key not in known:
            raise OptionsError(prefix + key, f"unknown option (known: {', '.join(sorted(known))})")


def globs(options: Mapping[str, Any], key: str, *, ignore_case: bool = False) -> GlobSet:
    """``ignore_case`` for globs of server names (see :class:`GlobSet`)."""
    value = options.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise OptionsError(key, f"must be a list of non-empty glob strings, got {value!r}")
    return GlobSet(value, ignore_case=ignore_case)


def boolean(options: Mapping[str, Any], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise OptionsError(key, f"must be true or false, got {value!r}")
    return value


def choice(options: Mapping[str, Any], key: str, default: str, *choices: str) -> str:
    value = options.get(key, default)
    if value not in choices:
        raise OptionsError(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)


def positive_number(
    options: Mapping[str, Any], key: str, prefix: str = "", *, allow_zero: bool = False
) -> float:
    value = options.get(key)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):  # type: ignore[operator]
        limit = ">= 0" if allow_zero else "> 0"
        raise OptionsError(prefix + key, f"must be a number {limit}, got {value!r}")
    return float(value)  # type: ignore[arg-type]
