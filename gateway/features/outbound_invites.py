"""Our invites go out as v3 invites ("inviting with authorization") where the destination
has the endpoint, so a receiving server can verify who created the room.

Synapse sends ``PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`` with ``room_version``,
``event`` and ``invite_room_state``. For a room of version 3 or later (events whose IDs are
hashes, which the v3 endpoint computes itself) the gateway:

1. Looks up what it remembers of the destination (the store, shared by every worker and
   replica, for ``outbound.invite_version_memory`` seconds). A destination known to lack
   the v3 endpoint gets Synapse's request unchanged.
2. Reads the room's ``m.room.create`` event from the homeserver's own federation API, signed
   as the homeserver. From room version 12 the create event's ID is the room ID's hash;
   before, it is one of the invite's ``auth_events``.
3. Builds the v3 request: ``event`` as Synapse signed it, ``invite_room_state`` without its
   stripped create event, and ``state`` holding the create event as a full PDU. It is
   signed (X-Matrix) as our server with the homeserver's key, which the gateway holds, and
   sent to ``/_matrix/federation/v3/invite/{roomId}`` (or the unstable prefix).
4. A destination that answers 404 or 405, or with ``M_UNRECOGNIZED``, does not have the
   endpoint: that is remembered and Synapse's original v2 request goes out unchanged.
   Any other answer shows the endpoint exists (remembered as well) and is the answer.
5. The v3 answer has the v2 answer's shape (``{"event": ...}`` with the invitee's server's
   signature added), so it goes back to Synapse as it came.

Room versions 1 and 2, unknown room versions, and an invite whose create event cannot be
read all go out as v2, unchanged.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import quote

from nacl.signing import SigningKey

from gateway.errors import MatrixError
from gateway.features.outbound_requests import OutboundRequest, destination_error
from gateway.federation.errors import FederationError
from gateway.http import Response
from gateway.matrix.room_versions import ROOM_VERSIONS, EventIdFormat, RoomVersion
from gateway.matrix.xmatrix import sign_request
from gateway.services import Services, now_ms

__all__ = [
    "InviteAnswer",
    "invite_event_of",
    "is_missing_endpoint",
    "known_class",
    "send_invite",
    "v3_invite_body",
]

STABLE_PREFIX = "/_matrix/federation/v3/invite/"
UNSTABLE_PREFIX = "/_matrix/federation/unstable/org.matrix.msc0000/invite/"
_MEMORY = "outbound.invite_endpoint"
#: A create event is among the first few auth events; never read more than this many.
_MAX_AUTH_EVENTS = 10

Remembered = Literal["v3", "v2"]


@dataclass(frozen=True)
class InviteAnswer:
    """The destination's answer to a v3 invite, for the homeserver."""

    response: Response
    destination_class: str


def invite_event_of(body: bytes) -> dict[str, Any] | None:
    """The invite event of a v2 invite body, if the body is well formed."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    event = parsed.get("event") if isinstance(parsed, dict) else None
    return event if isinstance(event, dict) else None


def is_missing_endpoint(status: int, body: bytes) -> bool:
    """Whether an answer shows the destination does not have the endpoint at all."""
    if status in (404, 405):
        return True
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(parsed, dict) and parsed.get("errcode") == "M_UNRECOGNIZED"


def v3_invite_body(
    event: dict[str, Any], invite_room_state: list[Any], create_event: dict[str, Any]
) -> dict[str, Any]:
    """The v3 request body for a v2 invite's parts and the room's create event."""
    stripped = [
        e
        for e in invite_room_state
        if isinstance(e, dict)
        and not (e.get("type") == "m.room.create" and e.get("state_key") == "")
    ]
    return {"event": event, "invite_room_state": stripped, "state": [create_event]}


async def remembered(services: Services, destination: str) -> Remembered | None:
    store = services.store
    if store is None:
        return None
    value = await store.kv_get(_MEMORY, destination, now_ts=now_ms())
    known: Remembered | None = value if value in ("v3", "v2") else None  # type: ignore[assignment]
    _LABELS.put(destination, known or "remote")
    return known


async def remember(services: Services, destination: str, endpoint: Remembered) -> None:
    _LABELS.put(destination, endpoint)
    store = services.store
    if store is None:
        return
    memory_ms = int(services.config.outbound.invite_version_memory * 1000)
    await store.kv_set(_MEMORY, destination, endpoint, expires_ts=now_ms() + memory_ms)


class _LabelCache:
    """What this worker last learnt of each destination, for metric labels only: a
    transaction must not wait for the store to be labelled."""

    def __init__(self, size: int = 4096, ttl_s: float = 300.0) -> None:
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._size = size
        self._ttl = ttl_s

    def get(self, destination: str) -> str | None:
        entry = self._entries.get(destination)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, destination: str, label: str) -> None:
        self._entries[destination] = (time.monotonic() + self._ttl, label)
        self._entries.move_to_end(destination)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


_LABELS = _LabelCache()


def known_class(destination: str) -> str:
    """``v3``/``v2`` for a destination whose invite endpoint this worker knows, else
    ``remote``."""
    return _LABELS.get(destination) or "remote"


def _create_event_id(event: dict[str, Any], room_id: str, version: RoomVersion) -> list[str]:
    """Candidate IDs of the room's create event."""
    if version.room_id_from_create_event:
        return ["$" + room_id[1:]] if room_id.startswith("!") else []
    auth = event.get("auth_events")
    if not isinstance(auth, list):
        return []
    return [a for a in auth[:_MAX_AUTH_EVENTS] if isinstance(a, str)]


