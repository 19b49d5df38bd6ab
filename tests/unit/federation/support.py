"""Loopback HTTPS servers and signed key responses for the federation tests."""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import signedjson.key
import signedjson.sign
import trio
import trustme
from signedjson.types import SigningKey


@dataclass
class ReceivedRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    sni: str | None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, status: int = 200, **headers: str) -> Reply:
        return cls(
            status, json.dumps(obj).encode(), {"Content-Type": "application/json", **headers}
        )


Handler = Callable[[ReceivedRequest], Awaitable[Reply]]
#: The ``start_https`` fixture: ``await start_https("name.test", ...)`` starts a server.
StartHttps = Callable[..., Awaitable["HttpsTestServer"]]


class HttpsTestServer:
    """A minimal HTTP/1.1 server over real TLS on 127.0.0.1 (one request per connection)."""

    def __init__(self, ca: trustme.CA, names: tuple[str, ...]) -> None:
        self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(self.ssl_context)
        self._sni: str | None = None
        self.ssl_context.sni_callback = self._on_sni
        self.routes: dict[tuple[str, str], Handler] = {}
        self.requests: list[ReceivedRequest] = []
        self.connections = 0
        self.port = 0

    def _on_sni(self, sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        sock.sni = name  # type: ignore[attr-defined]

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    def reply(self, method: str, path: str, reply: Reply) -> None:
        async def handler(_: ReceivedRequest) -> Reply:
            return reply

        self.route(method, path, handler)

    def requests_to(self, path: str) -> list[ReceivedRequest]:
        return [r for r in self.requests if r.target.split("?")[0] == path]

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        tls = trio.SSLStream(stream, self.ssl_context, server_side=True)
        try:
            await tls.do_handshake()
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await tls.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0"))
            while len(body) < length:
                chunk = await tls.receive_some(65536)
                if not chunk:
                    return
                body += chunk
            sni = getattr(tls._ssl_object, "sni", None)
            request = ReceivedRequest(method, target, headers, body, sni)
            self.requests.append(request)
            handler = self.routes.get((method, target.split("?")[0]))
            reply = (
                await handler(request)
                if handler
                else Reply.json({"errcode": "M_UNRECOGNIZED"}, 404)
            )
            out = [f"HTTP/1.1 {reply.status} X", f"Content-Length: {len(reply.body)}"]
            out += [f"{k}: {v}" for k, v in reply.headers.items()]
            out.append("Connection: close")
            await tls.send_all(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + reply.body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, ValueError):
            pass
        finally:
            with trio.move_on_after(1):
                await tls.aclose()


class ServerKeys:
    """A server's signing keys and the key responses it publishes."""

    def __init__(self, server_name: str, version: str = "k1") -> None:
        self.server_name = server_name
        self.signing_key: SigningKey = signedjson.key.generate_signing_key(version)
        self.old_keys: dict[str, tuple[SigningKey, int]] = {}

    @property
    def key_id(self) -> str:
        return f"ed25519:{self.signing_key.version}"

    def verify_key_base64(self, key: SigningKey | None = None) -> str:
        vk = signedjson.key.get_verify_key(key or self.signing_key)
        return str(signedjson.key.encode_verify_key_base64(vk))

    def response(
        self,
        valid_until_ts: int,
        *,
        server_name: str | None = None,
        sign_with: SigningKey | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "server_name": server_name or self.server_name,
            "valid_until_ts": valid_until_ts,
            "verify_keys": {self.key_id: {"key": self.verify_key_base64()}},
            "old_verify_keys": {
                f"ed25519:{k.version}": {"key": self.verify_key_base64(k), "expired_ts": ts}
                for k, ts in self.old_keys.values()
            },
        }
        return dict(
            signedjson.sign.sign_json(body, self.server_name, sign_with or self.signing_key)
        )
