"""Authenticated origins on owned endpoints: who signed a request, and each origin's share
of the requests in progress (``public.max_concurrent_per_origin``).

:func:`authenticate_origin` is the X-Matrix check of every owned federation endpoint on the
public listener (:func:`gateway.federation.auth.authenticate_request`, addressed to our
server), counted against the origin's cap once the signature verified; the public app ends
the count when the request is answered. The notary's endpoints, on the internal listener,
authenticate without counting: only our homeserver may call them.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from gateway.errors import Codes, MatrixError
from gateway.federation.auth import authenticate_request
from gateway.federation.keys import KeySource
from gateway.http import Request
from gateway.matrix.xmatrix import XMatrixAuth

if TYPE_CHECKING:
    from gateway.services import Services

__all__ = ["OVER_CAP_RETRY_AFTER_MS", "OriginConcurrency", "authenticate_origin"]

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
    def of(cls, services: Services) -> OriginConcurrency:
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


async def authenticate_origin(
    request: Request[Services],
    content: Any | None,
    *,
    keys: KeySource,
    destination: str | None = None,
    now_ms: int | None = None,
) -> XMatrixAuth:
    """The request's X-Matrix check for our server (``destination`` by default our server
    name), then its origin's place among its requests in progress (429 when over the cap).
    """
    auth = await authenticate_request(
        request,
        content,
        keys=keys,
        destination=destination or request.services.config.server.server_name,
        now_ms=now_ms,
    )
    OriginConcurrency.of(request.services).enter(request, auth.origin)
    return auth
