"""Recorded requests for ``gateway policy test``: a JSON file naming a context type and its
fields.

::

    {
      "description": "a v3 invite into a room created on spam.example",
      "context": "invite",
      "fields": {"inviter": "@a:spam.example", "invitee": "@bob:our.example", ...}
    }

``context`` is ``invite``, ``join`` or ``knock``; ``fields`` are the context's fields (see
:mod:`gateway.policy.api`), lists for tuples. For invites ``creator_servers`` may be left out
when ``create_event`` is given: it is then derived from the create event.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.policy.api import (
    Context,
    InviteContext,
    JoinContext,
    KnockContext,
    creator_servers_of,
)

__all__ = ["FixtureError", "context_from_json", "load_fixture"]

_TYPES: dict[str, type[InviteContext] | type[JoinContext] | type[KnockContext]] = {
    "invite": InviteContext,
    "join": JoinContext,
    "knock": KnockContext,
}
_TUPLE_FIELDS = {"creator_servers", "stripped_state_untrusted"}


class FixtureError(ValueError):
    """The fixture does not describe a valid context."""


def context_from_json(data: Any) -> Context:
    if not isinstance(data, Mapping):
        raise FixtureError("a fixture must be a JSON object")
    kind = data.get("context")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise FixtureError(f"context: must be one of {', '.join(_TYPES)}, got {kind!r}")
    fields = data.get("fields")
    if not isinstance(fields, Mapping):
        raise FixtureError("fields: must be an object")
    known = {f.name: f for f in dataclasses.fields(cls) if f.name != "tools"}
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in known:
            raise FixtureError(f"fields.{name}: not a field of {kind} (known: {', '.join(known)})")
        values[name] = tuple(value) if name in _TUPLE_FIELDS and isinstance(value, list) else value
    if cls is InviteContext:
        create = values.get("create_event")
        values.setdefault("create_event", None)
        values.setdefault("create_event_verified", create is not None)
        if "creator_servers" not in values and isinstance(create, Mapping):
            values["creator_servers"] = creator_servers_of(create, str(values.get("room_version")))
        values.setdefault("creator_servers", ())
    missing = [
        name
        for name, f in known.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise FixtureError(f"fields: missing {', '.join(missing)}")
    try:
        return cls(**values)
    except TypeError as e:
        raise FixtureError(f"fields: {e}") from None


def load_fixture(path: str | Path) -> Context:
    """Reads a fixture file; raises :class:`FixtureError` (or OSError)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf8"))
    except json.JSONDecodeError as e:
        raise FixtureError(f"not valid JSON: {e}") from None
    return context_from_json(data)
