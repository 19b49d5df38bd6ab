"""Authenticating federation requests to owned endpoints (server-server "Request Authentication").

Every owned federation endpoint checks the X-Matrix signature itself before it acts: the
origin's key comes from a :class:`~gateway.federation.keys.KeySource` (the keyring; the
notary's own), the signature must cover the method, the raw request target as sent,
origin, destination and the JSON body. A header naming
another destination is refused. Several ``Authorization`` headers are allowed (the spec
lets a sender sign with several keys); they must name the same origin and one must verify.
"""

from __future__ import annotations

import time
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

__all__ = ["MAX_AUTHORIZATION_HEADERS", "authenticate_request"]

#: A sender signs with each of its keys at most; nobody has more than a few at once.
MAX_AUTHORIZATION_HEADERS = 4


def _unauthorized(message: str) -> MatrixError:
    return MatrixError(401, Codes.UNAUTHORIZED, message)


async def authenticate_request(
    request: Request[Any],
    content: Any | None,
    *,
    keys: KeySource,
    destination: str,
    now_ms: int | None = None,
) -> XMatrixAuth:
    """Checks the request's X-Matrix signature(s); returns the header that verified.

    ``content`` is the parsed JSON body (None for a request without one); ``keys`` gives the
    origin's keys; ``destination`` is the name the request must be addressed to; a key must
    be valid at ``now_ms`` (default: now).
    """
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
            return verify_request(
                auth,
                method=request.method,
                uri=request.target.decode("latin-1"),
                destination=destination,
                content=content,
                verify_key=found.verify_key,
            )
        except DestinationMismatch as e:  # pragma: no cover - checked above
            raise _unauthorized(str(e)) from None
        except SignatureError as e:
            failure = f"Invalid X-Matrix signature by {auth.origin} ({auth.key_id}): {e}"
        except ValueError as e:  # content that has no canonical form cannot be signed
            failure = f"The request cannot be checked: {e}"
    raise _unauthorized(failure)
