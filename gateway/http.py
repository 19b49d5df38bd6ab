"""The small HTTP vocabulary shared by the listeners: ASGI types, requests, responses, routes.

Owned endpoints plug into a :class:`Router`::

    async def on_invite(request: Request) -> Response:
        event = await request.json()
        ...
        return Response.json({"event": signed})

    router.add("PUT", "/_matrix/federation/v2/invite/{roomId}/{eventId}", on_invite,
               name="invite_v2")

Templates are matched segment by segment against the *raw* path: a ``%2F`` inside a room ID
stays inside its segment. Literal segments are compared after percent-decoding (a peer
cannot dodge an owned route by encoding a letter); parameters are handed to the handler
percent-decoded. A path that matches a template but not its method is passed through, so
the homeserver answers it as it always would.
"""

from __future__ import annotations

import email.utils
import json
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qs, unquote_to_bytes

import trio

from gateway.errors import Codes, MatrixError
from gateway.matrix.canonical_json import InvalidJson, parse_json

__all__ = [
    "Handler",
    "Headers",
    "Receive",
    "Request",
    "Response",
    "Route",
    "RouteMatch",
    "Router",
    "Scope",
    "Send",
    "new_request_id",
    "send_response",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: Header lists as ASGI has them: lower-case names, raw byte values, in order.
Headers = list[tuple[bytes, bytes]]


#: Owned endpoints refuse bodies nested deeper than this. No event needs more; a homeserver
#: re-encoding a much deeper body (to check its signature) can run out of stack: Synapse
#: answered 500 to X-Matrix-signed bodies of about 950 levels that the gateway had accepted.
MAX_JSON_DEPTH = 100


def new_request_id() -> str:
    """A fresh id for one request. Ids sent by clients are never trusted or reused."""
    return secrets.token_hex(8)


class ClientDisconnected(Exception):
    """The client went away before its request body was complete."""


@dataclass
class Response:
    """What an owned handler answers."""

    status: int = 200
    body: bytes = b""
    headers: Headers = field(default_factory=list)

    @classmethod
    def json(
        cls, data: Any, status: int = 200, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> Response:
        body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf8")
        return cls(status, body, [(b"content-type", b"application/json"), *headers])

    @classmethod
    def error(cls, error: MatrixError) -> Response:
        headers: list[tuple[bytes, bytes]] = []
        if error.retry_after_ms is not None:
            seconds = max(1, (error.retry_after_ms + 999) // 1000)
            headers.append((b"retry-after", str(seconds).encode()))
        return cls.json(error.to_json(), error.status, headers)


async def send_response(send: Send, response: Response, *, head: bool = False) -> None:
    """Sends a complete response through ASGI ``send``."""
    headers = [
        (b"content-length", str(len(response.body)).encode()),
        (b"date", email.utils.formatdate(usegmt=True).encode()),
    ]
    headers.extend(h for h in response.headers if h[0].lower() not in (b"content-length", b"date"))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else response.body})


#: What a listener hands its handlers as ``request.services`` (``gateway.services.Services``
#: for the gateway's listeners); this module does not need to know it.
ServicesT = TypeVar("ServicesT")


class Request(Generic[ServicesT]):
    """One request to an owned endpoint.

    ``raw_path`` and ``query_string`` are exactly the bytes the client sent (still
    percent-encoded); ``path_params`` are the decoded template parameters; ``log`` is a
    structlog logger bound to the request id; ``services`` reaches configuration, the
    homeserver and the other shared parts. :meth:`body` reads at most ``max_body_size``
    bytes, within ``body_timeout`` seconds.
    """

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        *,
        services: ServicesT,
        request_id: str,
        log: Any,
        max_body_size: int,
        body_timeout: float,
        path_params: Mapping[str, str] | None = None,
        route: str = "",
    ) -> None:
        self.scope = scope
        self._receive = receive
        self.services = services
        self.max_body_size = max_body_size
        self.body_timeout = body_timeout
        self.request_id = request_id
        self.log = log
        self.path_params: Mapping[str, str] = dict(path_params or {})
        self.route = route
        self.method: str = scope["method"]
        self.raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf8")
        self.query_string: bytes = scope.get("query_string", b"")
        self.headers: Headers = list(scope.get("headers", []))
        self.scheme: str = scope.get("scheme", "http")
        client = scope.get("client")
        self.client: tuple[str, int] | None = (client[0], client[1]) if client else None
        self._body: bytes | None = None

    @property
    def target(self) -> bytes:
        """The request target as sent: raw path, then ``?`` and the raw query if any."""
        return self.raw_path + (b"?" + self.query_string if self.query_string else b"")

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), decoded as latin-1."""
        key = name.lower().encode("latin-1")
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None

    def query(self) -> dict[str, list[str]]:
        """The decoded query parameters."""
        return parse_qs(self.query_string.decode("latin-1"), keep_blank_values=True)

    async def body(self) -> bytes:
        """The whole body, read once, within ``max_body_size`` and ``body_timeout`` (413
        ``M_TOO_LARGE`` / 408 otherwise)."""
        if self._body is None:
            self._body = await read_body(
                self._receive, self.headers, self.max_body_size, self.body_timeout
            )
        return self._body

    async def json(self) -> Any:
        """The body parsed as JSON (400 ``M_NOT_JSON`` when it is not, or when it nests
        deeper than :data:`MAX_JSON_DEPTH`)."""
        raw = await self.body()
        try:
            # Strict: no NaN/Infinity, no lone surrogates, no duplicate keys, bounded depth.
            return parse_json(raw, max_depth=MAX_JSON_DEPTH)
        except InvalidJson as e:
            raise MatrixError(400, Codes.NOT_JSON, f"Content not JSON: {e}") from None


def content_length(headers: Headers, limit: int) -> int | None:
    """The declared Content-Length (None if absent); 413 when it is over ``limit``."""
    for k, v in headers:
        if k == b"content-length":
            try:
                length = int(v)
            except ValueError:
                raise MatrixError(400, Codes.UNKNOWN, "Invalid Content-Length") from None
            if length > limit:
                raise too_large(limit)
            return length
    return None


def too_large(limit: int) -> MatrixError:
    return MatrixError(413, Codes.TOO_LARGE, f"Request body is larger than {limit} bytes")


async def read_body(receive: Receive, headers: Headers, limit: int, seconds: float) -> bytes:
    content_length(headers, limit)
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(seconds) as scope:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
    if scope.cancelled_caught:
        raise MatrixError(408, Codes.UNKNOWN, "Timed out reading the request body")
    return b"".join(chunks)


Handler = Callable[[Request[Any]], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    handler: Handler
    #: the route class in logs and metrics
    name: str
    #: literal segment text, or None where the template has a parameter
    literals: tuple[str | None, ...]
    params: tuple[str | None, ...]


@dataclass(frozen=True)
class RouteMatch:
    route: Route
    params: dict[str, str]


class Router:
    """Maps (method, path template) to owned handlers."""

    def __init__(self) -> None:
        self._by_length: dict[int, list[Route]] = {}
        self.routes: list[Route] = []

    def add(self, method: str, template: str, handler: Handler, *, name: str | None = None) -> None:
        """Registers ``handler`` for ``method`` on ``template`` (``{name}`` marks a parameter
        that spans exactly one path segment)."""
        if not template.startswith("/"):
            raise ValueError(f"template must start with '/': {template!r}")
        literals: list[str | None] = []
        params: list[str | None] = []
        for segment in template[1:].split("/"):
            if segment.startswith("{") and segment.endswith("}") and len(segment) > 2:
                literals.append(None)
                params.append(segment[1:-1])
            elif "{" in segment or "}" in segment:
                raise ValueError(f"a parameter must be a whole segment: {template!r}")
            else:
                literals.append(segment)
                params.append(None)
        method = method.upper()
        for existing in self.routes:
            if existing.method == method and existing.literals == tuple(literals):
                raise ValueError(f"{method} {template} is already routed to {existing.name}")
        route = Route(method, template, handler, name or template, tuple(literals), tuple(params))
        self.routes.append(route)
        self._by_length.setdefault(len(literals), []).append(route)

    def route(
        self, method: str, template: str, *, name: str | None = None
    ) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`add`."""

        def register(handler: Handler) -> Handler:
            self.add(method, template, handler, name=name)
            return handler

        return register

    def match(self, method: str, raw_path: bytes) -> RouteMatch | None:
        """The route for this request, or None (passthrough). A parameter that is not valid
        UTF-8 once decoded is a 400 ``M_INVALID_PARAM``."""
        if not self.routes:
            return None
        raw_segments = raw_path[1:].split(b"/")
        candidates = self._by_length.get(len(raw_segments))
        if not candidates:
            return None
        decoded = [unquote_to_bytes(s) if b"%" in s else s for s in raw_segments]
        for route in candidates:
            if route.method != method:
                # Synapse answers HEAD like GET; passed through, a HEAD would reach an owned
                # GET endpoint (make_join, say) without the gateway's checks.
                if not (method == "HEAD" and route.method == "GET"):
                    continue
            for literal, segment in zip(route.literals, decoded, strict=True):
                if literal is not None and segment != literal.encode("utf8"):
                    break
            else:
                params: dict[str, str] = {}
                for name, segment in zip(route.params, decoded, strict=True):
                    if name is not None:
                        try:
                            params[name] = segment.decode("utf8")
                        except UnicodeDecodeError:
                            raise MatrixError(
                                400, Codes.INVALID_PARAM, f"{name} is not valid UTF-8"
                            ) from None
                if method != route.method:
                    raise MatrixError(405, Codes.UNRECOGNIZED, f"{method} is not supported here")
                return RouteMatch(route, params)
        return None
