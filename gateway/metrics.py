"""Prometheus metrics, served on the internal listener at ``/metrics``.

Metric names:

* ``gateway_requests_total{route, status}``: requests answered on the public listener.
  ``route`` is the route class: ``passthrough``, ``admin`` (admin API passed through because
  it is exposed), ``admin_blocked``, ``not_found``, or the name of an owned route.
* ``gateway_request_duration_seconds{route, status}``: time from the request's arrival to
  the end of the response.
* ``gateway_upstream_errors_total{kind}``: failures talking to the homeserver, ``kind`` one of
  ``connect_error``, ``connect_timeout``, ``read_timeout``, ``write_timeout``,
  ``protocol_error``, ``closed_early``.
* ``gateway_worker_starts_total``: worker processes started (restarts included).
* ``gateway_legacy_invites_total{version}``: v1 and v2 invites passed through (v1 is
  deprecated; this shows which peers still use it).
* ``gateway_v3_invites_total{outcome}``: v3 invites by outcome (``delivered``, ``refused``).
* ``gateway_delegation_entries_removed_total``: delegation-key entries removed from public
  key-query answers.
* ``gateway_outbound_requests_total{kind, destination_class, outcome}`` and
  ``gateway_outbound_request_duration_seconds{kind, destination_class}``: the homeserver's
  outbound federation requests. ``kind`` is the endpoint class (``send``, ``invite``,
  ``make_join``, ``query``, ``keys``, ``media``, ...); ``destination_class`` is ``notary``
  (answered locally), ``v3`` or ``v2`` (a destination known to have, or lack, the v3 invite
  endpoint) or ``remote``; ``outcome`` is ``2xx``/``4xx``/``5xx`` (the destination's
  answer), ``refused`` (egress policy), ``unreachable``, ``timeout`` or ``unauthorized``.
* ``gateway_outbound_invites_total{version}``: our invites by the endpoint they went out
  on (``v3``, ``unstable``, ``v2``), and ``gateway_outbound_invite_fallbacks_total``: v3
  attempts a destination did not understand, re-sent as v2.
* ``gateway_guest_requests_total{outcome}``: guests' client API requests the guest edge
  judged (``[guests]``): ``allowed``, ``rate_limited`` or ``forbidden``.
* ``gateway_whoami_lookups_total{outcome}``: access tokens the guest edge identified:
  ``cached``, ``asked`` (the homeserver's whoami answered) or ``failed``.

With several workers every process writes its values into files in the directory named by
``PROMETHEUS_MULTIPROC_DIR`` (the supervising process creates it before the workers start)
and a scrape of any worker adds them all up.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

__all__ = ["CONTENT_TYPE_LATEST", "MULTIPROC_ENV", "Metrics"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Federation requests are mostly fast; media and /sync can take long.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The gateway's metrics for one process."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # In multiprocess mode values live in files; this registry only keeps the metric
        # objects apart from the global default registry.
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests_total",
            "Requests answered on the public listener, by route class and HTTP status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            ["route", "status"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Failures talking to the homeserver, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.worker_starts = Counter(
            "gateway_worker_starts_total",
            "Gateway worker processes started, restarts included.",
            registry=self.registry,
        )

        self.legacy_invites = Counter(
            "gateway_legacy_invites_total",
            "v1 and v2 invites passed through to the homeserver, by endpoint version.",
            ["version"],
            registry=self.registry,
        )
        self.v3_invites = Counter(
            "gateway_v3_invites_total",
            "v3 invites, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.delegation_entries_removed = Counter(
            "gateway_delegation_entries_removed_total",
            "Server-keys entries carrying a delegation key removed from public key answers.",
            registry=self.registry,
        )

        self.outbound_requests = Counter(
            "gateway_outbound_requests_total",
            "The homeserver's outbound federation requests, by endpoint class, destination "
            "class and outcome.",
            ["kind", "destination_class", "outcome"],
            registry=self.registry,
        )
        self.outbound_duration = Histogram(
            "gateway_outbound_request_duration_seconds",
            "Time from an outbound request's arrival to the end of its response.",
            ["kind", "destination_class"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.outbound_invites = Counter(
            "gateway_outbound_invites_total",
            "Our invites sent to other servers, by the invite endpoint version used.",
            ["version"],
            registry=self.registry,
        )
        self.outbound_invite_fallbacks = Counter(
            "gateway_outbound_invite_fallbacks_total",
            "v3 invites a destination did not understand, sent again as v2.",
            registry=self.registry,
        )

        self.guest_requests = Counter(
            "gateway_guest_requests_total",
            "Client API requests of guests that the guest edge judged, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.whoami_lookups = Counter(
            "gateway_whoami_lookups_total",
            "Access tokens identified by the guest edge: from its cache, or by asking the "
            "homeserver, by outcome.",
            ["outcome"],
            registry=self.registry,
        )

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        code = str(status)
        self.requests.labels(route, code).inc()
        self.duration.labels(route, code).observe(seconds)

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors.labels(kind).inc()

    def render(self) -> bytes:
        """The text exposition format, aggregated over all workers in multiprocess mode."""
        if self.multiprocess:
            registry = CollectorRegistry()
            _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return bytes(generate_latest(registry))
        return bytes(generate_latest(self.registry))
