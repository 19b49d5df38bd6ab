"""Moderation policy lists: ``m.policy.rule.user``, ``.server`` and ``.room`` with the
``m.ban`` recommendation, entities as globs.

Options::

    [[policies]]
    module = "policies.policy_lists"
    options.files = ["/etc/gateway/banlist.json"]   # each a JSON list of policy rule events
    options.policy_rooms = ["!banlist:example.org"] # policy rooms to follow (optional)
    options.refresh_seconds = 60                    # how often to re-read them (default 60)
    options.invite_action = "drop"                  # or "deny" (default)
    options.outbound = true                         # refuse to send to banned servers

A file holds the state events of a policy room, as a client's ``/state`` returns them (a list
of ``{"type": ..., "state_key": ..., "content": {"entity": ..., "recommendation": "m.ban",
"reason": ...}}``). Relative paths are relative to the configuration file's directory (or the
entry's ``base_dir``). Files are read when the policy loads: edit them, then reload the
gateway (SIGHUP).

A policy room is followed live: its current state is read through our homeserver
(``ctx.tools.room_state``), so the homeserver must be in the room (a local user joined, e.g.
the moderation bot or an admin). The rules in force are those of the files plus those of the
rooms. A decision re-reads the rooms when the last read is ``refresh_seconds`` old; a change
in a room therefore applies within ``refresh_seconds`` (plus a couple of seconds the
homeserver reader caches the room's newest event). If a re-read fails, the rules of the last
good read stay in force and the failure is logged. Until a room has been read once, decisions
fail, and the entry's ``on_error`` applies (``closed`` by default: refused). A read happens
inside a decision and counts against the entry's ``timeout`` (2 s by default): raise it for a
large room.

How bans apply (following the spec's suggestions for ``m.ban``):

* a **user** rule refuses invites sent by that user, and joins and knocks by that user;
* a **server** rule refuses requests from that origin, invites sent by its users, invites into
  rooms created on it, and joins and knocks by its users;
* a **room** rule refuses invites to, joins of and knocks on that room ID.

With ``outbound = true`` (and the outbound edge, ``[outbound]``, on) a **server** rule also
refuses every federation request our homeserver would send to that server, and a **room**
rule our invites and joins for that room; without it outbound traffic is not looked at.

Server entities are matched against the server name with and without its port, ignoring the
case of ASCII letters (as server ACLs are); user and room entities are case-sensitive, as
user and room IDs are (``@Spam:example.org`` is another user than ``@spam:example.org``).
Legacy event types (``m.room.rule.*``, ``org.matrix.mjolnir.rule.*``) and the
``org.matrix.mjolnir.ban`` recommendation are accepted too. Rules with empty content
(removed rules) are ignored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.policy.api import (
    Decision,
    GlobSet,
    InviteContext,
    JoinContext,
    KnockContext,
    OptionsError,
    OutboundContext,
    PolicyTools,
    allow,
    deny,
    drop,
)

from ._options import boolean, check_known, choice, positive_number

_log = logging.getLogger(__name__)

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
        # Server entities ignore case, like server ACLs (DNS does not tell EVIL.example from
        # evil.example); user and room IDs are case-sensitive identifiers.
        self._globs = {
            kind: GlobSet((r.entity for r in found), ignore_case=kind == "server")
            for kind, found in rules.items()
        }

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


class PolicyRoomError(LookupError):
    """A followed policy room has not been read successfully yet: no rules to decide with."""


@dataclass
class RoomFollower:
    """The rules of followed policy rooms, re-read through ``tools.room_state`` at most every
    ``refresh_ms``. One per configured policy entry (a reload starts afresh)."""

    rooms: tuple[str, ...]
    refresh_ms: int
    file_events: tuple[Mapping[str, Any], ...] = ()
    #: The last good read of each room.
    _events: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)
    _errors: dict[str, str] = field(default_factory=dict)
    _read_at_ms: int | None = None
    _reading: bool = False
    _bans: BanList = field(default_factory=BanList)

    async def bans(self, tools: PolicyTools) -> BanList:
        now = tools.now_ms()
        due = self._read_at_ms is None or now - self._read_at_ms >= self.refresh_ms
        if due and not self._reading:
            self._read_at_ms = now
            self._reading = True
            try:
                await self._read_rooms(tools, self.rooms)
            finally:
                self._reading = False
        else:
            # Rooms never read yet (a burst of requests while the first read runs, or a room
            # the homeserver was not in): each request tries itself rather than failing for a
            # whole refresh interval.
            missing = tuple(r for r in self.rooms if r not in self._events)
            if missing:
                await self._read_rooms(tools, missing)
        missing = tuple(r for r in self.rooms if r not in self._events)
        if missing:
            raise PolicyRoomError(
                "policy room(s) not read yet, no rules to decide with: "
                + "; ".join(f"{r}: {self._errors.get(r, 'read in progress')}" for r in missing)
            )
        return self._bans

    async def _read_rooms(self, tools: PolicyTools, rooms: Iterable[str]) -> None:
        for room_id in rooms:
            try:
                events = await tools.room_state(room_id)
            except Exception as e:
                # Not only LookupError: an unreachable or slow homeserver must not take away
                # the rules already known.
                self._errors[room_id] = f"{type(e).__name__}: {e}"
                _log.warning(
                    "policy room not read (%s): %s; %s",
                    room_id,
                    self._errors[room_id],
                    "the rules of its last good read stay in force"
                    if room_id in self._events
                    else "it was never read, decisions fail until it is",
                )
                continue
            self._errors.pop(room_id, None)
            self._events[room_id] = [e for e in events if str(e.get("type")) in _KINDS]
            # Rebuilt after each room, so a read cut short (the hook's time limit) keeps
            # what it did read.
            followed = [e for room in self.rooms for e in self._events.get(room, ())]
            self._bans = BanList([*self.file_events, *followed])


@dataclass(frozen=True)
class Options:
    #: The rules of the files.
    bans: BanList
    invite_action: str
    follower: RoomFollower | None = None
    #: apply server bans to our homeserver's outbound requests too
    outbound: bool = False

    async def current_bans(self, tools: PolicyTools) -> BanList:
        """The rules in force now: the files', plus the followed rooms' when there are any."""
        if self.follower is None:
            return self.bans
        return await self.follower.bans(tools)


def _read(file: Path, key: str) -> list[Mapping[str, Any]]:
    path = str(file)
    try:
        data = json.loads(file.read_text(encoding="utf8"))
    except OSError as e:
        raise OptionsError(key, f"cannot read {path!r}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OptionsError(key, f"{path!r} is not JSON: {e}") from None
    if not isinstance(data, list) or not all(isinstance(e, Mapping) for e in data):
        raise OptionsError(key, f"{path!r} must hold a JSON list of state events")
    return data


def _policy_rooms(options: Mapping[str, Any]) -> tuple[str, ...]:
    rooms = options.get("policy_rooms", [])
    if not isinstance(rooms, list):
        raise OptionsError("policy_rooms", f"must be a list of room IDs, got {rooms!r}")
    for index, room in enumerate(rooms):
        # "!opaque:server", or "!hash" without a server name from room version 12.
        if (
            not isinstance(room, str)
            or not room.startswith("!")
            or len(room) < 2
            or any(ch.isspace() for ch in room)
        ):
            raise OptionsError(
                f"policy_rooms[{index}]", f"must be a room ID like '!abc:example.org', got {room!r}"
            )
    return tuple(dict.fromkeys(rooms))


def validate_options(options: Mapping[str, Any], *, base_dir: Path | None = None) -> Options:
    """``base_dir``: what relative ``files`` are relative to (the gateway passes the
    configuration file's directory; None, for a direct call, means the working directory)."""
    check_known(options, {"files", "invite_action", "outbound", "policy_rooms", "refresh_seconds"})
    files = options.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise OptionsError("files", f"must be a list of file paths, got {files!r}")
    directory = base_dir if base_dir is not None else Path.cwd()
    events: list[Mapping[str, Any]] = []
    for index, path in enumerate(files):
        events.extend(_read(directory / Path(path).expanduser(), f"files[{index}]"))
    rooms = _policy_rooms(options)
    refresh_seconds = 60.0
    if "refresh_seconds" in options:
        if not rooms:
            raise OptionsError("refresh_seconds", "only means something with policy_rooms")
        refresh_seconds = positive_number(options, "refresh_seconds")
    follower = (
        RoomFollower(rooms, max(1, round(refresh_seconds * 1000)), tuple(events)) if rooms else None
    )
    return Options(
        BanList(events),
        choice(options, "invite_action", "deny", "deny", "drop"),
        follower,
        boolean(options, "outbound", False),
    )


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
    problem = _refusal(await options.current_bans(ctx.tools), *checks)
    if problem is None:
        return allow()
    return drop(problem) if options.invite_action == "drop" else deny(problem)


async def on_join(ctx: JoinContext, options: Options) -> Decision:
    problem = _refusal(
        await options.current_bans(ctx.tools),
        ("server", ctx.origin, "server"),
        ("user", ctx.user, "user"),
        ("server", ctx.user_server, "server"),
        ("room", ctx.room_id, "room"),
    )
    return allow() if problem is None else deny(problem)


async def on_knock(ctx: KnockContext, options: Options) -> Decision:
    problem = _refusal(
        await options.current_bans(ctx.tools),
        ("server", ctx.origin, "server"),
        ("user", ctx.user, "user"),
        ("server", ctx.user_server, "server"),
        ("room", ctx.room_id, "room"),
    )
    return allow() if problem is None else deny(problem)


async def on_outbound(ctx: OutboundContext, options: Options) -> Decision:
    if not options.outbound:
        return allow()
    checks = [("server", ctx.destination, "server")]
    if ctx.room_id:
        checks.append(("room", ctx.room_id, "room"))
    problem = _refusal(await options.current_bans(ctx.tools), *checks)
    return allow() if problem is None else deny(problem)
