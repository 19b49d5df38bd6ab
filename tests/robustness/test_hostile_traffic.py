"""10,000 hostile requests against a gateway in front of a fake homeserver, then a check that
it still does its job.

The gateway runs in a process of its own (``tests.robustness.harness``), so its log is a
file like in production and the sender keeps this process's core. The figures are printed
(``pytest -s`` shows them) and are in every assertion message.

What must hold:

* no 500 (the gateway failing), no reset connection, no exchange left without an answer in
  the time allowed, no answer cut short;
* the only other 5xx is 501, the listener's answer to a transfer coding it does not
  implement (``Transfer-Encoding: gzip``), which RFC 9112 section 6.1 asks for;
* every error of an owned route is a Matrix error (JSON with ``errcode``);
* afterwards a valid v3 invite is delivered, a client request and ``/health`` answer 200;
* no traceback, and no error, in the gateway's log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import trio

from tests.robustness.harness import (
    LOCAL_USER,
    REMOTE_USER,
    GatewayProcess,
    fake_homeserver_target,
    gateway_process,
    make_samples,
    q,
)
from tests.robustness.hostile import CLASSES, generate
from tests.robustness.wire import Figures, send_all, summary_lines
from tests.support.inprocess_gateway import HS, REMOTE
from tests.support.remote_server import x_matrix_authorization

SEED = 20261203
REQUESTS = 10_000


@pytest.fixture(scope="module", params=["builtin", "hypercorn"])
def gateway(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[GatewayProcess]:
    """The gateway with each HTTP server the public listener can run (public.http_server)."""
    with gateway_process(tmp_path_factory.mktemp("hostile"), request.param) as running:
        yield running


def still_serving(gateway: GatewayProcess) -> None:
    """A valid v3 invite is delivered, a client request and /health answer."""
    samples = make_samples(REMOTE, gateway.remote_key, LOCAL_USER, REMOTE_USER)
    uri = f"/_matrix/federation/v3/invite/{q(samples.room_id)}"
    auth = x_matrix_authorization(
        method="PUT",
        uri=uri,
        origin=REMOTE,
        destination=HS,
        signing_key=gateway.remote_key,
        content=samples.v3_invite,
    )
    with httpx.Client(base_url=gateway.public_url, timeout=10) as client:
        request = client.build_request(
            "PUT",
            uri,
            headers={"Authorization": auth},
            content=json.dumps(samples.v3_invite).encode(),
        )
        request.url = request.url.copy_with(raw_path=uri.encode())
        invite = client.send(request)
        assert invite.status_code == 200, invite.text
        assert invite.json()["event"]["state_key"] == LOCAL_USER
        versions = client.get("/_matrix/client/versions")
        assert versions.status_code == 200, versions.text
    health = httpx.get(f"{gateway.internal_url}/health", verify=False, timeout=10)
    assert health.status_code == 200, health.text


def check(figures: Figures) -> None:
    report = summary_lines(figures)
    print(report)
    assert figures.requests == REQUESTS, report
    assert set(figures.by_class) == set(CLASSES), report
    assert figures.internal_errors == 0, report
    assert figures.resets == 0, report
    assert figures.timeouts == 0, report
    assert figures.outcomes["closed"] == 0, report
    assert figures.outcomes["cut_short"] == 0, report
    assert set(figures.server_errors) <= {("http_framing", 501)}, report
    assert sum(figures.non_matrix_errors.values()) == 0, report


def test_ten_thousand_hostile_requests_leave_the_gateway_serving(gateway: GatewayProcess) -> None:
    url = httpx.URL(gateway.public_url)
    assert url.port is not None
    target = fake_homeserver_target(f"{url.host}:{url.port}", gateway.routes, gateway.remote_key)
    owned = {template for _, template in target.routes}
    requests = generate(target, REQUESTS, SEED)
    # Every owned endpoint is aimed at, and the passthrough and key queries too.
    assert owned <= {r.aim for r in requests}
    assert {"passthrough", "key_query", "raw", "pipeline"} <= {r.aim for r in requests}

    figures = trio.run(
        lambda: send_all(url.host, url.port, requests, concurrency=16, exchange_seconds=15)
    )
    check(figures)
    still_serving(gateway)
    assert gateway.process.poll() is None
    assert gateway.tracebacks() == []


def test_the_generator_is_reproducible() -> None:
    target = fake_homeserver_target(
        "127.0.0.1:1", [("PUT", "/_matrix/federation/v3/invite/{roomId}")]
    )
    first = [r.data for r in generate(target, 300, 7)]
    again = [r.data for r in generate(target, 300, 7)]
    other = [r.data for r in generate(target, 300, 8)]
    assert first == again
    assert first != other
