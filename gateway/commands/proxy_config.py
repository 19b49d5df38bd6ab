"""``gateway proxy-config``: routing for a reverse proxy the operator already runs.

In front-proxy mode nginx, Caddy, HAProxy or Traefik terminates TLS and sends only what the
gateway must see to the gateway; everything else goes straight to the homeserver. The
snippet is derived from the gateway's own route table (:func:`gateway.app.public_route_table`
and the key-query class of :meth:`gateway.app.PublicApp.classify`), never from a list kept
by hand.

The client API (``/_matrix/client/``) is among the gateway's paths when ``[cors]`` or
``[guests]`` is on: the gateway acts on every client request then.

The rule the snippets follow is an allow-list for bypassing the gateway: a request goes
straight to the homeserver only when its path is under one of
:data:`gateway.app.PASSTHROUGH_PREFIXES` *and* not under an owned prefix *and* its raw
spelling is unambiguous. Everything else, ``/_synapse/admin`` included, goes to the gateway,
which answers it as it would on its own listener (so the admin API stays blocked unless
``homeserver.expose_admin_api``, and unknown paths get 404 ``M_UNRECOGNIZED``).

Why "unambiguous": a proxy matches on its own normalised path (percent-decoded, ``.`` and
``..`` resolved, ``//`` merged), but forwards the raw one, and the homeserver matches the
raw path. Dot segments, literal or encoded, can make the two disagree: a room ID of
``..%2F..%2F..%2Fclient`` turns an invite path into a client path in the proxy's eyes while
the homeserver still sees an invite. Such spellings (:data:`AMBIGUOUS_PATH`) always go to
the gateway, which routes on the raw path itself. Without them, normalising changes nothing
but the encoding, and a prefix of the decoded path is a prefix of what the gateway and the
homeserver see.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, cast

from gateway.app import PASSTHROUGH_PREFIXES, handled_prefixes, public_route_table
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.services import Services

__all__ = [
    "AMBIGUOUS_PATH",
    "PROXIES",
    "RoutePlan",
    "add_arguments",
    "is_ambiguous",
    "main",
    "owned_prefixes",
    "render",
    "route_plan",
]

#: A raw request target (path, maybe ``?query``) whose path has a dot segment or an empty
#: segment, literal or percent-encoded, with ``/`` or ``%2F`` around it. PCRE and RE2
#: syntax alike (nginx, HAProxy, Caddy's CEL); Python's ``re`` reads it the same way.
AMBIGUOUS_PATH = r"^[^?]*(?:/|%2[fF])(?:(?:\.|%2[eE]){1,2}(?:/|%2[fF]|\?|$)|/|%2[fF])"
_AMBIGUOUS = re.compile(AMBIGUOUS_PATH.encode())

_UNRECOGNIZED = '{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}'


def is_ambiguous(raw_target: bytes) -> bool:
    """Whether a proxy's normalised view of this path may differ from its decoded form."""
    return _AMBIGUOUS.search(raw_target) is not None


class _RoutingOnly:
    """Stands in for :class:`gateway.services.Services` while routes are only listed."""

    def __getattr__(self, name: str) -> NoReturn:
        raise RuntimeError(
            f"a route installer used services.{name} while installing its routes; "
            "`gateway proxy-config` lists routes without running the gateway"
        )


def owned_prefixes(templates: Sequence[str]) -> tuple[str, ...]:
    """The literal part of each template up to its first parameter, without prefixes that a
    shorter one already covers, sorted."""
    prefixes = set()
    for template in templates:
        literal = template.split("{", 1)[0]
        prefixes.add(literal)
    ordered = sorted(prefixes)
    return tuple(p for p in ordered if not any(p != q and p.startswith(q) for q in ordered))


@dataclass(frozen=True)
class RoutePlan:
    """What a front proxy must do, in terms every proxy can express."""

    #: decoded path prefixes that must reach the gateway (owned routes, key queries)
    gateway_prefixes: tuple[str, ...]
    #: decoded path prefixes the homeserver serves; only these may bypass the gateway
    homeserver_prefixes: tuple[str, ...]
    gateway_url: str
    homeserver_url: str
    #: the public host name (``server_name`` of nginx, Caddy's site address)
    host: str
    max_body_size: int
    #: the gateway's ``public.request_timeout`` (its bound on a slow client)
    request_timeout: float
    connect_timeout: float
    read_timeout: float
    x_forwarded: bool


