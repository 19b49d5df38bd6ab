"""``gateway demo`` starts Synapse and the gateway, describes them, and stops them cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from gateway.config import parse_config
from gateway.demo.stack import gateway_config, to_toml
from gateway.demo.synapse import free_port, register_user


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_gateway_config_is_accepted_by_the_gateway(tmp_path: Path) -> None:
    user_config = {
        "server": {"server_name": "not-the-demo.example"},
        "log": {"level": "debug"},
        "federation": {"ip_range_whitelist": ["10.1.0.0/16"]},
    }
    document = gateway_config(
        server_name="localhost:8448",
        public_port=8448,
        internal_port=8449,
        homeserver_url="http://127.0.0.1:8008",
        signing_key_path="synapse/signing.key",
        user_config=user_config,
    )
    (tmp_path / "synapse").mkdir()
    (tmp_path / "synapse" / "signing.key").write_text("ed25519 a AAAA\n")
    text = to_toml(document, header="a header\nin two lines")
    config = parse_config(tomllib.loads(text), base_dir=tmp_path)

    # The demo decides where things run; the user's file decides the rest.
    assert config.server.server_name == "localhost:8448"
    assert config.log.level == "debug"
    assert [str(n) for n in config.federation.ip_range_whitelist] == [
        "10.1.0.0/16",
        "127.0.0.0/8",
        "::1/128",
    ]
    assert config.federation.federation_certificate_verification_whitelist == ("localhost",)
    assert config.federation.trusted_key_servers == ()
    assert str(config.public.bind) == "127.0.0.1:8448"
    assert config.homeserver.expose_admin_api is False


@pytest.mark.integration
def test_demo_runs_both_and_stops_both_on_sigint(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    port = free_port()
    user_config = tmp_path / "mine.toml"
    user_config.write_text('[server]\nserver_name = "ignored.example"\n[log]\nlevel = "debug"\n')
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "demo",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--config",
            str(user_config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    demo_file = data_dir / "demo.json"
    try:
        deadline = time.monotonic() + 90
        while not demo_file.exists():
            assert demo.poll() is None, demo.communicate()[0]
            assert time.monotonic() < deadline, "demo.json never appeared"
            time.sleep(0.2)
        info = json.loads(demo_file.read_text())
        assert info["server_name"] == f"localhost:{port}"
        assert info["gateway_url"] == f"http://127.0.0.1:{port}"
        for key in ("internal_url", "homeserver_url", "registration_shared_secret"):
            assert info[key]
        written = tomllib.loads((data_dir / "gateway.toml").read_text())
        assert written["server"]["server_name"] == f"localhost:{port}"
        assert written["log"]["level"] == "debug"

        version = httpx.get(f"{info['gateway_url']}/_matrix/federation/v1/version", timeout=30)
        assert version.status_code == 200, version.text
        assert version.json()["server"]["name"] == "Synapse"
        assert (
            httpx.get(f"{info['internal_url']}/health", timeout=30, verify=False).status_code == 200
        )
        user = register_user(
            info["homeserver_url"], info["registration_shared_secret"], "demo", "demo-password"
        )
        login = httpx.post(
            f"{info['gateway_url']}/_matrix/client/v3/login",
            json={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": "demo"},
                "password": "demo-password",
            },
            timeout=30,
        )
        assert login.status_code == 200, login.text
        assert login.json()["user_id"] == user.user_id == f"@demo:localhost:{port}"
        children = list(info["pids"].values())
        assert all(_alive(pid) for pid in children)
    finally:
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=60)

    assert demo.returncode == 0, output
    assert "Stopped." in output
    assert not [pid for pid in children if _alive(pid)], "a child outlived the demo"
