"""`gateway check` against a real Synapse names what is wrong.

The stack here has no gateway running, as for an operator checking a configuration before the
first start: `gateway check` then serves the notary itself for the length of its probe. The
stack is this module's own, because one test makes Synapse back off its notary.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from signedjson.key import generate_signing_key, read_signing_keys, write_signing_keys

from gateway.demo.stack import Stack, gateway_process, prepare_stack, to_toml
from gateway.demo.synapse import free_port, synapse_process
from gateway.matrix.signing import key_id_of
from gateway.matrix.xmatrix import sign_request

pytestmark = pytest.mark.integration

#: How every line `gateway check` prints starts; anything else is someone else's log line.
CHECK_LINE_PREFIXES = ("configuration ", "homeserver ", "notary: ", "outbound: ")


@pytest.fixture(scope="module")
def homeserver_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = prepare_stack(tmp_path_factory.mktemp("check"), port=free_port(), log_format="json")
    synapse = synapse_process(stack.synapse)
    synapse.start()
    try:
        synapse.wait_until_ready(timeout=90)
        yield stack
    finally:
        synapse.stop()


def check(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(config_path)],
        cwd=config_path.parent,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def variant(stack: Stack, name: str, section: str, key: str, value: Any) -> Path:
    """The stack's gateway config with one value changed, next to the original (so its
    relative paths keep their meaning)."""
    config = tomllib.loads(stack.gateway_config_path.read_text())
    config[section][key] = value
    path = stack.data_dir / name
    path.write_text(to_toml(config))
    return path


def notary_name(stack: Stack) -> str:
    name: str = stack.gateway_config["notary"]["server_name"]
    return name


def retry_timings(stack: Stack, destination: str) -> tuple[int, int]:
    """Synapse's (retry_last_ts, retry_interval) for a destination; (0, 0) when it has none."""
    with sqlite3.connect(stack.synapse.data_dir / "homeserver.db") as db:
        row = db.execute(
            "SELECT retry_last_ts, retry_interval FROM destinations WHERE destination = ?",
            (destination,),
        ).fetchone()
    return (row[0] or 0, row[1] or 0) if row else (0, 0)


def homeserver_key_id(stack: Stack) -> str:
    with stack.synapse.signing_key_path.open() as f:
        return key_id_of(read_signing_keys(f)[0])


def test_a_wrong_server_name_is_named_with_both_values(homeserver_only: Stack) -> None:
    stack = homeserver_only
    path = variant(stack, "wrong-name.toml", "server", "server_name", "localhost:1")
    result = check(path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "server.server_name" in result.stderr
    assert '"localhost:1"' in result.stderr
    assert f'"{stack.server_name}"' in result.stderr
    assert "does not use the notary" not in result.stderr


def test_a_wrong_signing_key_copy_is_named(homeserver_only: Stack) -> None:
    stack = homeserver_only
    other = stack.data_dir / "other.signing.key"
    with other.open("w") as f:
        write_signing_keys(f, [generate_signing_key("a_other")])
    path = variant(stack, "wrong-key.toml", "server", "signing_key_path", other.name)
    result = check(path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "server.signing_key_path" in result.stderr
    assert "does not match the homeserver's key" in result.stderr
    assert "ed25519:a_other" in result.stderr
    assert homeserver_key_id(stack) in result.stderr
    # The check stopped before its probe, so Synapse was never refused by a notary holding
    # the wrong key (which would have made it back off the notary).
    time.sleep(1.0)
    assert retry_timings(stack, notary_name(stack)) == (0, 0)


def test_check_prints_only_its_own_lines(homeserver_only: Stack) -> None:
    result = check(homeserver_only.gateway_config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "notary: ok" in result.stdout
    # No gateway runs: the check's own outbound listener answered the homeserver.
    assert "outbound: ok (the homeserver's federation requests leave through" in result.stdout
    for line in (result.stdout + result.stderr).splitlines():
        if not line.strip():
            continue
        assert line.startswith(CHECK_LINE_PREFIXES), line
        with pytest.raises(ValueError):
            json.loads(line)


def make_synapse_fail_against_the_notary(stack: Stack) -> None:
    """With no notary listening, a request from an unknown origin makes Synapse ask the
    notary for the origin's key; the refused connection makes it back off the notary."""
    key = generate_signing_key("a_1")
    origin = "backoff-trigger.invalid"
    target = "/_matrix/federation/v1/query/profile?user_id=" + quote(
        f"@nobody:{stack.server_name}", safe=""
    )
    authorization = sign_request("GET", target, origin, stack.server_name, None, key)
    with httpx.Client(base_url=stack.homeserver_url, timeout=60) as client:
        request = client.build_request("GET", target, headers={"Authorization": authorization})
        request.url = request.url.copy_with(raw_path=target.encode())
        assert client.send(request).status_code == 401
    deadline = time.monotonic() + 15
    while retry_timings(stack, notary_name(stack))[1] == 0:
        assert time.monotonic() < deadline, "Synapse did not back off the notary"
        time.sleep(0.2)


def test_check_ends_a_backoff_of_the_notary_and_says_so(homeserver_only: Stack) -> None:
    stack = homeserver_only
    make_synapse_fail_against_the_notary(stack)
    name = notary_name(stack)
    assert retry_timings(stack, name)[1] >= 600_000  # Synapse's first backoff: 10 minutes

    result = check(stack.gateway_config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backing off" in result.stdout
    assert f"/_synapse/admin/v1/federation/destinations/{name}/reset_connection" in result.stdout
    assert "notary: ok" in result.stdout
    assert retry_timings(stack, name) == (0, 0)


def test_check_ends_a_backoff_through_the_running_gateway(homeserver_only: Stack) -> None:
    # The usual way into a backoff: the gateway was down while the homeserver needed a key.
    stack = homeserver_only
    make_synapse_fail_against_the_notary(stack)
    gateway = gateway_process(
        stack.gateway_config_path,
        ready_url=f"{stack.internal_url}/health",
        log_path=stack.gateway_log_path,
    )
    gateway.start()
    try:
        gateway.wait_until_ready(timeout=60)
        name = notary_name(stack)
        assert retry_timings(stack, name)[1] > 0  # starting the gateway does not end it
        result = check(stack.gateway_config_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "backing off" in result.stdout
        assert retry_timings(stack, name) == (0, 0)
    finally:
        gateway.stop()
