"""Does the homeserver really trust the notary? (``gateway check``)

The check does what a v3 invite does, on a harmless request: it vouches a delegation key for
a made-up origin, signs a profile query as that origin and sends it to the homeserver. The
homeserver can only verify the signature by asking the notary, so an answer other than 401
shows the whole chain works: ``trusted_key_servers``, the certificate whitelist, loopback
allowed, and the notary answering. Needs the gateway's internal listener up; when it is not,
the check runs one for the duration of the probe.
"""

from __future__ import annotations

import socket
from typing import cast
from urllib.parse import quote

import httpx
import trio
from nacl.signing import SigningKey

from gateway.config import GatewayConfig
from gateway.matrix.xmatrix import sign_request
from gateway.services import open_services

#: A name that resolves nowhere, so the homeserver cannot get keys for it but from the notary.
PROBE_ORIGIN = "notary-check.invalid"


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


async def _probe(config: GatewayConfig) -> tuple[bool, str]:
    our = config.server.server_name
    async with open_services(config) as services:
        notary = services.notary
        if notary is None:
            return False, "the notary is off (server.signing_key_path is not set)"
        key = await notary.vouch_for(PROBE_ORIGIN)
        target = "/_matrix/federation/v1/query/profile?user_id=" + quote(
            f"@gateway-notary-check:{our}", safe=""
        )
        authorization = sign_request(
            "GET",
            target,
            PROBE_ORIGIN,
            our,
            None,
            cast(SigningKey, key.signing_key),
            key_id=key.key_id,
        )
        hs = config.homeserver
        timeout = httpx.Timeout(hs.read_timeout, connect=hs.connect_timeout)
        async with httpx.AsyncClient(base_url=hs.url, timeout=timeout) as client:
            request = client.build_request("GET", target, headers={"Authorization": authorization})
            request.url = request.url.copy_with(raw_path=target.encode())
            try:
                answer = await client.send(request)
            except httpx.HTTPError as e:
                return False, f"the homeserver does not answer: {e}"
    if answer.status_code == 401:
        return False, (
            "the homeserver refused a request signed with a key the notary vouches for: it does "
            "not use the notary. Add the settings `gateway synapse-config` prints and restart it."
        )
    return True, f"the homeserver uses the notary {notary.key.server_name}"


async def check_homeserver_uses_notary(config: GatewayConfig) -> tuple[bool, str]:
    bind = config.internal.bind
    if _listening(bind.host, bind.port):
        return await _probe(config)
    from gateway.app import serve

    async with trio.open_nursery() as nursery:
        await nursery.start(serve, config)
        result = await _probe(config)
        nursery.cancel_scope.cancel()
    return result
