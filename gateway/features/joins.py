"""Restricted joins (MSC3083; room versions 8 and later) checked at the edge.

A room whose join rule is ``restricted`` (or ``knock_restricted`` from room version 10) lets
a user join without an invite when the user is a member of one of the rooms its
``m.room.join_rules`` ``allow`` list names. The resident server decides, names one of its
own joined users who could have invited the user in the join's
``content.join_authorised_via_users_server``, and signs the join event as well.

The gateway checks all of that on the way through:

``GET /_matrix/federation/v1/make_join/{roomId}/{userId}``
    the origin is authenticated and owns the user; the homeserver builds the template; for
    a restricted room the gateway decides as MSC3083 says, and checks or fills in the
    authorising user, and remembers what it handed out.

``PUT /_matrix/federation/v1|v2/send_join/{roomId}/{eventId}``
    the event is verified (event ID, content hash, the joining server's signature, its
    sender belongs to the origin); an authorising user must be ours, joined and able to
    invite; the answer carries the join event with our server's signature.

The decision itself is :func:`gateway.features.restricted_joins.decide_join`; power levels
and creators are :mod:`gateway.matrix.power_levels`. Room state comes from the one
homeserver state reader of the worker (``services.room_state``), the policy engine's
decisions from ``services.policy``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from nacl.signing import SigningKey

from gateway.errors import Codes, MatrixError
from gateway.features.origins import authenticate_origin
from gateway.features.restricted_joins import RoomStateReader, decide_join
from gateway.federation.keys import KeySource
from gateway.federation.pdu_check import PduProblem, PduRejected, check_pdu
from gateway.http import Request, Response, Router
from gateway.matrix.events import compute_event_id
from gateway.matrix.identifiers import user_server_name
from gateway.matrix.power_levels import can_invite
from gateway.matrix.room_state import RoomState
from gateway.matrix.room_versions import RoomVersion, UnknownRoomVersion, get_room_version
from gateway.matrix.signing import InvalidSignature, MissingSignature, sign_event
from gateway.policy.api import JoinContext, JoinStage
from gateway.store import Store

if TYPE_CHECKING:
    from gateway.services import Services

__all__ = [
    "AUTHORISING_USER",
    "JoinServices",
    "JoinStateReader",
    "MakeJoinRecord",
    "complete_send_join_answer",
    "install",
    "join_services",
    "register",
    "verify_join_event",
]

log = structlog.get_logger(__name__)

AUTHORISING_USER = "join_authorised_via_users_server"
#: The key Synapse used for the signed join event before MSC3083 was stable.
UNSTABLE_EVENT_KEY = "org.matrix.msc3083.v2.event"
#: The store namespace of make_join records (kv entries with expiry).
MAKE_JOIN_NAMESPACE = "make_join"
#: How long a make_join record is kept for its send_join.
MAKE_JOIN_RECORD_LIFETIME_MS = 15 * 60 * 1000


# --- verifying the join event -------------------------------------------------------------


async def verify_join_event(
    event: Any,
    *,
    room_id: str,
    event_id: str,
    origin: str,
    version: RoomVersion,
    keys: KeySource,
    now_ms: int | None = None,
) -> dict[str, Any]:
    """Checks a join event sent to send_join; returns it. Raises :class:`MatrixError`.

    The send_join rules: the event ID is the path's, the event is a join of its own sender,
    and the sender belongs to the origin; then the checks on every received PDU
    (:func:`gateway.federation.pdu_check.check_pdu`): canonical JSON, the content hash, the
    joining server's signature with a key valid at ``origin_server_ts`` from v5.
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if not isinstance(event, dict):
        raise MatrixError(400, Codes.BAD_JSON, "The join event must be a JSON object")
    if event.get("room_id") != room_id:
        raise MatrixError(400, Codes.BAD_JSON, "The event's room_id is not the path's")
    try:
        actual_id = compute_event_id(event, version)
    except ValueError:
        raise MatrixError(400, Codes.BAD_JSON, "The event has no usable event ID") from None
    if actual_id != event_id:
        raise MatrixError(400, Codes.BAD_JSON, "The event ID does not match the event")
    content = event.get("content")
    sender = event.get("sender")
    if (
        event.get("type") != "m.room.member"
        or not isinstance(content, dict)
        or content.get("membership") != "join"
        or event.get("state_key") != sender
    ):
        raise MatrixError(400, Codes.BAD_JSON, "Not a join event of its own sender")
    if user_server_name(sender) != origin:
        raise MatrixError(403, Codes.FORBIDDEN, "The joining user does not belong to the origin")
    try:
        # Only the joining server's signature: the resident server's, when the join names
        # an authorising user of ours, is added to the event after this check.
        await check_pdu(event, version, keys, now_ms=now_ms, signers=[origin])
    except PduRejected as e:
        raise _join_refused(e) from None
    return event


