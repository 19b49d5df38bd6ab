"""The policy API: everything a policy module needs, and nothing else.

A policy is a Python module with one or more hooks, plain ``async def`` functions that look at
a request the gateway has already authenticated and validated, and return a decision::

    from gateway.policy.api import InviteContext, Decision, allow, deny

    async def on_invite(ctx: InviteContext, options: dict) -> Decision:
        if ctx.origin.endswith(".example"):
            return deny("invites from .example are not accepted here")
        return allow()

Hooks (all optional, at least one must exist):

* ``async def on_invite(ctx: InviteContext, options) -> Decision``: v1, v2 and v3 invites.
* ``async def on_join(ctx: JoinContext, options) -> Decision``: make_join and send_join.
* ``async def on_knock(ctx: KnockContext, options) -> Decision``: make_knock and send_knock.
* ``async def on_outbound(ctx: OutboundContext, options) -> Decision``: every federation
  request our homeserver sends (with ``[outbound]`` on): egress rules.
* ``def validate_options(options: Mapping[str, Any]) -> Any``: called once when the policy
  is loaded (start, reload, ``gateway check``) with the ``options`` table of its
  configuration entry. Raise :class:`OptionsError` naming the bad key; whatever it returns is
  passed to the hooks as ``options`` (so parse and compile there, once). Without it the hooks
  get the options table as a plain dict. An option that names a file is relative to the
  configuration file's directory: declare a keyword parameter ``base_dir`` and the gateway
  passes that directory (a :class:`pathlib.Path`), e.g.
  ``def validate_options(options, *, base_dir): path = base_dir / options["file"]``.

Decisions: :func:`allow`, :func:`deny` (an error answered to the peer, 403 ``M_FORBIDDEN``
unless the policy says otherwise) and :func:`drop` (invites only: the peer gets the normal
answer, signed by our server, and the homeserver never sees the invite).

Contexts hold facts the gateway has verified. What it could not verify is marked in the
field's name or by a flag next to it: ``stripped_state_untrusted`` is what the inviting server
sent and may be a lie; ``creator_servers`` is only as good as ``create_event_verified``.

Helpers come through ``ctx.tools``: the time (:meth:`PolicyTools.now_ms`), token buckets
shared by every worker (:meth:`PolicyTools.rate_limit`) and the current state of a room our
homeserver is in (:meth:`PolicyTools.room_state`). Use them instead of the system clock and
module-level state so tests control time and replicas agree.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias

from gateway.matrix.events import STATE_SUBKEY, STATE_SUBKEY_UNSTABLE
from gateway.matrix.identifiers import server_name_of
from gateway.matrix.power_levels import creator_servers
from gateway.matrix.room_versions import RoomVersion, UnknownRoomVersion, get_room_version

__all__ = [
    "Allow",
    "Decision",
    "Deny",
    "Drop",
    "Endpoint",
    "GlobSet",
    "InviteContext",
    "JoinContext",
    "JoinStage",
    "KnockContext",
    "KnockStage",
    "MemoryTools",
    "OptionsError",
    "OutboundContext",
    "OutboundKind",
    "PolicyTools",
    "RateLimitResult",
    "allow",
    "claimed_creator_servers",
    "creator_servers_of",
    "deny",
    "drop",
    "is_ip_literal",
    "server_of",
    "state_subkey",
]

Endpoint = Literal["v1", "v2", "v3"]
JoinStage = Literal["make_join", "send_join"]
KnockStage = Literal["make_knock", "send_knock"]

# --- decisions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Allow:
    """Let the request through (to the next policy in the chain, then to the homeserver)."""

    kind: Literal["allow"] = "allow"


@dataclass(frozen=True, slots=True)
class Deny:
    """Refuse the request: the peer gets ``status`` with a Matrix error ``errcode``/``reason``.

    ``reason`` is shown to the remote server (and usually its user): say what the rule is,
    not how it was found out.
    """

    reason: str
    errcode: str = "M_FORBIDDEN"
    status: int = 403
    #: For rate limits: sent to the peer as ``retry_after_ms``.
    retry_after_ms: int | None = None
    kind: Literal["deny"] = "deny"


@dataclass(frozen=True, slots=True)
class Drop:
    """Invites only: answer the peer as if the invite was accepted, never tell the homeserver.

    ``reason`` is for the audit log and the operator; the peer never sees it.
    """

    reason: str
    kind: Literal["drop"] = "drop"


Decision: TypeAlias = Allow | Deny | Drop

_ALLOW = Allow()


def allow() -> Allow:
    """Let the request through."""
    return _ALLOW


def deny(
    reason: str,
    errcode: str = "M_FORBIDDEN",
    status: int = 403,
    *,
    retry_after_ms: int | None = None,
) -> Deny:
    """Refuse with a Matrix error, e.g. ``deny("no invites from example.org")`` (403
    ``M_FORBIDDEN``) or ``deny("slow down", "M_LIMIT_EXCEEDED", 429, retry_after_ms=500)``."""
    if not 400 <= status <= 599:
        raise ValueError(f"deny status must be an HTTP error status (400-599), got {status}")
    return Deny(reason=reason, errcode=errcode, status=status, retry_after_ms=retry_after_ms)


def drop(reason: str) -> Drop:
    """Silently drop an invite (for invites only; a join or knock hook returning this is
    treated as a failing policy)."""
    return Drop(reason=reason)


# --- options ------------------------------------------------------------------------------


class OptionsError(ValueError):
    """Raised by ``validate_options``: ``key`` is the option's path inside ``options``
    (e.g. ``"per_origin.capacity"``), or None when the table as a whole is wrong."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


