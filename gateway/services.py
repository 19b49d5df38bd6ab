"""The parts every handler may reach through ``request.services``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from gateway.config import GatewayConfig
from gateway.homeserver.forward import Forwarder
from gateway.metrics import Metrics

__all__ = ["Services", "open_services"]


@dataclass
class Services:
    """Shared, long-lived parts of one worker process.

    ``forwarder`` sends requests to the homeserver byte for byte (passthrough and
    ``request.forward()``); ``homeserver`` is an httpx client with ``base_url`` set to the
    homeserver for the gateway's own calls to it (paths the gateway composes itself).
    Later parts (store, keyring, notary) are added as fields here and opened in
    :func:`open_services`.
    """

    config: GatewayConfig
    metrics: Metrics
    forwarder: Forwarder
    homeserver: httpx.AsyncClient
    #: parts added by features that have no field of their own yet
    extra: dict[str, Any] = field(default_factory=dict)


@asynccontextmanager
async def open_services(
    config: GatewayConfig, *, metrics: Metrics | None = None
) -> AsyncIterator[Services]:
    """Opens everything a worker needs and closes it again on exit."""
    metrics = metrics if metrics is not None else Metrics()
    hs = config.homeserver
    timeout = httpx.Timeout(hs.read_timeout, connect=hs.connect_timeout)
    forwarder = Forwarder(config, metrics)
    try:
        async with httpx.AsyncClient(base_url=hs.url, timeout=timeout) as client:
            yield Services(config=config, metrics=metrics, forwarder=forwarder, homeserver=client)
    finally:
        await forwarder.aclose()
