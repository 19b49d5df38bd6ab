"""Invites: the v3 endpoint ("inviting with authorization") translated to the v2 invite.

A remote server sends ``PUT /_matrix/federation/v3/invite/{roomId}`` (or the unstable
``/_matrix/federation/unstable/org.matrix.msc0000/invite/{roomId}``) with ``event``,
``invite_room_state`` and ``state``, where ``state`` holds full PDUs and at least the
room's ``m.room.create``. The homeserver only speaks v2, so the gateway checks what the
proposal asks of the receiving server, then hands the homeserver a v2 invite signed as the
origin with a delegation key its notary vouches for (DESIGN.md, trust model).

What the receiving server must check, in the order done here:

1. The request is signed by the origin (X-Matrix) and addressed to us.
2. ``state`` holds exactly one ``m.room.create``, with ``state_key`` "".
3. The room version comes from that create event (none means "1"); versions whose events
   carry their own IDs (1 and 2) are refused: the v3 endpoint computes the event ID.
4. The create event belongs to the room of the path: its ``room_id`` (v3 to v11) or the
   room ID computed from its reference hash (v12 and later).
5. The create event is correctly hashed and signed by its sender's server.
6. The invite is an ``m.room.member`` invite in that room, for one of our users, sent by a
   user of the origin, correctly hashed and signed by the origin.
7. Other events in ``state`` are kept only when they are valid PDUs of the room whose
   ``auth_events`` are all among what was verified; the rest is ignored.

``invite_room_state`` is never trusted: its ``m.room.create`` is replaced by the verified
one, and state events verified from ``state`` replace their stripped versions.

v1 and v2 invites keep passing through unchanged once their JSON has the shape of an invite;
they are counted (v1 is deprecated).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote

import trio
from nacl.signing import SigningKey

from gateway.errors import Codes, MatrixError
from gateway.features.origins import authenticate_origin
from gateway.federation.pdu_check import PduProblem, PduRejected, check_pdu
from gateway.http import Request, Response, Router
from gateway.matrix.events import compute_event_id, compute_room_id
from gateway.matrix.identifiers import InvalidIdentifier, parse_user_id
from gateway.matrix.room_versions import (
    ROOM_VERSIONS,
    EventIdFormat,
    RoomVersion,
)
from gateway.matrix.signing import sign_event
from gateway.matrix.xmatrix import sign_request
from gateway.policy.api import InviteContext, claimed_creator_servers, creator_servers_of
from gateway.services import Services, now_ms

V3_INVITE = "/_matrix/federation/v3/invite/{roomId}"
UNSTABLE_INVITE = "/_matrix/federation/unstable/org.matrix.msc0000/invite/{roomId}"
V2_INVITE = "/_matrix/federation/v2/invite/{roomId}/{eventId}"
V1_INVITE = "/_matrix/federation/v1/invite/{roomId}/{eventId}"


def _invalid(message: str) -> MatrixError:
    return MatrixError(400, Codes.INVALID_PARAM, message)


def _bad_json(message: str) -> MatrixError:
    return MatrixError(400, Codes.BAD_JSON, message)


@dataclass
class ValidatedInvite:
    """A v3 invite that passed every check, ready to be translated."""

    origin: str
    room_id: str
    room_version: RoomVersion
    event: dict[str, Any]
    event_id: str
    create_event: dict[str, Any]
    #: state events from ``state`` whose auth chain was verified from what was sent
    verified_state: list[dict[str, Any]] = field(default_factory=list)
    invite_room_state: list[dict[str, Any]] = field(default_factory=list)
    #: ``invite_room_state`` exactly as sent (untrusted; for policies to look at)
    sent_room_state: list[dict[str, Any]] = field(default_factory=list)

    @property
    def creator_servers(self) -> tuple[str, ...]:
        """Servers of the room's creators, from the verified create event."""
        return creator_servers_of(self.create_event, self.room_version.identifier)


async def _check_pdu(
    services: Services, event: dict[str, Any], version: RoomVersion, what: str
) -> None:
    """Hashes and signatures of a received PDU (:mod:`gateway.federation.pdu_check`);
    non-canonical JSON is 400 M_BAD_JSON, any other failure 400 M_INVALID_PARAM."""
    try:
        await check_pdu(event, version, services.require_keyring(), now_ms=now_ms())
    except PduRejected as e:
        if e.problem is PduProblem.NOT_CANONICAL:
            raise _bad_json(
                f"the {what} is not canonical JSON, as room version "
                f"{version.identifier} requires: {e.detail}"
            ) from None
        if e.problem is PduProblem.CONTENT_HASH:
            raise _invalid(f"the {what} fails its content hash check") from None
        if e.problem is PduProblem.UNKNOWN_SIGNERS:
            raise _invalid(f"cannot tell who must sign the event: {e.detail}") from None
        raise _invalid(f"the {what} fails its signature check: {e.detail}") from None


