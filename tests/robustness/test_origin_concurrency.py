"""The per-origin concurrency cap on owned endpoints (``public.max_concurrent_per_origin``).

A homeserver that holds every request until a test lets it go shows the cap (with v3
invites, which reach the homeserver once checked): requests of
one origin beyond it get 429 ``M_LIMIT_EXCEEDED`` at once, another origin is not slowed
down, forged requests in that origin's name take nothing from it, and a finished request
gives its place back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import signedjson.key
import trio

from gateway.config import ConfigError, PublicConfig, parse_config
from gateway.federation.keys import KeyUnavailableError, VerifyKeyWithExpiry
from tests.robustness.harness import LOCAL_USER, gateway_for_hostile_traffic, make_samples, q
from tests.support.inprocess_gateway import HS, REMOTE, REMOTE_KEY
from tests.support.remote_server import x_matrix_authorization

OTHER = "other.test"
OTHER_KEY = signedjson.key.generate_signing_key("o1")
CAP = 2


class TwoServerKeyring:
    keys = {(REMOTE, "ed25519:r1"): REMOTE_KEY, (OTHER, "ed25519:o1"): OTHER_KEY}

    async def get_verify_key(
        self, server_name: str, key_id: str, *, minimum_valid_until_ts: int
    ) -> VerifyKeyWithExpiry:
        key = self.keys.get((server_name, key_id))
        if key is None:
            raise KeyUnavailableError(server_name, key_id, minimum_valid_until_ts)
        return VerifyKeyWithExpiry(key_id, signedjson.key.get_verify_key(key), 4_000_000_000_000)


def invite(client: httpx.AsyncClient, origin: str, key: Any, forged: bool = False) -> Any:
    """A valid v3 invite from ``origin`` (signed with ``key``; by another key if
    ``forged``)."""
    samples = make_samples(origin, key, LOCAL_USER, f"@bob:{origin}")
    uri = f"/_matrix/federation/v3/invite/{q(samples.room_id)}"
    authorization = x_matrix_authorization(
        method="PUT",
        uri=uri,
        origin=origin,
        destination=HS,
        signing_key=signedjson.key.generate_signing_key("r1") if forged else key,
        content=samples.v3_invite,
    )
    request = client.build_request(
        "PUT",
        uri,
        headers={"Authorization": authorization},
        content=json.dumps(samples.v3_invite).encode(),
    )
    request.url = request.url.copy_with(raw_path=uri.encode())
    return client.send(request)


class HeldHomeserver:
    """Answers /version at once and everything else (404) only once ``release`` is set."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.arrivals, self._arrived = trio.open_memory_channel[str](100)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        while (await receive()).get("more_body"):
            pass
        if scope["path"] != "/_matrix/federation/v1/version":
            self.arrivals.send_nowait(scope["path"])
            await self.release.wait()
        body = b'{"errcode":"M_NOT_FOUND","error":"Unknown room"}'
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": body})


async def test_an_origin_over_its_cap_gets_429_and_others_are_served(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    homeserver = HeldHomeserver()
    async with gateway_for_hostile_traffic(
        nursery,
        tmp_path,
        homeserver=homeserver,
        keyring=TwoServerKeyring(),
        public={"max_concurrent_per_origin": CAP},
        policies=[],
    ) as gateway:
        async with httpx.AsyncClient(base_url=gateway.listening.public_url, timeout=20) as client:
            done, finished = trio.open_memory_channel[httpx.Response](10)

            async def one(origin: str = REMOTE, key: Any = REMOTE_KEY) -> None:
                done.send_nowait(await invite(client, origin, key))

            for _ in range(CAP):
                nursery.start_soon(one)
            with trio.fail_after(10):
                for _ in range(CAP):
                    await homeserver._arrived.receive()

            # Forged requests in REMOTE's name, however many, are refused and count nothing.
            for _ in range(5):
                forged = await invite(client, REMOTE, REMOTE_KEY, forged=True)
                assert forged.status_code == 401, forged.text

            started = trio.current_time()
            over = await invite(client, REMOTE, REMOTE_KEY)
            assert trio.current_time() - started < 2
            assert over.status_code == 429, over.text
            assert over.json()["errcode"] == "M_LIMIT_EXCEEDED"
            assert over.json()["retry_after_ms"] > 0
            assert int(over.headers["retry-after"]) >= 1

            # Another origin is not held back by REMOTE's requests.
            nursery.start_soon(one, OTHER, OTHER_KEY)
            with trio.fail_after(10):
                await homeserver._arrived.receive()

            homeserver.release.set()
            with trio.fail_after(10):
                answers = [await finished.receive() for _ in range(CAP + 1)]
            assert [r.status_code for r in answers] == [404] * (CAP + 1)

            # The places are given back.
            again = await invite(client, REMOTE, REMOTE_KEY)
            assert again.status_code == 404, again.text
            limiter = gateway.services.extra["origin_concurrency"]
            assert limiter.in_progress(REMOTE) == 0 and limiter.in_progress(OTHER) == 0


def test_the_cap_is_32_by_default_and_must_be_a_positive_integer(tmp_path: Path) -> None:
    assert PublicConfig().max_concurrent_per_origin == 32
    base: dict[str, Any] = {"server": {"server_name": HS}}
    config = parse_config({**base, "public": {"max_concurrent_per_origin": 5}}, base_dir=tmp_path)
    assert config.public.max_concurrent_per_origin == 5
    for bad in (0, -1, "32", 1.5, True):
        with pytest.raises(ConfigError) as e:
            parse_config({**base, "public": {"max_concurrent_per_origin": bad}}, base_dir=tmp_path)
        assert "public.max_concurrent_per_origin" in str(e.value)
    assert json.dumps(PublicConfig().max_concurrent_per_origin) == "32"