async def _read_create_event(
    services: Services, event: dict[str, Any], room_id: str, version: RoomVersion
) -> dict[str, Any] | None:
    reader = services.room_state
    if reader is None:
        return None
    for event_id in _create_event_id(event, room_id, version):
        found = await reader.event(event_id)
        if (
            found is not None
            and found.get("type") == "m.room.create"
            and found.get("state_key") == ""
        ):
            return dict(found)
    return None


async def send_invite(services: Services, request: OutboundRequest) -> InviteAnswer | None:
    """Send our v2 invite as a v3 invite; None when it must go out as v2, unchanged."""
    config = services.config.outbound
    destination = request.target.destination
    metrics = services.metrics
    parts = request.target.raw_path.split("/")
    # ['', '_matrix', 'federation', 'v2', 'invite', room, event]
    if config.invite_version == "v2" or parts[3:5] != ["v2", "invite"] or len(parts) != 7:
        metrics.outbound_invites.labels(parts[3] if len(parts) > 3 else "v2").inc()
        return None
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        body = None
    event = body.get("event") if isinstance(body, dict) else None
    declared = body.get("room_version") if isinstance(body, dict) else None
    version = ROOM_VERSIONS.get(declared) if isinstance(declared, str) else None
    room_state = body.get("invite_room_state", []) if isinstance(body, dict) else []
    if (
        not isinstance(event, dict)
        or version is None
        or version.event_id_format is EventIdFormat.DOMAIN
        or not isinstance(room_state, list)
        or await remembered(services, destination) == "v2"
    ):
        metrics.outbound_invites.labels("v2").inc()
        return None
    room_id = request.room_id or str(event.get("room_id", ""))
    try:
        create = await _read_create_event(services, event, room_id, version)
    except MatrixError as e:
        request.log.warning("outbound.invite.create_unreadable", error=e.message)
        create = None
    if create is None:
        request.log.info("outbound.invite.v2", reason="the room's create event is unavailable")
        metrics.outbound_invites.labels("v2").inc()
        return None

    prefix = UNSTABLE_PREFIX if config.invite_version == "unstable" else STABLE_PREFIX
    target = prefix + quote(room_id, safe="")
    content = v3_invite_body(event, room_state, create)
    our_server = services.config.server.server_name
    key = services.homeserver_signing_key
    assert key is not None  # _read_create_event needs it too
    authorization = sign_request(
        "PUT", target, our_server, destination, content, cast(SigningKey, key)
    )
    federation = services.federation
    assert federation is not None
    try:
        answer = await federation.request(
            "PUT",
            destination,
            target,
            content=json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode(),
            headers={
                "Authorization": authorization,
                "Content-Type": "application/json",
                "Accept-Encoding": "identity",
            },
            sign=False,
            time_limit=config.request_timeout,
        )
    except FederationError as e:
        # The v3 attempt could not be made at all: the v2 request would fare no better.
        raise destination_error(destination, e) from None
    if is_missing_endpoint(answer.status, answer.body):
        await remember(services, destination, "v2")
        metrics.outbound_invite_fallbacks.inc()
        metrics.outbound_invites.labels("v2").inc()
        request.log.info("outbound.invite.fallback", status=answer.status)
        return None
    await remember(services, destination, "v3")
    label = "unstable" if config.invite_version == "unstable" else "v3"
    metrics.outbound_invites.labels(label).inc()
    request.log.info(
        "outbound.invite.v3",
        room_id=room_id,
        room_version=version.identifier,
        status=answer.status,
        endpoint=label,
    )
    content_type = answer.headers.get("content-type", "application/json")
    return InviteAnswer(
        Response(answer.status, answer.body, [(b"content-type", content_type.encode("latin-1"))]),
        "v3",
    )
