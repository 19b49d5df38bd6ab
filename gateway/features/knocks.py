"""Knocking (server-server API "Knocking upon a room"; room version 7 and later).

A remote user asks to be let into a room whose join rule is ``knock`` (or
``knock_restricted``) by handing a signed ``knock`` membership event to a resident server.
The gateway owns both steps so admission policies can refuse a knock before the homeserver
sees it:

``GET /_matrix/federation/v1/make_knock/{roomId}/{userId}``
    the origin is authenticated and owns the user; the knock policy (if one is configured)
    sees the room's version and join rule; then the homeserver builds the template.

``PUT /_matrix/federation/v1/send_knock/{roomId}/{eventId}``
    the origin is authenticated; the event is a knock of its own sender, who belongs to the
    origin; the knock policy decides; then the homeserver checks the event in full (hashes,
    signatures, auth rules) and answers with the room's stripped state.

Both requests reach the homeserver exactly as the peer sent them (path, ``ver`` query,
body, ``Authorization``), so the origin's X-Matrix signature still holds there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.errors import Codes, MatrixError
from gateway.features.joins import JoinServices, join_services
from gateway.http import Request, Response, Router
from gateway.matrix.identifiers import user_server_name
from gateway.policy.api import KnockContext, KnockStage

if TYPE_CHECKING:
    from gateway.services import Services

__all__ = [
    "check_knock_event",
    "install",
    "on_make_knock",
    "on_send_knock",
    "register",
]


def check_knock_event(event: Any, *, room_id: str, origin: str) -> str:
    """The sender of a knock event sent to send_knock; raises :class:`MatrixError`.

    Only what the gateway needs to trust the knock's user for the policy: the event is an
    ``m.room.member`` ``knock`` of its own sender in the path's room (400
    ``M_INVALID_PARAM`` otherwise), and the sender belongs to the origin (403
    ``M_FORBIDDEN``; spec: the knocking server may only knock for its own users). Hashes,
    signatures and auth rules are the homeserver's job, as the event reaches it unchanged.
    """
    if not isinstance(event, dict):
        raise MatrixError(400, Codes.INVALID_PARAM, "The knock event must be a JSON object")
    content = event.get("content")
    sender = event.get("sender")
    if (
        event.get("type") != "m.room.member"
        or not isinstance(content, dict)
        or content.get("membership") != "knock"
        or not isinstance(sender, str)
        or event.get("state_key") != sender
    ):
        raise MatrixError(400, Codes.INVALID_PARAM, "Not a knock event of its own sender")
    if event.get("room_id") != room_id:
        raise MatrixError(400, Codes.INVALID_PARAM, "The event's room_id is not the path's")
    if user_server_name(sender) != origin:
        raise MatrixError(403, Codes.FORBIDDEN, "The knocking user does not belong to the origin")
    return sender


async def _ask_policy(
    request: Request[Services],
    deps: JoinServices,
    stage: KnockStage,
    *,
    origin: str,
    user_id: str,
    room_id: str,
) -> None:
    """Asks the admission policies (``services.policy``), with the room's version and join
    rule as the homeserver knows them; a refusal is raised as its Matrix error. Without
    policies nothing is read."""
    engine = request.services.policy
    if engine is None:
        return
    state = await deps.state.room_state(room_id)
    outcome = await engine.decide_knock(
        KnockContext(
            user=user_id,
            origin=origin,
            room_id=room_id,
            # The homeserver is not in the room: it will answer 404 itself, the policy may
            # still refuse first.
            room_version=state.room_version if state else "",
            join_rule=state.join_rule if state else None,
            stage=stage,
            request_id=request.request_id,
        )
    )
    if not outcome.allowed:
        raise outcome.error()


async def on_make_knock(request: Request[Services]) -> Response:
    deps = join_services(request.services)
    room_id = request.path_params["roomId"]
    user_id = request.path_params["userId"]
    origin = await deps.authenticate(request, None)
    if user_server_name(user_id) != origin:
        raise MatrixError(403, Codes.FORBIDDEN, "The user does not belong to the origin")
    await _ask_policy(request, deps, "make_knock", origin=origin, user_id=user_id, room_id=room_id)
    # The original request, ``ver`` parameters included: the homeserver picks the version.
    return await request.services.forwarder.forward(request)


async def on_send_knock(request: Request[Services]) -> Response:
    deps = join_services(request.services)
    room_id = request.path_params["roomId"]
    event = await request.json()
    origin = await deps.authenticate(request, event)
    sender = check_knock_event(event, room_id=room_id, origin=origin)
    await _ask_policy(request, deps, "send_knock", origin=origin, user_id=sender, room_id=room_id)
    return await request.services.forwarder.forward(request)


def install(router: Router, services: Services) -> None:
    """The route installer for ``gateway.app.PUBLIC_ROUTES``."""
    register(router)


def register(router: Router) -> None:
    """Adds make_knock and send_knock to ``router``."""
    router.add(
        "GET",
        "/_matrix/federation/v1/make_knock/{roomId}/{userId}",
        on_make_knock,
        name="make_knock",
    )
    router.add(
        "PUT",
        "/_matrix/federation/v1/send_knock/{roomId}/{eventId}",
        on_send_knock,
        name="send_knock",
    )
