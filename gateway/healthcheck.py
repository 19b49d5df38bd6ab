"""``gateway health``: asks a running gateway's internal listener whether it is healthy.

For container health checks and service managers. The internal listener is loopback only,
and HTTPS with a certificate the gateway made for itself once the notary is on, so a client
has to know the configuration to reach it; this one reads it. Exit status 0 when the answer
is 200, 1 otherwise (also for an unusable configuration); one line of output either way.
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import sys
from pathlib import Path

from gateway.config import ConfigError, GatewayConfig, load_config

__all__ = ["DEFAULT_TIMEOUT", "add_arguments", "main", "probe"]

#: Seconds for each step (connect, TLS handshake, reading the answer). The gateway's own
#: /health gives the homeserver at most 2 seconds.
DEFAULT_TIMEOUT = 5.0
_MAX_BODY = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--live",
        action="store_true",
        help="ask /health/live (the gateway runs) instead of /health (and the homeserver answers)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this long without progress (default: {DEFAULT_TIMEOUT:g})",
    )


def main(args: argparse.Namespace) -> int:
    config_path: Path = args.config
    try:
        config = load_config(config_path)
    except ConfigError as e:
        print(f"unhealthy: invalid configuration {e}", file=sys.stderr)
        return 1
    healthy, line = probe(config, "/health/live" if args.live else "/health", args.timeout)
    if healthy:
        print(f"healthy: {line}")
        return 0
    print(f"unhealthy: {line}", file=sys.stderr)
    return 1


def probe(config: GatewayConfig, path: str, timeout: float) -> tuple[bool, str]:
    """(healthy, what happened) for GET ``path`` on the internal listener of ``config``."""
    bind = config.internal.bind
    if bind.port == 0:
        return False, "internal.bind has port 0 (a port the system picks), so it cannot be asked"
    # The rule of gateway.app.internal_tls_files, without making the notary's files: the
    # notary, on when the homeserver's signing key is configured, switches the listener to TLS.
    tls = config.server.signing_key_path is not None
    url = f"{'https' if tls else 'http'}://{bind}{path}"
    host = "127.0.0.1" if bind.host == "localhost" else bind.host
    connection: http.client.HTTPConnection
    if tls:
        from gateway.notary.certificate import certificate_paths

        certificate, _ = certificate_paths(config.notary.state_dir)
        if not certificate.is_file():
            return False, f"{url}: no certificate at {certificate} yet (has the gateway started?)"
        context = ssl.create_default_context(cafile=str(certificate))
        # The certificate names "localhost"; the listener may be on 127.0.0.1 or ::1. What
        # matters is that the peer holds the key of the one certificate trusted here.
        context.check_hostname = False
        connection = http.client.HTTPSConnection(host, bind.port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(host, bind.port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"User-Agent": "gateway-health"})
        response = connection.getresponse()
        status, body = response.status, response.read(_MAX_BODY)
    except (OSError, http.client.HTTPException) as e:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return False, f"{url}: {reason}"
    finally:
        connection.close()
    return status == 200, f"{url} answered {status}{_detail(body)}"


def _detail(body: bytes) -> str:
    try:
        answer = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(answer, dict):
        return ""
    parts = [f"{k}: {v}" for k, v in answer.items() if isinstance(v, str)]
    return f" ({', '.join(parts)})" if parts else ""
