"""The gateway's two listeners and the in-process way to run them.

The public listener is a plain ASGI callable rather than a Quart app: most requests are
passthrough, and for those the only work is choosing a route class and streaming bytes, so
a framework's request parsing, body buffering and response objects would be pure cost.
Owned endpoints get a small :class:`gateway.http.Request` instead (see ``gateway/http.py``).

Public routing, in order:

1. An owned route (``Router.add``) matching method and path: its handler answers.
2. ``/_synapse/admin`` (after percent-decoding and resolving ``.``/``..``): 404
   ``M_UNRECOGNIZED`` unless ``homeserver.expose_admin_api`` is set, then passthrough.
3. ``/_matrix/``, ``/.well-known/matrix/`` and ``/_synapse/client/`` (Synapse's pages for
   SSO, password reset and consent, which browsers must reach): passthrough.
4. Anything else, other ``/_synapse/`` paths included (replication, metrics): 404
   ``M_UNRECOGNIZED``. The raw path is what is forwarded; the decoded and resolved form
   only decides the class, so ``/_matrix/../_synapse/admin`` cannot reach the admin API.

The internal listener (loopback only) serves ``/health``, ``/health/live`` and
``/metrics``, plus whatever is registered on its router (the notary later).
"""

from __future__ import annotations

import logging
import posixpath
import resource
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from gateway.config import BindAddress, GatewayConfig
from gateway.errors import Codes, MatrixError
from gateway.features import invites, joins, keys, knocks
from gateway.features import notary as notary_endpoints
from gateway.features.cors import Cors
from gateway.features.guests import (
    CLIENT_PREFIX,
    GuestEdge,
    RefusedUnread,
    client_api_segments,
)
from gateway.features.origins import OriginConcurrency
from gateway.features.outbound import OutboundApp
from gateway.homeserver.forward import ResponseCutShort
from gateway.http import (
    ClientDisconnected,
    Message,
    Receive,
    Request,
    Response,
    Router,
    Scope,
    Send,
    new_request_id,
    send_response,
)
from gateway.http1.server import ServerSettings, serve_http1, tls_context
from gateway.logging import get_logger, loggable_query
from gateway.metrics import CONTENT_TYPE_LATEST
from gateway.notary import prepare_notary_files
from gateway.services import Services, open_services, reload_policies
from gateway.store import StoreError

__all__ = [
    "InternalApp",
    "ListenError",
    "ListenerSockets",
    "Listening",
    "PublicApp",
    "RouteInstaller",
    "bind_sockets",
    "handled_prefixes",
    "public_route_table",
    "serve",
]

#: A feature's way in: called once per worker with the router and the services.
RouteInstaller = Callable[[Router, Services], None]

#: Owned endpoints on the public listener. Feature modules add their installer here.
PUBLIC_ROUTES: list[RouteInstaller] = [invites.install, joins.install, knocks.install]
#: Endpoints on the internal listener besides /health and /metrics (the notary).
INTERNAL_ROUTES: list[RouteInstaller] = [notary_endpoints.install]

_BACKLOG = 1024
_GRACEFUL_TIMEOUT = 5.0
# Open files kept for other things than client connections (store, logs, listeners, keys).
_RESERVED_FILES = 128
# Idle keep-alive connections (and clients slow to send their headers) are closed after
# this, never later than public.request_timeout.
_KEEP_ALIVE_TIMEOUT = 20.0
# Synapse keeps idle connections to its federation proxy for 120 s: the outbound listener
# keeps them longer, so it is always Synapse that closes one (closing it under a request
# Synapse is about to send would fail that request).
_OUTBOUND_KEEP_ALIVE_TIMEOUT = 180.0
#: Paths passed through to the homeserver (unless an owned route or a class below takes them).
PASSTHROUGH_PREFIXES = (b"/_matrix/", b"/.well-known/matrix/", b"/_synapse/client/")
#: Every path under this, in any spelling, is a key query whose answer is filtered.
KEY_QUERY_PREFIX = b"/_matrix/key/"


