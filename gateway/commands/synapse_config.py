"""``gateway synapse-config``: the homeserver settings that make it use the gateway's notary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.notary import NotaryKey, prepare_notary_files


def notary_name(config: GatewayConfig) -> str:
    if config.notary.server_name:
        return config.notary.server_name
    if not config.internal.bind.port:
        raise ValueError(
            "internal.bind has port 0: set a fixed port (or notary.server_name) so the "
            "homeserver knows where its notary is"
        )
    return f"localhost:{config.internal.bind.port}"


def homeserver_settings(config: GatewayConfig, name: str | None = None) -> dict[str, Any]:
    """Settings for the homeserver's config file (Synapse's homeserver.yaml)."""
    name = name or notary_name(config)
    files = prepare_notary_files(config.notary.state_dir)
    key = NotaryKey.load_or_create(files.key_path, name)
    host = name.rsplit(":", 1)[0] if not name.endswith("]") else name
    return {
        "trusted_key_servers": [
            {"server_name": name, "verify_keys": {key.key_id: key.verify_key_base64}}
        ],
        # The notary is the only key server the homeserver needs; matrix.org is not asked.
        "suppress_key_server_warning": True,
        # The notary's certificate is made by the gateway itself.
        "federation_certificate_verification_whitelist": [host],
        # Loopback is refused by default, and the failure looks like a DNS error.
        "ip_range_whitelist": ["127.0.0.1"],
    }


#: The name the homeserver's config gives the gateway's outbound listener.
OUTBOUND_INSTANCE = "gateway"


def outbound_synapse_settings(host: str, port: int, secret: str) -> dict[str, Any]:
    """Settings that make Synapse send all its outbound federation through the gateway."""
    return {
        # Synapse sends the secret as "Proxy-Authorization: Bearer <secret>".
        "worker_replication_secret": secret,
        "instance_map": {OUTBOUND_INSTANCE: {"host": host, "port": port}},
        "outbound_federation_restricted_to": [OUTBOUND_INSTANCE],
    }


OUTBOUND_HEADER = """\
#
# Outbound edge ([outbound] is enabled): Synapse sends every outbound federation request
# to the gateway's outbound listener, which sends it on (and our invites as v3 where the
# destination has the endpoint). worker_replication_secret must equal outbound.secret; if
# the homeserver already has one (workers), put that value in outbound.secret instead. If
# instance_map already exists, add the "gateway" entry to it.
"""


HEADER = """\
# Settings for the homeserver's config (homeserver.yaml); then restart the homeserver.
#
# trusted_key_servers: REPLACE the existing list (Synapse's default is matrix.org) with
# this one; do not add the notary to it. The notary fetches and verifies every remote
# server's keys itself; any other server left in the list would still be asked, and
# trusted, for keys.
#
# ip_range_whitelist and federation_certificate_verification_whitelist loosen Synapse's
# protection against server-side request forgery, for loopback only: the first lets its
# outbound requests (federation, push, identity servers) reach 127.0.0.1, the notary's
# address; the second accepts an unverifiable certificate from the host named there (the
# notary's self-made one). Keep them to these values: each entry added widens what a
# remote server can make Synapse reach.
#
# The homeserver's federation listener should bind to loopback only.
"""


def to_yaml(settings: dict[str, Any]) -> str:
    """YAML that needs no YAML library: every value written as JSON, which YAML accepts."""
    lines = []
    for key, value in settings.items():
        if key == "trusted_key_servers":
            lines.append(f"{key}:")
            for entry in value:
                lines.append(f"  - server_name: {json.dumps(entry['server_name'])}")
                lines.append(f"    verify_keys: {json.dumps(entry['verify_keys'])}")
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    path = Path(getattr(args, "config", None) or "gateway.toml")
    try:
        config = load_config(path)
    except ConfigError as e:
        print(e.describe(), file=sys.stderr)
        return 1
    if config.server.signing_key_path is None:
        print(
            "server.signing_key_path is not set: the notary (and v3 invites) need a copy of "
            "the homeserver's signing key",
            file=sys.stderr,
        )
        return 1
    try:
        settings = homeserver_settings(config)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 1
    outbound = config.outbound
    if outbound.enabled:
        bind = outbound.bind
        host = "127.0.0.1" if bind.host == "localhost" else bind.host
        settings.update(outbound_synapse_settings(host, bind.port, outbound.secret))
    print(HEADER, end="")
    if outbound.enabled:
        print(OUTBOUND_HEADER, end="")
    print(to_yaml(settings), end="")
    return 0