def _find_create_event(state: list[Any]) -> dict[str, Any]:
    creates = [e for e in state if isinstance(e, dict) and e.get("type") == "m.room.create"]
    if not creates:
        raise _invalid("state must contain the room's m.room.create event")
    if len(creates) > 1:
        raise _invalid(
            f"state must contain exactly one m.room.create event, it contains {len(creates)}"
        )
    create = creates[0]
    if create.get("state_key") != "":
        raise _invalid('the m.room.create event in state must have an empty state_key ("")')
    return create


def _room_version_of(create: dict[str, Any]) -> RoomVersion:
    content = create.get("content")
    if not isinstance(content, dict):
        raise _invalid("the m.room.create event has no content")
    version_id = content.get("room_version", "1")
    if not isinstance(version_id, str):
        raise _invalid("the m.room.create event's room_version must be a string")
    version = ROOM_VERSIONS.get(version_id)
    if version is None:
        raise MatrixError(
            400,
            Codes.INCOMPATIBLE_ROOM_VERSION,
            f"room version {version_id!r} is not supported here",
            # Room version identifiers are at most 32 code points (spec, "Room Versions").
            extra={"room_version": version_id} if len(version_id) <= 32 else {},
        )
    if version.event_id_format is EventIdFormat.DOMAIN:
        raise MatrixError(
            400,
            Codes.INCOMPATIBLE_ROOM_VERSION,
            f"the v3 invite endpoint needs room version 3 or later (the event ID is computed "
            f"from the event); room version {version_id} invites use the v2 endpoint",
            extra={"room_version": version_id},
        )
    return version


def _create_room_id(create: dict[str, Any], version: RoomVersion) -> str:
    if version.room_id_from_create_event:
        try:
            return compute_room_id(create, version)
        except ValueError as e:
            raise _invalid(
                f"cannot compute the room ID from the m.room.create event: {e}"
            ) from None
    room_id = create.get("room_id")
    if not isinstance(room_id, str):
        raise _invalid("the m.room.create event has no room_id")
    return room_id


def _user_server(user_id: Any, what: str) -> str:
    if not isinstance(user_id, str):
        raise _invalid(f"the invite's {what} must be a user ID")
    try:
        return parse_user_id(user_id).server_name
    except InvalidIdentifier as e:
        raise _invalid(f"the invite's {what} is not a valid user ID: {e}") from None


def _check_invite_event(
    event: dict[str, Any], *, room_id: str, origin: str, our_server: str
) -> None:
    if event.get("type") != "m.room.member":
        raise _invalid("the invite event must be of type m.room.member")
    content = event.get("content")
    if not isinstance(content, dict) or content.get("membership") != "invite":
        raise _invalid("the invite event's membership must be 'invite'")
    if event.get("room_id") != room_id:
        raise _invalid("the invite event is for another room than the request path names")
    if _user_server(event.get("sender"), "sender") != origin:
        raise _invalid(
            f"the invite's sender {event.get('sender')!r} is not a user of the origin server "
            f"{origin!r}"
        )
    if _user_server(event.get("state_key"), "state_key (invitee)") != our_server:
        raise _invalid(
            f"the invitee {event.get('state_key')!r} is not a user of this server ({our_server})"
        )


#: More entries in ``state`` than this are ignored: an invite needs a handful of events, and
#: each one costs hashing, signature checks and possibly key fetches.
MAX_STATE_EVENTS = 100
#: The auth rules never give an event more than this many auth events.
MAX_AUTH_EVENTS = 10


def _usable_auth_events(
    event: dict[str, Any], create_id: str, version: RoomVersion
) -> set[str] | None:
    """The auth event IDs an event waits for, or None if its list breaks the room's rules."""
    auth = event.get("auth_events")
    if not isinstance(auth, list) or not all(isinstance(a, str) for a in auth):
        return None
    if len(auth) > MAX_AUTH_EVENTS:
        return None
    if version.room_id_from_create_event:
        # v12: the create event is implied and must not be listed.
        return None if create_id in auth else set(auth)
    # Before v12 every event but the create event cites it among its auth events.
    return set(auth) - {create_id} if create_id in auth else None


