"""`gateway proxy-config`: the routing snippet comes from the gateway's own route table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.app import KEY_QUERY_PREFIX, PASSTHROUGH_PREFIXES, public_route_table, route_path
from gateway.commands.proxy_config import PROXIES, is_ambiguous, owned_prefixes, render, route_plan
from gateway.config import load_config
from gateway.http import Request, Response, Router
from gateway.services import Services

CONFIG = """\
[server]
server_name = "example.org"
[homeserver]
url = "http://127.0.0.1:8008"
[public]
bind = "127.0.0.1:8450"
x_forwarded = true
"""


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG)
    return path


class _Unused:
    def __getattr__(self, name: str) -> object:
        raise AssertionError("not used while installing")


def owned_templates() -> list[str]:
    router = public_route_table(_Unused())  # type: ignore[arg-type]
    return [r.template for r in router.routes]


def test_every_owned_route_and_every_key_path_goes_to_the_gateway(config_path: Path) -> None:
    plan = route_plan(load_config(config_path))
    templates = owned_templates()
    assert {
        "/_matrix/federation/v3/invite/{roomId}",
        "/_matrix/federation/v2/send_join/{roomId}/{eventId}",
    } <= set(templates)
    for template in templates:
        assert any(template.startswith(p) for p in plan.gateway_prefixes), template
    assert KEY_QUERY_PREFIX.decode() in plan.gateway_prefixes
    assert plan.homeserver_prefixes == tuple(p.decode() for p in PASSTHROUGH_PREFIXES)
    for proxy in PROXIES:
        text = render(proxy, plan)
        for prefix in plan.gateway_prefixes:
            assert prefix in text, (proxy, prefix)
        assert "127.0.0.1:8450" in text and "127.0.0.1:8008" in text


def test_a_route_added_to_the_table_appears_in_every_snippet(config_path: Path) -> None:
    async def handler(request: Request) -> Response:
        return Response()

    def install(router: Router, services: Services) -> None:
        router.add("PUT", "/_matrix/federation/v9/thing/{roomId}", handler, name="thing")

    plan = route_plan(load_config(config_path), [install])
    assert "/_matrix/federation/v9/thing/" in plan.gateway_prefixes
    for proxy in PROXIES:
        assert "/_matrix/federation/v9/thing/" in render(proxy, plan)


def test_an_installer_that_needs_services_to_install_is_named(config_path: Path) -> None:
    def install(router: Router, services: Services) -> None:
        services.config  # noqa: B018

    with pytest.raises(RuntimeError, match=r"services\.config while installing"):
        route_plan(load_config(config_path), [install])


def test_prefixes_are_the_literal_part_and_the_shortest_cover() -> None:
    assert owned_prefixes(["/a/b/{x}", "/a/b/{x}/{y}", "/a/", "/a/c", "/z/{q}"]) == ("/a/", "/z/")


@pytest.mark.parametrize(
    "target",
    [
        b"/_matrix//key/v2/server",
        b"/_matrix/./key",
        b"/_matrix/federation/../key/v2/query",
        b"/_matrix/federation/%2E%2E/key",
        b"/_matrix/federation/%2e./key",
        b"/_matrix/federation/v1/make_join/..%2F..%2Fclient/x",
        b"/_matrix/federation/v1/make_join/%2F%2F/x",
        b"/_matrix/key/..",
        b"/_matrix/key/.?x=1",
    ],
)
def test_dot_and_empty_segments_are_ambiguous(target: bytes) -> None:
    assert is_ambiguous(target)


@pytest.mark.parametrize(
    "target",
    [
        b"/_matrix/client/v3/rooms/%21a%3Ab.c/send/m.room.message/1",
        b"/_matrix/client/v3/directory/room/%23my.room%3Aexample.org",
        b"/_matrix/key/v2/query/example.org/",
        b"/_matrix/federation/v1/event/%24abc%2Fdef",
        b"/_matrix/client/v3/sync?since=s1..2&filter=//x",
        b"/.well-known/matrix/server",
    ],
)
def test_ordinary_paths_are_not_ambiguous(target: bytes) -> None:
    assert not is_ambiguous(target)


_SEGMENT = st.lists(
    st.sampled_from(["a", "key", ".", "..", "%2e", "%2E", "%2F", "%2f", "x.y", "%41", "", "%"]),
    max_size=4,
).map("".join)


@given(st.lists(_SEGMENT, min_size=1, max_size=6))
def test_an_unambiguous_path_normalises_to_its_decoded_form(segments: list[str]) -> None:
    # What a proxy matches (decoded, dots resolved, slashes merged) and what decoding alone
    # gives agree whenever the path is not ambiguous: so a decoded prefix is a safe match.
    raw = ("/" + "/".join(segments)).encode()
    if not is_ambiguous(raw):
        assert route_path(raw) == unquote_to_bytes(raw)


def test_command_prints_the_snippet_and_warns_without_x_forwarded(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG.replace("x_forwarded = true", "x_forwarded = false"))
    argv = [
        sys.executable,
        "-m",
        "gateway",
        "proxy-config",
        "--for",
        "nginx",
        "--config",
        str(path),
    ]
    result = subprocess.run([*argv, "--listen", "127.0.0.1:8080"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "listen 127.0.0.1:8080;" in result.stdout
    assert "location ^~ /_matrix/key/ {" in result.stdout
    assert "ssl_certificate" not in result.stdout
    assert "public.x_forwarded is false" in result.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nserver_name = "x"\n[public]\nworkers = "many"\n')
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "proxy-config", "--for", "caddy", "--config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "public.workers" in result.stderr


@pytest.mark.parametrize(
    ("tables", "through_gateway"),
    [
        ("", True),  # [cors] is on by default
        ("[cors]\nenabled = false\n", False),
        ("[cors]\nenabled = false\n[guests]\nenabled = true\n", True),
    ],
)
def test_the_client_api_goes_to_the_gateway_when_its_client_edge_is_on(
    tmp_path: Path, tables: str, through_gateway: bool
) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(CONFIG + tables)
    plan = route_plan(load_config(path))
    assert ("/_matrix/client/" in plan.gateway_prefixes) is through_gateway
    location = "location ^~ /_matrix/client/ {\n        proxy_pass http://mxgw_gateway;"
    assert (location in render("nginx", plan)) is through_gateway


def test_the_haproxy_frontend_bounds_slow_clients_as_the_gateway_does(tmp_path: Path) -> None:
    # HAProxy has no client timeouts of its own: without these it waits forever.
    path = tmp_path / "slow.toml"
    path.write_text(
        CONFIG.replace("x_forwarded = true", "x_forwarded = true\nrequest_timeout = 30")
    )
    text = render("haproxy", route_plan(load_config(path)))
    assert "    timeout http-request 20s\n    timeout client 30s\n" in text
    path.write_text(CONFIG.replace("x_forwarded = true", "x_forwarded = true\nrequest_timeout = 8"))
    assert "    timeout http-request 8s\n" in render("haproxy", route_plan(load_config(path)))
