"""`gateway run` on a port someone else holds: one line naming the address and the key."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.app.conftest import FAKE_HOMESERVER_KEY, FakeHomeserver
from tests.unit.app.test_app_cli import run_cli
from tests.unit.app.test_check_identity import notary_config

OUTBOUND = '[outbound]\nenabled = true\nsecret = "a-secret-of-sixteen-chars"\n'


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("listener", ["public", "internal", "outbound"])
def test_a_taken_port_is_one_line_naming_address_and_key(
    tmp_path: Path, taken_port: int, listener: str, workers: int
) -> None:
    binds = {"public": "127.0.0.1:0", "internal": "127.0.0.1:0", "outbound": "127.0.0.1:0"}
    binds[listener] = f"127.0.0.1:{taken_port}"
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[server]
server_name = "hs.test"
[homeserver]
url = "http://127.0.0.1:1"
[public]
bind = "{binds["public"]}"
workers = {workers}
[internal]
bind = "{binds["internal"]}"
{OUTBOUND}bind = "{binds["outbound"]}"
[log]
format = "json"
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert lines == [
        f"gateway: cannot listen on 127.0.0.1:{taken_port} ({listener}.bind): "
        "address already in use"
    ], result.stderr
    assert result.stdout == ""


async def test_check_names_a_taken_port_it_needs_for_its_probe(
    tmp_path: Path, taken_port: int, homeserver: FakeHomeserver
) -> None:
    # No gateway listens on internal.bind, so the check runs the listeners for its probe.
    path = notary_config(tmp_path, homeserver.url, FAKE_HOMESERVER_KEY, "hs.test")
    text = path.read_text()
    public = '[public]\nbind = "127.0.0.1:0"'
    assert public in text
    path.write_text(text.replace(public, f'[public]\nbind = "127.0.0.1:{taken_port}"'))
    result = await run_cli("check", "--config", str(path))
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "notary: the check cannot run the notary for its probe: cannot listen on "
        f"127.0.0.1:{taken_port} (public.bind): address already in use"
    ]
