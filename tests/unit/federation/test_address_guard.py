from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway.federation import DEFAULT_IP_RANGE_BLACKLIST, AddressGuard, AddressRefused


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.9.9.9",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "224.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "2001:db8::1",
        # IPv6 spellings of blacklisted IPv4 addresses.
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::1",
    ],
)
def test_default_blacklist_refuses(address: str) -> None:
    guard = AddressGuard()
    assert not guard.is_allowed(address)
    with pytest.raises(AddressRefused) as info:
        guard.check(address)
    assert info.value.address


@pytest.mark.parametrize("address", ["1.1.1.1", "8.8.8.8", "172.32.0.1", "2606:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert AddressGuard().is_allowed(address)


def test_whitelist_overrides_blacklist() -> None:
    guard = AddressGuard(ip_range_whitelist=["127.0.0.1/32", "10.5.0.0/16"])
    assert guard.is_allowed("127.0.0.1")
    assert guard.is_allowed("::ffff:127.0.0.1")
    assert guard.is_allowed("10.5.3.4")
    assert not guard.is_allowed("127.0.0.2")
    assert not guard.is_allowed("10.6.0.1")


def test_custom_blacklist_replaces_default() -> None:
    guard = AddressGuard(ip_range_blacklist=["8.8.8.0/24"])
    assert not guard.is_allowed("8.8.8.8")
    assert guard.is_allowed("127.0.0.1")


def test_not_an_address_is_refused() -> None:
    assert not AddressGuard().is_allowed("example.org")


def test_malformed_cidr_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        AddressGuard(ip_range_blacklist=["10.0.0.0/33"])


def test_default_matches_example_configuration() -> None:
    config = Path(__file__).resolve().parents[3] / "gateway.toml"
    federation = tomllib.loads(config.read_text())["federation"]
    assert tuple(federation["ip_range_blacklist"]) == DEFAULT_IP_RANGE_BLACKLIST
