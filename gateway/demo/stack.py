"""``gateway demo``: a local Synapse with the gateway in front, ready to play with.

Everything lives in one data directory (``./demo-data`` by default)::

    demo.json       where everything answers, written once both processes answer
    gateway.toml    the gateway's config (rewritten on every start)
    gateway.log     the gateway's output
    synapse/        Synapse's config, signing key, SQLite database, media and logs

The homeserver is named ``localhost:PORT`` after the gateway's public port, so peers reach
it through the gateway (see ``gateway.demo.synapse``). The demo's settings let a
script on the same machine act as a remote server named ``localhost:OTHERPORT``: loopback
addresses are allowed and TLS certificates of ``localhost`` are not checked, by Synapse and
by the gateway alike. Production defaults stay strict; these settings exist only here.

The same pieces start the stack for the integration tests (``prepare_stack``,
``StackProcesses``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import secrets
import signal
import socket
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from gateway.app import internal_tls_files
from gateway.commands.synapse_config import outbound_synapse_settings
from gateway.config import ConfigError, load_config
from gateway.demo.synapse import (
    HomeserverError,
    ServiceProcess,
    SynapseConfig,
    SynapseSettings,
    free_port,
    prepare_synapse,
    read_server_name,
    synapse_process,
)
from gateway.notary import NotaryKey, prepare_notary_files
from gateway.notary.certificate import ensure_self_signed_certificate

DEFAULT_DATA_DIR = Path("demo-data")
DEFAULT_PORT = 8448
GATEWAY_CONFIG_FILE = "gateway.toml"
GATEWAY_LOG_FILE = "gateway.log"
DEMO_FILE = "demo.json"
SYNAPSE_DIR = "synapse"

# Sections of a user's ``--config`` that describe where things run; the demo decides those.
_DEMO_OWNED_SECTIONS = frozenset({"server", "homeserver", "public", "internal"})
# Demo-only allowances, kept even when ``--config`` has a [federation] section.
_DEMO_IP_RANGE_WHITELIST = ("127.0.0.0/8", "::1/128")
_DEMO_CERTIFICATE_WHITELIST = ("localhost",)


class DemoError(Exception):
    """The demo cannot start; the message says why and what to do."""


# --- TOML -------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_table(name: str, table: Mapping[str, Any]) -> Iterator[str]:
    yield f"[{name}]"
    subtables = []
    for key, value in table.items():
        if (
            isinstance(value, Mapping)
            and value
            and all(isinstance(v, Mapping) for v in value.values())
        ):
            subtables.append((key, value))
        else:
            yield f"{_toml_key(key)} = {_toml_value(value)}"
    for key, value in subtables:
        yield ""
        yield from _toml_table(f"{name}.{_toml_key(key)}", value)


def to_toml(document: Mapping[str, Mapping[str, Any]], header: str = "") -> str:
    """Write a document of tables as TOML (enough for the gateway's config format)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for name, table in document.items():
        if isinstance(table, list | tuple):
            # An array of tables ([[policies]]): nested values are written inline.
            for entry in table:
                if lines:
                    lines.append("")
                lines.append(f"[[{_toml_key(name)}]]")
                lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in entry.items())
            continue
        if lines:
            lines.append("")
        lines.extend(_toml_table(_toml_key(name), table))
    return "\n".join(lines) + "\n"


# --- the stack ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """A prepared data directory: a Synapse config and a gateway config that match."""

    data_dir: Path
    server_name: str
    gateway_url: str
    internal_url: str
    homeserver_url: str
    gateway_config_path: Path
    gateway_log_path: Path
    synapse: SynapseConfig
    # The gateway config as written (tables of the TOML file).
    gateway_config: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # The outbound listener the homeserver sends its federation traffic to, when on.
    outbound_url: str | None = None

    @property
    def registration_shared_secret(self) -> str:
        return self.synapse.registration_shared_secret

    def summary(self) -> dict[str, Any]:
        """What ``demo.json`` holds."""
        return {
            "server_name": self.server_name,
            "gateway_url": self.gateway_url,
            "internal_url": self.internal_url,
            "homeserver_url": self.homeserver_url,
            "outbound_url": self.outbound_url,
            "registration_shared_secret": self.registration_shared_secret,
            "data_dir": str(self.data_dir),
            "gateway_config": str(self.gateway_config_path),
            "homeserver_config": str(self.synapse.config_path),
            "homeserver_signing_key": str(self.synapse.signing_key_path),
            "logs": {
                "gateway": str(self.gateway_log_path),
                "homeserver": str(self.synapse.log_path),
            },
        }