def _join_refused(rejected: PduRejected) -> MatrixError:
    if rejected.problem is PduProblem.NOT_CANONICAL:
        return MatrixError(
            400, Codes.BAD_JSON, f"The join event is not canonical JSON: {rejected.detail}"
        )
    if rejected.problem is PduProblem.CONTENT_HASH:
        return MatrixError(400, Codes.BAD_JSON, "The event's content hash does not match")
    if isinstance(rejected.signature_error, MissingSignature):
        return MatrixError(403, Codes.FORBIDDEN, "The join is not signed by the joining server")
    if isinstance(rejected.signature_error, InvalidSignature):
        return MatrixError(403, Codes.FORBIDDEN, "The joining server's signature does not verify")
    return MatrixError(
        403, Codes.FORBIDDEN, "The join is not signed with a known key of the joining server"
    )


def _is_signed_by(event: Mapping[str, Any], server_name: str, signing_key: SigningKey) -> bool:
    key_id = f"{getattr(signing_key, 'alg', 'ed25519')}:{getattr(signing_key, 'version', '')}"
    signatures = event.get("signatures")
    ours = signatures.get(server_name) if isinstance(signatures, dict) else None
    return isinstance(ours, dict) and key_id in ours


def complete_send_join_answer(
    answer: dict[str, Any],
    sent_event: Mapping[str, Any],
    *,
    event_id: str,
    version: RoomVersion,
    server_name: str,
    signing_key: SigningKey,
    granted: bool,
) -> dict[str, Any]:
    """The send_join answer with the join event in ``event``, signed by our server.

    A homeserver that still uses the unstable key has it moved to ``event``. When the join
    names a local authorising user and the homeserver did not sign (a homeserver without
    restricted joins), the event is signed with the homeserver's key, but only if
    ``granted``: this gateway's make_join handed out that authorising user to that origin.
    An ``event`` that is not the join that was sent is an error (502).
    """
    answer = dict(answer)
    event = answer.get("event")
    unstable = answer.pop(UNSTABLE_EVENT_KEY, None)
    if not isinstance(event, dict):
        event = unstable if isinstance(unstable, dict) else None
    content = sent_event.get("content")
    authoriser = content.get(AUTHORISING_USER) if isinstance(content, Mapping) else None
    if event is None:
        if authoriser is None:
            return answer
        event = dict(sent_event)
    try:
        same = compute_event_id(event, version) == event_id
    except ValueError:
        same = False
    if not same:
        raise MatrixError(502, Codes.UNKNOWN, "The homeserver answered with a different event")
    if user_server_name(authoriser) == server_name and not _is_signed_by(
        event, server_name, signing_key
    ):
        if not granted:
            raise MatrixError(
                502,
                Codes.UNKNOWN,
                "The homeserver did not sign the join, and this server did not grant it",
            )
        event = sign_event(event, version, server_name, signing_key)
    answer["event"] = event
    return answer


# --- the services the handlers use --------------------------------------------------------


class JoinStateReader(RoomStateReader, Protocol):
    """The room state reader the handlers use (:class:`HomeserverStateReader`)."""

    def forget_latest(self, room_id: str) -> None:
        """The room just changed: its newest event is to be read afresh."""
        ...


@dataclass
class JoinServices:
    """What the join handlers need besides the request."""

    server_name: str
    keys: KeySource
    store: Store
    #: The homeserver's signing key (a copy): signs joins the homeserver did not.
    signing_key: SigningKey
    state: JoinStateReader
    clock_ms: Callable[[], int] = lambda: int(time.time() * 1000)
    record_lifetime_ms: int = MAKE_JOIN_RECORD_LIFETIME_MS

    async def authenticate(
        self, request: Request[Services], content: Any | None, now_ms: int | None = None
    ) -> str:
        """The origin of a request signed with X-Matrix for our server (401 otherwise)."""
        auth = await authenticate_origin(
            request,
            content,
            keys=self.keys,
            destination=self.server_name,
            now_ms=self.clock_ms() if now_ms is None else now_ms,
        )
        return auth.origin


