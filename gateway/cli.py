"""The ``gateway`` command.

Subcommands are entries in :data:`COMMANDS`; a new one is a :class:`Command` with a function
that adds its arguments and a function that runs it. Heavy modules are imported only when
their subcommand runs (see :func:`lazy`).

Exit status: 0 success, 1 invalid configuration (or a failure to start; for ``gateway
check`` also a ``server.server_name`` or signing key copy that is not the homeserver's own),
2 for ``gateway check`` when the configuration is valid but the homeserver does not answer, or
the notary check fails (the homeserver does not use the gateway's notary, or the chain
homeserver -> notary -> delegation key does not verify). A notary the homeserver backs off
after an earlier failure is not a failure: the check ends the backoff and says so.
"""

from __future__ import annotations

import argparse
import importlib
import os
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import ConfigError, GatewayConfig, load_config

__all__ = ["COMMANDS", "Command", "lazy", "main"]

DEFAULT_CONFIG = Path("gateway.toml")
EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_HOMESERVER = 2


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def lazy(module: str, function: str = "main") -> Callable[[argparse.Namespace], int]:
    """A runner that imports ``module`` only when the subcommand runs, then calls
    ``module.function(args)``."""

    def run(args: argparse.Namespace) -> int:
        result = getattr(importlib.import_module(module), function)(args)
        return int(result or 0)

    return run


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        metavar="PATH",
        help=f"configuration file (default: {DEFAULT_CONFIG})",
    )


