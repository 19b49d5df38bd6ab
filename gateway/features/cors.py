"""CORS on the client API (client-server API, "Web Browser Clients").

Browsers ask before a cross-origin request that carries an ``Authorization`` header or a
JSON body: an ``OPTIONS`` preflight. The spec says servers must expect ``OPTIONS`` on every
endpoint and must not run the endpoint's logic for it, and recommends these headers on every
answer::

    Access-Control-Allow-Origin: *
    Access-Control-Allow-Methods: GET, POST, PUT, DELETE, OPTIONS
    Access-Control-Allow-Headers: X-Requested-With, Content-Type, Authorization

With ``[cors]`` enabled (the default) the gateway answers every ``OPTIONS`` under
``/_matrix/client/`` itself (204, no body; the homeserver never sees it) and puts the
configured headers on every answer under ``/_matrix/client/``: passed through, owned, or an
error the gateway made itself (a browser cannot read an answer without them, a 429 either).
Synapse sets its own CORS headers; those three (and ``Access-Control-Expose-Headers`` when
``expose_headers`` is set) are replaced rather than sent twice, because a browser refuses a
response with two ``Access-Control-Allow-Origin`` values. The rewrite touches only the
response head; bodies stream through untouched.

Left to the homeserver: the MSC4108 rendezvous endpoint, whose CORS headers differ (it
needs ``If-Match`` and exposes ``ETag``).
"""

from __future__ import annotations

from gateway.config import CorsConfig
from gateway.http import Headers, Message, Response, Send

__all__ = ["CLIENT_API_PREFIX", "Cors"]

CLIENT_API_PREFIX = b"/_matrix/client/"
#: Client API paths whose CORS the homeserver keeps.
_HOMESERVER_CORS = (b"/_matrix/client/unstable/org.matrix.msc4108/rendezvous",)


class Cors:
    """The configured CORS headers, ready to be sent."""

    def __init__(self, config: CorsConfig) -> None:
        self.headers: Headers = [
            (b"access-control-allow-origin", config.allow_origin.encode("latin-1")),
            (b"access-control-allow-methods", ", ".join(config.allow_methods).encode("latin-1")),
            (b"access-control-allow-headers", ", ".join(config.allow_headers).encode("latin-1")),
        ]
        if config.expose_headers:
            self.headers.append(
                (
                    b"access-control-expose-headers",
                    ", ".join(config.expose_headers).encode("latin-1"),
                )
            )
        self._replaced = frozenset(k for k, _ in self.headers)
        self._preflight: Headers = list(self.headers)
        if config.max_age:
            self._preflight.append((b"access-control-max-age", str(config.max_age).encode()))

    @staticmethod
    def applies(path: bytes) -> bool:
        """Whether the gateway handles CORS for ``path`` (decoded and resolved, as
        ``gateway.app.route_path`` gives it)."""
        return path.startswith(CLIENT_API_PREFIX) and not path.startswith(_HOMESERVER_CORS)

    def preflight(self) -> Response:
        """The answer to an ``OPTIONS`` request."""
        return Response(204, b"", list(self._preflight))

    def with_headers(self, headers: Headers) -> Headers:
        """``headers`` with the CORS headers set to ours."""
        replaced = self._replaced
        out = [(k, v) for k, v in headers if k.lower() not in replaced]
        out.extend(self.headers)
        return out

    def wrap(self, send: Send) -> Send:
        """``send`` with the CORS headers set on the response's head."""

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": self.with_headers(message.get("headers", []))}
            await send(message)

        return send_with_cors
