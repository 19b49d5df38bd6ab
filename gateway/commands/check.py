"""Does the homeserver really trust the notary? (``gateway check``)

The check does what a v3 invite does, on a harmless request: it vouches a delegation key for
a made-up origin, signs a profile query as that origin and sends it to the homeserver. The
homeserver can only verify the signature by asking the notary, so an answer other than 401
shows the whole chain works: ``trusted_key_servers``, the certificate whitelist, loopback
allowed, and the notary answering. Each probe has an origin of its own: a key the homeserver
cached for an earlier probe would let it pass without asking the notary.

A 401 has two causes Synapse does not tell apart in its answer: it does not use the notary,
or it skips the notary after a request to it failed (a backoff: 10 minutes after the first
failure, longer after each further one; kept in its database, so a restart does not end it).
The check then asks the homeserver for the notary's own key, newer than any it can have
cached: Synapse fetches it from the notary even while it backs off, and that success ends the
backoff. If the probe then passes, the homeserver was backing off. Verified on Synapse
1.163.2.

Needs the gateway's internal listener up; when it is not, the check runs one for the duration
of the probe.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast
from urllib.parse import quote

import httpx
import trio
from nacl.signing import SigningKey

from gateway.app import ListenError, bind_sockets, serve
from gateway.config import GatewayConfig
from gateway.features.outbound import CHECK_DESTINATION, CHECK_KEY_ID, CHECK_KEY_VALIDITY_MS
from gateway.matrix.xmatrix import sign_request
from gateway.notary.service import OWN_KEY_VALIDITY_MS, Notary
from gateway.services import open_services

#: Probe origins are names under this one, which resolves nowhere: the homeserver cannot get
#: their keys but from the notary.
PROBE_DOMAIN = "notary-check.invalid"

# Synapse records the end of a backoff in the background: the pauses before probing again.
_REPROBE_DELAYS = (0.5, 1.5)
# Far beyond any notary key the homeserver has cached, so it must fetch a fresh one.
_TEN_YEARS_MS = 10 * 365 * 24 * 3600 * 1000


@dataclass(frozen=True)
class NotaryCheck:
    ok: bool
    detail: str
    #: what the operator should know even though the check passed
    notes: tuple[str, ...] = ()


def probe_origin() -> str:
    return f"{secrets.token_hex(6)}.{PROBE_DOMAIN}"


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


async def _signed_probe(client: httpx.AsyncClient, notary: Notary, our: str) -> int:
    """The homeserver's status for a request signed as a fresh origin with its vouched key."""
    origin = probe_origin()
    key = await notary.vouch_for(origin)
    target = "/_matrix/federation/v1/query/profile?user_id=" + quote(
        f"@gateway-notary-check:{our}", safe=""
    )
    authorization = sign_request(
        "GET", target, origin, our, None, cast(SigningKey, key.signing_key), key_id=key.key_id
    )
    request = client.build_request("GET", target, headers={"Authorization": authorization})
    request.url = request.url.copy_with(raw_path=target.encode())
    return (await client.send(request)).status_code


async def _homeserver_fetches_notary_key(client: httpx.AsyncClient, notary: Notary) -> bool:
    """Has the homeserver fetch the notary's own key from the notary; True when it got it."""
    asked_at = notary.clock_ms()
    name, key_id = notary.key.server_name, notary.key.key_id
    wanted = {"minimum_valid_until_ts": asked_at + _TEN_YEARS_MS}
    answer = await client.post(
        "/_matrix/key/v2/query", json={"server_keys": {name: {key_id: wanted}}}
    )
    if answer.status_code != 200:
        return False
    try:
        entries: Any = answer.json().get("server_keys")
    except (ValueError, AttributeError):
        return False
    # Only a key fetched now is valid this long; one cached earlier expires sooner.
    fresh = asked_at + OWN_KEY_VALIDITY_MS
    return isinstance(entries, list) and any(
        isinstance(e, dict)
        and e.get("server_name") == name
        and key_id in (e.get("verify_keys") or {})
        and isinstance(e.get("valid_until_ts"), int)
        and e["valid_until_ts"] >= fresh
        for e in entries
    )


def _backoff_note(name: str, homeserver_url: str) -> str:
    return (
        f"the homeserver was backing off the notary {name}: after a request to it fails, "
        "Synapse stops asking it for 10 minutes (longer after each further failure; a restart "
        "does not end it). This check ended the backoff by having the homeserver fetch the "
        f"notary's own key. To end it by hand: POST {homeserver_url}/_synapse/admin/v1/"
        f"federation/destinations/{name}/reset_connection with an admin's access token."
    )


