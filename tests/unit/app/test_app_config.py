"""Loading gateway.toml: defaults, paths, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import (
    BindAddress,
    ConfigError,
    FederationConfig,
    GatewayConfig,
    HomeserverConfig,
    LogConfig,
    PublicConfig,
    ServerConfig,
    StoreConfig,
    load_config,
)

REPO = Path(__file__).resolve().parents[3]


def test_example_config_is_valid_and_shows_the_defaults(tmp_path: Path) -> None:
    config = load_config(REPO / "gateway.toml")
    defaults = GatewayConfig(server=ServerConfig("example.org"))
    assert config.homeserver == defaults.homeserver == HomeserverConfig()
    assert config.public == PublicConfig()
    assert config.internal == defaults.internal
    assert config.log == LogConfig()
    assert config.store == StoreConfig(sqlite_path=REPO / "gateway.db")
    assert config.federation == FederationConfig()
    assert config.server.server_name == "example.org"
    assert config.server.signing_key_path is None


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text('[server]\nserver_name = "hs.test"\n' + text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    return e.value.problems


def test_values_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "signing.key").write_text("k")
    config = load_config(
        write(
            tmp_path,
            """signing_key_path = "keys/signing.key"
[public]
bind = "[::1]:0"
workers = 3
[internal]
bind = "localhost:9000"
[store]
sqlite_path = "data/gw.db"
[federation]
ip_range_whitelist = ["10.1.0.0/16"]
""",
        )
    )
    assert config.server.signing_key_path == tmp_path / "keys" / "signing.key"
    assert config.public.bind == BindAddress("::1", 0)
    assert config.public.workers == 3
    assert config.internal.bind == BindAddress("localhost", 9000)
    assert config.store.sqlite_path == tmp_path / "data" / "gw.db"
    assert [str(n) for n in config.federation.ip_range_whitelist] == ["10.1.0.0/16"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[public]\nworkers = "two"',
            "public.workers: must be \"auto\" or an integer from 1 to 64, got 'two'",
        ),
        (
            "[public]\nworkers = 0",
            'public.workers: must be "auto" or an integer from 1 to 64, got 0',
        ),
        ("[public]\nmax_body_size = true", "public.max_body_size: must be an integer >= 1"),
        (
            "[public]\nmax_connections = 8",
            'public.max_connections: must be "auto" or an integer from 16 to 1000000, got 8',
        ),
        (
            '[public]\nhttp_server = "uvicorn"',
            "public.http_server: must be one of 'builtin', 'hypercorn', got 'uvicorn'",
        ),
        ("[public]\nbogus = 1", "public.bogus: unknown key"),
        ("[nonsense]\na = 1", "nonsense: unknown section"),
        ('[internal]\nbind = "0.0.0.0:8449"', "internal.bind: must be a loopback address"),
        ('[public]\nbind = "8448"', "public.bind: must be 'host:port'"),
        ('[public]\ntls_certificate_path = "c.pem"', "public.tls_private_key_path: must be set"),
        ('[homeserver]\nurl = "ftp://x"', "homeserver.url: must be an http:// or https:// URL"),
        ('[homeserver]\nurl = "http://h/p"', "homeserver.url: must not have a path"),
        ("[homeserver]\nread_timeout = -1", "homeserver.read_timeout: must be a number of seconds"),
        ('[homeserver]\nexpose_admin_api = "yes"', "homeserver.expose_admin_api: must be true"),
        ('[log]\nformat = "xml"', "log.format: must be one of 'auto', 'json', 'console'"),
        ('[store]\nbackend = "postgres"', "store.postgres_dsn: must be set"),
        ('[federation]\nip_range_blacklist = ["nope"]', "federation.ip_range_blacklist: 'nope'"),
        ('signing_key_path = "missing.key"', "server.signing_key_path: file not found"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(p.startswith(expected) for p in found), found


def test_all_problems_reported_and_server_name_required(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[public]\nworkers = "two"\n[log]\nlevel = "loud"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == [
        "server.server_name: required key is missing",
        "public.workers: must be \"auto\" or an integer from 1 to 64, got 'two'",
        "log.level: must be one of 'debug', 'info', 'warning', 'error', got 'loud'",
    ]
    assert str(path) in e.value.describe()


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_workers_auto_is_one_per_core_this_process_may_use(tmp_path: Path) -> None:
    import os

    config = load_config(write(tmp_path, '[public]\nworkers = "auto"\n'))
    assert config.public.workers == min(64, len(os.sched_getaffinity(0)))
    assert config.public.workers >= 1


def test_max_connections_auto_follows_the_open_file_limit(tmp_path: Path) -> None:
    import resource

    from gateway.app import auto_max_connections, public_server_settings, raise_open_file_limit

    assert auto_max_connections(20_000) == (20_000 - 128) // 2
    assert auto_max_connections(100) == 16
    auto = load_config(write(tmp_path, '[public]\nmax_connections = "auto"\n'))
    assert auto.public.max_connections is None
    limit = raise_open_file_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == limit
    assert public_server_settings(auto).max_connections == auto_max_connections(limit)
    fixed = load_config(write(tmp_path, "[public]\nmax_connections = 500\n"))
    assert public_server_settings(fixed).max_connections == 500