# --- tools --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimitResult:
    allowed: bool
    #: Tokens left after this request (fractional: buckets refill continuously).
    remaining: float
    #: When refused: how long until ``cost`` tokens are available again.
    retry_after_ms: int


class PolicyTools(Protocol):
    """Helpers the gateway lends a policy. Bucket names are private to each configured
    policy entry, so two entries of the same module never share buckets."""

    def now_ms(self) -> int:
        """The current time in milliseconds since the epoch."""
        ...

    async def rate_limit(
        self, bucket: str, *, capacity: float, per_second: float, cost: float = 1.0
    ) -> RateLimitResult:
        """Take ``cost`` tokens from the token bucket ``bucket`` (created full, holding at most
        ``capacity`` tokens, refilled at ``per_second``). Atomic across workers and replicas
        when the gateway runs on a shared store."""
        ...

    async def room_state(self, room_id: str) -> list[Mapping[str, Any]]:
        """The current state events of ``room_id`` as our homeserver sees them: full events
        (``type``, ``state_key``, ``sender``, ``content``, ...), one per (type, state_key).

        Raises :class:`LookupError` when the homeserver is not in the room (or the gateway
        cannot read room state); other exceptions mean the homeserver could not be asked.
        Each call may ask the homeserver: cache what you derive from the answer.
        """
        ...


