"""A test "remote server": another homeserver as far as our Synapse can tell.

It has its own ed25519 signing key, serves it at ``/_matrix/key/v2/server`` over real TLS
(a ``trustme`` certificate for ``localhost``) on loopback, and is named ``localhost:PORT``, so
Synapse reaches it directly: an explicit port means no well-known or SRV lookup. Synapse needs
``ip_range_whitelist: [127.0.0.1]`` to connect to loopback and either
``federation_certificate_verification_whitelist: [localhost]`` or the trustme CA in
``federation_custom_ca_list`` to accept the certificate.

It signs the federation requests it sends with X-Matrix, written here with signedjson and
canonicaljson directly (independent of the gateway's own implementation), so tests check the
gateway against a second implementation.

The HTTPS server runs in a background thread, so it works next to synchronous tests and a
session-scoped fixture. Tests can add routes (``add_route``) for the calls Synapse makes back
(make_join, event fetches, ...) and read ``requests`` to see what reached it.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx
import trustme
from canonicaljson import encode_canonical_json
from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    # The raw request target: path and query exactly as sent.
    uri: str
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


# A route answers (status, JSON body).
Handler = Callable[[ReceivedRequest], tuple[int, Any]]


def x_matrix_authorization(
    *,
    method: str,
    uri: str,
    origin: str,
    destination: str,
    signing_key: SigningKey,
    content: Any = None,
) -> str:
    """The ``Authorization`` header value for a federation request (spec: Request Authentication).

    The signature covers the canonical JSON of method, URI (path and query as sent, still
    percent-encoded), origin, destination and, when there is a body, its parsed content.
    """
    request: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        request["content"] = content
    signed = sign_json(request, origin, signing_key)
    key_id = f"{signing_key.alg}:{signing_key.version}"
    signature = signed["signatures"][origin][key_id]
    return (
        f'X-Matrix origin="{origin}",destination="{destination}",key="{key_id}",sig="{signature}"'
    )


@dataclass
class RemoteServer:
    """A remote homeserver on loopback. Use as a context manager or call start()/stop()."""

    ca: trustme.CA = field(default_factory=trustme.CA)
    key_version: str = "remote1"
    # How long the published key stays valid.
    key_validity_ms: int = 24 * 3600 * 1000
    signing_key: SigningKey = field(init=False)
    port: int = field(init=False, default=0)
    requests: list[ReceivedRequest] = field(init=False, default_factory=list)
    _routes: dict[tuple[str, str], Handler] = field(init=False, default_factory=dict)
    _server: ThreadingHTTPServer | None = field(init=False, default=None)
    _thread: threading.Thread | None = field(init=False, default=None)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.signing_key = generate_signing_key(self.key_version)
        self.add_route("GET", "/_matrix/key/v2/server", lambda _request: (200, self.key_document()))

    # --- identity ------------------------------------------------------------------------

    @property
    def server_name(self) -> str:
        if not self.port:
            raise RuntimeError("the remote server is not started yet")
        return f"localhost:{self.port}"

    @property
    def key_id(self) -> str:
        return f"ed25519:{self.key_version}"

    @property
    def verify_key_base64(self) -> str:
        return str(encode_verify_key_base64(get_verify_key(self.signing_key)))

    @property
    def url(self) -> str:
        return f"https://{self.server_name}"

    def key_document(self) -> dict[str, Any]:
        """The self-signed server-keys response (spec: Publishing Keys)."""
        document = {
            "server_name": self.server_name,
            "valid_until_ts": int(time.time() * 1000) + self.key_validity_ms,
            "verify_keys": {self.key_id: {"key": self.verify_key_base64}},
            "old_verify_keys": {},
        }
        signed: dict[str, Any] = sign_json(document, self.server_name, self.signing_key)
        return signed

    # --- serving -------------------------------------------------------------------------

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Answer ``method path`` (path without query) with ``handler``."""
        with self._lock:
            self._routes[(method.upper(), path)] = handler

    def _handle(self, request: ReceivedRequest) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(request)
            handler = self._routes.get((request.method, urlsplit(request.uri).path))
        if handler is None:
            return 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}
        return handler(request)

    def start(self) -> RemoteServer:
        remote = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = ReceivedRequest(
                    method=self.command,
                    uri=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                try:
                    status, answer = remote._handle(request)
                except Exception as e:  # a broken test handler must not hang the caller
                    status, answer = 500, {"errcode": "M_UNKNOWN", "error": repr(e)}
                data = encode_canonical_json(answer)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        server.daemon_threads = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> RemoteServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- sending -------------------------------------------------------------------------

    def authorization(self, method: str, uri: str, destination: str, content: Any = None) -> str:
        return x_matrix_authorization(
            method=method,
            uri=uri,
            origin=self.server_name,
            destination=destination,
            signing_key=self.signing_key,
            content=content,
        )

    def federation_request(
        self,
        client: httpx.Client,
        method: str,
        uri: str,
        *,
        destination: str,
        content: Any = None,
        authorization: str | None = None,
    ) -> httpx.Response:
        """Send a signed federation request. ``uri`` is the raw path and query, sent as is.

        ``client`` must have the target's base URL. Pass ``authorization`` to send a header
        of your own (a broken signature, say) instead of a correct one.
        """
        if authorization is None:
            authorization = self.authorization(method, uri, destination, content)
        headers = {"Authorization": authorization}
        body = None
        if content is not None:
            body = encode_canonical_json(content)
            headers["Content-Type"] = "application/json"
        # httpx would normalise a URL given as a string; a prepared request with a raw
        # target keeps the percent-encoding exactly as signed.
        request = client.build_request(method, uri, headers=headers, content=body)
        request.url = request.url.copy_with(raw_path=uri.encode("ascii"))
        return client.send(request)
