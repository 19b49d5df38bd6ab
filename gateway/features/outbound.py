"""The outbound edge: our homeserver's federation requests leave through the gateway.

Synapse, configured with ``outbound_federation_restricted_to: [gateway]`` and the gateway's
outbound listener in its ``instance_map``, sends every outbound federation request (queries,
transactions, invites, key fetches, media) to that listener as plain HTTP, in the form of a
forward proxy request::

    PUT matrix-federation://remote.example/_matrix/federation/v1/send/1700 HTTP/1.1
    Authorization: X-Matrix origin="our.example",destination="remote.example",key=...,sig=...
    Content-Type: application/json
    User-Agent: Synapse/1.163.2
    Proxy-Authorization: Bearer <worker_replication_secret>

What the gateway does with one, in order:

1. The bearer must be the homeserver's ``worker_replication_secret`` (compared in constant
   time); otherwise 401, ``M_MISSING_TOKEN`` or ``M_UNAUTHORIZED``, as Synapse's own
   proxy answers.
2. The destination must be a valid server name and the path a ``/_matrix/`` path; 400
   otherwise.
3. A request to the gateway's own notary (the homeserver's trusted key server) is answered
   here, by the internal listener's application: it must not leave the machine. So is a
   request to :data:`CHECK_DESTINATION`, a name that exists nowhere: ``gateway check`` has
   the homeserver fetch its keys, which only this listener can answer.
4. The egress policies (``on_outbound`` hooks) may refuse it: 403 ``M_FORBIDDEN`` with the
   policy's reason, audited. Synapse reports that to the inviting client for an invite,
   and backs off and retries later for a transaction.
5. Our v2 invites into rooms of version 3 or later go out as v3 invites
   (:mod:`gateway.features.outbound_invites`).
6. Everything else goes on unchanged (method, target, body, and Synapse's ``Authorization``,
   ``Content-Type`` and ``User-Agent``: the request stays signed by the homeserver) with the
   gateway's federation client: discovery, TLS name rules, address guard, keep-alive pools.
   The answer is streamed back without its hop-by-hop headers.

Time: the request body must arrive within ``public.request_timeout``; discovery, connecting
and the response head within ``outbound.request_timeout`` (under Synapse's 90 s); each pause
in a response body within the federation request timeout. A destination that cannot be
reached is 502, a slow one 504, both ``M_UNKNOWN`` with a retry hint.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio
from nacl.signing import SigningKey

from gateway.errors import Codes, MatrixError
from gateway.features import outbound_invites
from gateway.features.outbound_requests import OutboundRequest, ProxyTarget, destination_error
from gateway.federation.errors import FederationError
from gateway.http import (
    ClientDisconnected,
    Headers,
    Message,
    Receive,
    Response,
    Scope,
    Send,
    new_request_id,
    read_body,
    send_response,
)
from gateway.logging import get_logger
from gateway.matrix.identifiers import InvalidIdentifier, parse_server_name
from gateway.matrix.signing import sign_json
from gateway.matrix.unpadded_base64 import encode_base64
from gateway.policy.api import OutboundContext, OutboundKind
from gateway.services import Services

__all__ = [
    "OutboundApp",
    "ProxyTarget",
    "check_proxy_authorization",
    "outbound_kind",
    "parse_proxy_target",
]

_log = get_logger("gateway.outbound")

SCHEME = b"matrix-federation://"
#: Synapse's proxy forwards only these request headers; so does the gateway.
FORWARDED_REQUEST_HEADERS = (b"authorization", b"content-type", b"user-agent")
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: The destination ``gateway check`` makes the homeserver fetch keys from (``.invalid``
#: cannot exist: only the outbound listener answers for it).
CHECK_DESTINATION = "outbound-check.invalid"
CHECK_KEY_ID = "ed25519:check"
#: How long the check destination's key document is valid: a fresh answer is told apart
#: from one the homeserver cached by its ``valid_until_ts``.
CHECK_KEY_VALIDITY_MS = 60_000

#: An ASGI application answering requests for a destination served locally (the notary).
LocalApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def parse_proxy_target(raw: bytes, query: bytes = b"") -> ProxyTarget:
    """The destination and target of a request line's absolute URI; 400 if it is not a
    ``matrix-federation://`` URI naming a valid server and a ``/_matrix/`` path."""
    if not raw.startswith(SCHEME):
        raise MatrixError(
            400,
            Codes.UNRECOGNIZED,
            "This listener only proxies matrix-federation:// requests from the homeserver",
        )
    rest = raw[len(SCHEME) :]
    slash = rest.find(b"/")
    authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
    try:
        destination = authority.decode("ascii")
        parse_server_name(destination)
    except (UnicodeDecodeError, InvalidIdentifier):
        raise MatrixError(
            400, Codes.INVALID_PARAM, "The destination is not a valid server name"
        ) from None
    if not path.startswith(b"/_matrix/") or any(c <= 0x20 or c == 0x7F for c in path + query):
        raise MatrixError(400, Codes.UNRECOGNIZED, "Only /_matrix/ paths are proxied")
    target = path + (b"?" + query if query else b"")
    return ProxyTarget(destination, target.decode("ascii"))


