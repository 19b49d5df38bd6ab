"""One rule for relative paths: relative to the configuration file, whatever the working
directory, for ``gateway check``, ``gateway run`` and ``gateway demo --config`` alike."""

from __future__ import annotations

import json
import shutil
import textwrap
import tomllib
import uuid
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.demo.stack import gateway_config, to_toml
from gateway.policy import PolicyConfigError, PolicySet, load_policy_set, parse_policy_config
from policies.policy_lists import BanList
from tests.unit.policy.contexts import FIXTURES

DENY_ALL = """
from gateway.policy.api import allow, deny

async def on_invite(ctx, options):
    return deny("no invites") if options.get("deny") else allow()
"""


def _minimal(extra: str) -> str:
    return textwrap.dedent(
        """
        [server]
        server_name = "hs.test"
        [homeserver]
        url = "http://127.0.0.1:1"
        """
    ) + textwrap.dedent(extra)


def _user_dir(tmp_path: Path) -> tuple[Path, str]:
    """A directory as an operator would have it: the config, a policy file, a policy package
    and a ban list, all referred to by relative paths."""
    user = tmp_path / "operator"
    (user / "mypolicies").mkdir(parents=True)
    (user / "mypolicies" / "deny_all.py").write_text(DENY_ALL)
    package = f"localpolicies_{uuid.uuid4().hex[:8]}"
    (user / package).mkdir()
    (user / package / "__init__.py").write_text("")
    (user / package / "deny_all.py").write_text(DENY_ALL)
    (user / "lists").mkdir()
    shutil.copy(FIXTURES / "banlist.json", user / "lists" / "ban.json")
    (user / "gateway.toml").write_text(
        _minimal(
            f"""
            [[policies]]
            module = "mypolicies/deny_all.py"
            options = {{ deny = true }}

            [[policies]]
            module = "{package}.deny_all"
            name = "packaged"

            [[policies]]
            module = "policies.policy_lists"
            options = {{ files = ["lists/ban.json"] }}
            """
        )
    )
    return user, package


def _loaded(path: Path) -> PolicySet:
    return load_policy_set(load_config(path).policies)


def _summary(policies: PolicySet) -> list[tuple[str, str | None, int | None]]:
    out = []
    for p in policies.policies:
        bans = getattr(p.options, "bans", None)
        out.append((p.name, p.module.__file__, len(bans) if bans is not None else None))
    return out


def test_policy_lists_files_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, _ = _user_dir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = _loaded(user / "gateway.toml").policies
    (policy_lists,) = [p for p in loaded if p.name == "policy_lists"]
    rules = json.loads((user / "lists" / "ban.json").read_text())
    assert len(policy_lists.options.bans) == len(BanList(rules)) > 0


def test_entry_base_dir_moves_relative_paths_of_that_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _user_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "gateway.toml").write_text(
        _minimal(
            """
            [[policies]]
            module = "policies.policy_lists"
            base_dir = "../operator"
            options = { files = ["lists/ban.json"] }
            """
        )
    )
    (policy_lists,) = _loaded(other / "gateway.toml").policies
    assert policy_lists.spec.base_dir == other / "../operator"
    assert len(policy_lists.options.bans) > 0


def test_base_dir_must_be_a_path_string() -> None:
    with pytest.raises(PolicyConfigError) as info:
        parse_policy_config([{"module": "policies.policy_lists", "base_dir": 3}])
    assert info.value.problems == ["policies[0].base_dir: must be a directory path string, got 3"]


def test_demo_config_resolves_relative_policy_paths_like_gateway_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, package = _user_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    # What `gateway check --config operator/gateway.toml` loads.
    checked = _summary(_loaded(user / "gateway.toml"))

    # What the demo writes into its own data directory from the same file.
    data_dir = tmp_path / "demo-data"
    (data_dir / "synapse").mkdir(parents=True)
    (data_dir / "synapse" / "signing.key").write_text("ed25519 a AAAA\n")
    document = gateway_config(
        server_name="localhost:8448",
        public_port=8448,
        internal_port=8449,
        homeserver_url="http://127.0.0.1:8008",
        signing_key_path="synapse/signing.key",
        user_config=tomllib.loads((user / "gateway.toml").read_text()),
        user_config_dir=user,
    )
    (data_dir / "gateway.toml").write_text(to_toml(document))
    demo = _summary(_loaded(data_dir / "gateway.toml"))

    assert demo == checked
    assert [name for name, _, _ in demo] == ["deny_all", "packaged", "policy_lists"]
    assert demo[0][1] == str(user / "mypolicies" / "deny_all.py")
    assert demo[1][1] == str(user / package / "deny_all.py")
    assert demo[2][2] is not None and demo[2][2] > 0


def test_demo_keeps_its_own_notary_and_resolves_the_store_path(tmp_path: Path) -> None:
    document = gateway_config(
        server_name="localhost:8448",
        public_port=8448,
        internal_port=8449,
        homeserver_url="http://127.0.0.1:8008",
        signing_key_path="synapse/signing.key",
        user_config={
            "notary": {"state_dir": "mystate", "server_name": "x:1", "delegation_key_lifetime": 60},
            "store": {"sqlite_path": "db/gw.db"},
        },
        user_config_dir=tmp_path,
    )
    assert document["notary"] == {
        "server_name": "localhost:8449",
        "state_dir": "state",
        "delegation_key_lifetime": 60,
    }
    assert document["store"]["sqlite_path"] == str(tmp_path / "db" / "gw.db")
