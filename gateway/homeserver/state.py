"""Reading room state through the homeserver's own federation API.

The gateway has no database of rooms; the homeserver does. It asks the homeserver the way a
resident server would be asked, signing each request with X-Matrix *as the homeserver
itself* (with the copy of its signing key): the homeserver's keyring trusts its own key,
and its "is the requesting server in the room?" checks pass for its own name whenever a
local user is joined.

What answers on Synapse 1.163 (``synapse/federation/federation_server.py``):

- ``GET /_matrix/federation/v1/state/{roomId}?event_id=E`` returns the state *before* E
  (``pdus``) and its auth chain. Only for rooms the homeserver is in (403 "Host not in room"
  otherwise, 404 for an unknown event).
- ``GET /_matrix/federation/v1/event/{eventId}`` returns E itself; applied on top of the
  state before E it gives the state *after* E, which is what a new event on top of E is
  authorised against.
- ``GET /_matrix/federation/v1/timestamp_to_event/{roomId}?ts=NOW&dir=b`` names the newest
  event of a room (spec v1.6); this is how a room is read that no make_join template points
  into (the rooms named in ``allow``). A 403 or 404 here means the homeserver is not in the
  room: it does not "know" it in the sense of MSC3083.

State at a given event never changes, so those answers are cached by event ID; the newest
event of a room is cached only briefly.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx
import structlog
import trio
from nacl.signing import SigningKey

from gateway.errors import Codes, MatrixError
from gateway.matrix.room_state import RoomState
from gateway.matrix.xmatrix import sign_request

__all__ = ["HomeserverStateReader"]

log = structlog.get_logger(__name__)


class HomeserverStateReader:
    """Reads room state from the homeserver, signed as the homeserver (see module docs).

    ``client`` has ``base_url`` set to the homeserver's federation listener. Every call is
    bounded by ``timeout`` seconds; an unreachable homeserver is a 502, a slow one a 504.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        server_name: str,
        signing_key: SigningKey,
        timeout: float = 10.0,
        latest_event_ttl: float = 2.0,
        cache_size: int = 256,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._client = client
        self._server_name = server_name
        self._signing_key = signing_key
        self._timeout = timeout
        self._latest_ttl = latest_event_ttl
        self._cache_size = cache_size
        self._clock = clock
        self._wall_clock_ms = wall_clock_ms
        self._state_after: OrderedDict[tuple[str, str], RoomState] = OrderedDict()
        self._latest: dict[str, tuple[float, str | None]] = {}

    # -- the reader interface (joins, knocks, the policies' tools) -----------------------

    async def room_state(
        self, room_id: str, *, at_event_ids: Sequence[str] = ()
    ) -> RoomState | None:
        """The room's state after one of ``at_event_ids`` (the make_join template's
        ``prev_events``), or after the room's newest event when none is given. None when
        the homeserver is not in the room.

        With several prev_events (a forked room) the state after the first one is used; the
        homeserver resolves the fork itself when it authorises the join, and the gateway's
        reading can then be off only for a change made on another branch.
        """
        event_id = at_event_ids[0] if at_event_ids else await self.latest_event_id(room_id)
        if event_id is None:
            return None
        return await self.state_after(room_id, event_id)

    # -- the federation calls ------------------------------------------------------------

    def forget_latest(self, room_id: str) -> None:
        """The room just changed (a join went through): read its newest event afresh."""
        self._latest.pop(room_id, None)

    async def latest_event_id(self, room_id: str) -> str | None:
        """The room's newest event, or None when the homeserver is not in the room."""
        cached = self._latest.get(room_id)
        now = self._clock()
        if cached is not None and cached[0] > now:
            return cached[1]
        path = f"/_matrix/federation/v1/timestamp_to_event/{_segment(room_id)}"
        status, body = await self._get(path, f"ts={self._wall_clock_ms()}&dir=b")
        event_id: str | None = None
        if status == 200 and isinstance(body, dict) and isinstance(body.get("event_id"), str):
            event_id = body["event_id"]
        elif status not in (403, 404):
            raise _unexpected("timestamp_to_event", status)
        self._latest[room_id] = (now + self._latest_ttl, event_id)
        if len(self._latest) > self._cache_size:
            self._latest.pop(next(iter(self._latest)))
        return event_id

    async def state_after(self, room_id: str, event_id: str) -> RoomState | None:
        """The state after ``event_id``: the state before it plus the event itself when it
        is a state event. None when the homeserver is not in the room or lacks the event."""
        key = (room_id, event_id)
        cached = self._state_after.get(key)
        if cached is not None:
            self._state_after.move_to_end(key)
            return cached
        path = f"/_matrix/federation/v1/state/{_segment(room_id)}"
        status, body = await self._get(path, f"event_id={_segment(event_id)}")
        if status in (403, 404):
            return None
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("pdus"), list):
            raise _unexpected("state", status)
        events: list[Mapping[str, Any]] = [p for p in body["pdus"] if isinstance(p, dict)]
        status, body = await self._get(f"/_matrix/federation/v1/event/{_segment(event_id)}")
        if status == 404:
            return None
        pdus = body.get("pdus") if isinstance(body, dict) else None
        if status != 200 or not isinstance(pdus, list) or not pdus or not isinstance(pdus[0], dict):
            raise _unexpected("event", status)
        events.append(pdus[0])
        state = RoomState.from_events(room_id, events)
        self._state_after[key] = state
        if len(self._state_after) > self._cache_size:
            self._state_after.popitem(last=False)
        return state

    async def event(self, event_id: str) -> Mapping[str, Any] | None:
        """One event as the homeserver has it (``/event/{eventId}``), or None when the
        homeserver does not have it or will not show it to itself."""
        status, body = await self._get(f"/_matrix/federation/v1/event/{_segment(event_id)}")
        if status in (403, 404):
            return None
        pdus = body.get("pdus") if isinstance(body, dict) else None
        if status != 200 or not isinstance(pdus, list) or not pdus or not isinstance(pdus[0], dict):
            raise _unexpected("event", status)
        event: Mapping[str, Any] = pdus[0]
        return event

    async def _get(self, path: str, query: str = "") -> tuple[int, Any]:
        target = path + ("?" + query if query else "")
        authorization = sign_request(
            "GET", target, self._server_name, self._server_name, None, self._signing_key
        )
        request = self._client.build_request(
            "GET", target, headers={"Authorization": authorization}
        )
        # Keep the target byte for byte as signed; httpx would otherwise normalise it.
        request.url = request.url.copy_with(raw_path=target.encode("ascii"))
        try:
            with trio.fail_after(self._timeout):
                response = await self._client.send(request)
        except trio.TooSlowError:
            raise MatrixError(
                504, Codes.UNKNOWN, "The homeserver was too slow", retry_after_ms=5000
            ) from None
        except httpx.HTTPError as e:
            log.warning("homeserver state read failed", path=path, error=type(e).__name__)
            raise MatrixError(
                502, Codes.UNKNOWN, "The homeserver is unreachable", retry_after_ms=5000
            ) from None
        try:
            body = json.loads(response.content) if response.content else None
        except ValueError:
            body = None
        return response.status_code, body


def _segment(identifier: str) -> str:
    return quote(identifier, safe="")


def _unexpected(what: str, status: int) -> MatrixError:
    log.warning("homeserver answered a state read unexpectedly", call=what, status=status)
    return MatrixError(502, Codes.UNKNOWN, f"The homeserver's {what} answer was unusable")