async def _verified_state(
    services: Services,
    state: list[Any],
    create: dict[str, Any],
    create_id: str,
    room_id: str,
    version: RoomVersion,
) -> list[dict[str, Any]]:
    """Events of ``state`` whose whole auth chain is among what was sent and verified.

    One pass in dependency order: an event is checked once all its auth events have been
    verified, and never if one of them is missing or fails.
    """
    candidates: dict[str, dict[str, Any]] = {}
    waiting_for: dict[str, set[str]] = {}
    waiters: dict[str, list[str]] = {}
    ready: list[str] = []
    for event in state[: MAX_STATE_EVENTS + 1]:
        if event is create or not isinstance(event, dict):
            continue
        if event.get("room_id") != room_id or not isinstance(event.get("state_key"), str):
            continue
        if not isinstance(event.get("type"), str):
            continue
        try:
            event_id = compute_event_id(event, version)
        except ValueError:
            continue
        needed = _usable_auth_events(event, create_id, version)
        if needed is None or event_id in candidates:
            continue
        candidates[event_id] = event
        if needed:
            waiting_for[event_id] = needed
            for auth_id in needed:
                waiters.setdefault(auth_id, []).append(event_id)
        else:
            ready.append(event_id)
    verified: list[dict[str, Any]] = []
    while ready:
        event_id = ready.pop()
        event = candidates[event_id]
        try:
            await _check_pdu(services, event, version, "state event")
        except MatrixError:
            continue
        verified.append(event)
        for waiter in waiters.pop(event_id, []):
            remaining = waiting_for[waiter]
            remaining.discard(event_id)
            if not remaining:
                ready.append(waiter)
    return verified


async def validate_v3_invite(request: Request[Services]) -> ValidatedInvite:
    """Every check the proposal asks of the receiving server; raises a Matrix error."""
    services = request.services
    our_server = services.config.server.server_name
    path_room_id = request.path_params["roomId"]
    body = await request.json()
    auth = await authenticate_origin(request, body, keys=services.require_keyring())
    origin = auth.origin
    if not isinstance(body, dict):
        raise _bad_json("the request body must be a JSON object")
    event = body.get("event")
    if not isinstance(event, dict):
        raise _bad_json("event must be an object (the invite PDU)")
    state = body.get("state", [])
    if not isinstance(state, list):
        raise _bad_json("state must be a list of PDUs")
    sent_room_state = body.get("invite_room_state", [])
    if not isinstance(sent_room_state, list):
        raise _bad_json("invite_room_state must be a list")

    create = _find_create_event(state)
    version = _room_version_of(create)
    create_room_id = _create_room_id(create, version)
    if create_room_id != path_room_id:
        if version.room_id_from_create_event:
            raise _invalid(
                f"the room ID {path_room_id!r} does not match the m.room.create event's hash "
                f"({create_room_id!r})"
            )
        raise _invalid(f"the m.room.create event in state is for another room ({create_room_id!r})")
    _check_invite_event(event, room_id=path_room_id, origin=origin, our_server=our_server)
    await _check_pdu(services, create, version, "m.room.create event")
    await _check_pdu(services, event, version, "invite event")
    event_id = compute_event_id(event, version)
    create_id = compute_event_id(create, version)
    verified_state = await _verified_state(
        services, state, create, create_id, path_room_id, version
    )

    replaced = {("m.room.create", "")} | {(e["type"], e["state_key"]) for e in verified_state}
    room_state = [create, *verified_state]
    if not version.room_id_from_create_event:
        # Up to v11 stripped entries may still be passed on (the homeserver shows them to the
        # invitee); from v12 every entry must be a verified PDU of the room (MSC4311), so
        # the unverified ones are left out.
        room_state += [
            e
            for e in sent_room_state
            if isinstance(e, dict)
            and isinstance(e.get("type"), str)
            and isinstance(e.get("state_key"), str)
            and (e["type"], e["state_key"]) not in replaced
        ]
    return ValidatedInvite(
        origin=origin,
        room_id=path_room_id,
        room_version=version,
        event=event,
        event_id=event_id,
        create_event=create,
        verified_state=verified_state,
        invite_room_state=room_state,
        sent_room_state=[e for e in sent_room_state if isinstance(e, dict)],
    )


