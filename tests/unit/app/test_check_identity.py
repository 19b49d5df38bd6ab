"""`gateway check` compares server.server_name and the signing key copy with the homeserver's
own ``/_matrix/key/v2/server``; the notary publishes its own key there too."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import signedjson.key
import signedjson.sign
import trio
from signedjson.types import SigningKey

from gateway.homeserver.identity import HomeserverKeys, identity_problems, parse_server_keys
from tests.unit.app.conftest import (
    FAKE_HOMESERVER_KEY,
    FAKE_HOMESERVER_KEYS,
    FakeHomeserver,
    StartGateway,
    make_config,
)
from tests.unit.app.test_app_cli import run_cli, write_config


def public_key(key: SigningKey) -> str:
    return str(signedjson.key.encode_verify_key_base64(signedjson.key.get_verify_key(key)))


def write_key(path: Path, key: SigningKey) -> Path:
    with path.open("w") as f:
        signedjson.key.write_signing_keys(f, [key])
    return path


HOMESERVER = parse_server_keys(FAKE_HOMESERVER_KEYS)
URL = "http://127.0.0.1:8008"


def test_parse_server_keys_reads_name_and_keys() -> None:
    assert HOMESERVER.server_name == "hs.test"
    assert HOMESERVER.verify_keys == {"ed25519:a_fake": public_key(FAKE_HOMESERVER_KEY)}


@pytest.mark.parametrize(
    "answer", [None, [], {"verify_keys": {}}, {"server_name": "hs.test", "verify_keys": []}]
)
def test_parse_server_keys_refuses_answers_without_name_or_keys(answer: object) -> None:
    with pytest.raises(ValueError):
        parse_server_keys(answer)


def test_no_problem_when_name_and_key_are_the_homeservers() -> None:
    problems = identity_problems(
        HOMESERVER, server_name="hs.test", homeserver_url=URL, signing_key=FAKE_HOMESERVER_KEY
    )
    assert problems == []


def test_a_wrong_server_name_names_the_key_and_both_values() -> None:
    (problem,) = identity_problems(HOMESERVER, server_name="other.test", homeserver_url=URL)
    assert problem.startswith("server.server_name: ")
    assert '"other.test"' in problem
    assert '"hs.test"' in problem
    assert URL in problem


def test_a_wrong_key_copy_names_both_key_ids_and_public_keys(tmp_path: Path) -> None:
    other = signedjson.key.generate_signing_key("a_other")
    (problem,) = identity_problems(
        HOMESERVER,
        server_name="hs.test",
        homeserver_url=URL,
        signing_key=other,
        signing_key_path=tmp_path / "copy.key",
    )
    assert problem.startswith("server.signing_key_path: ")
    assert "does not match the homeserver's key" in problem
    assert f"ed25519:a_other with public key {public_key(other)}" in problem
    assert f"ed25519:a_fake with public key {public_key(FAKE_HOMESERVER_KEY)}" in problem
    assert str(tmp_path / "copy.key") in problem


def test_same_key_id_with_another_public_key_is_a_mismatch() -> None:
    impostor = signedjson.key.generate_signing_key("a_fake")
    (problem,) = identity_problems(
        HOMESERVER, server_name="hs.test", homeserver_url=URL, signing_key=impostor
    )
    assert "does not match the homeserver's key" in problem


def test_a_retired_key_of_the_homeserver_is_called_so() -> None:
    old = signedjson.key.generate_signing_key("a_old")
    keys = HomeserverKeys(
        server_name="hs.test",
        verify_keys=HOMESERVER.verify_keys,
        old_verify_keys={"ed25519:a_old": public_key(old)},
    )
    (problem,) = identity_problems(keys, server_name="hs.test", homeserver_url=URL, signing_key=old)
    assert "a key the homeserver used before" in problem


def notary_config(tmp_path: Path, homeserver_url: str, key: SigningKey, name: str) -> Path:
    path = write_config(
        tmp_path,
        homeserver_url,
        f'[public]\nbind = "127.0.0.1:0"\n[notary]\nstate_dir = "{tmp_path / "state"}"\n',
    )
    key_path = write_key(tmp_path / "homeserver.signing.key", key)
    text = path.read_text().replace(
        'server_name = "hs.test"\n',
        f'server_name = "{name}"\nsigning_key_path = "{key_path}"\n',
        1,
    )
    path.write_text(text)
    return path


async def test_check_stops_at_a_wrong_server_name_with_status_1(
    tmp_path: Path, homeserver: FakeHomeserver
) -> None:
    path = notary_config(tmp_path, homeserver.url, FAKE_HOMESERVER_KEY, "other.test")
    result = await run_cli("check", "--config", str(path))
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert 'server.server_name: is "other.test"' in stderr
    assert 'named "hs.test"' in stderr
    # Nothing reached the homeserver's federation API: the check stopped before its probe.
    assert not [s for s in homeserver.seen if s.raw_path.startswith(b"/_matrix/federation/v1/q")]


async def test_check_stops_at_a_wrong_signing_key_copy_with_status_1(
    tmp_path: Path, homeserver: FakeHomeserver
) -> None:
    other = signedjson.key.generate_signing_key("a_other")
    path = notary_config(tmp_path, homeserver.url, other, "hs.test")
    result = await run_cli("check", "--config", str(path))
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "server.signing_key_path: the signing key copy" in stderr
    assert "does not match the homeserver's key (ed25519:a_fake" in stderr


async def test_check_passes_the_homeservers_own_name_and_key_on_to_the_probe(
    tmp_path: Path, homeserver: FakeHomeserver
) -> None:
    path = notary_config(tmp_path, homeserver.url, FAKE_HOMESERVER_KEY, "hs.test")
    result = await run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr.decode()
    assert "server name and signing key as configured" in result.stdout.decode()
    assert "notary: ok" in result.stdout.decode()


async def test_the_notary_publishes_its_own_self_signed_key(
    tmp_path: Path, homeserver: FakeHomeserver, start_gateway: StartGateway
) -> None:
    key_path = write_key(tmp_path / "homeserver.signing.key", FAKE_HOMESERVER_KEY)
    config = make_config(
        tmp_path,
        homeserver.url,
        server={"signing_key_path": str(key_path)},
        notary={"server_name": "localhost:8449", "state_dir": str(tmp_path / "state")},
    )
    listening = await start_gateway(config)
    async with httpx.AsyncClient(verify=False) as client:
        answer = await client.get(listening.internal_url + "/_matrix/key/v2/server")
    assert answer.status_code == 200
    keys = answer.json()
    assert keys["server_name"] == "localhost:8449"
    assert keys["valid_until_ts"] > trio.current_time()  # a wall-clock time in ms, far ahead
    ((key_id, entry),) = keys["verify_keys"].items()
    version = key_id.split(":", 1)[1]
    verify_key = signedjson.key.decode_verify_key_base64("ed25519", version, entry["key"])
    signedjson.sign.verify_signed_json(keys, "localhost:8449", verify_key)
