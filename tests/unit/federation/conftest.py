from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trustme

from gateway.federation import DnspythonResolver, FederationClient
from gateway.store import Store, open_store
from tests.support.dns_server import LoopbackDnsServer
from tests.unit.federation.support import HttpsTestServer, StartHttps


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_ssl_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
async def dns_server(nursery: trio.Nursery) -> LoopbackDnsServer:
    server = LoopbackDnsServer()
    await nursery.start(server.serve)
    return server


@pytest.fixture
def start_https(nursery: trio.Nursery, ca: trustme.CA) -> StartHttps:
    """Start an HTTPS server on loopback whose certificate covers the given names."""

    async def start(*names: str) -> HttpsTestServer:
        server = HttpsTestServer(ca, names or ("localhost",))
        await nursery.start(server.serve)
        return server

    return start


@pytest.fixture
async def make_client(
    dns_server: LoopbackDnsServer, client_ssl_context: ssl.SSLContext
) -> AsyncIterator[Callable[..., FederationClient]]:
    """A federation client resolving through the test DNS server, loopback allowed."""
    clients: list[FederationClient] = []

    def make(**kwargs: object) -> FederationClient:
        options: dict[str, object] = {
            "request_timeout": 5.0,
            "ip_range_whitelist": ["127.0.0.1/32"],
            "ssl_context": client_ssl_context,
            "resolver": DnspythonResolver(dns_server.resolver(), timeout=2.0, static_hosts={}),
        }
        options.update(kwargs)
        client = FederationClient.create(**options)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await open_store("sqlite", sqlite_path=str(tmp_path / "keys.db"))
    try:
        yield store
    finally:
        await store.aclose()