def _load(path: Path) -> GatewayConfig | None:
    try:
        return load_config(path)
    except ConfigError as e:
        print(e.describe(), file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from gateway.workers import run

    return run(config)


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    public = config.public
    if public.tls_certificate_path and public.tls_private_key_path:
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(public.tls_certificate_path, public.tls_private_key_path)
        except (ssl.SSLError, OSError) as e:
            print(
                f"invalid configuration {args.config}:\n  public.tls_certificate_path / "
                f"public.tls_private_key_path: cannot load the certificate and key: {e}",
                file=sys.stderr,
            )
            return EXIT_CONFIG
    if config.policies:
        from gateway.policy import PolicyLoadError, load_policy_set

        try:
            load_policy_set(config.policies, generation=1)
        except PolicyLoadError as e:
            problems = "\n".join(f"  {p}" for p in e.problems)
            print(f"invalid policies in {args.config}:\n{problems}", file=sys.stderr)
            return EXIT_CONFIG
    print(f"configuration {args.config}: ok")

    import trio

    from gateway.logging import configure_logging

    # The notary the probe may run logs as a running gateway does; check prints only its
    # own lines.
    with open(os.devnull, "w") as discard:
        configure_logging("json", "error", stream=discard)
        return trio.run(_check_homeserver, config)


async def _check_homeserver(config: GatewayConfig) -> int:
    import httpx

    hs = config.homeserver
    url = hs.url + "/_matrix/federation/v1/version"
    timeout = httpx.Timeout(hs.read_timeout, connect=hs.connect_timeout)
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.get(url)
    except httpx.HTTPError as e:
        reason = str(e) or type(e).__name__
        print(f"homeserver {hs.url} (homeserver.url) does not answer: {reason}", file=sys.stderr)
        return EXIT_HOMESERVER
    server: Any = None
    if response.status_code == 200:
        try:
            server = response.json().get("server")
        except ValueError:
            server = None
    if not isinstance(server, dict):
        print(
            f"homeserver {hs.url} (homeserver.url) answered GET /_matrix/federation/v1/version "
            f"with {response.status_code}, not a federation version",
            file=sys.stderr,
        )
        return EXIT_HOMESERVER
    name, version = server.get("name", "?"), server.get("version", "?")
    print(f"homeserver {hs.url}: ok ({name} {version})")
    status = await _check_identity(config)
    if status != EXIT_OK:
        return status
    if config.server.signing_key_path is not None:
        from gateway.commands.check import check_homeserver_uses_notary

        result = await check_homeserver_uses_notary(config)
        if not result.ok:
            print(f"notary: {result.detail}", file=sys.stderr)
            return EXIT_HOMESERVER
        for note in result.notes:
            print(f"notary: {note}")
        print(f"notary: ok ({result.detail})")
    if config.outbound.enabled:
        from gateway.commands.check import check_outbound_routing

        outbound = await check_outbound_routing(config)
        if not outbound.ok:
            print(f"outbound: {outbound.detail}", file=sys.stderr)
            return EXIT_HOMESERVER
        print(f"outbound: ok ({outbound.detail})")
    return EXIT_OK


async def _check_identity(config: GatewayConfig) -> int:
    """server.server_name and the signing key copy against what the homeserver publishes."""
    import httpx

    from gateway.homeserver.identity import SERVER_KEYS_PATH, identity_problems, parse_server_keys

    hs = config.homeserver
    timeout = httpx.Timeout(hs.read_timeout, connect=hs.connect_timeout)
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.get(hs.url + SERVER_KEYS_PATH)
        keys = parse_server_keys(response.json() if response.status_code == 200 else None)
    except (httpx.HTTPError, ValueError) as e:
        print(
            f"homeserver {hs.url} (homeserver.url) answered GET {SERVER_KEYS_PATH} without its "
            f"name and keys: {e}",
            file=sys.stderr,
        )
        return EXIT_HOMESERVER
    signing_key = None
    path = config.server.signing_key_path
    if path is not None:
        from gateway.services import load_homeserver_signing_key

        try:
            signing_key = load_homeserver_signing_key(path)
        except (OSError, ValueError) as e:
            print(
                f"invalid configuration:\n  server.signing_key_path: cannot read a signing key "
                f"from {path}: {e}",
                file=sys.stderr,
            )
            return EXIT_CONFIG
    problems = identity_problems(
        keys,
        server_name=config.server.server_name,
        homeserver_url=hs.url,
        signing_key=signing_key,
        signing_key_path=path,
    )
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        print(
            f"the configuration does not match the homeserver (its GET {SERVER_KEYS_PATH}):\n"
            + lines,
            file=sys.stderr,
        )
        return EXIT_CONFIG
    what = "server name and signing key" if signing_key is not None else "server name"
    print(f'homeserver {hs.url}: "{keys.server_name}", {what} as configured')
    return EXIT_OK


def _health_arguments(parser: argparse.ArgumentParser) -> None:
    from gateway.healthcheck import add_arguments

    _config_argument(parser)
    add_arguments(parser)


def _decisions_arguments(parser: argparse.ArgumentParser) -> None:
    from gateway.policy.cli import add_decisions_arguments

    _config_argument(parser)
    add_decisions_arguments(parser)


def _decisions(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from gateway.policy.cli import run_decisions

    return run_decisions(args, config.store)


def _policy_arguments(parser: argparse.ArgumentParser) -> None:
    from gateway.policy.cli import add_policy_test_arguments

    actions = parser.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    test = actions.add_parser(
        "test",
        help="run a policy on a recorded request and print its decision",
        description="Run a policy on a recorded request (policies/fixtures/) and print its "
        "decision.",
    )
    add_policy_test_arguments(test)


def _policy(args: argparse.Namespace) -> int:
    from gateway.policy.cli import run_policy_test

    return run_policy_test(args)


def _proxy_config_arguments(parser: argparse.ArgumentParser) -> None:
    from gateway.commands.proxy_config import add_arguments

    _config_argument(parser)
    add_arguments(parser)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults stay None: gateway.demo.stack parses the forwarded arguments and owns the defaults.
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the demo keeps its homeserver, configs and demo.json (default: demo-data)",
    )
    parser.add_argument(
        "--port", type=int, default=None, metavar="N", help="the gateway's public port"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="a gateway configuration to start from (default: one made for the demo)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="HTTPS on the public listener, so two demos on one machine federate",
    )


def _demo(args: argparse.Namespace) -> int:
    argv: list[str] = []
    for flag, value in (("--data-dir", args.data_dir), ("--port", args.port)):
        if value is not None:
            argv += [flag, str(value)]
    if args.config is not None:
        argv += ["--config", str(args.config)]
    if args.tls:
        argv.append("--tls")
    return int(importlib.import_module("gateway.demo.stack").main(argv) or 0)


COMMANDS: list[Command] = [
    Command("run", "serve (until SIGINT or SIGTERM)", _config_argument, _run),
    Command(
        "check",
        "validate the configuration, then check that the homeserver answers",
        _config_argument,
        _check,
    ),
    Command(
        "health",
        "ask the running gateway's internal listener for /health (exit status 0 if healthy)",
        _health_arguments,
        lazy("gateway.healthcheck"),
    ),
    Command(
        "demo",
        "start a local Synapse with the gateway in front of it",
        _demo_arguments,
        _demo,
    ),
    Command(
        "demo-peer",
        "act as a remote server towards the running demo: a v3 invite, a restricted join, a knock",
        lambda parser: importlib.import_module("gateway.demo.peer").add_arguments(parser),
        lazy("gateway.demo.peer"),
    ),
    Command(
        "decisions",
        "list the admission decisions in the audit trail",
        _decisions_arguments,
        _decisions,
    ),
    Command("policy", "work with admission policies (policy test)", _policy_arguments, _policy),
    Command(
        "synapse-config",
        "print the homeserver.yaml settings that make Synapse use the gateway's notary",
        _config_argument,
        lazy("gateway.commands.synapse_config"),
    ),
    Command(
        "proxy-config",
        "print the routing for a reverse proxy in front of the gateway and the homeserver",
        _proxy_config_arguments,
        lazy("gateway.commands.proxy_config"),
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="A Matrix federation gateway in front of a homeserver."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