def join_services(services: Services) -> JoinServices:
    """The handlers' :class:`JoinServices`, taken from ``services``: the keyring, the store,
    the homeserver's signing key (``server.signing_key_path``) and the worker's homeserver
    state reader (``services.room_state``). Without them a join is answered 500.
    """
    signing_key: Any = services.homeserver_signing_key
    if services.keyring is None or services.store is None or signing_key is None:
        log.error("joins need the keyring, the store and the homeserver's signing key")
        raise MatrixError(500, Codes.UNKNOWN, "Internal server error")
    if not isinstance(signing_key, SigningKey):  # signedjson's keys are nacl keys
        raise MatrixError(500, Codes.UNKNOWN, "The homeserver signing key is not ed25519")
    if services.room_state is None:
        log.error("joins need the homeserver state reader")
        raise MatrixError(500, Codes.UNKNOWN, "Internal server error")
    return JoinServices(
        server_name=services.config.server.server_name,
        keys=services.keyring,
        store=services.store,
        signing_key=signing_key,
        state=services.room_state,
    )


async def _ask_policy(
    request: Request[Services],
    stage: JoinStage,
    *,
    origin: str,
    user_id: str,
    room_id: str,
    room_version: str,
    join_rule: str | None,
) -> None:
    """The admission policies' say (``services.policy``), at make_join before the homeserver
    sees the request and at send_join before it is forwarded; a refusal is raised as its
    Matrix error."""
    engine = request.services.policy
    if engine is None:
        return
    outcome = await engine.decide_join(
        JoinContext(
            user=user_id,
            origin=origin,
            room_id=room_id,
            room_version=room_version,
            join_rule=join_rule,
            is_restricted=join_rule in ("restricted", "knock_restricted"),
            stage=stage,
            request_id=request.request_id,
        )
    )
    if not outcome.allowed:
        raise outcome.error()