def handled_prefixes(config: GatewayConfig) -> tuple[bytes, ...]:
    """Decoded path prefixes the public listener acts on beyond its router, as
    :meth:`PublicApp._http` does: key queries always, the client API when ``[cors]`` or
    ``[guests]`` is on. A front proxy must send all of them to the gateway."""
    client_edge = config.cors.enabled or config.guests.enabled
    return (KEY_QUERY_PREFIX, CLIENT_PREFIX) if client_edge else (KEY_QUERY_PREFIX,)


def _not_recognized() -> MatrixError:
    return MatrixError(404, Codes.UNRECOGNIZED, "Unrecognized request")


_log = get_logger("gateway")


def route_path(raw_path: bytes) -> bytes:
    """The path as the homeserver would resolve it: percent-decoded, ``//`` collapsed,
    ``.`` and ``..`` resolved. Used only to choose a route class."""
    decoded = unquote_to_bytes(raw_path) if b"%" in raw_path else raw_path
    if b"/." not in decoded and b"//" not in decoded:
        return decoded
    trailing = decoded.endswith(b"/")
    resolved = posixpath.normpath(decoded.decode("latin-1")).encode("latin-1")
    if resolved.startswith(b"//"):
        resolved = b"/" + resolved.lstrip(b"/")
    return resolved + b"/" if trailing and resolved != b"/" else resolved


