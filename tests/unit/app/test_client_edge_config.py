"""``[guests]`` and ``[cors]`` in gateway.toml: defaults shown in the example file, every
problem reported by its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import (
    GUEST_ENDPOINTS,
    ConfigError,
    CorsConfig,
    GuestsConfig,
    TokenBucket,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[3]


def test_the_example_file_shows_the_defaults() -> None:
    config = load_config(REPO / "gateway.toml")
    assert config.guests == GuestsConfig()
    assert not config.guests.enabled
    assert config.guests.allowed_endpoints == GUEST_ENDPOINTS
    assert config.cors == CorsConfig()
    # The spec's recommendation (client-server API, "Web Browser Clients").
    assert config.cors.allow_headers == ("X-Requested-With", "Content-Type", "Authorization")
    assert config.cors.allow_methods == ("GET", "POST", "PUT", "DELETE", "OPTIONS")


def test_settings_are_read() -> None:
    config = parse_config(
        {
            "server": {"server_name": "hs.test"},
            "guests": {
                "enabled": True,
                "whoami_cache_seconds": 5,
                "state_rate": {"capacity": 1, "per_second": 0.5},
                "send_rate": {"per_second": 2},
                "restrict_endpoints": True,
                "allowed_endpoints": ["GET /sync", "POST /user/{userId}/filter"],
            },
            "cors": {"allow_origin": "https://app.example:8443", "max_age": 600},
        },
        base_dir=Path("."),
    )
    assert config.guests.state_rate == TokenBucket(1.0, 0.5)
    assert config.guests.send_rate == TokenBucket(10.0, 2.0)  # capacity keeps its default
    assert config.guests.allowed_endpoints == ("GET /sync", "POST /user/{userId}/filter")
    assert config.cors.allow_origin == "https://app.example:8443"


def test_every_problem_is_reported_by_its_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "server": {"server_name": "hs.test"},
                "guests": {
                    "enabled": "yes",
                    "whoami_cache_seconds": 3600,
                    "whoami_cache_size": 0,
                    "state_rate": {"capacity": 0, "burst": 1},
                    "send_rate": 5,
                    "allowed_endpoints": [
                        "GET /sync",
                        "FETCH /sync",
                        "GET /_matrix/client/v3/sync",
                        "GET /rooms/{roomId}x",
                        7,
                    ],
                    "colour": "blue",
                },
                "cors": {
                    "allow_origin": "https://app.example/path",
                    "allow_methods": ["get"],
                    "allow_headers": ["Bad Header"],
                    "max_age": 90000,
                },
            },
            base_dir=Path("."),
        )
    keys = [problem.split(":", 1)[0] for problem in info.value.problems]
    assert sorted(keys) == sorted(
        [
            "guests.colour",
            "guests.enabled",
            "guests.whoami_cache_seconds",
            "guests.whoami_cache_size",
            "guests.state_rate.burst",
            "guests.state_rate.capacity",
            "guests.send_rate",
            "guests.allowed_endpoints[1]",
            "guests.allowed_endpoints[2]",
            "guests.allowed_endpoints[3]",
            "guests.allowed_endpoints[4]",
            "cors.allow_origin",
            "cors.allow_methods",
            "cors.allow_headers",
            "cors.max_age",
        ]
    )