async def deliver_as_v2(request: Request[Services], invite: ValidatedInvite) -> Response:
    """Sends the invite to the homeserver as a v2 invite signed as the origin."""
    services = request.services
    notary = services.notary
    if notary is None:
        raise MatrixError(
            500, Codes.UNKNOWN, "v3 invites are not set up on this server (no notary)"
        )
    our_server = services.config.server.server_name
    key = await notary.vouch_for(invite.origin)
    target = (
        f"/_matrix/federation/v2/invite/{quote(invite.room_id, safe='')}"
        f"/{quote(invite.event_id, safe='')}"
    )
    content = {
        "room_version": invite.room_version.identifier,
        "event": invite.event,
        "invite_room_state": invite.invite_room_state,
    }
    authorization = sign_request(
        "PUT",
        target,
        invite.origin,
        our_server,
        content,
        cast(SigningKey, key.signing_key),
        key_id=key.key_id,
    )
    body = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()
    headers = [
        (b"host", our_server.encode("idna") if our_server.isascii() else our_server.encode()),
        (b"authorization", authorization.encode("latin-1")),
        (b"content-type", b"application/json"),
        *services.forwarder.forwarded_headers(request.scope),
    ]
    answer = await services.forwarder.forward(
        request, method="PUT", target=target.encode(), headers=headers, body=body
    )
    request.log.info(
        "invite.v3.delivered",
        origin=invite.origin,
        room_id=invite.room_id,
        event_id=invite.event_id,
        room_version=invite.room_version.identifier,
        homeserver_status=answer.status,
    )
    return answer


# --- admission policy -----------------------------------------------------------------


def _answer_dropped(
    request: Request[Services], event: dict[str, Any], version: RoomVersion, endpoint: str
) -> Response:
    """The answer of a homeserver that accepted the invite: the event with our signature.

    The peer cannot tell a dropped invite from a delivered one; the homeserver never sees it.
    """
    services = request.services
    key = services.homeserver_signing_key
    if key is None:
        raise MatrixError(
            500, Codes.UNKNOWN, "dropping invites needs server.signing_key_path to be set"
        )
    unsigned = event.get("unsigned")
    if isinstance(unsigned, dict) and "invite_room_state" in unsigned:
        event = dict(event)
        event["unsigned"] = {k: v for k, v in unsigned.items() if k != "invite_room_state"}
    signed = sign_event(event, version, services.config.server.server_name, cast(SigningKey, key))
    if endpoint == "v1":
        return Response.json([200, {"event": signed}])
    return Response.json({"event": signed})


async def _apply_policy(
    request: Request[Services],
    ctx: InviteContext,
    event: dict[str, Any],
    version: RoomVersion,
) -> Response | None:
    """Runs the invite policies: None to go on, or the answer to send instead."""
    engine = request.services.policy
    if engine is None:
        return None
    outcome = await engine.decide_invite(ctx)
    if outcome.allowed:
        return None
    if outcome.dropped:
        request.log.info("invite.dropped", policy=outcome.policy, origin=ctx.origin)
        return _answer_dropped(request, event, version, ctx.endpoint)
    raise outcome.error()


async def on_v3_invite(request: Request[Services]) -> Response:
    try:
        # The body first, under its own limit (408): a client slow to send it is not a
        # gateway slow to check it (504).
        await request.body()
        try:
            with trio.fail_after(request.services.config.public.request_timeout):
                invite = await validate_v3_invite(request)
        except trio.TooSlowError:
            raise MatrixError(
                504, Codes.UNKNOWN, "Checking the invite took too long", retry_after_ms=5000
            ) from None
    except MatrixError as e:
        request.services.metrics.v3_invites.labels(outcome="refused").inc()
        request.log.info("invite.v3.refused", errcode=e.errcode, reason=e.message)
        raise
    ctx = InviteContext(
        event=invite.event,
        inviter=str(invite.event["sender"]),
        invitee=str(invite.event["state_key"]),
        origin=invite.origin,
        room_id=invite.room_id,
        room_version=invite.room_version.identifier,
        create_event=invite.create_event,
        create_event_verified=True,
        creator_servers=invite.creator_servers,
        stripped_state_untrusted=tuple(invite.sent_room_state),
        endpoint="v3",
        request_id=request.request_id,
    )
    try:
        answer = await _apply_policy(request, ctx, invite.event, invite.room_version)
    except MatrixError:
        request.services.metrics.v3_invites.labels(outcome="denied").inc()
        raise
    if answer is not None:
        request.services.metrics.v3_invites.labels(outcome="dropped").inc()
        return answer
    request.services.metrics.v3_invites.labels(outcome="delivered").inc()
    return await deliver_as_v2(request, invite)


