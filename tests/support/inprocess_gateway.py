"""A gateway run inside the test process, for features the app may not route yet.

Two shapes:

* ``gateway_in_front_of`` starts the gateway of ``HS`` in the test's own nursery, in front
  of a fake homeserver (a ``FakeHomeserverApp`` it serves on loopback), with a keyring
  that knows only ``REMOTE``'s key; ``signed_request`` talks to it as ``REMOTE``.
* ``gateway_thread`` runs a second gateway in its own thread and Trio loop, in front of the
  stack's real Synapse, using the stack's configuration file but its own database.

Both add the feature's routes only when ``gateway.app.PUBLIC_ROUTES`` does not list them.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import signedjson.key
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from signedjson.sign import verify_signed_json

from gateway.app import PUBLIC_ROUTES, Listening, RouteInstaller, serve
from gateway.config import BindAddress, load_config, parse_config
from gateway.errors import MatrixError
from gateway.federation.keys import VerifyKeyWithExpiry
from gateway.http import Router
from gateway.services import Services
from tests.support.remote_server import x_matrix_authorization

#: Our homeserver's name and signing key, and a remote server's, for the fake homeserver.
HS = "hs.test"
REMOTE = "remote.test"
HS_KEY = signedjson.key.generate_signing_key("hs1")
REMOTE_KEY = signedjson.key.generate_signing_key("r1")


def q(identifier: str) -> str:
    return quote(identifier, safe="")


# --- a fake homeserver ----------------------------------------------------------------------


@dataclass(frozen=True)
class HomeserverRequest:
    """One request as the fake homeserver received it."""

    method: str
    #: The raw (still percent-encoded) path.
    raw_path: str
    query: str
    headers: dict[str, str]
    body: bytes

    @property
    def target(self) -> str:
        """Path and query exactly as sent: what an X-Matrix signature covers."""
        return self.raw_path + ("?" + self.query if self.query else "")


class FakeHomeserverApp:
    """The ASGI side of a fake homeserver; a subclass answers each request in ``handle``."""

    def handle(self, request: HomeserverRequest) -> tuple[int, bytes]:
        raise NotImplementedError

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                done = message["type"] == "lifespan.shutdown"
                await send({"type": message["type"] + ".complete"})
                if done:
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        request = HomeserverRequest(
            method=scope["method"],
            raw_path=scope["raw_path"].decode(),
            query=scope["query_string"].decode(),
            headers={k.decode(): v.decode() for k, v in scope["headers"]},
            body=body,
        )
        status, data = self.handle(request)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": data})


def signed_as(
    request: HomeserverRequest,
    server_name: str,
    signing_key: Any,
    *,
    destination_required: bool = False,
) -> bool:
    """Whether ``request`` carries a valid X-Matrix signature of ``server_name`` to itself.

    With ``destination_required`` the header must also name ``server_name`` as destination.
    """
    auth = request.headers.get("authorization", "")
    params = dict(p.split("=", 1) for p in auth.removeprefix("X-Matrix ").split(","))
    params = {k: v.strip('"') for k, v in params.items()}
    signed: dict[str, Any] = {
        "method": request.method,
        "uri": request.target,
        "origin": params["origin"],
        "destination": server_name,
    }
    signed["signatures"] = {params["origin"]: {params["key"]: params["sig"]}}
    try:
        verify_signed_json(signed, server_name, signedjson.key.get_verify_key(signing_key))
    except Exception:
        return False
    if destination_required and params.get("destination") != server_name:
        return False
    return params["origin"] == server_name


async def serve_fake_homeserver(nursery: trio.Nursery, app: FakeHomeserverApp) -> str:
    """Serves ``app`` over HTTP on a free loopback port; returns its base URL."""
    hc = HypercornConfig()
    hc.bind = ["127.0.0.1:0"]
    hc.accesslog = None
    hc.graceful_timeout = 0.1
    binds: list[str] = await nursery.start(hypercorn_serve, app, hc)
    return binds[0]


class OneKeyKeyring:
    """A keyring that knows one remote server's key and refuses every other."""

    def __init__(self, server_name: str, signing_key: Any) -> None:
        self.server_name = server_name
        self.signing_key = signing_key

    async def get_verify_key(
        self, server_name: str, key_id: str, *, minimum_valid_until_ts: int
    ) -> VerifyKeyWithExpiry:
        if (server_name, key_id) == (self.server_name, f"ed25519:{self.signing_key.version}"):
            return VerifyKeyWithExpiry(
                key_id, signedjson.key.get_verify_key(self.signing_key), 4_000_000_000_000
            )
        raise MatrixError(401, "M_UNAUTHORIZED", "unknown key")


# --- the gateway in the test's nursery ------------------------------------------------------


@dataclass
class InProcessGateway:
    client: httpx.AsyncClient
    services: Services


