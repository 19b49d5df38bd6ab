"""`gateway synapse-config` and `gateway check` against the running Synapse."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.demo.stack import Stack, to_toml

pytestmark = [pytest.mark.integration, pytest.mark.both_stores]


def gateway_command(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_synapse_config_prints_the_notary_the_homeserver_trusts(stack: Stack) -> None:
    result = gateway_command(
        "synapse-config", "--config", str(stack.gateway_config_path), cwd=stack.data_dir
    )
    assert result.returncode == 0, result.stderr
    homeserver_yaml = stack.synapse.config_path.read_text()
    # The key the command prints is the one the demo configured Synapse with.
    key_line = next(line for line in result.stdout.splitlines() if "verify_keys" in line)
    key_b64 = key_line.split('": "')[1].split('"')[0]
    assert key_b64 in homeserver_yaml
    assert "trusted_key_servers:" in result.stdout
    assert "federation_certificate_verification_whitelist" in result.stdout


def test_check_confirms_the_homeserver_uses_the_notary(stack: Stack) -> None:
    result = gateway_command(
        "check", "--config", str(stack.gateway_config_path), cwd=stack.data_dir
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "notary: ok" in result.stdout


def test_check_fails_when_the_homeserver_does_not_trust_this_notary(
    stack: Stack, tmp_path: Path
) -> None:
    # Same homeserver, but a notary with other keys: the homeserver trusts the running one,
    # which cannot vouch for keys derived from this config's secret.
    config = tomllib.loads(stack.gateway_config_path.read_text())
    config["notary"]["state_dir"] = str(tmp_path / "other-state")
    config["notary"]["server_name"] = "localhost:1"
    config["internal"]["bind"] = "127.0.0.1:0"
    config["public"]["bind"] = "127.0.0.1:0"
    if "outbound" in config:
        config["outbound"]["bind"] = "127.0.0.1:0"  # the running gateway has the stack's port
    config["store"]["sqlite_path"] = str(tmp_path / "other.db")
    key = Path(config["server"]["signing_key_path"])
    if not key.is_absolute():
        shutil.copy(stack.data_dir / key, tmp_path / key.name)
        config["server"]["signing_key_path"] = str(tmp_path / key.name)
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(config))
    result = gateway_command("check", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "does not use the notary" in result.stderr