async def _probe(config: GatewayConfig) -> NotaryCheck:
    our = config.server.server_name
    hs = config.homeserver
    timeout = httpx.Timeout(hs.read_timeout, connect=hs.connect_timeout)
    async with open_services(config) as services:
        notary = services.notary
        if notary is None:
            return NotaryCheck(False, "the notary is off (server.signing_key_path is not set)")
        name = notary.key.server_name
        async with httpx.AsyncClient(base_url=hs.url, timeout=timeout) as client:
            try:
                if await _signed_probe(client, notary, our) != 401:
                    return NotaryCheck(True, f"the homeserver uses the notary {name}")
                reached = await _homeserver_fetches_notary_key(client, notary)
                for delay in _REPROBE_DELAYS if reached else ():
                    await trio.sleep(delay)
                    if await _signed_probe(client, notary, our) != 401:
                        return NotaryCheck(
                            True,
                            f"the homeserver uses the notary {name}",
                            notes=(_backoff_note(name, hs.url),),
                        )
            except httpx.HTTPError as e:
                return NotaryCheck(False, f"the homeserver does not answer: {e}")
    if not reached:
        return NotaryCheck(
            False,
            f"the homeserver does not use the notary {name}: it cannot reach it (asked for the "
            f"notary's own key, it got none from https://{name}). homeserver.yaml needs the "
            "federation_certificate_verification_whitelist and ip_range_whitelist that "
            f"`gateway synapse-config` prints, and {name} must lead to the internal listener "
            "(internal.bind).",
        )
    return NotaryCheck(
        False,
        f"the homeserver does not use the notary {name}: it reaches it, but refused a request "
        "signed with a key the notary vouches for, so it does not ask the notary for keys or "
        "does not trust its key. Add the trusted_key_servers entry `gateway synapse-config` "
        "prints to homeserver.yaml and restart the homeserver.",
    )


async def _with_gateway(
    config: GatewayConfig, work: Callable[[], Awaitable[NotaryCheck]], what: str
) -> NotaryCheck:
    """Run ``work`` with the gateway's listeners up: the running gateway's, or, when none
    runs, the check's own for the duration of ``work``."""
    bind = config.internal.bind
    if _listening(bind.host, bind.port):
        return await work()
    try:
        sockets = bind_sockets(config)
    except ListenError as e:
        return NotaryCheck(False, f"the check cannot run the {what} for its probe: {e}")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, config, sockets=sockets))
            result = await work()
            nursery.cancel_scope.cancel()
    finally:
        sockets.close()
    return result


async def check_homeserver_uses_notary(config: GatewayConfig) -> NotaryCheck:
    return await _with_gateway(config, partial(_probe, config), "notary")


async def _outbound_probe(config: GatewayConfig) -> NotaryCheck:
    hs = config.homeserver
    timeout = httpx.Timeout(hs.read_timeout, connect=hs.connect_timeout)
    asked_at = int(time.time() * 1000)
    # Newer than anything the homeserver can have cached: it must fetch the keys now.
    fresh = asked_at + CHECK_KEY_VALIDITY_MS - 500
    wanted = {CHECK_DESTINATION: {CHECK_KEY_ID: {"minimum_valid_until_ts": fresh}}}
    try:
        async with httpx.AsyncClient(base_url=hs.url, timeout=timeout) as client:
            answer = await client.post("/_matrix/key/v2/query", json={"server_keys": wanted})
        entries: Any = answer.json().get("server_keys") if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        return NotaryCheck(False, f"the homeserver does not answer its key query: {e}")
    reached = isinstance(entries, list) and any(
        isinstance(e, dict)
        and e.get("server_name") == CHECK_DESTINATION
        and isinstance(e.get("valid_until_ts"), int)
        and e["valid_until_ts"] >= fresh
        for e in entries
    )
    bind = config.outbound.bind
    if reached:
        return NotaryCheck(
            True, f"the homeserver's federation requests leave through the gateway ({bind})"
        )
    return NotaryCheck(
        False,
        "the homeserver does not send its federation requests through the gateway: asked "
        f"for the keys of {CHECK_DESTINATION}, which only the outbound listener ({bind}) "
        "answers, it got none. homeserver.yaml needs the worker_replication_secret (equal to "
        "outbound.secret), instance_map and outbound_federation_restricted_to that "
        "`gateway synapse-config` prints; restart the homeserver after adding them.",
    )


async def check_outbound_routing(config: GatewayConfig) -> NotaryCheck:
    """Does the homeserver send its federation traffic through the outbound listener?"""
    return await _with_gateway(config, partial(_outbound_probe, config), "outbound listener")