def public_route_table(services: Services, extra: Sequence[RouteInstaller] = ()) -> Router:
    """The public listener's owned routes: :data:`PUBLIC_ROUTES` and ``extra`` installed on
    a new router. Also what ``gateway proxy-config`` derives a front proxy's routing from,
    so installers only register routes; ``services`` is for their handlers."""
    router = Router()
    for install in [*PUBLIC_ROUTES, *extra]:
        install(router, services)
    return router


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class PublicApp:
    """The public listener's ASGI application."""

    def __init__(self, services: Services, router: Router) -> None:
        self.services = services
        self.router = router
        self.expose_admin = services.config.homeserver.expose_admin_api
        config = services.config
        self.cors = Cors(config.cors) if config.cors.enabled else None
        self.guests = (
            GuestEdge.create(
                config.guests,
                homeserver=services.homeserver,
                store=services.store,
                metrics=services.metrics,
                forwarded_headers=services.forwarder.upstream_headers,
            )
            if config.guests.enabled
            else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    def classify(self, raw_path: bytes) -> str:
        """The route class of a request no owned route took."""
        path = route_path(raw_path)
        if path == b"/_synapse/admin" or path.startswith(b"/_synapse/admin/"):
            return "admin" if self.expose_admin else "admin_blocked"
        if path.startswith(KEY_QUERY_PREFIX):
            # Every key answer of the homeserver, whatever the path's shape (trailing slash,
            # key id, encoding), is filtered: none may carry a delegation key out.
            return "key_query"
        if path.startswith(PASSTHROUGH_PREFIXES):
            return "passthrough"
        return "not_found"

    def _request(
        self,
        scope: Scope,
        receive: Receive,
        request_id: str,
        route: str,
        params: Mapping[str, str],
    ) -> Request[Services]:
        return Request(
            scope,
            receive,
            services=self.services,
            request_id=request_id,
            log=_log.bind(request_id=request_id, route=route),
            max_body_size=self.services.config.public.max_body_size,
            body_timeout=self.services.config.public.request_timeout,
            path_params=params,
            route=route,
        )

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = new_request_id()
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf8")
        status = 0
        sent = 0
        # The client API: CORS on every answer (gateway.features.cors), guests judged before
        # passthrough (gateway.features.guests).
        client_api = False
        if self.cors is not None or self.guests is not None:
            path = route_path(raw_path)
            client_api = path.startswith(CLIENT_PREFIX)
            if client_api and self.cors is not None and self.cors.applies(path):
                send = self.cors.wrap(send)
                if method == "OPTIONS":
                    await self._preflight(scope, send, request_id, raw_path)
                    return

        async def tracked_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            try:
                await send(message)
            except (trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError):
                # Hypercorn closes a connection whose peer broke the framing (a pipelined
                # request after a refused body) while an answer may still be on its way.
                raise ClientDisconnected() from None

        route = "not_found"
        outcome: str | None = None

        async def answer_error(response: Response) -> None:
            nonlocal outcome
            try:
                await send_response(tracked_send, response, head=method == "HEAD")
            except ClientDisconnected:
                outcome = "client_disconnected"

        services = self.services
        try:
            match = self.router.match(method, raw_path)
            if match is not None:
                route = match.route.name
                request = self._request(scope, receive, request_id, route, match.params)
                # Every owned endpoint ends in bounded time, however many keys, state reads
                # and homeserver calls it needs.
                limit = services.config.public.request_timeout + (
                    services.config.homeserver.read_timeout
                )
                try:
                    with trio.fail_after(limit):
                        response = await match.route.handler(request)
                except trio.TooSlowError:
                    raise MatrixError(
                        504, Codes.UNKNOWN, "The request took too long", retry_after_ms=5000
                    ) from None
                finally:
                    # The origin's share of public.max_concurrent_per_origin, if it took one.
                    OriginConcurrency.of(services).leave(request)
                await send_response(tracked_send, response, head=method == "HEAD")
            else:
                route = self.classify(raw_path)
                if route == "key_query":
                    request = self._request(scope, receive, request_id, route, {})
                    response = await keys.on_key_query(request)
                    await send_response(tracked_send, response, head=method == "HEAD")
                elif route == "passthrough" or route == "admin":
                    # Unversioned client paths (/versions) need no authentication: not judged.
                    segments = client_api_segments(raw_path) if client_api else None
                    if segments is not None and self.guests is not None:
                        await self.guests.admit(scope, segments)
                    await services.forwarder.passthrough(scope, receive, tracked_send)
                else:
                    raise _not_recognized()
        except MatrixError as e:
            if e.status >= 500:
                outcome = getattr(e, "kind", e.errcode)
            if status == 0:
                response = Response.error(e)
                unread = e.status in (400, 408, 413) or isinstance(e, RefusedUnread)
                if unread and scope.get("http_version") in ("1.0", "1.1"):
                    # The rest of the body is still on the wire: this connection is done.
                    response.headers.append((b"connection", b"close"))
                await answer_error(response)
        except ClientDisconnected:
            outcome = "client_disconnected"
            status = status or 499
        except ResponseCutShort as e:
            outcome = f"cut_short:{e.kind}"
        except StoreError as e:
            # The database is down or locked: the peer may try again, nothing is broken.
            outcome = "store_unavailable"
            _log.warning("store unavailable", request_id=request_id, route=route, error=str(e))
            if status == 0:
                error = MatrixError(
                    503, Codes.UNKNOWN, "Storage is unavailable, try again", retry_after_ms=5000
                )
                await answer_error(Response.error(error))
        except Exception:
            outcome = "exception"
            _log.exception("unhandled error", request_id=request_id, route=route)
            if status == 0:
                error = MatrixError(500, Codes.UNKNOWN, "Internal server error")
                await answer_error(Response.error(error))
        duration = time.perf_counter() - started
        services.metrics.observe_request(route, status, duration)
        client = scope.get("client")
        _log.info(
            "request",
            request_id=request_id,
            method=method,
            path=raw_path.decode("latin-1"),
            query=loggable_query(scope.get("query_string", b"")),
            route=route,
            status=status,
            duration_ms=round(duration * 1000, 2),
            bytes_out=sent,
            client=client[0] if client else None,
            **({"outcome": outcome} if outcome else {}),
        )

    async def _preflight(self, scope: Scope, send: Send, request_id: str, raw_path: bytes) -> None:
        """A CORS preflight (``OPTIONS``) on the client API, answered here: the spec says no
        endpoint logic may run for it, so the homeserver need not see it."""
        assert self.cors is not None
        started = time.perf_counter()
        await send_response(send, self.cors.preflight())
        duration = time.perf_counter() - started
        self.services.metrics.observe_request("cors_preflight", 204, duration)
        client = scope.get("client")
        _log.info(
            "request",
            request_id=request_id,
            method="OPTIONS",
            path=raw_path.decode("latin-1"),
            query=loggable_query(scope.get("query_string", b"")),
            route="cors_preflight",
            status=204,
            duration_ms=round(duration * 1000, 2),
            client=client[0] if client else None,
        )


class InternalApp:
    """The internal listener: health, metrics, and routes added for the notary."""

    def __init__(self, services: Services, router: Router) -> None:
        self.services = services
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        request_id = new_request_id()
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf8")
        try:
            match = self.router.match(method, raw_path)
            if match is not None:
                request = Request(
                    scope,
                    receive,
                    services=self.services,
                    request_id=request_id,
                    log=_log.bind(request_id=request_id, route=match.route.name),
                    max_body_size=self.services.config.public.max_body_size,
                    body_timeout=self.services.config.public.request_timeout,
                    path_params=match.params,
                    route=match.route.name,
                )
                response = await match.route.handler(request)
            elif method in ("GET", "HEAD") and raw_path == b"/metrics":
                body = self.services.metrics.render()
                response = Response(200, body, [(b"content-type", CONTENT_TYPE_LATEST.encode())])
            elif method in ("GET", "HEAD") and raw_path == b"/health/live":
                response = Response.json({"status": "ok"})
            elif method in ("GET", "HEAD") and raw_path == b"/health":
                response = await self._health()
            else:
                raise _not_recognized()
        except MatrixError as e:
            response = Response.error(e)
        except Exception:
            _log.exception("unhandled error", request_id=request_id, listener="internal")
            response = Response.error(MatrixError(500, Codes.UNKNOWN, "Internal server error"))
        await send_response(send, response, head=method == "HEAD")
        _log.debug(
            "internal request",
            request_id=request_id,
            method=method,
            path=raw_path.decode("latin-1"),
            status=response.status,
        )

    async def _health(self) -> Response:
        """200 when the homeserver answers its federation version endpoint, 503 if not."""
        try:
            with trio.fail_after(min(2.0, self.services.config.homeserver.connect_timeout + 1)):
                answer = await self.services.homeserver.get("/_matrix/federation/v1/version")
            ok = answer.status_code == 200
            detail = "ok" if ok else f"answered {answer.status_code}"
        except (httpx.HTTPError, trio.TooSlowError) as e:
            ok, detail = False, f"unreachable ({type(e).__name__})"
        body = {"status": "ok" if ok else "degraded", "homeserver": detail}
        return Response.json(body, 200 if ok else 503)


# --- serving -------------------------------------------------------------------------------


@dataclass
class ListenerSockets:
    """Bound, listening sockets of the listeners; shared by all worker processes.
    ``outbound`` is set when ``[outbound]`` is enabled."""

    public: socket.socket
    internal: socket.socket
    outbound: socket.socket | None = None

    def close(self) -> None:
        self.public.close()
        self.internal.close()
        if self.outbound is not None:
            self.outbound.close()


@dataclass(frozen=True)
class Listening:
    """Where a running gateway answers (ports resolved when the config said 0)."""

    public_url: str
    internal_url: str
    #: the outbound listener, when enabled
    outbound_url: str | None = None


class ListenError(OSError):
    """A listener cannot bind its address; names the configuration key that sets it."""

    def __init__(self, address: BindAddress, key: str, error: OSError) -> None:
        reason = error.strerror or str(error)
        super().__init__(error.errno, reason)
        self.address = address
        self.key = key
        self.reason = reason[:1].lower() + reason[1:]

    def __str__(self) -> str:
        return f"cannot listen on {self.address} ({self.key}): {self.reason}"


def _bind(address: BindAddress, key: str) -> socket.socket:
    host = "127.0.0.1" if address.host == "localhost" else address.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, address.port))
        sock.listen(_BACKLOG)
    except OSError as e:
        sock.close()
        raise ListenError(address, key, e) from e
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def bind_sockets(config: GatewayConfig) -> ListenerSockets:
    """Binds the listeners (raises ListenError, e.g. when a port is taken)."""
    internal = _bind(config.internal.bind, "internal.bind")
    try:
        public = _bind(config.public.bind, "public.bind")
    except OSError:
        internal.close()
        raise
    outbound = None
    if config.outbound.enabled:
        try:
            outbound = _bind(config.outbound.bind, "outbound.bind")
        except OSError:
            internal.close()
            public.close()
            raise
    return ListenerSockets(public=public, internal=internal, outbound=outbound)


