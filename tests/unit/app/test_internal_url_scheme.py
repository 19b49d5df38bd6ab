"""The internal listener serves HTTPS once the notary is on; the start-up log says so."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
import signedjson.key
import trio

from tests.unit.app.conftest import FakeHomeserver
from tests.unit.app.test_app_cli import start_gateway_process, stop, write_config


@pytest.mark.parametrize("workers", [1, 2])
async def test_started_line_gives_the_internal_url_with_the_scheme_it_serves(
    tmp_path: Path, homeserver: FakeHomeserver, nursery: trio.Nursery, workers: int
) -> None:
    key_path = tmp_path / "homeserver.signing.key"
    with key_path.open("w") as f:
        signedjson.key.write_signing_keys(f, [signedjson.key.generate_signing_key("a1")])
    config = write_config(
        tmp_path,
        homeserver.url,
        f'[public]\nbind = "127.0.0.1:0"\nworkers = {workers}\n'
        f'[notary]\nserver_name = "localhost:1"\n',
    )
    text = config.read_text().replace(
        'server_name = "hs.test"\n',
        f'server_name = "hs.test"\nsigning_key_path = "{key_path}"\n',
        1,
    )
    config.write_text(text)
    running = await start_gateway_process(nursery, config)
    try:
        started = (await running.wait_for("gateway started"))[0]
        internal = started["internal_url"]
        assert internal.startswith("https://127.0.0.1:"), started
        # The notary's certificate is self-made: the URL is right if TLS answers on it.
        async with httpx.AsyncClient(verify=False) as client:
            live = await client.get(internal + "/health/live")
        assert live.status_code == 200
    finally:
        assert await stop(running, signal.SIGTERM) == 0
