"""The public key-query filter: no delegation key leaves through the public listener.

The fake homeserver answers every request the way Synapse does once it has cached a
delegation key our notary vouched: its key answers carry entries naming ``ed25519:mxgw_…``
keys. Whatever the path's spelling, the public listener must answer without them.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpcore
import httpx
import pytest
import trio

from gateway.app import PublicApp, serve
from gateway.config import parse_config
from gateway.errors import MatrixError
from gateway.features.keys import filter_key_query_body
from gateway.http import Router
from gateway.services import Services
from tests.support.inprocess_gateway import serve_fake_homeserver

HS = "hs.test"
REMOTE = "remote.test"
DELEGATION_KEY = "ed25519:mxgw_Ab12"


def _entry(server: str, **fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "server_name": server,
        "valid_until_ts": 4_000_000_000_000,
        "verify_keys": {"ed25519:k1": {"key": "a2V5IG9uZQ"}},
        "old_verify_keys": {"ed25519:k0": {"key": "a2V5IHplcm8", "expired_ts": 1}},
        "signatures": {server: {"ed25519:k1": "c2ln"}, "notary.test": {"ed25519:n": "c2ln"}},
    }
    entry.update(fields)
    return entry


CLEAN = _entry(REMOTE)
OURS = _entry(HS)
IN_VERIFY_KEYS = _entry(REMOTE, verify_keys={DELEGATION_KEY: {"key": "ZGVsZWdhdGlvbg"}})
IN_OLD_KEYS = _entry(
    REMOTE, old_verify_keys={DELEGATION_KEY: {"key": "ZGVsZWdhdGlvbg", "expired_ts": 1}}
)
IN_SIGNATURES = _entry(
    REMOTE, signatures={REMOTE: {DELEGATION_KEY: "c2ln"}, "notary.test": {"ed25519:n": "c2ln"}}
)
#: A key-query answer as the homeserver gives it, and what may leave through the public side.
LEAKY_QUERY_ANSWER = {
    "server_keys": [IN_VERIFY_KEYS, CLEAN, IN_OLD_KEYS, OURS, IN_SIGNATURES],
}
FILTERED = [CLEAN, OURS]


def _assert_no_delegation_key(body: bytes) -> None:
    assert b"mxgw_" not in body, body


# --- the filter on its own --------------------------------------------------------------------


def test_every_entry_naming_a_delegation_key_is_removed_and_the_rest_kept_in_order() -> None:
    body, removed = filter_key_query_body(json.dumps(LEAKY_QUERY_ANSWER).encode())
    assert removed == 3
    assert json.loads(body) == {"server_keys": FILTERED}


def test_an_answer_without_delegation_keys_is_passed_on_byte_for_byte() -> None:
    raw = b'{"server_keys": [ %s ], "x": 1.50}' % json.dumps(CLEAN).encode()
    assert filter_key_query_body(raw) == (raw, 0)


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(IN_VERIFY_KEYS).encode(),  # the shape of /_matrix/key/v2/server
        json.dumps({"server_keys": {REMOTE: IN_VERIFY_KEYS}}).encode(),
        b"not json, but mxgw_Ab12",
        b'{"server_keys": [' + json.dumps(IN_VERIFY_KEYS).encode(),
    ],
    ids=["bare-server-keys", "server-keys-object", "not-json", "cut-short"],
)
def test_an_answer_that_cannot_be_filtered_entry_by_entry_is_never_passed_on(raw: bytes) -> None:
    with pytest.raises(MatrixError) as caught:
        filter_key_query_body(raw)
    assert (caught.value.status, caught.value.errcode) == (502, "M_UNKNOWN")


# --- through the public listener -------------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class LeakyHomeserver:
    """Answers every request with ``answer``, gzipped when the request allows it."""

    answer: Any = field(default_factory=lambda: LEAKY_QUERY_ANSWER)
    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        query = scope["query_string"]
        target = scope["raw_path"] + (b"?" + query if query else b"")
        headers = list(scope["headers"])
        self.seen.append(Seen(scope["method"], target, headers, body))
        data = json.dumps(self.answer).encode()
        out = [(b"content-type", b"application/json")]
        if any(k == b"accept-encoding" and b"gzip" in v for k, v in headers):
            data = gzip.compress(data)
            out.append((b"content-encoding", b"gzip"))
        out.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": out})
        await send({"type": "http.response.body", "body": data})


@dataclass
class Setup:
    homeserver: LeakyHomeserver
    public_url: str


@pytest.fixture
async def setup(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Setup]:
    fake = LeakyHomeserver()
    homeserver_url = await serve_fake_homeserver(nursery, fake)  # type: ignore[arg-type]
    config = parse_config(
        {
            "server": {"server_name": HS},
            "homeserver": {"url": homeserver_url, "connect_timeout": 2.0, "read_timeout": 5.0},
            "public": {"bind": "127.0.0.1:0"},
            "internal": {"bind": "127.0.0.1:0"},
            "log": {"format": "json"},
        },
        base_dir=tmp_path,
    )
    listening = await nursery.start(lambda task_status: serve(config, task_status=task_status))
    yield Setup(fake, listening.public_url)


async def raw_request(
    base: str,
    method: bytes,
    target: bytes,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, dict[bytes, bytes], bytes]:
    """Sends ``target`` exactly as given (httpx would normalise it); the answer undecoded."""
    url = httpx.URL(base)
    all_headers = [(b"host", f"{url.host}:{url.port}".encode()), *(headers or [])]
    if body:
        all_headers += [(b"content-type", b"application/json")]
        all_headers += [(b"content-length", str(len(body)).encode())]
    async with httpcore.AsyncConnectionPool() as pool:
        response = await pool.request(
            method,
            httpcore.URL(scheme=b"http", host=url.host.encode(), port=url.port, target=target),
            headers=all_headers,
            content=body,
        )
        return response.status, {k.lower(): v for k, v in response.headers}, response.content


QUERY_BODY = json.dumps({"server_keys": {REMOTE: {"ed25519:k1": {}}}}).encode()


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        (b"POST", b"/_matrix/key/v2/query", QUERY_BODY),
        (b"GET", b"/_matrix/key/v2/query/remote.test", b""),
        (b"GET", b"/_matrix/key/v2/query/remote.test/ed25519%3Ak1", b""),
        (b"GET", b"/_matrix/key/v2/query/remote.test?minimum_valid_until_ts=1", b""),
    ],
    ids=["post", "get", "get-key-id", "get-minimum"],
)
async def test_key_query_answer_loses_its_delegation_entries(
    setup: Setup, method: bytes, target: bytes, body: bytes
) -> None:
    status, headers, answer = await raw_request(setup.public_url, method, target, body)
    assert status == 200
    assert json.loads(answer) == {"server_keys": FILTERED}
    assert headers[b"content-length"] == str(len(answer)).encode()
    # The request reached the homeserver unchanged.
    [seen] = setup.homeserver.seen
    assert (seen.method, seen.target, seen.body) == (method.decode(), target, body)


async def test_own_key_answer_naming_a_delegation_key_is_not_passed_on(setup: Setup) -> None:
    # /_matrix/key/v2/server is one server-keys object, not a list to remove entries from.
    setup.homeserver.answer = IN_VERIFY_KEYS
    status, _, answer = await raw_request(setup.public_url, b"GET", b"/_matrix/key/v2/server")
    assert status == 502
    assert json.loads(answer)["errcode"] == "M_UNKNOWN"
    _assert_no_delegation_key(answer)


async def test_an_answer_the_homeserver_would_compress_is_still_filtered(setup: Setup) -> None:
    # A compressed answer cannot be read entry by entry: the homeserver is asked for an
    # uncompressed one whatever the client accepts.
    status, headers, answer = await raw_request(
        setup.public_url,
        b"POST",
        b"/_matrix/key/v2/query",
        QUERY_BODY,
        [(b"accept-encoding", b"gzip")],
    )
    assert status == 200
    assert b"content-encoding" not in headers
    assert json.loads(answer) == {"server_keys": FILTERED}
    assert not any(k == b"accept-encoding" for k, _ in setup.homeserver.seen[0].headers)


# --- every spelling of a path under /_matrix/key/ ---------------------------------------------

#: Paths a homeserver may resolve to one of its key endpoints, however they are written.
KEY_PATH_SPELLINGS = [
    b"/_matrix/key/v2/server",
    b"/_matrix/key/v2/server/",
    b"/_matrix/key/v2/server/ed25519:k1",
    b"/_matrix/key/v2/query",
    b"/_matrix/key/v2/query/",
    b"/_matrix/key/v2/query/remote.test/",
    b"/_matrix/key/v2/query/remote.test/%20",
    b"/_matrix/key/v1/query/remote.test",
    b"/_matrix/key/unknown",
    b"/_matrix/%6Bey/v2/query/remote.test",
    b"/_matrix/%6b%65%79/v2/query/remote.test",
    b"/_matrix/key%2Fv2%2Fquery%2Fremote.test",
    b"/_matrix%2Fkey/v2/query/remote.test",
    b"//_matrix/key/v2/query/remote.test",
    b"/_matrix//key/v2/query/remote.test",
    b"/_matrix/key//v2/query/remote.test",
    b"/_matrix/./key/v2/query/remote.test",
    b"/_matrix/%2e/key/v2/query/remote.test",
    b"/_matrix/key/v2/./query/remote.test",
    b"/_matrix/x/../key/v2/query/remote.test",
    b"/_matrix/federation/%2e%2e/key/v2/query/remote.test",
    b"/_matrix/key/../key/v2/query/remote.test",
    b"/_matrix/media/../../_matrix/key/v2/query/remote.test",
]


def _public_app() -> PublicApp:
    config = parse_config(
        {"server": {"server_name": HS}, "homeserver": {"url": "http://127.0.0.1:1"}},
        base_dir=Path("."),
    )
    return PublicApp(cast(Services, SimpleNamespace(config=config)), Router())


@pytest.mark.parametrize("path", KEY_PATH_SPELLINGS, ids=lambda p: p.decode())
def test_every_spelling_under_matrix_key_is_a_key_query(path: bytes) -> None:
    assert _public_app().classify(path) == "key_query"


@pytest.mark.parametrize(
    "path",
    [b"/_matrix/key", b"/_matrix/keys/v2/query", b"/_matrix/federation/v1/query/profile"],
)
def test_other_paths_are_not_key_queries(path: bytes) -> None:
    assert _public_app().classify(path) == "passthrough"


@pytest.mark.parametrize("path", KEY_PATH_SPELLINGS, ids=lambda p: p.decode())
async def test_no_spelling_of_a_key_path_lets_a_delegation_key_out(
    setup: Setup, path: bytes
) -> None:
    for method, body in ((b"GET", b""), (b"POST", QUERY_BODY)):
        status, _, answer = await raw_request(setup.public_url, method, path, body)
        assert status == 200, (method, answer)
        assert json.loads(answer) == {"server_keys": FILTERED}
        # Filtered, yet forwarded as sent: the raw path reached the homeserver unchanged.
        assert setup.homeserver.seen[-1].target == path
