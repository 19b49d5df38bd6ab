"""Server discovery against a real DNS server and real HTTPS .well-known servers on loopback."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gateway.federation import (
    DiscoveryError,
    Endpoint,
    FederationClient,
    ResolvedServer,
    parse_server_name,
)
from gateway.federation.resolver import SrvRecord, order_srv_records
from tests.support.dns_server import LoopbackDnsServer
from tests.unit.federation.support import Reply, StartHttps

WK = "/.well-known/matrix/server"


class Clock:
    def __init__(self, now: int = 1_700_000_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("example.org", ("example.org", None)),
        ("example.org:8449", ("example.org", 8449)),
        ("1.2.3.4", ("1.2.3.4", None)),
        ("1.2.3.4:80", ("1.2.3.4", 80)),
        ("[::1]", ("::1", None)),
        ("[1234:5678::abcd]:443", ("1234:5678::abcd", 443)),
        ("localhost", ("localhost", None)),
    ],
)
def test_parse_server_name(name: str, parsed: tuple[str, int | None]) -> None:
    assert parse_server_name(name) == parsed


@pytest.mark.parametrize(
    "name",
    ["", "exa mple.org", "example.org:", "example.org:123456", "example.org:0", "[::1", "[x]:1",
     "[::1]x", "example.org:8a", "ex_ample.org", "a" * 256],
)  # fmt: skip
def test_parse_server_name_rejects(name: str) -> None:
    with pytest.raises(DiscoveryError):
        parse_server_name(name)


def test_srv_order_by_priority_then_weight() -> None:
    records = [
        SrvRecord(20, 0, 1, "c"),
        SrvRecord(10, 0, 2, "b"),
        SrvRecord(10, 100, 3, "a"),
        SrvRecord(5, 0, 4, "d"),
    ]
    ordered = order_srv_records(records)
    assert ordered[0].target == "d"
    assert {r.target for r in ordered[1:3]} == {"a", "b"}
    assert ordered[3].target == "c"


MakeClient = Callable[..., FederationClient]


async def test_ip_literals(make_client: MakeClient) -> None:
    d = make_client().discovery
    assert await d.resolve("1.2.3.4") == ResolvedServer(
        "1.2.3.4", (Endpoint("1.2.3.4", 8448),), "1.2.3.4", "1.2.3.4"
    )
    assert await d.resolve("[2001:db8::1]:8449") == ResolvedServer(
        "[2001:db8::1]:8449", (Endpoint("2001:db8::1", 8449),), "2001:db8::1", "[2001:db8::1]:8449"
    )


async def test_explicit_port_skips_well_known_and_srv(
    make_client: MakeClient, dns_server: LoopbackDnsServer
) -> None:
    dns_server.add("_matrix-fed._tcp.remote.test", "SRV", "0 0 9999 elsewhere.test.")
    resolved = await make_client().discovery.resolve("remote.test:1234")
    assert resolved == ResolvedServer(
        "remote.test:1234", (Endpoint("remote.test", 1234),), "remote.test", "remote.test:1234"
    )
    assert dns_server.queries == []


async def test_well_known_with_explicit_port(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    wk = await start_https("remote.test")
    wk.reply("GET", WK, Reply.json({"m.server": "delegated.test:7777"}))
    dns_server.add("remote.test", "A", "127.0.0.1")
    resolved = await make_client(well_known_port=wk.port).discovery.resolve("remote.test")
    assert resolved == ResolvedServer(
        "remote.test", (Endpoint("delegated.test", 7777),), "delegated.test", "delegated.test:7777"
    )
    (request,) = wk.requests
    assert request.headers["host"] == f"remote.test:{wk.port}"
    assert request.sni == "remote.test"


async def test_well_known_then_srv_on_delegated_name(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    wk = await start_https("remote.test")
    wk.reply("GET", WK, Reply.json({"m.server": "delegated.test"}))
    dns_server.add("remote.test", "A", "127.0.0.1")
    dns_server.add("_matrix-fed._tcp.delegated.test", "SRV", "10 0 8500 target.test.")
    dns_server.add("_matrix._tcp.delegated.test", "SRV", "10 0 8600 old.test.")
    resolved = await make_client(well_known_port=wk.port).discovery.resolve("remote.test")
    # SRV moves the connection; TLS and Host stay with the delegated name.
    assert resolved == ResolvedServer(
        "remote.test", (Endpoint("target.test", 8500),), "delegated.test", "delegated.test"
    )


async def test_well_known_then_deprecated_srv(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    wk = await start_https("remote.test")
    wk.reply("GET", WK, Reply.json({"m.server": "delegated.test"}))
    dns_server.add("remote.test", "A", "127.0.0.1")
    dns_server.add("_matrix._tcp.delegated.test", "SRV", "10 0 8600 old.test.")
    resolved = await make_client(well_known_port=wk.port).discovery.resolve("remote.test")
    assert resolved.endpoints == (Endpoint("old.test", 8600),)
    assert (resolved.tls_name, resolved.host_header) == ("delegated.test", "delegated.test")
    assert ("_matrix-fed._tcp.delegated.test", "SRV") in dns_server.queries


async def test_well_known_then_default_port(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    wk = await start_https("remote.test")
    wk.reply("GET", WK, Reply.json({"m.server": "delegated.test"}))
    dns_server.add("remote.test", "A", "127.0.0.1")
    resolved = await make_client(well_known_port=wk.port).discovery.resolve("remote.test")
    assert resolved == ResolvedServer(
        "remote.test", (Endpoint("delegated.test", 8448),), "delegated.test", "delegated.test"
    )


async def test_well_known_delegating_to_ip_literal(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    wk = await start_https("remote.test")
    wk.reply("GET", WK, Reply.json({"m.server": "[2001:db8::5]"}))
    dns_server.add("remote.test", "A", "127.0.0.1")
    resolved = await make_client(well_known_port=wk.port).discovery.resolve("remote.test")
    assert resolved == ResolvedServer(
        "remote.test", (Endpoint("2001:db8::5", 8448),), "2001:db8::5", "[2001:db8::5]"
    )


@pytest.mark.parametrize(
    "reply",
    [
        Reply.json({"errcode": "M_NOT_FOUND"}, status=404),
        Reply(200, b"not json"),
        Reply.json({"m.server": 5}),
        Reply.json({"m.server": "bad name!"}),
        Reply.json(["m.server"]),
    ],
)
async def test_invalid_well_known_falls_back_to_srv_on_hostname(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps, reply: Reply
) -> None:
    wk = await start_https("remote.test")
    wk.reply("GET", WK, reply)
    dns_server.add("remote.test", "A", "127.0.0.1")
    dns_server.add("_matrix-fed._tcp.remote.test", "SRV", "10 0 8500 target.test.")
    resolved = await make_client(well_known_port=wk.port).discovery.resolve("remote.test")
    assert resolved == ResolvedServer(
        "remote.test", (Endpoint("target.test", 8500),), "remote.test", "remote.test"
    )
    assert len(wk.requests) == 1


async def test_no_well_known_no_srv_uses_8448(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    wk = await start_https("remote.test")
    wk.reply("GET", WK, Reply.json({}, status=404))
    dns_server.add("remote.test", "A", "127.0.0.1")
    dns_server.add("_matrix._tcp.remote.test", "SRV", "10 0 8600 old.test.")
    d = make_client(well_known_port=wk.port).discovery
    assert (await d.resolve("remote.test")).endpoints == (Endpoint("old.test", 8600),)
    dns_server.records.pop(("_matrix._tcp.remote.test", "SRV"))
    resolved = await d.resolve("remote.test")
    assert resolved == ResolvedServer(
        "remote.test", (Endpoint("remote.test", 8448),), "remote.test", "remote.test"
    )


async def test_well_known_cached_per_cache_control(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    wk = await start_https("remote.test")
    wk.reply(
        "GET", WK, Reply.json({"m.server": "a.test:1"}, **{"Cache-Control": "public, max-age=60"})
    )
    dns_server.add("remote.test", "A", "127.0.0.1")
    clock = Clock()
    d = make_client(well_known_port=wk.port, clock_ms=clock).discovery
    await d.resolve("remote.test")
    clock.now += 59_000
    await d.resolve("remote.test")
    assert len(wk.requests) == 1
    clock.now += 2_000
    wk.reply("GET", WK, Reply.json({"m.server": "b.test:2"}))
    assert (await d.resolve("remote.test")).endpoints == (Endpoint("b.test", 2),)
    assert len(wk.requests) == 2
    # Without cache headers: 24 hours.
    clock.now += 24 * 3600_000 - 1
    await d.resolve("remote.test")
    assert len(wk.requests) == 2
    clock.now += 2
    await d.resolve("remote.test")
    assert len(wk.requests) == 3


async def test_well_known_cache_time_is_capped_at_48_hours(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    wk = await start_https("remote.test")
    wk.reply(
        "GET", WK, Reply.json({"m.server": "a.test:1"}, **{"Cache-Control": "max-age=9999999"})
    )
    dns_server.add("remote.test", "A", "127.0.0.1")
    clock = Clock()
    d = make_client(well_known_port=wk.port, clock_ms=clock).discovery
    await d.resolve("remote.test")
    clock.now += 48 * 3600_000 + 1
    await d.resolve("remote.test")
    assert len(wk.requests) == 2


async def test_well_known_errors_cached_with_backoff(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    wk = await start_https("remote.test")
    wk.reply("GET", WK, Reply.json({}, status=500))
    dns_server.add("remote.test", "A", "127.0.0.1")
    clock = Clock()
    d = make_client(well_known_port=wk.port, clock_ms=clock).discovery
    await d.resolve("remote.test")
    await d.resolve("remote.test")
    assert len(wk.requests) == 1
    clock.now += 2 * 60_000  # first failure: cached two minutes
    await d.resolve("remote.test")
    assert len(wk.requests) == 2
    clock.now += 2 * 60_000  # second failure: four minutes
    await d.resolve("remote.test")
    assert len(wk.requests) == 2
    clock.now += 2 * 60_000
    wk.reply("GET", WK, Reply.json({"m.server": "a.test:1"}))
    assert (await d.resolve("remote.test")).endpoints == (Endpoint("a.test", 1),)
    # Backoff grows to at most an hour.
    wk.reply("GET", WK, Reply.json({}, status=500))
    for _ in range(12):
        clock.now += 48 * 3600_000
        await d.resolve("remote.test")
    count = len(wk.requests)
    clock.now += 3600_000
    await d.resolve("remote.test")
    assert len(wk.requests) == count + 1


async def test_well_known_redirect_followed_through_guard(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    wk = await start_https("remote.test", "other.test")
    wk.reply("GET", WK, Reply(302, headers={"Location": "/elsewhere"}))
    wk.reply("GET", "/elsewhere", Reply.json({"m.server": "a.test:1"}))
    dns_server.add("remote.test", "A", "127.0.0.1")
    d = make_client(well_known_port=wk.port).discovery
    assert (await d.resolve("remote.test")).endpoints == (Endpoint("a.test", 1),)
    assert [r.target for r in wk.requests] == [WK, "/elsewhere"]


async def test_well_known_redirect_to_private_address_refused(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    wk = await start_https("remote.test")
    wk.reply("GET", WK, Reply(301, headers={"Location": "https://internal.test/secret"}))
    dns_server.add("remote.test", "A", "127.0.0.1")
    dns_server.add("internal.test", "A", "10.0.0.1")
    d = make_client(well_known_port=wk.port).discovery
    # The redirect is refused before any connection, so discovery falls back to 8448.
    assert (await d.resolve("remote.test")).endpoints == (Endpoint("remote.test", 8448),)
    assert [r.target for r in wk.requests] == [WK]


async def test_well_known_on_private_address_not_fetched(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    wk = await start_https("remote.test")
    wk.reply("GET", WK, Reply.json({"m.server": "a.test:1"}))
    dns_server.add("remote.test", "A", "127.0.0.1")
    d = make_client(well_known_port=wk.port, ip_range_whitelist=[]).discovery
    assert (await d.resolve("remote.test")).endpoints == (Endpoint("remote.test", 8448),)
    assert wk.connections == 0


async def test_well_known_certificate_checked_unless_whitelisted(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    wk = await start_https("someone-else.test")
    wk.reply("GET", WK, Reply.json({"m.server": "a.test:1"}))
    dns_server.add("remote.test", "A", "127.0.0.1")
    strict = make_client(well_known_port=wk.port).discovery
    assert (await strict.resolve("remote.test")).endpoints == (Endpoint("remote.test", 8448),)
    assert wk.requests == []
    lax = make_client(
        well_known_port=wk.port, federation_certificate_verification_whitelist=["*.test"]
    ).discovery
    assert (await lax.resolve("remote.test")).endpoints == (Endpoint("a.test", 1),)


async def test_srv_target_dot_means_no_service(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    wk = await start_https("remote.test")
    dns_server.add("remote.test", "A", "127.0.0.1")
    dns_server.add("_matrix-fed._tcp.remote.test", "SRV", "0 0 0 .")
    with pytest.raises(DiscoveryError):
        await make_client(well_known_port=wk.port).discovery.resolve("remote.test")