def _legacy_invite_parts(
    body: Any, endpoint: str
) -> tuple[dict[str, Any], str, list[dict[str, Any]]] | None:
    """(event, room version, invite_room_state) of a v1 or v2 invite body, if well formed."""
    if not isinstance(body, dict):
        return None
    if endpoint == "v2":
        event, version, room_state = (
            body.get("event"),
            body.get("room_version"),
            body.get("invite_room_state", []),
        )
    else:
        # v1 carries the bare event, with the room state in its unsigned section; it predates
        # room versions, so the room is taken to be version 1.
        event, version = body, "1"
        unsigned = body.get("unsigned")
        room_state = unsigned.get("invite_room_state", []) if isinstance(unsigned, dict) else []
    if not isinstance(event, dict) or not isinstance(version, str):
        return None
    if not isinstance(event.get("sender"), str) or not isinstance(event.get("state_key"), str):
        return None
    states = [e for e in room_state if isinstance(e, dict)] if isinstance(room_state, list) else []
    return event, version, states


def _legacy_invite(endpoint: str) -> Any:
    async def handler(request: Request[Services]) -> Response:
        services = request.services
        services.metrics.legacy_invites.labels(version=endpoint).inc()
        if services.policy is None:
            # Without policies the homeserver checks the rest, but the shape first: Synapse
            # answered 500 to invites without a room version or event, and to JSON it
            # could not encode again (escaped lone surrogates).
            if _legacy_invite_parts(await request.json(), endpoint) is None:
                raise _bad_json("the invite must carry an event with a sender and a state_key")
            return await request.services.forwarder.forward(request)
        body = await request.json()
        auth = await authenticate_origin(request, body, keys=services.require_keyring())
        parts = _legacy_invite_parts(body, endpoint)
        if parts is None:
            # Never forwarded unchecked: that would pass by the policies.
            raise _bad_json("the invite must carry an event with a sender and a state_key")
        version = ROOM_VERSIONS.get(parts[1])
        if version is None:
            raise MatrixError(
                400,
                Codes.INCOMPATIBLE_ROOM_VERSION,
                f"invites to rooms of version {parts[1]!r} cannot be checked by this server's "
                "admission policies",
                extra={"room_version": parts[1]} if len(parts[1]) <= 32 else {},
            )
        event, _, room_state = parts
        room_id = request.path_params["roomId"]
        # Policies are promised verified facts: the invite must really come from the origin
        # (and be signed by it) before anyone decides on it.
        our_server = services.config.server.server_name
        _check_invite_event(event, room_id=room_id, origin=auth.origin, our_server=our_server)
        await _check_pdu(services, event, version, "invite event")
        creates = [
            e for e in room_state if e.get("type") == "m.room.create" and e.get("state_key") == ""
        ]
        ctx = InviteContext(
            event=event,
            inviter=str(event["sender"]),
            invitee=str(event["state_key"]),
            origin=auth.origin,
            room_id=room_id,
            room_version=version.identifier,
            create_event=creates[0] if creates else None,
            create_event_verified=False,
            creator_servers=claimed_creator_servers(room_state, room_id, version.identifier),
            stripped_state_untrusted=tuple(room_state),
            endpoint="v1" if endpoint == "v1" else "v2",
            request_id=request.request_id,
        )
        engine = services.policy
        outcome = await engine.decide_invite(ctx)
        if outcome.denied:
            raise outcome.error()
        if outcome.dropped:
            request.log.info("invite.dropped", policy=outcome.policy, origin=auth.origin)
            return _answer_dropped(request, event, version, endpoint)
        return await request.services.forwarder.forward(request)

    return handler


def install(router: Router, services: Services) -> None:
    router.add("PUT", V3_INVITE, on_v3_invite, name="invite_v3")
    router.add("PUT", UNSTABLE_INVITE, on_v3_invite, name="invite_v3_unstable")
    router.add("PUT", V2_INVITE, _legacy_invite("v2"), name="invite_v2")
    router.add("PUT", V1_INVITE, _legacy_invite("v1"), name="invite_v1")
