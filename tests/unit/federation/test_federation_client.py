"""The outbound client against real TLS servers on loopback."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import signedjson.key
import signedjson.sign
import trio

from gateway.federation import (
    AddressRefused,
    FederationClient,
    RequestFailed,
    RequestTimeout,
    ResponseError,
    ResponseTooLarge,
    x_matrix_authorization,
)
from tests.support.dns_server import LoopbackDnsServer
from tests.unit.federation.support import ReceivedRequest, Reply, StartHttps

MakeClient = Callable[..., FederationClient]


def parse_x_matrix(header: str) -> dict[str, str]:
    scheme, _, params = header.partition(" ")
    assert scheme == "X-Matrix"
    out = {}
    for part in params.split(","):
        k, _, v = part.partition("=")
        out[k] = v.strip('"')
    return out


async def test_connects_to_checked_ip_with_tls_name_and_host(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    server = await start_https("remote.test")
    server.reply("GET", "/_matrix/federation/v1/version", Reply.json({"server": {"name": "x"}}))
    dns_server.add("remote.test", "A", "127.0.0.1")
    client = make_client()
    try:
        body = await client.get_json(f"remote.test:{server.port}", "/_matrix/federation/v1/version")
    finally:
        await client.aclose()
    assert body == {"server": {"name": "x"}}
    (request,) = server.requests
    assert request.headers["host"] == f"remote.test:{server.port}"
    assert request.sni == "remote.test"
    assert "authorization" not in request.headers


async def test_signs_requests_with_x_matrix(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    server = await start_https("remote.test")
    server.reply("PUT", "/_matrix/federation/v1/send/1", Reply.json({}))
    dns_server.add("remote.test", "A", "127.0.0.1")
    key = signedjson.key.generate_signing_key("abc")
    client = make_client(origin="origin.test", signing_key=key)
    destination = f"remote.test:{server.port}"
    target = "/_matrix/federation/v1/send/1?x=a%20b&y=%2F"
    try:
        response = await client.request("PUT", destination, target, json_body={"pdus": ["é"]})
    finally:
        await client.aclose()
    assert response.status == 200
    (request,) = server.requests
    assert request.target == target
    params = parse_x_matrix(request.headers["authorization"])
    assert params["origin"] == "origin.test"
    assert params["destination"] == destination
    assert params["key"] == "ed25519:abc"
    # Verify as a receiving server would, from what arrived on the wire.
    signed = {
        "method": "PUT",
        "uri": request.target,
        "origin": "origin.test",
        "destination": destination,
        "content": request.json(),
        "signatures": {"origin.test": {params["key"]: params["sig"]}},
    }
    signedjson.sign.verify_signed_json(signed, "origin.test", signedjson.key.get_verify_key(key))
    signed["content"] = {"pdus": ["other"]}
    with pytest.raises(signedjson.sign.SignatureVerifyException):
        signedjson.sign.verify_signed_json(
            signed, "origin.test", signedjson.key.get_verify_key(key)
        )


def test_x_matrix_header_without_content_matches_spec_shape() -> None:
    key = signedjson.key.generate_signing_key("k")
    header = x_matrix_authorization(
        origin="o.test", destination="d.test", signing_key=key, method="GET", uri="/x"
    )
    params = parse_x_matrix(header)
    signed = {
        "method": "GET",
        "uri": "/x",
        "origin": "o.test",
        "destination": "d.test",
        "signatures": {"o.test": {"ed25519:k": params["sig"]}},
    }
    signedjson.sign.verify_signed_json(signed, "o.test", signedjson.key.get_verify_key(key))


async def test_redirects_are_not_followed(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    server = await start_https("remote.test")
    server.reply("GET", "/a", Reply(302, headers={"Location": "/b"}))
    server.reply("GET", "/b", Reply.json({}))
    dns_server.add("remote.test", "A", "127.0.0.1")
    client = make_client()
    try:
        response = await client.request("GET", f"remote.test:{server.port}", "/a")
        assert response.status == 302
        with pytest.raises(ResponseError) as info:
            await client.get_json(f"remote.test:{server.port}", "/a")
        assert info.value.status == 302
    finally:
        await client.aclose()
    assert [r.target for r in server.requests] == ["/a", "/a"]


async def test_response_size_limit(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    server = await start_https("remote.test")
    server.reply("GET", "/big", Reply(200, b"x" * 200_000))
    dns_server.add("remote.test", "A", "127.0.0.1")
    client = make_client(max_response_size=100_000)
    try:
        with pytest.raises(ResponseTooLarge):
            await client.request("GET", f"remote.test:{server.port}", "/big")
        ok = await client.request(
            "GET", f"remote.test:{server.port}", "/big", max_response_size=300_000
        )
        assert len(ok.body) == 200_000
    finally:
        await client.aclose()


async def test_timeout_against_silent_server(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    server = await start_https("remote.test")

    async def never(_: ReceivedRequest) -> Reply:
        await trio.sleep_forever()
        raise AssertionError

    server.route("GET", "/slow", never)
    dns_server.add("remote.test", "A", "127.0.0.1")
    client = make_client(request_timeout=0.5)
    try:
        start = trio.current_time()
        with pytest.raises(RequestTimeout):
            await client.request("GET", f"remote.test:{server.port}", "/slow")
        assert trio.current_time() - start < 2
    finally:
        await client.aclose()


async def test_loopback_refused_unless_whitelisted(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    server = await start_https("remote.test")
    server.reply("GET", "/x", Reply.json({}))
    dns_server.add("remote.test", "A", "127.0.0.1")
    dns_server.add("sneaky.test", "AAAA", "::ffff:127.0.0.1")
    client = make_client(ip_range_whitelist=[])
    try:
        with pytest.raises(AddressRefused):
            await client.request("GET", f"remote.test:{server.port}", "/x")
        with pytest.raises(AddressRefused):
            await client.request("GET", f"sneaky.test:{server.port}", "/x")
        with pytest.raises(AddressRefused):
            await client.request("GET", f"127.0.0.1:{server.port}", "/x")
    finally:
        await client.aclose()
    assert server.connections == 0


async def test_certificate_must_match_server_name(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    server = await start_https("someone-else.test")
    server.reply("GET", "/x", Reply.json({"ok": True}))
    dns_server.add("remote.test", "A", "127.0.0.1")
    strict = make_client()
    lax = make_client(federation_certificate_verification_whitelist=["remote.*"])
    try:
        with pytest.raises(RequestFailed):
            await strict.request("GET", f"remote.test:{server.port}", "/x")
        assert server.requests == []
        assert await lax.get_json(f"remote.test:{server.port}", "/x") == {"ok": True}
    finally:
        await strict.aclose()
        await lax.aclose()


async def test_ip_literal_needs_certificate_for_the_ip(
    make_client: MakeClient, start_https: StartHttps
) -> None:
    server = await start_https("127.0.0.1")
    server.reply("GET", "/x", Reply.json({"ok": True}))
    client = make_client()
    try:
        assert await client.get_json(f"127.0.0.1:{server.port}", "/x") == {"ok": True}
    finally:
        await client.aclose()
    assert server.requests[0].headers["host"] == f"127.0.0.1:{server.port}"


async def test_srv_targets_tried_in_order(
    make_client: MakeClient, dns_server: LoopbackDnsServer, start_https: StartHttps
) -> None:
    server = await start_https("remote.test")
    server.reply("GET", "/x", Reply.json({"ok": True}))
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    dns_server.add("remote.test", "A", "127.0.0.1")
    dns_server.add("dead.test", "A", "127.0.0.1")
    dns_server.add("live.test", "A", "127.0.0.1")
    dns_server.add(
        "_matrix-fed._tcp.remote.test",
        "SRV",
        f"1 0 {closed_port} dead.test.",
        f"2 0 {server.port} live.test.",
    )
    # .well-known is looked for on a closed port, so discovery falls through to SRV.
    client = make_client(well_known_port=closed_port)
    try:
        assert await client.get_json("remote.test", "/x") == {"ok": True}
    finally:
        await client.aclose()
    assert server.requests[0].headers["host"] == "remote.test"
    assert server.requests[0].sni == "remote.test"
