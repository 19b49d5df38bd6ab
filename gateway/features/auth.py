"""Authenticating federation requests to owned endpoints (server-server "Request Authentication").

Every owned federation endpoint checks the X-Matrix signature itself before it acts: the
origin's key is fetched and verified by the keyring, the signature must cover the method,
the raw request target as sent, origin, destination and the JSON body. A header naming
another destination is refused. Several ``Authorization`` headers are allowed (the spec
lets a sender sign with several keys); they must name the same origin and one must verify.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from gateway.errors import Codes, MatrixError
from gateway.federation.keys import KeySource
from gateway.http import Request
from gateway.matrix.signing import SignatureError
from gateway.matrix.xmatrix import (
    DestinationMismatch,
    MalformedXMatrix,
    XMatrixAuth,
    parse_x_matrix,
    verify_request,
)

#: A sender signs with each of its keys at most; nobody has more than a few at once.
MAX_AUTHORIZATION_HEADERS = 4
#: What a peer over its concurrency cap is told to wait before trying again.
OVER_CAP_RETRY_AFTER_MS = 1000


class OriginConcurrency:
    """Requests of each authenticated origin in progress on owned endpoints, capped at
    ``public.max_concurrent_per_origin`` (per worker process).

    An origin counts from the moment its signature verified (before that, the header's
    ``origin`` is only a claim: counting claims would let anyone use up another server's
    share) until the gateway has its answer. One origin over the cap gets 429
    ``M_LIMIT_EXCEEDED`` with ``retry_after_ms``; the others are not slowed down.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_progress: dict[str, int] = {}
        self._held: weakref.WeakKeyDictionary[Request[Any], str] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, services: Any) -> OriginConcurrency:
        """The services' instance (made once, kept in ``services.extra``)."""
        existing = services.extra.get("origin_concurrency")
        if isinstance(existing, OriginConcurrency):
            return existing
        made = cls(services.config.public.max_concurrent_per_origin)
        services.extra["origin_concurrency"] = made
        return made

    def in_progress(self, origin: str) -> int:
        return self._in_progress.get(origin, 0)

    def enter(self, request: Request[Any], origin: str) -> None:
        """Counts ``request`` for ``origin`` (once); raises the 429 when over the cap."""
        if request in self._held:
            return
        current = self._in_progress.get(origin, 0)
        if current >= self.limit:
            raise MatrixError(
                429,
                Codes.LIMIT_EXCEEDED,
                f"Too many requests from {origin} in progress (at most {self.limit})",
                retry_after_ms=OVER_CAP_RETRY_AFTER_MS,
            )
        self._in_progress[origin] = current + 1
        self._held[request] = origin

    def leave(self, request: Request[Any]) -> None:
        """Ends ``request``'s count, if it has one."""
        origin = self._held.pop(request, None)
        if origin is None:
            return
        remaining = self._in_progress[origin] - 1
        if remaining:
            self._in_progress[origin] = remaining
        else:
            del self._in_progress[origin]


def _unauthorized(message: str) -> MatrixError:
    return MatrixError(401, Codes.UNAUTHORIZED, message)


async def authenticate_request(
    request: Request[Any],
    content: Any | None,
    *,
    keys: KeySource,
    destination: str | None = None,
    now_ms: int | None = None,
) -> XMatrixAuth:
    """Checks the request's X-Matrix signature(s); returns the header that verified.

    ``content`` is the parsed JSON body (None for a request without one); ``keys`` gives the
    origin's keys (the keyring; the notary's own source); ``destination`` defaults to our
    server name.
    """
    destination = destination or request.services.config.server.server_name
    headers = [
        v.decode("latin-1")
        for k, v in request.headers
        if k == b"authorization" and v[:8].lower() == b"x-matrix"
    ]
    if not headers:
        raise _unauthorized("Missing X-Matrix Authorization header")
    if len(headers) > MAX_AUTHORIZATION_HEADERS:
        raise _unauthorized(
            f"At most {MAX_AUTHORIZATION_HEADERS} X-Matrix Authorization headers are accepted"
        )
    parsed: list[XMatrixAuth] = []
    for header in headers:
        try:
            parsed.append(parse_x_matrix(header))
        except MalformedXMatrix as e:
            raise _unauthorized(f"Malformed X-Matrix Authorization header: {e}") from None
    origins = {auth.origin for auth in parsed}
    if len(origins) != 1:
        raise _unauthorized("X-Matrix Authorization headers name different origins")
    # Key validity: the key must be valid now (request signatures are checked at receipt).
    now = int(time.time() * 1000) if now_ms is None else now_ms
    failure = "no signature verified"
    for auth in parsed:
        if auth.destination is not None and auth.destination != destination:
            raise _unauthorized(
                f"X-Matrix destination {auth.destination!r} is not this server ({destination!r})"
            )
        try:
            found = await keys.get_verify_key(auth.origin, auth.key_id, minimum_valid_until_ts=now)
        except MatrixError as e:
            failure = e.message
            continue
        try:
            verified = verify_request(
                auth,
                method=request.method,
                uri=request.target.decode("latin-1"),
                destination=destination,
                content=content,
                verify_key=found.verify_key,
            )
            OriginConcurrency.of(request.services).enter(request, verified.origin)
            return verified
        except DestinationMismatch as e:  # pragma: no cover - checked above
            raise _unauthorized(str(e)) from None
        except SignatureError as e:
            failure = f"Invalid X-Matrix signature by {auth.origin} ({auth.key_id}): {e}"
        except ValueError as e:  # content that has no canonical form cannot be signed
            failure = f"The request cannot be checked: {e}"
    raise _unauthorized(failure)
