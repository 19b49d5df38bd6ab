"""Running a local Synapse next to the gateway: its configuration and its process.

Used by ``gateway demo`` and by the integration tests. Synapse is an optional dependency
(the ``demo`` and ``test`` extras); this module imports nothing from it and only runs it as
a child process with the current interpreter.

How the names fit together: Synapse's ``server_name`` is ``localhost:PORT`` where PORT is the
gateway's *public* port. A peer that resolves a server name with an explicit port and a
hostname (not an IP literal) connects straight to that host and port, without well-known or
SRV lookups, so every peer reaches the gateway under the homeserver's name. Synapse itself
listens elsewhere, on loopback and plain HTTP; it never needs to know the gateway's address,
only to accept requests whose X-Matrix ``destination`` is its own name.

Synapse refuses loopback addresses for outbound federation unless they are in
``ip_range_whitelist`` (the refusal looks like a DNS failure), and it checks federation TLS
certificates unless the name is in ``federation_certificate_verification_whitelist``. Both are
opened for ``localhost`` only, and only in the configurations made here.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

CONFIG_FILE = "homeserver.yaml"
LOG_CONFIG_FILE = "log.config.yaml"
LOG_FILE = "homeserver.log"
# Synapse's own standard output and error: where errors go before its logging is set up.
CONSOLE_FILE = "console.log"

# Generous limits: tests register users, create rooms and send messages in quick
# succession, which Synapse's defaults (made against abuse) would throttle.
_RELAXED = {"per_second": 1000, "burst_count": 10000}
RELAXED_RATE_LIMITS: dict[str, Any] = {
    "rc_message": _RELAXED,
    "rc_registration": _RELAXED,
    "rc_registration_token_validity": _RELAXED,
    "rc_login": {"address": _RELAXED, "account": _RELAXED, "failed_attempts": _RELAXED},
    "rc_admin_redaction": _RELAXED,
    "rc_joins": {"local": _RELAXED, "remote": _RELAXED},
    "rc_joins_per_room": _RELAXED,
    "rc_3pid_validation": _RELAXED,
    "rc_invites": {"per_room": _RELAXED, "per_user": _RELAXED, "per_issuer": _RELAXED},
    "rc_third_party_invite": _RELAXED,
    "rc_key_requests": _RELAXED,
    "rc_media_create": _RELAXED,
    "rc_presence": {"per_user": _RELAXED},
    "rc_delayed_event_mgmt": _RELAXED,
    "rc_room_creation": _RELAXED,
    "rc_reports": _RELAXED,
    "rc_user_directory": _RELAXED,
    "rc_profile": _RELAXED,
    "rc_federation": {
        "window_size": 1000,
        "sleep_limit": 1000,
        "sleep_delay": 1,
        "reject_limit": 10000,
        "concurrent": 100,
    },
}


class HomeserverError(Exception):
    """The local homeserver could not be configured, started or used."""


@dataclass(frozen=True)
class SynapseSettings:
    """What we want from a local Synapse; everything else comes from its generated config."""

    data_dir: Path
    # The name peers know the homeserver by: ``localhost:<gateway public port>``.
    server_name: str
    # The plain-HTTP listener (client and federation resources) on 127.0.0.1.
    port: int
    # Where clients reach the homeserver (the gateway); Synapse puts it in links it makes.
    public_baseurl: str | None = None
    # Notaries Synapse asks for other servers' keys. Empty: Synapse fetches keys directly.
    trusted_key_servers: Sequence[Mapping[str, Any]] = ()
    # Server names (globs) whose federation TLS certificates Synapse does not check.
    federation_certificate_verification_whitelist: Sequence[str] = ("localhost",)
    # Addresses Synapse may reach despite its blacklist of private ranges.
    ip_range_whitelist: Sequence[str] = ("127.0.0.1",)
    # PEM files of extra CAs for federation TLS (replaces Synapse's default trust roots).
    federation_custom_ca_list: Sequence[str] = ()
    relaxed_rate_limits: bool = True
    # Anything else, merged last (top-level keys replace the generated ones).
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SynapseConfig:
    """A prepared Synapse data directory."""

    data_dir: Path
    config_path: Path
    server_name: str
    port: int
    registration_shared_secret: str
    signing_key_path: Path
    log_path: Path
    console_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _yaml() -> Any:
    # PyYAML comes with Synapse (an optional dependency) and has no type information.
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise HomeserverError(
            "PyYAML is missing: install the demo extra (pip install 'matrix-gateway[demo]')"
        ) from e
    return yaml


def _log_config(log_path: Path) -> dict[str, Any]:
    # Unbuffered, unlike Synapse's generated logging config, so the log tail shown when
    # something fails is complete.
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                "%(request)s - %(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": str(log_path),
                "encoding": "utf8",
            }
        },
        # synapse.storage.SQL at DEBUG would log access tokens.
        "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


def prepare_synapse(settings: SynapseSettings, *, python: str = sys.executable) -> SynapseConfig:
    """Generate (once) and adjust a Synapse config in ``settings.data_dir``.

    An existing config is reused, keeping its secrets, signing key and database; it must be
    for the same server name (Synapse's database is tied to it). Our settings are applied
    again on every call, so a new listener port takes effect.
    """
    yaml = _yaml()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = data_dir / CONFIG_FILE
    if not config_path.exists():
        result = subprocess.run(
            [
                python,
                "-m",
                "synapse.app.homeserver",
                "--generate-config",
                "--server-name",
                settings.server_name,
                "--config-path",
                str(config_path),
                "--data-directory",
                str(data_dir),
                "--report-stats=no",
            ],
            cwd=data_dir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0 or not config_path.exists():
            raise HomeserverError(
                f"generating the Synapse config failed (exit {result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )

    config = yaml.safe_load(config_path.read_text(encoding="utf8"))
    if not isinstance(config, dict):
        raise HomeserverError(f"{config_path} does not hold a YAML mapping")
    if config.get("server_name") != settings.server_name:
        raise HomeserverError(
            f"{config_path} is for server name {config.get('server_name')!r}, not "
            f"{settings.server_name!r}; Synapse's database is tied to its server name, "
            "so use a fresh data directory (or the same port as before)"
        )
    secret = config.get("registration_shared_secret")
    if not isinstance(secret, str) or not secret:
        raise HomeserverError(f"{config_path} has no registration_shared_secret")
    signing_key_path = Path(str(config.get("signing_key_path", "")))
    if not signing_key_path.is_file():
        raise HomeserverError(f"Synapse's signing key {signing_key_path} is missing")

    log_path = data_dir / LOG_FILE
    log_config_path = data_dir / LOG_CONFIG_FILE
    log_config_path.write_text(yaml.safe_dump(_log_config(log_path)), encoding="utf8")

    config.update(
        {
            "pid_file": str(data_dir / "homeserver.pid"),
            "listeners": [
                {
                    "port": settings.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    # The gateway sets X-Forwarded-For/-Proto; Synapse logs the real client.
                    "x_forwarded": True,
                    "resources": [{"names": ["client", "federation"], "compress": False}],
                }
            ],
            "database": {
                "name": "sqlite3",
                "args": {"database": str(data_dir / "homeserver.db")},
            },
            "media_store_path": str(data_dir / "media_store"),
            "log_config": str(log_config_path),
            "report_stats": False,
            "enable_registration": False,
            "trusted_key_servers": [dict(s) for s in settings.trusted_key_servers],
            "suppress_key_server_warning": True,
            "federation_certificate_verification_whitelist": list(
                settings.federation_certificate_verification_whitelist
            ),
            "ip_range_whitelist": list(settings.ip_range_whitelist),
        }
    )
    if settings.public_baseurl is not None:
        config["public_baseurl"] = settings.public_baseurl
    if settings.federation_custom_ca_list:
        config["federation_custom_ca_list"] = list(settings.federation_custom_ca_list)
    else:
        config.pop("federation_custom_ca_list", None)
    if settings.relaxed_rate_limits:
        config.update(RELAXED_RATE_LIMITS)
    config.update(settings.extra)

    # Written to a temporary file first so a crash never leaves half a config behind.
    tmp = config_path.with_suffix(".yaml.tmp")
    tmp.write_text(
        "# Generated by Synapse, then adjusted by matrix-gateway (rewritten on every start).\n"
        + yaml.safe_dump(config, sort_keys=False),
        encoding="utf8",
    )
    tmp.replace(config_path)
    return SynapseConfig(
        data_dir=data_dir,
        config_path=config_path,
        server_name=settings.server_name,
        port=settings.port,
        registration_shared_secret=secret,
        signing_key_path=signing_key_path,
        log_path=log_path,
        console_path=data_dir / CONSOLE_FILE,
    )


def read_server_name(data_dir: Path) -> str | None:
    """The server name of an existing config in ``data_dir``, if there is one."""
    config_path = data_dir / CONFIG_FILE
    if not config_path.exists():
        return None
    config = _yaml().safe_load(config_path.read_text(encoding="utf8"))
    name = config.get("server_name") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file, or a note that it does not exist."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf8", errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(data.splitlines()[-lines:])


class ServiceProcess:
    """A child process that serves HTTP: started, awaited until it answers, stopped.

    The child runs in its own session so that a terminal's Ctrl-C reaches only us, and we
    stop the children in order. Its standard output and error go to ``console_path``.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready_url: str,
        console_path: Path,
        log_paths: Sequence[Path] = (),
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.ready_url = ready_url
        self.console_path = console_path
        self.log_paths = [console_path, *log_paths]
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        if self._process is not None:
            raise HomeserverError(f"{self.name} is already started")
        self.console_path.parent.mkdir(parents=True, exist_ok=True)
        with self.console_path.open("ab") as console:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )

    def poll(self) -> int | None:
        """The exit status if the process has ended, else None."""
        if self._process is None:
            raise HomeserverError(f"{self.name} was never started")
        return self._process.poll()

    def logs(self, lines: int = 40) -> str:
        return "\n".join(
            f"--- {p} (last {lines} lines) ---\n{tail(p, lines)}" for p in self.log_paths
        )

    def wait_until_ready(self, timeout: float = 60.0, *, url: str | None = None) -> None:
        """Wait until ``url`` (default ``ready_url``) answers 200 while the process runs;
        raise with the logs' tails otherwise."""
        url = url or self.ready_url
        deadline = time.monotonic() + timeout
        last_problem = "no answer yet"
        with httpx.Client(timeout=httpx.Timeout(2.0), verify=False) as client:
            while True:
                status = self.poll()
                if status is not None:
                    raise HomeserverError(
                        f"{self.name} exited with status {status} while starting\n{self.logs()}"
                    )
                try:
                    response = client.get(url)
                    if response.status_code == 200:
                        return
                    last_problem = f"{url} answered {response.status_code}"
                except httpx.HTTPError as e:
                    last_problem = f"{url}: {type(e).__name__}: {e}"
                if time.monotonic() > deadline:
                    raise HomeserverError(
                        f"{self.name} did not answer within {timeout:.0f} s "
                        f"({last_problem})\n{self.logs()}"
                    )
                time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Returns the exit status."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5.0)
        # The child leads its own process group: whatever it forked (server workers) and
        # left behind goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.returncode

    def __enter__(self) -> ServiceProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def synapse_process(config: SynapseConfig, *, python: str = sys.executable) -> ServiceProcess:
    """The Synapse process for a prepared config (not yet started)."""
    return ServiceProcess(
        "Synapse",
        [python, "-m", "synapse.app.homeserver", "--config-path", str(config.config_path)],
        ready_url=f"{config.url}/_matrix/client/versions",
        console_path=config.console_path,
        log_paths=[config.log_path],
        cwd=config.data_dir,
    )


