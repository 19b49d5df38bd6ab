"""The notary's query endpoints on the internal listener: only the homeserver may ask, and
its queries are not counted against ``public.max_concurrent_per_origin`` (that cap is the
public listener's; the internal listener never gives a place back, so a counted query would
keep it forever)."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from tests.robustness.harness import gateway_for_hostile_traffic
from tests.support.inprocess_gateway import HS, HS_KEY, REMOTE, REMOTE_KEY
from tests.support.remote_server import x_matrix_authorization

CAP = 2


async def query(client: httpx.AsyncClient, notary: str, origin: str, key: object) -> int:
    uri = f"/_matrix/key/v2/query/{REMOTE}"
    authorization = x_matrix_authorization(
        method="GET", uri=uri, origin=origin, destination=notary, signing_key=key, content=None
    )
    answer = await client.get(uri, headers={"Authorization": authorization})
    return answer.status_code


async def test_homeserver_queries_beyond_the_public_cap_are_all_answered(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with gateway_for_hostile_traffic(
        nursery, tmp_path, public={"max_concurrent_per_origin": CAP}, policies=[]
    ) as gateway:
        notary = gateway.services.notary
        assert notary is not None
        name = notary.key.server_name
        internal = gateway.listening.internal_url
        async with httpx.AsyncClient(base_url=internal, verify=False, timeout=20) as client:
            statuses = [await query(client, name, HS, HS_KEY) for _ in range(3 * CAP)]
            stranger = await query(client, name, REMOTE, REMOTE_KEY)
    assert statuses == [200] * (3 * CAP)
    assert stranger == 401