def _url_host_port(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or "127.0.0.1"
    return parts.scheme, host, port


def route_plan(config: GatewayConfig, extra: Sequence[Any] = ()) -> RoutePlan:
    """The plan for ``config``; ``extra`` route installers as ``serve`` takes them."""
    router = public_route_table(cast(Services, _RoutingOnly()), extra)
    templates = [r.template for r in router.routes]
    templates += [p.decode() for p in handled_prefixes(config)]
    bind = config.public.bind
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "localhost": "127.0.0.1"}.get(bind.host, bind.host)
    netloc = f"[{host}]:{bind.port}" if ":" in host else f"{host}:{bind.port}"
    scheme = "https" if config.public.tls else "http"
    server_name = config.server.server_name
    public_host = server_name.rsplit(":", 1)[0] if not server_name.endswith("]") else server_name
    return RoutePlan(
        gateway_prefixes=owned_prefixes(templates),
        homeserver_prefixes=tuple(p.decode() for p in PASSTHROUGH_PREFIXES),
        gateway_url=f"{scheme}://{netloc}",
        homeserver_url=config.homeserver.url.rstrip("/"),
        host=public_host,
        max_body_size=config.public.max_body_size,
        request_timeout=config.public.request_timeout,
        connect_timeout=config.homeserver.connect_timeout,
        read_timeout=config.homeserver.read_timeout,
        x_forwarded=config.public.x_forwarded,
    )


def _header(plan: RoutePlan, comment: str) -> list[str]:
    lines = [
        "Generated by `gateway proxy-config` from the gateway's route table: generate it again",
        "after an upgrade of the gateway, never edit the routes by hand.",
        "",
        "To the gateway, in any spelling:",
        *(f"  {p}" for p in plan.gateway_prefixes),
        "and everything outside " + ", ".join(plan.homeserver_prefixes) + ",",
        "which the gateway answers as on its own listener (/_synapse/admin stays private),",
        "and every path spelled with a dot segment or an empty segment, literal or encoded.",
        "Everything else straight to the homeserver: those requests skip the gateway's limits",
        "and its request-smuggling guard, so the proxy's own limits apply to them.",
    ]
    return [f"{comment} {line}".rstrip() for line in lines]


# --- nginx -----------------------------------------------------------------------------------