@dataclass(frozen=True)
class RegisteredUser:
    user_id: str
    localpart: str
    password: str
    access_token: str
    device_id: str


def registration_mac(
    shared_secret: str, nonce: str, localpart: str, password: str, *, admin: bool
) -> str:
    """The HMAC-SHA1 Synapse's shared-secret registration expects, as hex.

    Over nonce, user name, password and "admin"/"notadmin", each separated by a NUL byte.
    """
    mac = hmac.new(shared_secret.encode("utf8"), digestmod=hashlib.sha1)
    mac.update(nonce.encode("utf8"))
    mac.update(b"\x00")
    mac.update(localpart.encode("utf8"))
    mac.update(b"\x00")
    mac.update(password.encode("utf8"))
    mac.update(b"\x00")
    mac.update(b"admin" if admin else b"notadmin")
    return mac.hexdigest()


def register_user(
    homeserver_url: str,
    shared_secret: str,
    localpart: str,
    password: str,
    *,
    admin: bool = False,
    timeout: float = 30.0,
) -> RegisteredUser:
    """Register a user with Synapse's shared-secret admin API, straight at the homeserver.

    The gateway does not expose ``/_synapse/admin`` by default, so this must not go through it.
    """
    url = f"{homeserver_url.rstrip('/')}/_synapse/admin/v1/register"
    with httpx.Client(timeout=timeout) as client:
        nonce_response = client.get(url)
        if nonce_response.status_code != 200:
            raise HomeserverError(
                f"GET {url} answered {nonce_response.status_code}: {nonce_response.text}"
            )
        nonce = nonce_response.json()["nonce"]
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": registration_mac(shared_secret, nonce, localpart, password, admin=admin),
        }
        response = client.post(url, json=body)
        if response.status_code != 200:
            raise HomeserverError(
                f"registering {localpart!r} answered {response.status_code}: {response.text}"
            )
        answer = response.json()
    return RegisteredUser(
        user_id=answer["user_id"],
        localpart=localpart,
        password=password,
        access_token=answer["access_token"],
        device_id=answer["device_id"],
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick; it may be taken again
    before it is used, which is unlikely enough for tests and demos)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
