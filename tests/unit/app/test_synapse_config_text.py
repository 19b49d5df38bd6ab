"""What ``gateway synapse-config`` tells the operator besides the settings themselves."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import signedjson.key
import yaml

from gateway.commands import synapse_config


def test_synapse_config_says_replace_and_flags_the_loopback_allowances(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path = tmp_path / "signing.key"
    with key_path.open("w") as f:
        signedjson.key.write_signing_keys(f, [signedjson.key.generate_signing_key("a1")])
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[server]\nserver_name = "hs.test"\nsigning_key_path = "signing.key"\n'
        '[homeserver]\nurl = "http://127.0.0.1:8008"\n[internal]\nbind = "127.0.0.1:8449"\n'
    )
    assert synapse_config.main(argparse.Namespace(config=config)) == 0
    out = capsys.readouterr().out
    comments = " ".join(line.lstrip("# ") for line in out.splitlines() if line.startswith("#"))

    assert "trusted_key_servers: REPLACE the existing list" in comments
    assert "do not add the notary to it" in comments
    assert "Add to the homeserver" not in out
    assert (
        "ip_range_whitelist and federation_certificate_verification_whitelist loosen "
        "Synapse's protection against server-side request forgery, for loopback only"
    ) in comments
    # The settings follow the comments and say what the comments say.
    assert 'ip_range_whitelist: ["127.0.0.1"]' in out
    assert 'federation_certificate_verification_whitelist: ["localhost"]' in out
    assert '  - server_name: "localhost:8449"' in out


def test_synapse_config_prints_the_outbound_settings_synapse_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path = tmp_path / "signing.key"
    with key_path.open("w") as f:
        signedjson.key.write_signing_keys(f, [signedjson.key.generate_signing_key("a1")])
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[server]\nserver_name = "hs.test"\nsigning_key_path = "signing.key"\n'
        '[internal]\nbind = "127.0.0.1:8449"\n'
        '[outbound]\nenabled = true\nbind = "127.0.0.1:8450"\n'
        'secret = "a-long-enough-secret-value"\n'
    )
    assert synapse_config.main(argparse.Namespace(config=config)) == 0
    settings = yaml.safe_load(capsys.readouterr().out)
    assert settings["worker_replication_secret"] == "a-long-enough-secret-value"
    assert settings["instance_map"] == {"gateway": {"host": "127.0.0.1", "port": 8450}}
    assert settings["outbound_federation_restricted_to"] == ["gateway"]
    # The notary settings are still there.
    assert settings["trusted_key_servers"][0]["server_name"] == "localhost:8449"


def test_synapse_config_without_outbound_says_nothing_of_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path = tmp_path / "signing.key"
    with key_path.open("w") as f:
        signedjson.key.write_signing_keys(f, [signedjson.key.generate_signing_key("a1")])
    config = tmp_path / "gateway.toml"
    config.write_text('[server]\nserver_name = "hs.test"\nsigning_key_path = "signing.key"\n')
    assert synapse_config.main(argparse.Namespace(config=config)) == 0
    out = capsys.readouterr().out
    assert "outbound_federation_restricted_to" not in out
    assert "worker_replication_secret" not in out