def _url(scheme: str, sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}"


def hypercorn_config(
    config: GatewayConfig, *, tls: tuple[Path, Path] | None = None
) -> HypercornConfig:
    """Hypercorn settings for one listener; ``tls`` is (certificate, private key)."""
    hc = HypercornConfig()
    hc.accesslog = None  # the app logs one line per request itself
    hc.errorlog = logging.getLogger("hypercorn.error")
    # Passthrough responses carry the homeserver's own Server and Date headers.
    hc.include_server_header = False
    hc.include_date_header = False
    hc.keep_alive_timeout = min(_KEEP_ALIVE_TIMEOUT, config.public.request_timeout)
    # Federation peers keep connections for long; Hypercorn's default closes them after
    # 1000 requests.
    hc.keep_alive_max_requests = 100_000
    hc.graceful_timeout = _GRACEFUL_TIMEOUT
    hc.backlog = _BACKLOG
    if tls is not None:
        hc.certfile = str(tls[0])
        hc.keyfile = str(tls[1])
    return hc


def _refused_by_listener(
    services: Services, status: int, reason: str, client: tuple[str, int] | None
) -> None:
    """A request the built-in server answered itself (malformed, too large a head): one log
    line and the request metric, as for any other request."""
    services.metrics.observe_request("http_refused", status, 0.0)
    _log.info(
        "request refused",
        request_id=new_request_id(),
        route="http_refused",
        status=status,
        reason=reason,
        client=client[0] if client else None,
    )