def check_proxy_authorization(headers: Headers, secret: str) -> None:
    """The request must carry ``Proxy-Authorization: Bearer <secret>``; 401 otherwise."""
    values = [v for k, v in headers if k == b"proxy-authorization"]
    if not values:
        raise MatrixError(401, Codes.MISSING_TOKEN, "Missing Proxy-Authorization header")
    expected = b"Bearer " + secret.encode("utf8")
    # One header only, compared in constant time whatever its length.
    if len(values) > 1 or not (secret and hmac.compare_digest(values[0], expected)):
        raise MatrixError(401, Codes.UNAUTHORIZED, "Invalid Proxy-Authorization header")


_FEDERATION_KINDS: Mapping[str, OutboundKind] = {
    "send": "send",
    "invite": "invite",
    "make_join": "make_join",
    "send_join": "send_join",
    "make_knock": "make_knock",
    "send_knock": "send_knock",
    "make_leave": "make_leave",
    "send_leave": "send_leave",
    "query": "query",
    "user": "user",
    "media": "media",
    "state": "room",
    "state_ids": "room",
    "backfill": "room",
    "get_missing_events": "room",
    "event": "room",
    "event_auth": "room",
    "timestamp_to_event": "room",
    "hierarchy": "room",
    "exchange_third_party_invite": "room",
}
_ROOM_IN_PATH = frozenset(
    {
        "invite",
        "make_join",
        "send_join",
        "make_knock",
        "send_knock",
        "make_leave",
        "send_leave",
        "state",
        "state_ids",
        "backfill",
        "get_missing_events",
        "event_auth",
        "timestamp_to_event",
        "hierarchy",
    }
)


def outbound_kind(path: str) -> tuple[OutboundKind, str]:
    """The endpoint class of a decoded path, and the room it names ("" if none)."""
    parts = path.split("/")
    # ['', '_matrix', 'federation', 'v1', 'send', ...]
    if len(parts) >= 3 and parts[2] == "key":
        return "keys", ""
    if len(parts) >= 3 and parts[2] == "media":
        return "media", ""
    if len(parts) >= 5 and parts[2] == "federation":
        endpoint = parts[4]
        kind = _FEDERATION_KINDS.get(endpoint, "other")
        room = ""
        if endpoint in _ROOM_IN_PATH and len(parts) >= 6 and parts[5].startswith("!"):
            room = parts[5]
        return kind, room
    return "other", ""