def render_nginx(plan: RoutePlan, listen: Sequence[str]) -> str:
    listen = list(listen) or ["443 ssl http2", "[::]:443 ssl http2", "8448 ssl http2"]
    _, gw_host, gw_port = _url_host_port(plan.gateway_url)
    gw_scheme = "https" if plan.gateway_url.startswith("https:") else "http"
    hs_scheme, hs_host, hs_port = _url_host_port(plan.homeserver_url)

    def server(host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    out = _header(plan, "#")
    out += [
        "# Include it in the http { } context (for example as /etc/nginx/conf.d/matrix.conf).",
        "",
        "upstream mxgw_gateway {",
        f"    server {server(gw_host, gw_port)};",
        "    keepalive 64;",
        "}",
        "upstream mxgw_homeserver {",
        f"    server {server(hs_host, hs_port)};",
        "    keepalive 64;",
        "}",
        "",
        "# nginx matches locations on the decoded, normalised path but forwards the raw one.",
        "map $request_uri $mxgw_ambiguous {",
        "    default 0;",
        f'    "~{AMBIGUOUS_PATH}" 1;',
        "}",
        "",
        "server {",
    ]
    out += [f"    listen {item};" for item in listen]
    out.append(f"    server_name {plan.host};")
    if any(" ssl" in f" {item}" for item in listen):
        out += [
            "    ssl_certificate     /etc/ssl/matrix/fullchain.pem;  # your certificate",
            "    ssl_certificate_key /etc/ssl/matrix/privkey.pem;",
        ]
    out += [
        "",
        f"    client_max_body_size {plan.max_body_size};",
        "    proxy_http_version 1.1;",
        '    proxy_set_header Connection "";',
        "    proxy_set_header Host $http_host;",
        "    # Replaced, not appended: the homeserver believes the first entry.",
        "    proxy_set_header X-Forwarded-For $remote_addr;",
        "    proxy_set_header X-Forwarded-Proto $scheme;",
        f"    proxy_connect_timeout {plan.connect_timeout:g}s;",
        f"    proxy_read_timeout {plan.read_timeout:g}s;",
        f"    proxy_send_timeout {plan.read_timeout:g}s;",
        "",
        "    if ($mxgw_ambiguous) {",
        "        rewrite ^ /_mxgw_raw last;",
        "    }",
        "    location = /_mxgw_raw {",
        "        internal;",
        f"        proxy_pass {gw_scheme}://mxgw_gateway$request_uri;",
        "    }",
        "",
        "    location / {",
        f"        proxy_pass {gw_scheme}://mxgw_gateway;",
        "    }",
    ]
    for prefix in plan.gateway_prefixes:
        out += [
            f"    location ^~ {prefix} {{",
            f"        proxy_pass {gw_scheme}://mxgw_gateway;",
            "    }",
        ]
    for prefix in plan.homeserver_prefixes:
        if prefix in plan.gateway_prefixes:
            continue
        out += [
            f"    location ^~ {prefix} {{",
            f"        proxy_pass {hs_scheme}://mxgw_homeserver;",
            "    }",
        ]
    out.append("}")
    return "\n".join(out) + "\n"


# --- Caddy -----------------------------------------------------------------------------------


def render_caddy(plan: RoutePlan, listen: Sequence[str]) -> str:
    sites = ", ".join(listen) if listen else f"{plan.host}, {plan.host}:8448"
    gateway = plan.gateway_url
    out = _header(plan, "#")
    out += [
        "# A Caddyfile site block (Caddy matches paths decoded, cleaned and case-insensitively;",
        "# the raw target is checked for ambiguous spellings).",
        "",
        f"{sites} {{",
        "\trequest_body {",
        f"\t\tmax_size {plan.max_body_size}",
        "\t}",
        "\t@mxgw_homeserver {",
        "\t\tpath " + " ".join(f"{p}*" for p in plan.homeserver_prefixes),
        "\t\tnot path " + " ".join(f"{p}*" for p in plan.gateway_prefixes),
        f"\t\tnot expression `{{http.request.orig_uri}}.matches({_go_string(AMBIGUOUS_PATH)})`",
        "\t}",
        "\thandle @mxgw_homeserver {",
        f"\t\treverse_proxy {plan.homeserver_url}",
        "\t}",
        "\thandle {",
        f"\t\treverse_proxy {gateway}",
        "\t}",
        "}",
    ]
    return "\n".join(out) + "\n"


def _go_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- HAProxy ---------------------------------------------------------------------------------


def render_haproxy(plan: RoutePlan, listen: Sequence[str]) -> str:
    binds = list(listen) or [
        ":443 ssl crt /etc/haproxy/certs/matrix.pem alpn h2,http/1.1",
        ":8448 ssl crt /etc/haproxy/certs/matrix.pem alpn h2,http/1.1",
    ]
    _, gw_host, gw_port = _url_host_port(plan.gateway_url)
    _, hs_host, hs_port = _url_host_port(plan.homeserver_url)
    gw_ssl = " ssl verify none" if plan.gateway_url.startswith("https:") else ""
    hs_ssl = (
        " ssl verify required ca-file @system-ca"
        if plan.homeserver_url.startswith("https:")
        else ""
    )
    out = _header(plan, "#")
    out += [
        "# HAProxy's `path` is raw; `path,url_dec` decoded (not dot-resolved: dotted",
        "# spellings are ambiguous and go to the gateway).",
        "",
        "frontend matrix",
        "    mode http",
    ]
    out += [f"    bind {b}" for b in binds]
    out += [
        # As the gateway's own listener (without them HAProxy waits for a silent client
        # forever, and warns at start-up): a request head within 20 s or
        # public.request_timeout, the shorter; no pause longer than public.request_timeout.
        f"    timeout http-request {min(20.0, plan.request_timeout):g}s",
        f"    timeout client {plan.request_timeout:g}s",
        "    http-request deny deny_status 413 if "
        f"{{ req.hdr_val(content-length) gt {plan.max_body_size} }}",
        "    # Replaced, not appended: the homeserver believes the first entry.",
        "    http-request del-header X-Forwarded-For",
        "    http-request set-header X-Forwarded-Proto https if { ssl_fc }",
        "    http-request set-header X-Forwarded-Proto http if !{ ssl_fc }",
        "    option forwardfor",
        "    acl mxgw_served path,url_dec -m beg " + " ".join(plan.homeserver_prefixes),
        "    acl mxgw_owned path,url_dec -m beg " + " ".join(plan.gateway_prefixes),
        # Single quotes: HAProxy reads backslashes and $ literally only inside them.
        f"    acl mxgw_ambiguous path -m reg '{AMBIGUOUS_PATH}'",
        "    use_backend mxgw_homeserver if mxgw_served !mxgw_owned !mxgw_ambiguous",
        "    default_backend mxgw_gateway",
        "",
        "backend mxgw_gateway",
        "    mode http",
        f"    timeout connect {plan.connect_timeout:g}s",
        f"    timeout server {plan.read_timeout:g}s",
        f"    server gateway {gw_host}:{gw_port}{gw_ssl}",
        "",
        "backend mxgw_homeserver",
        "    mode http",
        f"    timeout connect {plan.connect_timeout:g}s",
        f"    timeout server {plan.read_timeout:g}s",
        f"    server homeserver {hs_host}:{hs_port}{hs_ssl}",
    ]
    return "\n".join(out) + "\n"


# --- Traefik ---------------------------------------------------------------------------------


def render_traefik(plan: RoutePlan, listen: Sequence[str]) -> str:
    entry_points = list(listen) or ["websecure"]

    def any_prefix(prefixes: Sequence[str]) -> str:
        return " || ".join(f"PathPrefix(`{p}`)" for p in prefixes)

    rule = f"({any_prefix(plan.homeserver_prefixes)}) && !({any_prefix(plan.gateway_prefixes)})"
    out = _header(plan, "#")
    out += [
        "# Traefik dynamic configuration (file provider). Traefik has no matcher on the raw",
        "# path: keep the entry point's path sanitising on (the default), which resolves dot",
        "# segments and merges slashes before routing and before forwarding. Room version 3",
        "# event IDs contain '/', sent as %2F: allow it on the entry point",
        "# (http.encodedCharacters.allowEncodedSlash) where your Traefik rejects it.",
        "http:",
        "  routers:",
        "    mxgw-homeserver:",
        f"      rule: {_yaml_string(rule)}",
        "      entryPoints: [" + ", ".join(entry_points) + "]",
        "      service: mxgw-homeserver",
        "      priority: 100",
    ]
    if entry_points == ["websecure"]:
        out.append("      tls: {}")
    out += [
        "    mxgw-gateway:",
        '      rule: "PathPrefix(`/`)"',
        "      entryPoints: [" + ", ".join(entry_points) + "]",
        "      service: mxgw-gateway",
        "      priority: 1",
    ]
    if entry_points == ["websecure"]:
        out.append("      tls: {}")
    out += [
        "  services:",
        "    mxgw-gateway:",
        "      loadBalancer:",
        f"        servers: [{{url: {_yaml_string(plan.gateway_url)}}}]",
        "    mxgw-homeserver:",
        "      loadBalancer:",
        f"        servers: [{{url: {_yaml_string(plan.homeserver_url)}}}]",
    ]
    return "\n".join(out) + "\n"


def _yaml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- the command -----------------------------------------------------------------------------

PROXIES: dict[str, Callable[[RoutePlan, Sequence[str]], str]] = {
    "nginx": render_nginx,
    "caddy": render_caddy,
    "haproxy": render_haproxy,
    "traefik": render_traefik,
}


def render(proxy: str, plan: RoutePlan, listen: Sequence[str] = ()) -> str:
    return PROXIES[proxy](plan, listen)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--for",
        dest="proxy",
        choices=sorted(PROXIES),
        required=True,
        help="the reverse proxy in front of the gateway and the homeserver",
    )
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="WHERE",
        help="where the proxy listens, repeatable: nginx `listen` parameters (default 443 and "
        "8448 with TLS), HAProxy `bind` parameters, Caddy site addresses, Traefik entry points",
    )


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(e.describe(), file=sys.stderr)
        return 1
    plan = route_plan(config)
    if not plan.x_forwarded:
        print(
            textwrap.fill(
                f"note: public.x_forwarded is false in {args.config}: behind this proxy, set "
                "it to true, or the homeserver sees the proxy's address for every request "
                "that goes through the gateway.",
                88,
            ),
            file=sys.stderr,
        )
    if "/_matrix/client/" in plan.gateway_prefixes:
        why = "[guests]" if config.guests.enabled else "[cors] (on by default)"
        print(
            textwrap.fill(
                f"note: the client API (/_matrix/client/) goes through the gateway because {why} "
                "is on; with [cors] and [guests] off it goes straight to the homeserver, which "
                "then answers CORS itself.",
                88,
            ),
            file=sys.stderr,
        )
    sys.stdout.write(render(args.proxy, plan, args.listen))
    return 0
