"""Moderation policy lists: ``m.policy.rule.user``, ``.server`` and ``.room`` with the
``m.ban`` recommendation, entities as globs.

Options::

    [[policies]]
    module = "policies.policy_lists"
    options.files = ["/etc/gateway/banlist.json"]   # each a JSON list of policy rule events
    options.invite_action = "drop"                  # or "deny" (default)

A file holds the state events of a policy room, as a client's ``/state`` returns them (a list
of ``{"type": ..., "state_key": ..., "content": {"entity": ..., "recommendation": "m.ban",
"reason": ...}}``). Paths are relative to the gateway's working directory. Files are read when
the policy loads: edit them, then reload the gateway (SIGHUP).

How bans apply (following the spec's suggestions for ``m.ban``):

* a **user** rule refuses invites sent by that user, and joins and knocks by that user;
* a **server** rule refuses requests from that origin, invites sent by its users, invites into
  rooms created on it, and joins and knocks by its users;
* a **room** rule refuses invites to, joins of and knocks on that room ID.

Server entities are matched against the server name with and without its port. Legacy event
types (``m.room.rule.*``, ``org.matrix.mjolnir.rule.*``) and the ``org.matrix.mjolnir.ban``
recommendation are accepted too. Rules with empty content (removed rules) are ignored.

Following a policy room live is not done here yet: :meth:`BanList.replace` takes the room's
current state events, so a task reading the room through the homeserver can keep a loaded
list up to date without a reload.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.policy.api import (
    Decision,
    GlobSet,
    InviteContext,
    JoinContext,
    KnockContext,
    OptionsError,
    allow,
    deny,
    drop,
)

from ._options import check_known, choice

_KINDS = {
    "m.policy.rule.user": "user",
    "m.policy.rule.server": "server",
    "m.policy.rule.room": "room",
    "m.room.rule.user": "user",
    "m.room.rule.server": "server",
    "m.room.rule.room": "room",
    "org.matrix.mjolnir.rule.user": "user",
    "org.matrix.mjolnir.rule.server": "server",
    "org.matrix.mjolnir.rule.room": "room",
}
_BAN = {"m.ban", "org.matrix.mjolnir.ban"}


@dataclass(frozen=True)
class Rule:
    kind: str
    entity: str
    reason: str


class BanList:
    """The ``m.ban`` rules of one or more policy lists, compiled for matching."""

    def __init__(self, events: Iterable[Mapping[str, Any]] = ()) -> None:
        self.replace(events)

    def replace(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Use these policy room state events from now on (one assignment per kind)."""
        rules: dict[str, list[Rule]] = {"user": [], "server": [], "room": []}
        for event in events:
            kind = _KINDS.get(str(event.get("type")))
            content = event.get("content")
            if kind is None or not isinstance(content, Mapping):
                continue
            entity = content.get("entity")
            if content.get("recommendation") not in _BAN or not isinstance(entity, str):
                continue
            if not entity:
                continue
            reason = content.get("reason")
            rules[kind].append(Rule(kind, entity, reason if isinstance(reason, str) else ""))
        self._rules = {kind: tuple(found) for kind, found in rules.items()}
        self._globs = {kind: GlobSet(r.entity for r in found) for kind, found in rules.items()}

    def __len__(self) -> int:
        return sum(len(r) for r in self._rules.values())

    def match(self, kind: str, value: str) -> Rule | None:
        """The first ban rule of ``kind`` ("user", "server", "room") matching ``value``."""
        glob = self._globs[kind]
        candidates = [value]
        if kind == "server":
            host = value.rsplit(":", 1)[0] if not value.endswith("]") else value
            if host != value:
                candidates.append(host)
        for candidate in candidates:
            pattern = glob.match(candidate)
            if pattern is not None:
                return next(r for r in self._rules[kind] if r.entity == pattern)
        return None


@dataclass(frozen=True)
class Options:
    bans: BanList
    invite_action: str


def _read(path: str, key: str) -> list[Mapping[str, Any]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf8"))
    except OSError as e:
        raise OptionsError(key, f"cannot read {path!r}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OptionsError(key, f"{path!r} is not JSON: {e}") from None
    if not isinstance(data, list) or not all(isinstance(e, Mapping) for e in data):
        raise OptionsError(key, f"{path!r} must hold a JSON list of state events")
    return data


def validate_options(options: Mapping[str, Any]) -> Options:
    check_known(options, {"files", "invite_action"})
    files = options.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise OptionsError("files", f"must be a list of file paths, got {files!r}")
    events: list[Mapping[str, Any]] = []
    for index, path in enumerate(files):
        events.extend(_read(path, f"files[{index}]"))
    return Options(BanList(events), choice(options, "invite_action", "deny", "deny", "drop"))


def _refusal(bans: BanList, *checks: tuple[str, str, str]) -> str | None:
    for kind, value, what in checks:
        rule = bans.match(kind, value)
        if rule is not None:
            because = f": {rule.reason}" if rule.reason else ""
            return f"{what} {value} is banned by this server's policy list{because}"
    return None


async def on_invite(ctx: InviteContext, options: Options) -> Decision:
    checks = [
        ("server", ctx.origin, "server"),
        ("user", ctx.inviter, "user"),
        ("server", ctx.inviter_server, "server"),
        ("room", ctx.room_id, "room"),
    ]
    checks += [("server", s, "room creator server") for s in ctx.creator_servers]
    problem = _refusal(options.bans, *checks)
    if problem is None:
        return allow()
    return drop(problem) if options.invite_action == "drop" else deny(problem)


async def on_join(ctx: JoinContext, options: Options) -> Decision:
    problem = _refusal(
        options.bans,
        ("server", ctx.origin, "server"),
        ("user", ctx.user, "user"),
        ("server", ctx.user_server, "server"),
        ("room", ctx.room_id, "room"),
    )
    return allow() if problem is None else deny(problem)


async def on_knock(ctx: KnockContext, options: Options) -> Decision:
    problem = _refusal(
        options.bans,
        ("server", ctx.origin, "server"),
        ("user", ctx.user, "user"),
        ("server", ctx.user_server, "server"),
        ("room", ctx.room_id, "room"),
    )
    return allow() if problem is None else deny(problem)
