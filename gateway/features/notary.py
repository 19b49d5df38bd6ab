"""The notary's endpoints on the internal listener.

Only our homeserver may ask for keys: queries must carry an X-Matrix signature by the
homeserver's own key (the gateway holds a copy), addressed to the notary's name. The notary's
own key (``/_matrix/key/v2/server``) is public, as every server's is.
"""

from __future__ import annotations

from typing import cast

from nacl.signing import SigningKey

from gateway.errors import Codes, MatrixError
from gateway.federation.auth import authenticate_request
from gateway.federation.keys import VerifyKeyWithExpiry
from gateway.http import Request, Response, Router
from gateway.matrix.signing import key_id_of
from gateway.notary.service import Notary, parse_query_body
from gateway.services import Services

#: The homeserver's own key does not expire for the notary: it holds a copy of it.
_NEVER_MS = 2**53 - 1


class HomeserverKeySource:
    """The keys the notary accepts requests with: the homeserver's own, and nobody else's
    (a :class:`~gateway.federation.keys.KeySource`)."""

    def __init__(self, server_name: str, signing_key: SigningKey) -> None:
        self._server_name = server_name
        self._key = VerifyKeyWithExpiry(key_id_of(signing_key), signing_key.verify_key, _NEVER_MS)

    async def get_verify_key(
        self, server_name: str, key_id: str, *, minimum_valid_until_ts: int
    ) -> VerifyKeyWithExpiry:
        if server_name != self._server_name:
            raise MatrixError(
                401, Codes.UNAUTHORIZED, "this notary answers only its own homeserver"
            )
        if key_id != self._key.key_id:
            raise MatrixError(401, Codes.UNAUTHORIZED, f"unknown key {key_id} of {server_name}")
        return self._key


def _notary(request: Request[Services]) -> Notary:
    notary = request.services.notary
    if notary is None:
        raise MatrixError(404, Codes.UNRECOGNIZED, "Unrecognized request")
    return notary


async def _authenticate(request: Request[Services], content: object | None) -> None:
    notary = _notary(request)
    signing_key = request.services.homeserver_signing_key
    assert signing_key is not None
    await authenticate_request(
        request,
        content,
        destination=notary.key.server_name,
        keys=HomeserverKeySource(
            request.services.config.server.server_name, cast(SigningKey, signing_key)
        ),
    )


async def on_query_post(request: Request[Services]) -> Response:
    body = await request.json()
    await _authenticate(request, body)
    wanted = parse_query_body(body)
    answer = await _notary(request).query(wanted)
    request.log.info("notary.query", servers=list(wanted), entries=len(answer["server_keys"]))
    return Response.json(answer)


async def on_query_get(request: Request[Services]) -> Response:
    await _authenticate(request, None)
    server_name = request.path_params["serverName"]
    minimum: int | None = None
    values = request.query().get("minimum_valid_until_ts")
    if values and values[0].isdigit():
        minimum = int(values[0])
    answer = await _notary(request).query({server_name: minimum})
    request.log.info("notary.query", servers=[server_name], entries=len(answer["server_keys"]))
    return Response.json(answer)


async def on_server_keys(request: Request[Services]) -> Response:
    # Unauthenticated, like every server's: the homeserver fetches it unsigned.
    return Response.json(_notary(request).own_server_keys())


def install(router: Router, services: Services) -> None:
    if services.notary is None:
        return
    router.add("GET", "/_matrix/key/v2/server", on_server_keys, name="notary_server_keys")
    router.add("POST", "/_matrix/key/v2/query", on_query_post, name="notary_query")
    router.add("GET", "/_matrix/key/v2/query/{serverName}", on_query_get, name="notary_query")