def _absolute(base_dir: Path, value: Any) -> Any:
    if not isinstance(value, str) or not value:
        return value
    return str(base_dir / Path(value).expanduser())


def _merge_user_config(
    config: dict[str, dict[str, Any]],
    user_config: Mapping[str, Any],
    user_config_dir: Path | None = None,
) -> None:
    """``user_config_dir``: the directory of the user's file. Relative paths in it mean what
    they mean to ``gateway check`` of that file, though the demo's file lives elsewhere."""
    for section, table in user_config.items():
        if section in _DEMO_OWNED_SECTIONS:
            continue
        if section == "policies" and isinstance(table, list):
            entries = [dict(e) if isinstance(e, Mapping) else e for e in table]
            if user_config_dir is not None:
                # Each entry carries the user's directory: module paths, dotted modules
                # kept next to the file and path-valued options resolve from there.
                for entry in entries:
                    if isinstance(entry, dict):
                        entry["base_dir"] = _absolute(user_config_dir, entry.get("base_dir", "."))
            config[section] = entries  # type: ignore[assignment]
            continue
        if not isinstance(table, Mapping):
            raise DemoError(f"--config: {section!r} must be a table")
        table = dict(table)
        if section == "notary":
            # The demo's homeserver trusts the notary the demo made (name and key).
            table.pop("server_name", None)
            table.pop("state_dir", None)
        if section == "outbound":
            # Where it listens and its secret belong to the demo (the homeserver's config
            # must match); how invites leave is the user's choice.
            for key in ("enabled", "bind", "secret", "secret_path"):
                table.pop(key, None)
        if section == "store" and user_config_dir is not None and "sqlite_path" in table:
            table["sqlite_path"] = _absolute(user_config_dir, table["sqlite_path"])
        config.setdefault(section, {}).update(table)
    federation = config.setdefault("federation", {})
    for key, needed in (
        ("ip_range_whitelist", _DEMO_IP_RANGE_WHITELIST),
        ("federation_certificate_verification_whitelist", _DEMO_CERTIFICATE_WHITELIST),
    ):
        values = list(federation.get(key, []))
        federation[key] = values + [v for v in needed if v not in values]