class MemoryTools:
    """Tools that keep buckets in this object, for tests and ``gateway policy test``.

    ``clock`` returns seconds since the epoch (default: the system clock). ``rooms`` maps
    room IDs to their state events, for :meth:`room_state`; tests may change it between
    calls (it is used as given, not copied).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        rooms: dict[str, list[Mapping[str, Any]]] | None = None,
    ) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, int]] = {}
        self.rooms: dict[str, list[Mapping[str, Any]]] = rooms if rooms is not None else {}

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def rate_limit(
        self, bucket: str, *, capacity: float, per_second: float, cost: float = 1.0
    ) -> RateLimitResult:
        now = self.now_ms()
        tokens, updated = self._buckets.get(bucket, (capacity, now))
        result, tokens = take_tokens(
            tokens, updated, now, capacity=capacity, per_second=per_second, cost=cost
        )
        self._buckets[bucket] = (tokens, now)
        return result

    async def room_state(self, room_id: str) -> list[Mapping[str, Any]]:
        events = self.rooms.get(room_id)
        if events is None:
            raise LookupError(f"the homeserver is not in room {room_id}")
        return [dict(event) for event in events]


def take_tokens(
    tokens: float,
    updated_ms: int,
    now_ms: int,
    *,
    capacity: float,
    per_second: float,
    cost: float,
) -> tuple[RateLimitResult, float]:
    """Token bucket arithmetic: refill since ``updated_ms``, then try to take ``cost``.

    Returns the result and the bucket's new token count. Not part of the policy surface;
    shared by the bucket implementations.
    """
    elapsed = max(0, now_ms - updated_ms) / 1000
    tokens = min(capacity, tokens + elapsed * per_second)
    if tokens >= cost:
        tokens -= cost
        return RateLimitResult(True, tokens, 0), tokens
    missing = cost - tokens
    wait_ms = int(missing / per_second * 1000) + 1 if per_second > 0 else 2**31
    return RateLimitResult(False, tokens, wait_ms), tokens


def _default_tools() -> PolicyTools:
    return MemoryTools()


# --- contexts -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class InviteContext:
    """An invite for a user on our homeserver (``PUT /_matrix/federation/v1|v2/invite``, or
    the v3 invite that carries the room's create event).

    Verified: ``origin`` authenticated the request (X-Matrix) and signed ``event``;
    ``event`` is a well-formed ``m.room.member`` invite for ``invitee`` sent by ``inviter``,
    whose server is ``origin``. ``room_version`` is known to the gateway.

    Example::

        async def on_invite(ctx: InviteContext, options: Any) -> Decision:
            if ctx.create_event_verified and "evil.example" in ctx.creator_servers:
                return drop("room created by evil.example")
            return allow()
    """

    #: The invite event as received (``m.room.member``, membership ``invite``).
    event: Mapping[str, Any]
    #: The sender of the invite, a user of ``origin``.
    inviter: str
    #: Our user being invited (the event's ``state_key``).
    invitee: str
    #: The server that sent the request (authenticated).
    origin: str
    room_id: str
    room_version: str
    #: The room's create event, checked against the room ID (v3 invites), else None.
    create_event: Mapping[str, Any] | None
    #: True when ``create_event`` was verified, and so ``creator_servers`` is reliable.
    create_event_verified: bool
    #: Servers of the room's creators: the create event's sender and, from room version 12,
    #: ``content.additional_creators``. Unless ``create_event_verified`` this was derived
    #: from what the inviting server claimed (stripped state, room ID) and may be false.
    #: Even when verified, only the first entry (the sender's server) signed the create
    #: event; the additional creators are named by it, and their servers never vouched for
    #: the room. Allow-lists should look at the first entry only.
    creator_servers: tuple[str, ...]
    #: The stripped state sent with the invite, as sent: UNTRUSTED, the inviting server can
    #: put anything here (room name, join rules, a fake create event). Every key is kept,
    #: a state sub-key too (:func:`state_subkey`).
    stripped_state_untrusted: tuple[Mapping[str, Any], ...] = ()
    #: Which federation invite API carried the request.
    endpoint: Endpoint = "v2"
    #: The gateway's request id, for logs and the audit trail.
    request_id: str = ""
    tools: PolicyTools = field(default_factory=_default_tools, compare=False, repr=False)

    @property
    def inviter_server(self) -> str:
        return server_of(self.inviter)

    @property
    def invitee_server(self) -> str:
        return server_of(self.invitee)


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinContext:
    """A remote user joining a room through our homeserver (``make_join`` first, then
    ``send_join`` with the signed event).

    Verified: ``origin`` authenticated the request and ``user`` belongs to it; ``join_rule``
    and ``is_restricted`` come from the room's current state on our homeserver.
    """

    user: str
    origin: str
    room_id: str
    room_version: str
    #: The room's ``m.room.join_rules`` ``join_rule`` (``public``, ``invite``, ``restricted``,
    #: ``knock``, ``knock_restricted``, ``private``), or None if the room has none.
    join_rule: str | None
    #: True for ``restricted`` and ``knock_restricted`` rooms.
    is_restricted: bool
    stage: JoinStage = "make_join"
    request_id: str = ""
    tools: PolicyTools = field(default_factory=_default_tools, compare=False, repr=False)

    @property
    def user_server(self) -> str:
        return server_of(self.user)


@dataclass(frozen=True, slots=True, kw_only=True)
class KnockContext:
    """A remote user knocking on a room through our homeserver (``make_knock`` /
    ``send_knock``). Verified as for :class:`JoinContext`."""

    user: str
    origin: str
    room_id: str
    room_version: str
    join_rule: str | None
    stage: KnockStage = "make_knock"
    request_id: str = ""
    tools: PolicyTools = field(default_factory=_default_tools, compare=False, repr=False)

    @property
    def user_server(self) -> str:
        return server_of(self.user)


OutboundKind = Literal[
    "send",
    "invite",
    "make_join",
    "send_join",
    "make_knock",
    "send_knock",
    "make_leave",
    "send_leave",
    "query",
    "keys",
    "media",
    "room",
    "user",
    "other",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundContext:
    """A federation request our homeserver is sending to another server (the outbound edge:
    the homeserver's federation traffic leaves through the gateway).

    Verified: the request came from our homeserver (its proxy secret). ``destination`` is the
    server it is addressed to. For invites, ``event`` is the invite our user sent (else None);
    ``room_id`` is the room named in the path, or "" when the request names none (a
    transaction carries events of many rooms).

    Example::

        async def on_outbound(ctx: OutboundContext, options: Any) -> Decision:
            if ctx.destination.endswith(".spam.example"):
                return deny(f"this server does not federate with {ctx.destination}")
            return allow()

    A deny is answered to the homeserver, which reports the failure (to the inviting user,
    for an invite) and retries transactions later with its usual back-off. ``drop`` is not
    possible here.
    """

    destination: str
    #: The endpoint class of the request, from its path.
    kind: OutboundKind
    method: str
    #: The request's path, percent-decoded, without the query.
    path: str
    #: Our server: the request's origin.
    origin: str
    room_id: str = ""
    #: The invite event (``kind == "invite"``), as our homeserver signed it.
    event: Mapping[str, Any] | None = None
    request_id: str = ""
    tools: PolicyTools = field(default_factory=_default_tools, compare=False, repr=False)

    @property
    def sender(self) -> str:
        """The inviting user for an invite, else ""."""
        sender = self.event.get("sender") if self.event is not None else None
        return sender if isinstance(sender, str) else ""


Context: TypeAlias = InviteContext | JoinContext | KnockContext | OutboundContext

InviteHook: TypeAlias = Callable[[InviteContext, Any], Awaitable[Decision]]
JoinHook: TypeAlias = Callable[[JoinContext, Any], Awaitable[Decision]]
KnockHook: TypeAlias = Callable[[KnockContext, Any], Awaitable[Decision]]
OutboundHook: TypeAlias = Callable[[OutboundContext, Any], Awaitable[Decision]]

# --- small helpers ------------------------------------------------------------------------


def server_of(user_or_room_id: str) -> str:
    """The server name of ``@user:server`` (or ``!room:server``, ``#alias:server``).

    >>> server_of("@alice:example.org:8448")
    'example.org:8448'

    "" when it is not such an identifier, or names no server (v12 room IDs).
    """
    return server_name_of(user_or_room_id) or ""


def state_subkey(event: Mapping[str, Any]) -> str:
    """A state event's sub-key (MSC3760: ``state_subkey``, unstable
    ``org.matrix.mscxxxx.state_subkey``), or "" when it has none, as the MSC says a missing
    one means. Stripped state passes it on as sent.

    No room version gives sub-keys a meaning yet: in today's rooms two events that differ
    only in their sub-key are the same piece of state, so the later replaces the earlier.
    """
    for key in (STATE_SUBKEY, STATE_SUBKEY_UNSTABLE):
        value = event.get(key)
        if isinstance(value, str):
            return value
    return ""


def is_ip_literal(server_name: str) -> bool:
    """True for ``1.2.3.4``, ``1.2.3.4:8448``, ``[::1]`` and ``[::1]:8448``."""
    host = server_name
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    else:
        host = host.rpartition(":")[0] if host.count(":") == 1 else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def creator_servers_of(create_event: Mapping[str, Any], room_version: str) -> tuple[str, ...]:
    """The servers of a room's creators according to its create event.

    The sender's server, and from room version 12 the servers of
    ``content.additional_creators`` (entries that are not user IDs are ignored). Order is
    preserved, duplicates removed.
    """
    try:
        version: RoomVersion | None = get_room_version(room_version)
    except UnknownRoomVersion:
        version = None
    return creator_servers(create_event, version)


def claimed_creator_servers(
    stripped_state: Iterable[Mapping[str, Any]], room_id: str, room_version: str
) -> tuple[str, ...]:
    """Creator servers as an invite without a verified create event claims them (for
    ``InviteContext.creator_servers`` of v1/v2 invites, with ``create_event_verified=False``).

    From the ``m.room.create`` event in the stripped state if there is one, else the server
    name of a ``!opaque:server`` room ID (rooms before v12 are named by their creator's
    server). Untrusted either way: the inviting server wrote both.
    """
    for event in stripped_state:
        if event.get("type") == "m.room.create" and event.get("state_key") == "":
            servers = creator_servers_of(event, room_version)
            if servers:
                return servers
    server = server_of(room_id) if room_id.startswith("!") else ""
    return (server,) if server else ()


class GlobSet:
    """Matrix-style globs (``*`` any run of characters, ``?`` exactly one), as used by
    moderation policy lists and server ACLs.

    Case-sensitive by default, like user and room IDs. With ``ignore_case=True`` ASCII
    letters match either case, which is how server names must be matched: the spec makes
    server ACL globs case-insensitive, and DNS resolves ``EVIL.example`` to the same host as
    ``evil.example``, so a deny rule must not be dodged by changing case. (Server names as
    identifiers are still compared exactly: ``@u:EVIL.example`` is not ``@u:evil.example``.)

    >>> GlobSet(["*.evil.example", "spam?.org"]).match("a.evil.example")
    '*.evil.example'
    >>> GlobSet(["evil.example"], ignore_case=True).match("EVIL.Example")
    'evil.example'
    """

    __slots__ = ("_exact", "_fold", "_patterns", "_regex")

    def __init__(self, patterns: Iterable[str], *, ignore_case: bool = False) -> None:
        self._patterns: tuple[str, ...] = tuple(patterns)
        self._fold = ignore_case
        self._exact: dict[str, str] = {}
        for p in self._patterns:
            if "*" not in p and "?" not in p:
                self._exact.setdefault(_ascii_lower(p) if ignore_case else p, p)
        wild = [p for p in self._patterns if "*" in p or "?" in p]
        self._regex = (
            re.compile("|".join(f"(?:{_glob_to_regex(p)})" for p in wild), self._flags())
            if wild
            else None
        )

    def _flags(self) -> re.RegexFlag:
        # re.ASCII with IGNORECASE folds only A-Z/a-z: what DNS means by case (RFC 4343),
        # and no Unicode look-alike (the Kelvin sign, say) folds into an ASCII letter.
        return re.DOTALL | (re.IGNORECASE | re.ASCII if self._fold else re.NOFLAG)

    @property
    def patterns(self) -> Sequence[str]:
        return self._patterns

    @property
    def ignore_case(self) -> bool:
        return self._fold

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def match(self, text: str) -> str | None:
        """The first pattern that matches all of ``text``, or None."""
        exact = self._exact.get(_ascii_lower(text) if self._fold else text)
        if exact is not None:
            return exact
        if self._regex is None or self._regex.fullmatch(text) is None:
            return None
        flags = self._flags()
        for pattern in self._patterns:
            if re.fullmatch(_glob_to_regex(pattern), text, flags):
                return pattern
        return None  # pragma: no cover - the combined expression matched one of them


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ascii_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


def _glob_to_regex(pattern: str) -> str:
    return "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
