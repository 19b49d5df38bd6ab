"""``gateway health`` (the container image's health check) against a gateway in this process."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import signedjson.key
import trio

from gateway.app import serve
from gateway.config import load_config
from gateway.notary import prepare_notary_files
from tests.unit.app.conftest import FakeHomeserver, free_port_url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    directory: Path, homeserver_url: str, internal_port: int, *, notary: bool, state: str = "state"
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    key_line = ""
    if notary:
        key = signedjson.key.generate_signing_key("a1")
        (directory / "hs.key").write_text(
            f"ed25519 a1 {signedjson.key.encode_signing_key_base64(key)}\n"
        )
        key_line = 'signing_key_path = "hs.key"'
    path = directory / "gateway.toml"
    path.write_text(
        f"""
[server]
server_name = "hs.test"
{key_line}
[homeserver]
url = "{homeserver_url}"
connect_timeout = 1.0
read_timeout = 5.0
[public]
bind = "127.0.0.1:0"
[internal]
bind = "127.0.0.1:{internal_port}"
[notary]
state_dir = "{state}"
[log]
format = "json"
"""
    )
    return path


async def health(config: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "gateway", "health", "--config", str(config), *extra],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def start(nursery: trio.Nursery, config: Path) -> str:
    internal_url: str = (
        await nursery.start(lambda task_status: serve(load_config(config), task_status=task_status))
    ).internal_url
    return internal_url


async def test_healthy_over_the_notarys_tls(
    tmp_path: Path, homeserver: FakeHomeserver, nursery: trio.Nursery
) -> None:
    port = free_port()
    config = write_config(tmp_path, homeserver.url, port, notary=True)
    assert (await start(nursery, config)).startswith("https://")
    result = await health(config)
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines == [
        f"healthy: https://127.0.0.1:{port}/health answered 200 (status: ok, homeserver: ok)"
    ]


async def test_unhealthy_when_the_homeserver_is_down_but_live(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    port = free_port()
    config = write_config(tmp_path, free_port_url(), port, notary=False)
    assert (await start(nursery, config)).startswith("http://")
    result = await health(config)
    assert result.returncode == 1
    [line] = result.stderr.decode().splitlines()
    assert line.startswith(f"unhealthy: http://127.0.0.1:{port}/health answered 503 (")
    assert "homeserver: unreachable" in line
    live = await health(config, "--live")
    assert live.returncode == 0, live.stderr.decode()
    assert live.stdout.decode().startswith(f"healthy: http://127.0.0.1:{port}/health/live")


async def test_unhealthy_when_nothing_listens(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, free_port_url(), port, notary=False)
    result = await health(config, "--timeout", "2")
    assert result.returncode == 1
    [line] = result.stderr.decode().splitlines()
    assert line.startswith(f"unhealthy: http://127.0.0.1:{port}/health: ConnectionRefusedError")


async def test_refuses_a_listener_without_the_notarys_certificate(
    tmp_path: Path, homeserver: FakeHomeserver, nursery: trio.Nursery
) -> None:
    port = free_port()
    await start(nursery, write_config(tmp_path / "a", homeserver.url, port, notary=True))
    # Same listener, but the certificate trusted is another gateway's.
    other = write_config(tmp_path / "b", homeserver.url, port, notary=True)
    prepare_notary_files(tmp_path / "b" / "state")
    result = await health(other)
    assert result.returncode == 1
    [line] = result.stderr.decode().splitlines()
    assert "CERTIFICATE_VERIFY_FAILED" in line, line


async def test_a_bad_configuration_is_one_line(tmp_path: Path) -> None:
    result = await health(tmp_path / "missing.toml")
    assert result.returncode == 1
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("unhealthy: invalid configuration") and "file not found" in line