def raise_open_file_limit() -> int:
    """Raises this process's soft limit on open files to its hard limit (as Synapse does at
    start) and returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (OSError, ValueError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def auto_max_connections(open_files: int) -> int:
    """Client connections one worker takes at once when ``public.max_connections`` is
    "auto": each may hold a connection to the homeserver too, and the store, logs and
    listeners need some, so half of what is left after a reserve."""
    return max(16, (open_files - _RESERVED_FILES) // 2)


def public_server_settings(config: GatewayConfig) -> ServerSettings:
    """The built-in server's settings for the public listener (as Hypercorn's above)."""
    limit = config.public.max_connections
    open_files = raise_open_file_limit()
    return ServerSettings(
        keep_alive_timeout=min(_KEEP_ALIVE_TIMEOUT, config.public.request_timeout),
        write_timeout=config.public.request_timeout,
        graceful_timeout=_GRACEFUL_TIMEOUT,
        max_connections=limit if limit is not None else auto_max_connections(open_files),
    )


async def _reload_on_sighup(services: Services) -> None:
    """SIGHUP re-reads the admission policies; a broken set leaves the old one running."""
    with trio.open_signal_receiver(signal.SIGHUP) as received:
        async for _ in received:
            error = reload_policies(services)
            if error is None:
                _log.info("policies reloaded")
            else:
                _log.error("policies not reloaded; the previous set stays active", error=error)


def internal_tls_files(config: GatewayConfig) -> tuple[Path, Path] | None:
    """Certificate and key for the internal listener, or None for plain HTTP.

    The notary switches this on (a self-made certificate, see
    ``gateway.notary.certificate``): the homeserver only talks HTTPS to key servers. The
    notary is on when the homeserver's signing key is configured.
    """
    if config.server.signing_key_path is None:
        return None
    files = prepare_notary_files(config.notary.state_dir)
    return files.certificate_path, files.private_key_path


async def serve(
    config: GatewayConfig,
    *,
    sockets: ListenerSockets | None = None,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    public_routes: Sequence[RouteInstaller] = (),
    internal_routes: Sequence[RouteInstaller] = (),
    reload_on_sighup: bool = False,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Runs both listeners in this process until ``shutdown_trigger`` returns (graceful:
    requests in flight get a few seconds) or the caller cancels.

    Use with ``listening = await nursery.start(serve, config)``. Without ``sockets`` it
    binds its own (port 0 in the config picks free ports; see ``Listening``).
    ``public_routes``/``internal_routes`` install routes in addition to
    :data:`PUBLIC_ROUTES`/:data:`INTERNAL_ROUTES`.
    """
    own_sockets = sockets is None
    listeners = sockets if sockets is not None else bind_sockets(config)
    try:
        internal_port = listeners.internal.getsockname()[1]
        async with open_services(config, notary_name=f"localhost:{internal_port}") as services:
            services.metrics.worker_starts.inc()
            public_router = public_route_table(services, public_routes)
            internal_router = Router()
            for install in [*INTERNAL_ROUTES, *internal_routes]:
                install(internal_router, services)

            public_tls = None
            if config.public.tls_certificate_path and config.public.tls_private_key_path:
                public_tls = (
                    config.public.tls_certificate_path,
                    config.public.tls_private_key_path,
                )
            internal_tls = internal_tls_files(config)
            stop = trio.Event()

            def listener(
                app: Any, sock: socket.socket, tls: Any, keep_alive: float | None = None
            ) -> Any:
                hc = hypercorn_config(config, tls=tls)
                if keep_alive is not None:
                    hc.keep_alive_timeout = keep_alive
                secure, insecure = ([sock], []) if tls else ([], [sock])
                return partial(
                    worker_serve,
                    wrap_app(app, hc.wsgi_max_body_size, "asgi"),
                    hc,
                    sockets=Sockets(secure, insecure, []),
                    shutdown_trigger=stop.wait,
                )

            async with trio.open_nursery() as nursery:
                reloading = trio.CancelScope()
                if reload_on_sighup:

                    async def reload_until_stopped() -> None:
                        with reloading:
                            await _reload_on_sighup(services)

                    nursery.start_soon(reload_until_stopped)
                # Internal first: the homeserver stops asking a notary that failed to answer.
                await nursery.start(
                    listener(
                        InternalApp(services, internal_router), listeners.internal, internal_tls
                    )
                )
                public_app = PublicApp(services, public_router)
                if config.public.http_server == "builtin":
                    await nursery.start(
                        partial(
                            serve_http1,
                            public_app,
                            listeners.public,
                            settings=public_server_settings(config),
                            ssl_context=(
                                tls_context(str(public_tls[0]), str(public_tls[1]))
                                if public_tls
                                else None
                            ),
                            shutdown_trigger=stop.wait,
                            on_refused=partial(_refused_by_listener, services),
                        )
                    )
                else:
                    await nursery.start(listener(public_app, listeners.public, public_tls))
                outbound_url = None
                if listeners.outbound is not None:
                    # Synapse asks its trusted key server (our notary) through this
                    # listener too: that request is answered here, never sent out.
                    internal_app = InternalApp(services, internal_router)
                    local = (
                        {}
                        if services.notary is None
                        else {services.notary.key.server_name: internal_app}
                    )
                    await nursery.start(
                        listener(
                            OutboundApp(services, local=local),
                            listeners.outbound,
                            None,
                            keep_alive=_OUTBOUND_KEEP_ALIVE_TIMEOUT,
                        )
                    )
                    outbound_url = _url("http", listeners.outbound)
                task_status.started(
                    Listening(
                        public_url=_url("https" if public_tls else "http", listeners.public),
                        internal_url=_url("https" if internal_tls else "http", listeners.internal),
                        outbound_url=outbound_url,
                    )
                )
                if shutdown_trigger is not None:
                    await shutdown_trigger()
                    stop.set()
                    reloading.cancel()
    finally:
        if own_sockets:
            listeners.close()
