"""A fake homeserver (a real HTTP server on loopback) and a gateway in front of it."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import signedjson.key
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from gateway.app import Listening, RouteInstaller, serve
from gateway.config import GatewayConfig, parse_config

#: The fake homeserver's name and signing key, as its ``/_matrix/key/v2/server`` says.
FAKE_HOMESERVER_NAME = "hs.test"
# Fixed, not generated: pytest may import this module twice (as conftest and by name).
FAKE_HOMESERVER_KEY = signedjson.key.decode_signing_key_base64(
    "ed25519", "a_fake", "ZmFrZSBob21lc2VydmVyIGtleSBmb3IgdGVzdHMgISE"
)
FAKE_HOMESERVER_KEYS = {
    "server_name": FAKE_HOMESERVER_NAME,
    "valid_until_ts": 4_000_000_000_000,
    "verify_keys": {
        "ed25519:a_fake": {
            "key": signedjson.key.encode_verify_key_base64(
                signedjson.key.get_verify_key(FAKE_HOMESERVER_KEY)
            )
        }
    },
    "old_verify_keys": {},
}


@dataclass
class Seen:
    method: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]


@dataclass
class FakeHomeserver:
    """Records every request; a few paths behave specially (see ``__call__``)."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    release: trio.Event = field(default_factory=trio.Event)
    chunk: bytes = b"m" * 65536
    chunks: int = 64
    #: events the federation API's ``/event/{eventId}`` serves, by event ID
    events: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        complete = True
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                complete = False
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.seen.append(
            Seen(
                scope["method"],
                scope["raw_path"],
                scope["query_string"],
                list(scope["headers"]),
                body,
                complete,
            )
        )
        if not complete:
            return
        path = scope["path"]
        if path == "/_matrix/federation/v1/version":
            await _json(send, 200, b'{"server":{"name":"Fake","version":"1.0"}}')
        elif path == "/_matrix/key/v2/server":
            await _json(send, 200, json.dumps(FAKE_HOMESERVER_KEYS).encode())
        elif path.startswith("/_matrix/federation/v1/event/"):
            event = self.events.get(path.rsplit("/", 1)[1])
            if event is None:
                await _json(send, 404, b'{"errcode":"M_NOT_FOUND","error":"Unknown event"}')
            else:
                answer = {"origin": FAKE_HOMESERVER_NAME, "pdus": [event]}
                await _json(send, 200, json.dumps(answer).encode())
        elif path == "/_matrix/slow":
            await trio.sleep(30)
            await _json(send, 200, b"{}")
        elif path == "/_matrix/media/stream":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")],
                }
            )
            await send({"type": "http.response.body", "body": self.chunk, "more_body": True})
            await self.release.wait()
            for _ in range(self.chunks - 1):
                await send({"type": "http.response.body", "body": self.chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif path == "/_matrix/unauthorized":
            await _json(
                send,
                401,
                b'{"errcode":"M_UNAUTHORIZED","error":"no"}',
                [
                    (b"x-upstream", b"yes"),
                    (b"connection", b"x-secret-hop"),
                    (b"x-secret-hop", b"1"),
                ],
            )
        else:
            await _json(send, 200, b'{"ok":true}', [(b"x-upstream", b"yes")])


async def _json(
    send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def homeserver(nursery: trio.Nursery) -> AsyncIterator[FakeHomeserver]:
    fake = FakeHomeserver()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.1
    binds = await nursery.start(hypercorn_serve, fake, config)
    fake.url = binds[0]
    yield fake


def free_port_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def make_config(tmp_path: Path, homeserver_url: str, **sections: dict[str, Any]) -> GatewayConfig:
    data: dict[str, Any] = {
        "server": {"server_name": "hs.test"},
        "homeserver": {"url": homeserver_url, "connect_timeout": 2.0, "read_timeout": 5.0},
        "public": {"bind": "127.0.0.1:0", "max_body_size": 1024 * 1024},
        "internal": {"bind": "127.0.0.1:0"},
        "log": {"format": "json"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, base_dir=tmp_path)


StartGateway = Callable[..., Any]


@pytest.fixture
def start_gateway(nursery: trio.Nursery) -> StartGateway:
    async def start(
        config: GatewayConfig, public_routes: list[RouteInstaller] | None = None
    ) -> Listening:
        listening: Listening = await nursery.start(
            lambda task_status: serve(
                config, public_routes=public_routes or (), task_status=task_status
            )
        )
        return listening

    return start
