"""The parts every handler may reach through ``request.services``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import signedjson.key
from nacl.signing import SigningKey as Ed25519SigningKey
from signedjson.types import SigningKey

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.federation import FederationClient, Keyring, TrustedKeyServer
from gateway.homeserver.forward import Forwarder, ForwardSettings
from gateway.homeserver.state import HomeserverStateReader
from gateway.metrics import Metrics
from gateway.notary import DelegationKeys, Notary, NotaryKey, prepare_notary_files
from gateway.notary.keys import load_or_create_secret
from gateway.notary.vouches import StoreVouchRecords
from gateway.policy import PolicyEngine, PolicyLoadError, PolicyMetrics
from gateway.store import Store, open_store

__all__ = [
    "Services",
    "forward_settings",
    "load_homeserver_signing_key",
    "now_ms",
    "open_services",
]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Services:
    """Shared, long-lived parts of one worker process.

    ``forwarder`` sends requests to the homeserver byte for byte (passthrough, and the
    owned handlers' ``forward(request)``); ``homeserver`` is an httpx client with
    ``base_url`` set to the homeserver for the gateway's own calls to it (paths the gateway
    composes itself);
    ``keyring`` fetches and verifies other servers' keys; ``notary`` is set when the
    homeserver's signing key is configured (``server.signing_key_path``), and so is
    ``room_state``, the one reader of room state through the homeserver's federation API
    (joins, knocks, outbound invites and the policies' tools share its caches).
    """

    config: GatewayConfig
    metrics: Metrics
    forwarder: Forwarder
    homeserver: httpx.AsyncClient
    store: Store | None = None
    federation: FederationClient | None = None
    keyring: Keyring | None = None
    notary: Notary | None = None
    #: the homeserver's own signing key (a copy), when configured
    homeserver_signing_key: SigningKey | None = None
    #: room state read from the homeserver, signed as the homeserver (needs its key)
    room_state: HomeserverStateReader | None = None
    #: the admission policy engine (invites, joins, knocks, outbound), when ``[[policies]]``
    #: are configured
    policy: PolicyEngine | None = None
    #: parts added by features that have no field of their own yet
    extra: dict[str, Any] = field(default_factory=dict)

    def require_keyring(self) -> Keyring:
        assert self.keyring is not None, "services opened without a keyring"
        return self.keyring


def forward_settings(config: GatewayConfig) -> ForwardSettings:
    """The :class:`ForwardSettings` of ``config``."""
    hs, public = config.homeserver, config.public
    return ForwardSettings(
        url=hs.url,
        connect_timeout=hs.connect_timeout,
        read_timeout=hs.read_timeout,
        max_body_size=public.max_body_size,
        request_timeout=public.request_timeout,
        x_forwarded=public.x_forwarded,
    )


def load_homeserver_signing_key(path: Path) -> SigningKey:
    with path.open() as f:
        keys = signedjson.key.read_signing_keys(f)
    if not keys:
        raise ValueError(f"{path}: no signing key in the file")
    key: SigningKey = keys[0]
    return key


@asynccontextmanager
async def open_services(
    config: GatewayConfig,
    *,
    metrics: Metrics | None = None,
    notary_name: str | None = None,
) -> AsyncIterator[Services]:
    """Opens everything a worker needs and closes it again on exit."""
    metrics = metrics if metrics is not None else Metrics()
    hs = config.homeserver
    timeout = httpx.Timeout(hs.read_timeout, connect=hs.connect_timeout)
    forwarder = Forwarder(forward_settings(config), metrics)
    fed = config.federation
    async with AsyncExitStack() as stack:
        stack.push_async_callback(forwarder.aclose)
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=hs.url, timeout=timeout)
        )
        store = await open_store(
            config.store.backend,
            sqlite_path=str(config.store.sqlite_path),
            postgres_dsn=config.store.postgres_dsn or None,
        )
        stack.push_async_callback(store.aclose)
        federation = FederationClient.create(
            request_timeout=fed.request_timeout,
            ip_range_blacklist=[str(n) for n in fed.ip_range_blacklist],
            ip_range_whitelist=[str(n) for n in fed.ip_range_whitelist],
            federation_certificate_verification_whitelist=list(
                fed.federation_certificate_verification_whitelist
            ),
        )
        stack.push_async_callback(federation.aclose)
        keyring = Keyring(
            store=store,
            client=federation,
            trusted_key_servers=[
                TrustedKeyServer(t.server_name, dict(t.verify_keys))
                for t in fed.trusted_key_servers
            ],
            clock_ms=now_ms,
        )
        services = Services(
            config=config,
            metrics=metrics,
            forwarder=forwarder,
            homeserver=client,
            store=store,
            federation=federation,
            keyring=keyring,
        )
        if config.server.signing_key_path is not None:
            services.homeserver_signing_key = load_homeserver_signing_key(
                config.server.signing_key_path
            )
            if isinstance(services.homeserver_signing_key, Ed25519SigningKey):
                services.room_state = HomeserverStateReader(
                    client,
                    server_name=config.server.server_name,
                    signing_key=services.homeserver_signing_key,
                )
            files = prepare_notary_files(config.notary.state_dir)
            name = config.notary.server_name or notary_name or "localhost"
            services.notary = Notary(
                key=NotaryKey.load_or_create(files.key_path, name),
                delegation=DelegationKeys(
                    load_or_create_secret(files.secret_path),
                    lifetime_ms=int(config.notary.delegation_key_lifetime * 1000),
                ),
                vouches=StoreVouchRecords(store),
                remote_keys=keyring,
                homeserver_name=config.server.server_name,
                clock_ms=now_ms,
            )
        if config.policies:
            services.policy = PolicyEngine.from_specs(
                config.policies,
                store=store,
                metrics=PolicyMetrics(registry=metrics.registry),
                audit_allows=config.policy.audit_allows,
                state_reader=services.room_state,
            )
            # Runs before the store closes: it writes the audit rows still waiting.
            stack.push_async_callback(services.policy.aclose)
        yield services


def reload_policies(services: Services) -> str | None:
    """Re-reads the policies from the configuration file (SIGHUP). Returns None when the new
    set is active, or why not: on any error the set already running stays active."""
    source = services.config.source
    if source is None:
        return "the configuration was not loaded from a file"
    try:
        fresh = load_config(source)
    except ConfigError as e:
        return str(e)
    if services.policy is not None:
        error = services.policy.reload(fresh.policies)
        if error is not None:
            return str(error)
        services.policy.audit_allows = fresh.policy.audit_allows
        return None
    if not fresh.policies:
        return None
    try:
        engine = PolicyEngine.from_specs(
            fresh.policies,
            store=services.store,
            metrics=PolicyMetrics(registry=services.metrics.registry),
            audit_allows=fresh.policy.audit_allows,
            state_reader=services.room_state,
        )
    except PolicyLoadError as e:
        return str(e)
    services.policy = engine
    return None