def gateway_config(
    *,
    server_name: str,
    public_port: int,
    internal_port: int,
    homeserver_url: str,
    signing_key_path: str,
    log_format: str = "console",
    user_config: Mapping[str, Any] | None = None,
    user_config_dir: Path | None = None,
    outbound: Mapping[str, Any] | None = None,
    public_tls: tuple[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """The demo's gateway config, in the format of ``gateway.toml``. ``outbound`` is the
    ``[outbound]`` table (bind and secret) when the homeserver sends through the gateway;
    ``public_tls`` the public listener's (certificate, key)."""
    config: dict[str, dict[str, Any]] = {
        "server": {"server_name": server_name, "signing_key_path": signing_key_path},
        "homeserver": {
            "url": homeserver_url,
            "connect_timeout": 5.0,
            "read_timeout": 60.0,
            "expose_admin_api": False,
        },
        "public": {
            # Loopback only: the demo is for this machine.
            "bind": f"127.0.0.1:{public_port}",
            "tls_certificate_path": public_tls[0] if public_tls else "",
            "tls_private_key_path": public_tls[1] if public_tls else "",
            "max_body_size": 52428800,
            "workers": 1,
            "request_timeout": 60.0,
        },
        "internal": {"bind": f"127.0.0.1:{internal_port}"},
        "notary": {"server_name": f"localhost:{internal_port}", "state_dir": "state"},
        "log": {"format": log_format, "level": "info"},
        "store": {"backend": "sqlite", "sqlite_path": "gateway.db", "postgres_dsn": ""},
        "federation": {
            "ip_range_whitelist": list(_DEMO_IP_RANGE_WHITELIST),
            "federation_certificate_verification_whitelist": list(_DEMO_CERTIFICATE_WHITELIST),
            # Remote servers on this machine are asked directly for their keys.
            "trusted_key_servers": [],
            "request_timeout": 10.0,
        },
    }
    if outbound is not None:
        config["outbound"] = {"enabled": True, **outbound, "invite_version": "v3"}
    _merge_user_config(config, user_config or {}, user_config_dir)
    return config


def prepare_stack(
    data_dir: Path,
    *,
    port: int,
    internal_port: int | None = None,
    homeserver_port: int | None = None,
    user_config: Mapping[str, Any] | None = None,
    user_config_dir: Path | None = None,
    synapse_extra: Mapping[str, Any] | None = None,
    log_format: str = "console",
    outbound: bool = True,
    outbound_port: int | None = None,
    public_tls: bool = False,
) -> Stack:
    """Write matching Synapse and gateway configs into ``data_dir``.

    ``port`` is the gateway's public port and names the homeserver ``localhost:PORT``. The
    other ports default to free ones picked now. ``user_config_dir`` is what relative paths
    in ``user_config`` are relative to (the directory of the ``--config`` file).

    With ``outbound`` (the default) the homeserver sends its federation traffic through the
    gateway's outbound listener (``outbound_port``, a free one by default). With
    ``public_tls`` the public listener serves HTTPS with a certificate made for
    ``localhost``: what another homeserver (another demo) needs to federate with this one.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    server_name = f"localhost:{port}"
    internal_port = internal_port or free_port()
    homeserver_port = homeserver_port or free_port()
    gateway_url = f"https://localhost:{port}" if public_tls else f"http://127.0.0.1:{port}"
    tls_files: tuple[str, str] | None = None
    if public_tls:
        cert, key = ensure_self_signed_certificate(data_dir / "public-tls", "localhost")
        tls_files = (str(cert), str(key))
    outbound_table: dict[str, Any] | None = None
    synapse_outbound: dict[str, Any] = {}
    if outbound:
        outbound_port = outbound_port or free_port()
        secret = secrets.token_urlsafe(24)
        outbound_table = {"bind": f"127.0.0.1:{outbound_port}", "secret": secret}
        # What `gateway synapse-config` tells an operator to add (see gateway/notary).
        synapse_outbound = outbound_synapse_settings("127.0.0.1", outbound_port, secret)
    # The homeserver trusts the gateway's notary (made now, before either starts), as
    # `gateway synapse-config` would tell an operator to configure it.
    notary_name = f"localhost:{internal_port}"
    notary_files = prepare_notary_files(data_dir / "state")
    notary_key = NotaryKey.load_or_create(notary_files.key_path, notary_name)
    synapse = prepare_synapse(
        SynapseSettings(
            data_dir=data_dir / SYNAPSE_DIR,
            server_name=server_name,
            port=homeserver_port,
            public_baseurl=f"{gateway_url}/",
            trusted_key_servers=[
                {
                    "server_name": notary_name,
                    "verify_keys": {notary_key.key_id: notary_key.verify_key_base64},
                }
            ],
            extra={**synapse_outbound, **dict(synapse_extra or {})},
        )
    )
    try:
        signing_key = str(synapse.signing_key_path.relative_to(data_dir))
    except ValueError:
        signing_key = str(synapse.signing_key_path)
    config = gateway_config(
        server_name=server_name,
        public_port=port,
        internal_port=internal_port,
        homeserver_url=synapse.url,
        signing_key_path=signing_key,
        log_format=log_format,
        user_config=user_config,
        user_config_dir=user_config_dir,
        outbound=outbound_table,
        public_tls=tls_files,
    )
    config_path = data_dir / GATEWAY_CONFIG_FILE
    config_path.write_text(
        to_toml(
            config,
            header="matrix-gateway configuration written by `gateway demo`; rewritten on "
            "every start.\nPaths are relative to this file's directory.",
        ),
        encoding="utf8",
    )
    # Checked now, with the gateway's own loader, so a bad --config is reported before
    # anything starts.
    try:
        loaded = load_config(config_path)
    except ConfigError as e:
        raise DemoError(e.describe()) from e
    internal_scheme = "https" if internal_tls_files(loaded) is not None else "http"
    return Stack(
        data_dir=data_dir,
        server_name=server_name,
        gateway_url=gateway_url,
        internal_url=f"{internal_scheme}://127.0.0.1:{internal_port}",
        homeserver_url=synapse.url,
        gateway_config_path=config_path,
        gateway_log_path=data_dir / GATEWAY_LOG_FILE,
        synapse=synapse,
        gateway_config=config,
        outbound_url=f"http://127.0.0.1:{outbound_port}" if outbound else None,
    )


def gateway_process(
    config_path: Path, *, ready_url: str, log_path: Path, python: str = sys.executable
) -> ServiceProcess:
    """``gateway run --config PATH`` as a child process (not yet started)."""
    return ServiceProcess(
        "the gateway",
        [python, "-m", "gateway", "run", "--config", str(config_path)],
        ready_url=ready_url,
        console_path=log_path,
        cwd=config_path.parent,
    )


class StackProcesses:
    """Synapse and the gateway of a prepared stack, started together and stopped in order.

    Both start at once (Synapse takes seconds, the gateway well under one); ``start`` returns
    when Synapse answers directly and the gateway answers both on its internal listener and,
    forwarding to Synapse, on its public one.
    """

    def __init__(self, stack: Stack, *, python: str = sys.executable) -> None:
        self.stack = stack
        self.synapse = synapse_process(stack.synapse, python=python)
        self.gateway = gateway_process(
            stack.gateway_config_path,
            ready_url=f"{stack.internal_url}/health",
            log_path=stack.gateway_log_path,
            python=python,
        )

    def start(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        try:
            # The gateway first: its internal listener (the homeserver's notary) must be up
            # before Synapse asks it anything.
            self.gateway.start()
            self.synapse.start()
            self.gateway.wait_until_ready(timeout=max(1.0, deadline - time.monotonic()))
            self.synapse.wait_until_ready(timeout=max(1.0, deadline - time.monotonic()))
            self.gateway.wait_until_ready(
                timeout=max(1.0, deadline - time.monotonic()),
                url=f"{self.stack.gateway_url}/_matrix/client/versions",
            )
        except BaseException:
            self.stop()
            raise

    def poll(self) -> str | None:
        """The name of a process that has ended, if any."""
        for process in (self.gateway, self.synapse):
            if process.poll() is not None:
                return process.name
        return None

    def stop(self) -> None:
        # The gateway first, so nothing is forwarded to a homeserver that is going away.
        try:
            self.gateway.stop()
        finally:
            self.synapse.stop()

    def __enter__(self) -> StackProcesses:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- the command ---------------------------------------------------------------------------


class _StopRequested(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _StopRequested(signum)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _choose_port(data_dir: Path, requested: int | None) -> int:
    # A data directory belongs to one server name, so it keeps the port it was made with.
    existing = read_server_name(data_dir / SYNAPSE_DIR)
    existing_port: int | None = None
    if existing is not None:
        match = re.fullmatch(r"localhost:(\d+)", existing)
        if match is None:
            raise DemoError(f"{data_dir} holds a homeserver named {existing!r}, not a demo")
        existing_port = int(match.group(1))
    if requested is not None and existing_port is not None and requested != existing_port:
        raise DemoError(
            f"{data_dir} belongs to the homeserver {existing!r} (port {existing_port}); "
            f"run with --port {existing_port} or choose a new --data-dir"
        )
    port = requested or existing_port or DEFAULT_PORT
    if not 0 < port < 65536:
        raise DemoError(f"--port {port} is not a TCP port")
    if not _port_is_free(port):
        hint = (
            f"this data directory belongs to localhost:{existing_port}"
            if existing_port
            else "or choose another with --port N"
        )
        raise DemoError(f"port {port} on 127.0.0.1 is already in use: stop what uses it, {hint}")
    return port


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gateway demo",
        description="Start a local Synapse with the gateway in front of it.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="where configs, databases and logs go (default: ./demo-data)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"the gateway's public port; names the homeserver localhost:PORT "
        f"(default: {DEFAULT_PORT}, or the port an existing data dir was made with)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a gateway.toml whose sections other than server, homeserver, public and "
        "internal (policies, store, log, federation, ...) the demo uses; relative paths in "
        "it are relative to its directory, as for `gateway check`",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve the public listener over HTTPS (a self-made certificate for localhost), "
        "so another demo on this machine can federate with this one",
    )
    return parser.parse_args(argv)


def _insecure(stack: Stack) -> str:
    # The demo's own certificate is not one curl could verify.
    return " -k" if stack.gateway_url.startswith("https") else ""


def _welcome(stack: Stack, demo_file: Path) -> str:
    return f"""
matrix-gateway demo is running.

  homeserver name   {stack.server_name}
  gateway (public)  {stack.gateway_url}
  gateway internal  {stack.internal_url}  (/health, /metrics)
  gateway outbound  {stack.outbound_url or "off"}  (the homeserver's federation leaves here)
  Synapse (direct)  {stack.homeserver_url}
  details           {demo_file}
  logs              {stack.gateway_log_path}
                    {stack.synapse.log_path}

Register a user (straight at Synapse: the gateway keeps /_synapse/admin private):
  {sys.executable} -m synapse._scripts.register_new_matrix_user \\
      -c {stack.synapse.config_path} -u alice -p alice-password --no-admin {stack.homeserver_url}

Then log in through the gateway:
  curl -s{_insecure(stack)} -X POST {stack.gateway_url}/_matrix/client/v3/login \\
      -d '{{"type": "m.login.password", "identifier": {{"type": "m.id.user", "user": "alice"}}, \
"password": "alice-password"}}'

Federation requests for {stack.server_name} go to {stack.gateway_url}.
Play a remote server that sends a v3 invite, a restricted join or a knock (README):
  {sys.executable} -m gateway demo-peer invite --to @alice:{stack.server_name} \
      --data-dir {stack.data_dir}

Press Ctrl-C to stop.
"""


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """``gateway demo [--data-dir DIR] [--port N] [--config FILE]``; returns the exit status.

    ``argv`` is the command line after ``demo``, or the arguments ``gateway``'s own parser
    already read (``data_dir``, ``port``, ``config``).
    """
    args = argv if isinstance(argv, argparse.Namespace) else _parse_args(argv)
    data_dir: Path = args.data_dir.resolve()
    user_config: dict[str, Any] = {}
    try:
        if args.config is not None:
            try:
                user_config = tomllib.loads(args.config.read_text(encoding="utf8"))
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise DemoError(f"--config {args.config}: {e}") from e
        port = _choose_port(data_dir, args.port)
        print(f"Preparing {data_dir} ...", flush=True)
        stack = prepare_stack(
            data_dir,
            port=port,
            user_config=user_config,
            user_config_dir=args.config.resolve().parent if args.config is not None else None,
            public_tls=bool(getattr(args, "tls", False)),
        )
    except (DemoError, HomeserverError) as e:
        print(f"gateway demo: {e}", file=sys.stderr)
        return 2

    demo_file = data_dir / DEMO_FILE
    demo_file.unlink(missing_ok=True)
    processes = StackProcesses(stack)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        print("Starting Synapse and the gateway ...", flush=True)
        processes.start()
        summary = stack.summary()
        summary["pids"] = {"gateway": processes.gateway.pid, "homeserver": processes.synapse.pid}
        tmp = demo_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf8")
        tmp.replace(demo_file)
        print(_welcome(stack, demo_file), flush=True)
        while (ended := processes.poll()) is None:
            time.sleep(0.5)
        print(
            f"gateway demo: {ended} stopped unexpectedly\n"
            f"{processes.gateway.logs()}\n{processes.synapse.logs()}",
            file=sys.stderr,
        )
        status = 1
    except _StopRequested as stop:
        print(f"\n{stop} received, stopping ...", flush=True)
    except HomeserverError as e:
        print(f"gateway demo: {e}", file=sys.stderr)
        status = 1
    finally:
        # A second Ctrl-C must not interrupt the shutdown and leave a child behind.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        try:
            processes.stop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    print("Stopped.", flush=True)
    return status