class OutboundApp:
    """The outbound listener's ASGI application (loopback, plain HTTP, homeserver only)."""

    def __init__(self, services: Services, *, local: Mapping[str, LocalApp] | None = None) -> None:
        self.services = services
        self.local = dict(local or {})
        self.secret = services.config.outbound.secret
        self._check_key = SigningKey.generate()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = new_request_id()
        method: str = scope["method"]
        raw: bytes = scope.get("raw_path") or scope["path"].encode("utf8")
        status = 0
        sent = 0

        async def tracked_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        kind: OutboundKind = "other"
        destination = ""
        destination_class = "remote"
        outcome = ""
        log = _log.bind(request_id=request_id)
        try:
            headers: Headers = scope["headers"]
            try:
                check_proxy_authorization(headers, self.secret)
            except MatrixError:
                outcome = "unauthorized"
                raise
            target = parse_proxy_target(raw, scope.get("query_string", b""))
            destination = target.destination
            kind, room_id = outbound_kind(target.path)
            limits = self.services.config.public
            body = await read_body(receive, headers, limits.max_body_size, limits.request_timeout)
            request = OutboundRequest(
                request_id=request_id,
                method=method,
                target=target,
                kind=kind,
                room_id=room_id,
                headers=[
                    (k.decode("latin-1"), v.decode("latin-1"))
                    for k, v in headers
                    if k in FORWARDED_REQUEST_HEADERS
                ],
                body=body,
                log=log.bind(destination=destination, kind=kind),
            )
            local = self.local.get(destination)
            if destination == CHECK_DESTINATION:
                destination_class = "check"
                await send_response(tracked_send, self._check_answer(request.target))
            elif local is not None:
                destination_class = "notary"
                await _serve_locally(local, scope, request, tracked_send)
            else:
                destination_class, outcome = await self._send_on(request, tracked_send)
        except MatrixError as e:
            outcome = (
                outcome
                or getattr(e, "outcome", "")
                or ("refused" if e.status == 403 else f"error_{e.status}")
            )
            if status == 0:
                await send_response(tracked_send, Response.error(e))
        except ClientDisconnected:
            outcome = "homeserver_disconnected"
        except Exception:
            outcome = "exception"
            log.exception("outbound request failed unexpectedly", destination=destination)
            if status == 0:
                error = MatrixError(500, Codes.UNKNOWN, "Internal server error")
                await send_response(tracked_send, Response.error(error))
        duration = time.perf_counter() - started
        if not outcome:
            outcome = f"{status // 100}xx" if status else "no_answer"
        metrics = self.services.metrics
        metrics.outbound_requests.labels(kind, destination_class, outcome).inc()
        metrics.outbound_duration.labels(kind, destination_class).observe(duration)
        log.info(
            "outbound request",
            method=method,
            destination=destination,
            path=raw[len(SCHEME) :].partition(b"/")[2].decode("latin-1")[:200]
            if raw.startswith(SCHEME)
            else "",
            kind=kind,
            destination_class=destination_class,
            status=status,
            outcome=outcome,
            duration_ms=round(duration * 1000, 2),
            bytes_out=sent,
        )

    def _check_answer(self, target: ProxyTarget) -> Response:
        """The check destination's self-signed key document, valid briefly from now."""
        if target.raw_path != "/_matrix/key/v2/server":
            return Response.error(MatrixError(404, Codes.UNRECOGNIZED, "Unrecognized request"))
        document = {
            "server_name": CHECK_DESTINATION,
            "valid_until_ts": int(time.time() * 1000) + CHECK_KEY_VALIDITY_MS,
            "verify_keys": {
                CHECK_KEY_ID: {"key": encode_base64(bytes(self._check_key.verify_key))}
            },
            "old_verify_keys": {},
        }
        return Response.json(
            sign_json(document, CHECK_DESTINATION, self._check_key, key_id=CHECK_KEY_ID)
        )

    async def _send_on(self, request: OutboundRequest, send: Send) -> tuple[str, str]:
        """Policy, then v3 translation or plain forwarding. Returns (destination class,
        outcome); the outcome is "" when the status tells it."""
        services = self.services
        await _egress_policy(services, request)
        if request.kind == "invite" and request.method == "PUT":
            answer = await outbound_invites.send_invite(services, request)
            if answer is not None:
                await send_response(send, answer.response)
                return answer.destination_class, ""
        destination_class = outbound_invites.known_class(request.target.destination)
        await forward(services, request, send)
        return destination_class, ""


async def _egress_policy(services: Services, request: OutboundRequest) -> None:
    engine = services.policy
    if engine is None or not engine.has_outbound_policies():
        return
    event: Mapping[str, Any] | None = None
    if request.kind == "invite":
        event = outbound_invites.invite_event_of(request.body)
    ctx = OutboundContext(
        destination=request.target.destination,
        kind=request.kind,
        method=request.method,
        path=request.target.path,
        origin=services.config.server.server_name,
        room_id=request.room_id,
        event=event,
        request_id=request.request_id,
    )
    outcome = await engine.decide_outbound(ctx)
    if not outcome.allowed:
        request.log.info("outbound.refused", policy=outcome.policy)
        raise outcome.error()


def _response_headers(headers: Any) -> Headers:
    listed = {
        token.strip().lower().encode("latin-1")
        for value in headers.get_list("connection")
        for token in value.split(",")
    }
    out: Headers = []
    for key, value in headers.raw:
        name = key.lower()
        if name in _HOP_BY_HOP or name in listed:
            continue
        out.append((name, value))
    return out


async def forward(services: Services, request: OutboundRequest, send: Send) -> None:
    """Send the request on as the homeserver signed it and stream the answer back."""
    federation = services.federation
    assert federation is not None, "services opened without a federation client"
    target = request.target
    headers = [*request.headers, ("Accept-Encoding", "identity")]
    timeout = services.config.outbound.request_timeout
    try:
        async with federation.stream(
            request.method,
            target.destination,
            target.target,
            headers=headers,
            content=request.body if request.body or request.method in ("PUT", "POST") else None,
            time_limit=timeout,
        ) as response:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": _response_headers(response.headers),
                }
            )
            async for chunk in response.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except FederationError as e:
        raise destination_error(target.destination, e) from None


async def _serve_locally(app: LocalApp, scope: Scope, request: OutboundRequest, send: Send) -> None:
    """Hand the request to a local application as if it had arrived on its own listener."""
    target = request.target
    local_scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "https",
        "path": target.path,
        "raw_path": target.raw_path.encode("ascii"),
        "query_string": target.query.encode("ascii"),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "client": scope.get("client"),
        "server": scope.get("server"),
    }
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    await app(local_scope, receive, send)