@asynccontextmanager
async def gateway_in_front_of(
    nursery: trio.Nursery,
    tmp_path: Path,
    homeserver: FakeHomeserverApp,
    register: Callable[[Router], None],
) -> AsyncIterator[InProcessGateway]:
    """Serves ``homeserver`` and runs the gateway of ``HS`` in front of it, with a keyring
    that knows only ``REMOTE``'s key and the routes of ``register``'s feature; yields a
    client of its public listener and its services."""
    homeserver_url = await serve_fake_homeserver(nursery, homeserver)
    keyring = OneKeyKeyring(REMOTE, REMOTE_KEY)
    key_path = tmp_path / "hs.signing.key"
    key_path.write_text(
        f"ed25519 {HS_KEY.version} {signedjson.key.encode_signing_key_base64(HS_KEY)}\n"
    )
    config = parse_config(
        {
            "server": {"server_name": HS, "signing_key_path": str(key_path)},
            "homeserver": {"url": homeserver_url, "connect_timeout": 2.0, "read_timeout": 5.0},
            "public": {"bind": "127.0.0.1:0"},
            "internal": {"bind": "127.0.0.1:0"},
            "log": {"format": "json"},
        },
        base_dir=tmp_path,
    )
    installed: list[Services] = []

    def install(router: Router, services: Services) -> None:
        services.keyring = keyring  # type: ignore[assignment]
        installed.append(services)
        # An app that lists the feature's routes itself needs nothing added.
        if not any(getattr(i, "__module__", "") == register.__module__ for i in PUBLIC_ROUTES):
            register(router)

    listening: Listening = await nursery.start(
        lambda task_status: serve(config, public_routes=[install], task_status=task_status)
    )
    async with httpx.AsyncClient(base_url=listening.public_url, timeout=10) as client:
        yield InProcessGateway(client, installed[0])


async def signed_request(
    client: httpx.AsyncClient,
    method: str,
    uri: str,
    content: Any = None,
    *,
    destination: str = HS,
    key: Any = REMOTE_KEY,
    body: bytes | None = None,
) -> httpx.Response:
    """Sends ``uri`` (exactly these bytes) signed by ``REMOTE`` with ``key``; the body is
    ``body`` when given, else ``content`` as JSON."""
    authorization = x_matrix_authorization(
        method=method,
        uri=uri,
        origin=REMOTE,
        destination=destination,
        signing_key=key,
        content=content,
    )
    if body is None and content is not None:
        body = json.dumps(content).encode()
    request = client.build_request(
        method, uri, headers={"Authorization": authorization}, content=body
    )
    request.url = request.url.copy_with(raw_path=uri.encode("ascii"))
    return await client.send(request)


# --- a second gateway in front of the stack's Synapse -- -------------------------------------


@dataclass
class _Running:
    url: str
    token: trio.lowlevel.TrioToken
    stop: trio.Event


@contextmanager
def gateway_thread(
    config_path: Path,
    db_path: Path,
    feature: RouteInstaller,
    *,
    extra_routes: Sequence[RouteInstaller] = (),
    name: str,
) -> Iterator[str]:
    """Runs a gateway configured by ``config_path`` in a thread of its own, with ``feature``'s
    routes and ``extra_routes``; yields its public URL and stops it on exit."""
    ready: queue.Queue[_Running | BaseException] = queue.Queue()

    async def main() -> None:
        config = load_config(config_path)
        config = replace(
            config,
            public=replace(config.public, bind=BindAddress("127.0.0.1", 0)),
            internal=replace(config.internal, bind=BindAddress("127.0.0.1", 0)),
            # The stack's own gateway is the homeserver's outbound edge.
            outbound=replace(config.outbound, enabled=False),
            # Its own SQLite database: the gateway process of the stack keeps the stack's.
            # A PostgreSQL store is shared, as replicas share it.
            store=replace(config.store, sqlite_path=db_path)
            if config.store.backend == "sqlite"
            else config.store,
        )
        stop = trio.Event()
        # Once PUBLIC_ROUTES lists the feature's routes, they are there already.
        routes = [] if feature in PUBLIC_ROUTES else [feature]
        async with trio.open_nursery() as nursery:
            listening = await nursery.start(
                partial(
                    serve,
                    config,
                    public_routes=[*routes, *extra_routes],
                    shutdown_trigger=stop.wait,
                )
            )
            ready.put(_Running(listening.public_url, trio.lowlevel.current_trio_token(), stop))

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:  # reported to the fixture, which fails loudly
            ready.put(e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    started = ready.get(timeout=60)
    if isinstance(started, BaseException):
        raise started
    try:
        yield started.url
    finally:
        trio.from_thread.run_sync(started.stop.set, trio_token=started.token)
        thread.join(15)