# --- make_join ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MakeJoinRecord:
    """What make_join handed out, kept for the matching send_join."""

    origin: str
    room_version: str
    authorising_user: str | None

    def to_json(self) -> str:
        return json.dumps(
            {
                "origin": self.origin,
                "room_version": self.room_version,
                "authorising_user": self.authorising_user,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> MakeJoinRecord | None:
        try:
            data = json.loads(text)
            return cls(data["origin"], data["room_version"], data["authorising_user"])
        except (ValueError, KeyError, TypeError):
            return None


def _record_key(room_id: str, user_id: str) -> str:
    return json.dumps([room_id, user_id])


def _json_body(response: Response) -> Any:
    try:
        return json.loads(response.body)
    except ValueError:
        raise MatrixError(502, Codes.UNKNOWN, "The homeserver's answer was not JSON") from None


async def on_make_join(request: Request[Services]) -> Response:
    deps = join_services(request.services)
    room_id = request.path_params["roomId"]
    user_id = request.path_params["userId"]
    origin = await deps.authenticate(request, None)
    if user_server_name(user_id) != origin:
        raise MatrixError(403, Codes.FORBIDDEN, "The user does not belong to the origin")
    if request.services.policy is not None:
        state = await deps.state.room_state(room_id)
        await _ask_policy(
            request,
            "make_join",
            origin=origin,
            user_id=user_id,
            room_id=room_id,
            room_version=state.room_version if state else "",
            join_rule=state.join_rule if state else None,
        )

    # The original request, unchanged: the origin's signature stays valid.
    response = await request.services.forwarder.forward(request)
    if response.status != 200:
        return response
    answer = _json_body(response)
    template = answer.get("event") if isinstance(answer, dict) else None
    if not isinstance(template, dict) or not isinstance(template.get("content"), dict):
        raise MatrixError(502, Codes.UNKNOWN, "The homeserver's make_join template was unusable")
    try:
        version = get_room_version(str(answer.get("room_version", "1")))
    except UnknownRoomVersion:
        return response
    if not (version.restricted_join or version.knock_restricted):
        return response
    prev_events = template.get("prev_events")
    at = [e for e in prev_events if isinstance(e, str)] if isinstance(prev_events, list) else []
    decision = await decide_join(
        deps.state, room_id, user_id, server_name=deps.server_name, at_event_ids=at[:1]
    )
    if not decision.restricted:
        return response

    content: dict[str, Any] = template["content"]
    named = content.get(AUTHORISING_USER)
    if named not in decision.authorising_users:
        if named is not None:
            request.log.warning(
                "homeserver named an authorising user who cannot invite; replaced",
                room_id=room_id,
                named=named,
            )
        content[AUTHORISING_USER] = decision.authorising_users[0]
        response = Response.json(answer)
    await deps.store.kv_set(
        MAKE_JOIN_NAMESPACE,
        _record_key(room_id, user_id),
        MakeJoinRecord(origin, version.identifier, content[AUTHORISING_USER]).to_json(),
        expires_ts=deps.clock_ms() + deps.record_lifetime_ms,
    )
    request.log.info(
        "restricted join prepared",
        room_id=room_id,
        user_id=user_id,
        allowed_via=decision.allowed_via,
        authorising_user=content[AUTHORISING_USER],
    )
    return response


# --- send_join ----------------------------------------------------------------------------


async def _send_join(request: Request[Services], *, v1: bool) -> Response:
    deps = join_services(request.services)
    room_id = request.path_params["roomId"]
    event_id = request.path_params["eventId"]
    event = await request.json()
    now = deps.clock_ms()
    origin = await deps.authenticate(request, event, now)

    sender = event.get("sender") if isinstance(event, dict) else None
    record: MakeJoinRecord | None = None
    if isinstance(sender, str):
        stored = await deps.store.kv_get(
            MAKE_JOIN_NAMESPACE, _record_key(room_id, sender), now_ts=now
        )
        record = MakeJoinRecord.from_json(stored) if stored is not None else None
    # The room's current state, not the state at the event's prev_events: those are the
    # joining server's choice, and an old point in the room's history (before it became
    # restricted, or while the authoriser still had power) must not decide.
    at: list[str] = []
    state: RoomState | None = None
    if record is not None and record.origin == origin:
        room_version = record.room_version
    else:
        state = await deps.state.room_state(room_id, at_event_ids=at)
        if state is None:
            raise MatrixError(404, Codes.NOT_FOUND, "Unknown room")
        room_version = state.room_version
    try:
        version = get_room_version(room_version)
    except UnknownRoomVersion:
        raise MatrixError(
            400, Codes.UNSUPPORTED_ROOM_VERSION, f"Unknown room version {room_version!r}"
        ) from None
    event = await verify_join_event(
        event,
        room_id=room_id,
        event_id=event_id,
        origin=origin,
        version=version,
        keys=deps.keys,
        now_ms=now,
    )

    authoriser = event["content"].get(AUTHORISING_USER)
    if not version.restricted_join:
        # Before room version 8 the key means nothing (the spec gives it no role there).
        authoriser = None
    if authoriser is not None:
        if user_server_name(authoriser) != deps.server_name:
            raise MatrixError(
                400,
                Codes.UNABLE_TO_AUTHORISE_JOIN,
                "The join was prepared by another server: make_join and send_join must go "
                "to the same resident server",
            )
        if state is None:
            state = await deps.state.room_state(room_id, at_event_ids=at)
        if state is None:
            raise MatrixError(404, Codes.NOT_FOUND, "Unknown room")
        if not can_invite(state, authoriser, version):
            raise MatrixError(
                400, Codes.UNABLE_TO_GRANT_JOIN, "The authorising user cannot invite to the room"
            )
    if request.services.policy is not None:
        if state is None:
            state = await deps.state.room_state(room_id, at_event_ids=at)
        await _ask_policy(
            request,
            "send_join",
            origin=origin,
            user_id=event["sender"],
            room_id=room_id,
            room_version=version.identifier,
            join_rule=state.join_rule if state else None,
        )

    response = await request.services.forwarder.forward(request)
    if response.status != 200:
        return response
    # The membership just changed: the next restricted join that names this room as an
    # allowed room must see it.
    deps.state.forget_latest(room_id)
    answer = _json_body(response)
    if v1:
        if not (isinstance(answer, list) and len(answer) == 2 and isinstance(answer[1], dict)):
            raise MatrixError(502, Codes.UNKNOWN, "The homeserver's send_join answer was unusable")
        body = answer[1]
    elif isinstance(answer, dict):
        body = answer
    else:
        raise MatrixError(502, Codes.UNKNOWN, "The homeserver's send_join answer was unusable")
    completed = complete_send_join_answer(
        body,
        event,
        event_id=event_id,
        version=version,
        server_name=deps.server_name,
        signing_key=deps.signing_key,
        granted=(
            record is not None
            and record.origin == origin
            and record.authorising_user is not None
            and record.authorising_user == authoriser
        ),
    )
    if completed == body:
        return response
    return Response.json([answer[0], completed] if v1 else completed)


async def on_send_join_v1(request: Request[Services]) -> Response:
    return await _send_join(request, v1=True)


async def on_send_join_v2(request: Request[Services]) -> Response:
    return await _send_join(request, v1=False)


def install(router: Router, services: Services) -> None:
    """The route installer for ``gateway.app.PUBLIC_ROUTES``."""
    register(router)


def register(router: Router) -> None:
    """Adds make_join and send_join (v1, v2) to ``router``."""
    router.add(
        "GET",
        "/_matrix/federation/v1/make_join/{roomId}/{userId}",
        on_make_join,
        name="make_join",
    )
    router.add(
        "PUT",
        "/_matrix/federation/v1/send_join/{roomId}/{eventId}",
        on_send_join_v1,
        name="send_join_v1",
    )
    router.add(
        "PUT",
        "/_matrix/federation/v2/send_join/{roomId}/{eventId}",
        on_send_join_v2,
        name="send_join_v2",
    )
