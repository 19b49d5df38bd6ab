"""The gateway's configuration: ``gateway.toml`` loaded into frozen dataclasses.

Every problem is reported with the dotted key it concerns and what is wrong with it, e.g.
``public.workers: must be an integer >= 1, got 'two'``. All problems in a file are collected
and reported together, so an operator fixes them in one pass. Relative paths are relative to
the directory of the configuration file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from gateway.federation.address_guard import DEFAULT_IP_RANGE_BLACKLIST
from gateway.matrix.identifiers import InvalidIdentifier, parse_server_name
from gateway.policy.loading import PolicyConfigError, PolicySpec, parse_policy_config

__all__ = [
    "BindAddress",
    "ConfigError",
    "CorsConfig",
    "FederationConfig",
    "GatewayConfig",
    "GuestsConfig",
    "HomeserverConfig",
    "InternalConfig",
    "LogConfig",
    "NotaryConfig",
    "OutboundConfig",
    "PublicConfig",
    "ServerConfig",
    "StoreConfig",
    "TokenBucket",
    "TrustedKeyServer",
    "load_config",
    "parse_config",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
StoreBackend = Literal["sqlite", "postgres"]


class ConfigError(Exception):
    """The configuration is unusable. ``problems`` holds one ``"key: reason"`` line each."""

    def __init__(self, problems: list[str], *, source: Path | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source is not None else ""
        super().__init__(where + "; ".join(self.problems))

    def describe(self) -> str:
        """A multi-line text for a terminal: the file, then one problem per line."""
        head = f"invalid configuration {self.source}" if self.source else "invalid configuration"
        return head + ":\n" + "\n".join(f"  {p}" for p in self.problems)


@dataclass(frozen=True)
class BindAddress:
    """A listening address; ``port`` 0 lets the system pick a free port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class ServerConfig:
    server_name: str
    signing_key_path: Path | None = None


@dataclass(frozen=True)
class HomeserverConfig:
    url: str = "http://127.0.0.1:8008"
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    expose_admin_api: bool = False


HttpServer = Literal["builtin", "hypercorn"]


@dataclass(frozen=True)
class PublicConfig:
    bind: BindAddress = BindAddress("0.0.0.0", 8448)
    tls_certificate_path: Path | None = None
    tls_private_key_path: Path | None = None
    max_body_size: int = 52428800
    workers: int = 1
    request_timeout: float = 60.0
    x_forwarded: bool = False
    #: owned endpoints: requests of one authenticated origin in progress at once, per worker
    max_concurrent_per_origin: int = 32
    #: the HTTP server of this listener: the gateway's own HTTP/1.1 server, or Hypercorn
    #: (slower; speaks HTTP/2 to TLS peers that offer it)
    http_server: HttpServer = "builtin"
    #: built-in server: connections open at once per worker (None: "auto", from the
    #: process's open-file limit); beyond it new ones wait in the listen backlog
    max_connections: int | None = None

    @property
    def tls(self) -> bool:
        return self.tls_certificate_path is not None


@dataclass(frozen=True)
class InternalConfig:
    bind: BindAddress = BindAddress("127.0.0.1", 8449)


@dataclass(frozen=True)
class NotaryConfig:
    #: the name the homeserver knows the notary by; empty: ``localhost:<internal port>``
    server_name: str = ""
    #: where the gateway keeps what it makes itself (notary key, TLS certificate, secret)
    state_dir: Path = Path("state")
    #: lifetime of a delegation key, in seconds
    delegation_key_lifetime: float = 600.0


InviteVersion = Literal["v3", "unstable", "v2"]


@dataclass(frozen=True)
class OutboundConfig:
    """The homeserver's outbound federation through the gateway (a forward proxy that
    Synapse reaches through ``outbound_federation_restricted_to``)."""

    enabled: bool = False
    #: loopback only: the homeserver sends here as plain HTTP
    bind: BindAddress = BindAddress("127.0.0.1", 8450)
    #: the homeserver's ``worker_replication_secret`` (its ``Proxy-Authorization`` bearer)
    secret: str = field(default="", repr=False)
    #: how our v2 invites leave: ``v3`` (stable), ``unstable`` (MSC prefix) or ``v2`` as is
    invite_version: InviteVersion = "v3"
    #: how long to remember which invite endpoint a destination has, in seconds
    invite_version_memory: float = 86400.0
    #: bound on discovery, connecting and the response head (Synapse waits 90 s at most)
    request_timeout: float = 60.0


@dataclass(frozen=True)
class TokenBucket:
    """A rate limit: a burst of ``capacity``, refilled at ``per_second``."""

    capacity: float
    per_second: float


#: The endpoints the spec's guest access module lets guests use (client-server API, "Guest
#: Access", client behaviour), relative to ``/_matrix/client/<version>``. A path parameter
#: spans one segment. ``/state/{eventType}`` is the same endpoint with an empty state key.
GUEST_ENDPOINTS: tuple[str, ...] = (
    # retrieving events and media
    "GET /rooms/{roomId}/state",
    "GET /rooms/{roomId}/context/{eventId}",
    "GET /rooms/{roomId}/event/{eventId}",
    "GET /rooms/{roomId}/state/{eventType}",
    "GET /rooms/{roomId}/state/{eventType}/{stateKey}",
    "GET /rooms/{roomId}/messages",
    "GET /rooms/{roomId}/members",
    "GET /rooms/{roomId}/initialSync",
    "GET /sync",
    "GET /events",
    "GET /media/download/{serverName}/{mediaId}",
    "GET /media/download/{serverName}/{mediaId}/{fileName}",
    "GET /media/thumbnail/{serverName}/{mediaId}",
    # sending events
    "POST /rooms/{roomId}/join",
    "POST /rooms/{roomId}/leave",
    "PUT /rooms/{roomId}/send/{eventType}/{txnId}",
    "PUT /rooms/{roomId}/state/{eventType}",
    "PUT /rooms/{roomId}/state/{eventType}/{stateKey}",
    "PUT /sendToDevice/{eventType}/{txnId}",
    # their own account
    "PUT /profile/{userId}/displayname",
    "DELETE /profile/{userId}/displayname",
    "GET /devices",
    "GET /devices/{deviceId}",
    "PUT /devices/{deviceId}",
    "GET /account/whoami",
    # end-to-end encryption
    "POST /keys/upload",
    "POST /keys/query",
    "POST /keys/claim",
)


@dataclass(frozen=True)
class GuestsConfig:
    """The guest-aware client edge (guest access module, MSC3419). Off by default."""

    enabled: bool = False
    #: how long the answer of the homeserver's whoami is remembered per access token
    whoami_cache_seconds: float = 30.0
    #: at most this many tokens are remembered (the least recently used go first)
    whoami_cache_size: int = 10000
    #: guests' state events (``PUT /rooms/{roomId}/state/...``), per guest
    state_rate: TokenBucket = TokenBucket(capacity=5.0, per_second=0.05)
    #: guests' other sends (``/rooms/{roomId}/send/...``, redactions), per guest
    send_rate: TokenBucket = TokenBucket(capacity=10.0, per_second=0.2)
    #: refuse guests on endpoints not in ``allowed_endpoints`` (403 M_GUEST_ACCESS_FORBIDDEN)
    restrict_endpoints: bool = False
    allowed_endpoints: tuple[str, ...] = GUEST_ENDPOINTS


#: The spec's recommendation (client-server API, "Web Browser Clients").
CORS_ALLOW_METHODS = ("GET", "POST", "PUT", "DELETE", "OPTIONS")
CORS_ALLOW_HEADERS = ("X-Requested-With", "Content-Type", "Authorization")


@dataclass(frozen=True)
class CorsConfig:
    """CORS on the client API (``/_matrix/client/``): preflights answered by the gateway,
    these headers on every answer (the homeserver's own replaced)."""

    enabled: bool = True
    #: ``*`` or one origin (``https://app.example.org``)
    allow_origin: str = "*"
    allow_methods: tuple[str, ...] = CORS_ALLOW_METHODS
    allow_headers: tuple[str, ...] = CORS_ALLOW_HEADERS
    #: sent as Access-Control-Expose-Headers when set; empty: the homeserver's is kept
    expose_headers: tuple[str, ...] = ()
    #: seconds a browser may reuse a preflight answer (Access-Control-Max-Age); 0: not sent
    max_age: int = 0


@dataclass(frozen=True)
class PolicySettings:
    #: write allow decisions to the audit trail too (denies and drops always are)
    audit_allows: bool = False


@dataclass(frozen=True)
class LogConfig:
    format: LogFormat = "auto"
    level: LogLevel = "info"


@dataclass(frozen=True)
class StoreConfig:
    backend: StoreBackend = "sqlite"
    sqlite_path: Path = Path("gateway.db")
    postgres_dsn: str = ""


@dataclass(frozen=True)
class TrustedKeyServer:
    server_name: str
    #: key id (``ed25519:...``) -> unpadded base64 public key
    verify_keys: Mapping[str, str]


def _default_blacklist() -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(n) for n in DEFAULT_IP_RANGE_BLACKLIST)


def _default_trusted_key_servers() -> tuple[TrustedKeyServer, ...]:
    return (
        TrustedKeyServer(
            "matrix.org", {"ed25519:auto": "Noi6WqcDj0QmPxCNQqgezwTlBKrfqehY1u2FyWP9uYw"}
        ),
    )


@dataclass(frozen=True)
class FederationConfig:
    ip_range_blacklist: tuple[IPNetwork, ...] = field(default_factory=_default_blacklist)
    ip_range_whitelist: tuple[IPNetwork, ...] = ()
    federation_certificate_verification_whitelist: tuple[str, ...] = ()
    trusted_key_servers: tuple[TrustedKeyServer, ...] = field(
        default_factory=_default_trusted_key_servers
    )
    request_timeout: float = 10.0


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig
    homeserver: HomeserverConfig = HomeserverConfig()
    public: PublicConfig = PublicConfig()
    internal: InternalConfig = InternalConfig()
    log: LogConfig = LogConfig()
    store: StoreConfig = StoreConfig()
    federation: FederationConfig = field(default_factory=FederationConfig)
    notary: NotaryConfig = NotaryConfig()
    outbound: OutboundConfig = OutboundConfig()
    guests: GuestsConfig = GuestsConfig()
    cors: CorsConfig = CorsConfig()
    policy: PolicySettings = PolicySettings()
    #: the admission policies (``[[policies]]``), in the order they run
    policies: tuple[PolicySpec, ...] = ()
    #: the file this was loaded from (None when built in code)
    source: Path | None = None


# --- loading -------------------------------------------------------------------------------


def load_config(path: str | Path) -> GatewayConfig:
    """Reads and validates ``path``. Raises :class:`ConfigError` naming each bad key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf8")
    except FileNotFoundError:
        raise ConfigError(["file not found"], source=path) from None
    except OSError as e:
        raise ConfigError([f"cannot read the file: {e.strerror}"], source=path) from None
    except UnicodeDecodeError:
        raise ConfigError(["the file is not UTF-8 text"], source=path) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"invalid TOML: {e}"], source=path) from None
    return parse_config(data, base_dir=path.resolve().parent, source=path)


def parse_config(
    data: Mapping[str, Any], *, base_dir: Path, source: Path | None = None
) -> GatewayConfig:
    """Validates an already parsed TOML document; relative paths are joined to ``base_dir``."""
    r = _Reader(base_dir)
    sections = {
        "server",
        "homeserver",
        "public",
        "internal",
        "log",
        "store",
        "federation",
        "notary",
        "outbound",
        "guests",
        "cors",
        "policy",
    }
    for name, value in data.items():
        if name == "policies":
            continue
        if name not in sections:
            r.problem(name, f"unknown section (known: {', '.join(sorted(sections))})")
        elif not isinstance(value, dict):
            r.problem(name, f"must be a table ([{name}]), got {_show(value)}")

    def table(name: str) -> Mapping[str, Any]:
        value = data.get(name, {})
        return value if isinstance(value, dict) else {}

    server = _server(r, table("server"))
    homeserver = _homeserver(r, table("homeserver"))
    public = _public(r, table("public"))
    internal = _internal(r, table("internal"))
    log = _log(r, table("log"))
    store = _store(r, table("store"))
    federation = _federation(r, table("federation"))
    notary = _notary(r, table("notary"), internal)
    outbound = _outbound(r, table("outbound"))
    guests = _guests(r, table("guests"))
    cors = _cors(r, table("cors"))
    policy = _policy(r, table("policy"))
    policies: list[PolicySpec] = []
    try:
        policies = parse_policy_config(data.get("policies"), base_dir=base_dir)
    except PolicyConfigError as e:
        r.problems.extend(e.problems)
    if r.problems:
        raise ConfigError(r.problems, source=source)
    assert server is not None
    return GatewayConfig(
        server=server,
        homeserver=homeserver,
        public=public,
        internal=internal,
        log=log,
        store=store,
        federation=federation,
        notary=notary,
        outbound=outbound,
        guests=guests,
        cors=cors,
        policy=policy,
        policies=tuple(policies),
        source=source,
    )


_T = TypeVar("_T")
_MISSING: Any = object()


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Reader:
    """Reads typed values out of one table, remembering every problem it meets."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []

    def problem(self, key: str, reason: str) -> None:
        self.problems.append(f"{key}: {reason}")

    def check_keys(self, section: str, table: Mapping[str, Any], known: set[str]) -> None:
        for key in table:
            if key not in known:
                self.problem(f"{section}.{key}", f"unknown key (known: {', '.join(sorted(known))})")

    def get(
        self,
        section: str,
        table: Mapping[str, Any],
        key: str,
        default: _T,
        convert: Callable[[Any], _T],
    ) -> _T:
        """``convert`` returns the value or raises ValueError with the reason."""
        if key not in table:
            if default is _MISSING:
                self.problem(f"{section}.{key}", "required key is missing")
            return default
        try:
            return convert(table[key])
        except ValueError as e:
            self.problem(f"{section}.{key}", str(e))
            return default

    def path(self, value: Any) -> Path | None:
        if not isinstance(value, str):
            raise ValueError(f"must be a path string, got {_show(value)}")
        if value == "":
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


def _integer(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise ValueError(f"must be an integer {bound}, got {_show(value)}")
        return int(value)

    return convert


def _workers(value: Any) -> int:
    """An integer from 1 to 64, or "auto": one per CPU core this process may run on."""
    if value == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return max(1, min(64, cores or os.cpu_count() or 1))
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or not 1 <= value <= 64:
        raise ValueError(f'must be "auto" or an integer from 1 to 64, got {_show(value)}')
    return int(value)


def _max_connections(value: Any) -> int | None:
    """An integer from 16 to 1,000,000, or "auto" (None: worked out from the open-file
    limit when the listener starts)."""
    if value == "auto":
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or not 16 <= value <= 1_000_000:
        raise ValueError(f'must be "auto" or an integer from 16 to 1000000, got {_show(value)}')
    return int(value)


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"must be a number of seconds > 0, got {_show(value)}")
    if value > 86400:
        raise ValueError(f"must be at most 86400 seconds, got {_show(value)}")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_show(value)}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_show(value)}")
    return value


def _choice(*choices: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {_show(value)}")
        return str(value)

    return convert


def _bind(value: Any) -> BindAddress:
    if not isinstance(value, str):
        raise ValueError(f"must be a string 'host:port', got {_show(value)}")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"must be 'host:port' (IPv6 as '[::1]:8448'), got {_show(value)}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be from 0 to 65535, got {port}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(
                f"host must be an IP address (or 'localhost'), got {_show(host)}"
            ) from None
    return BindAddress(host, port)


def _is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def _server_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty server name, got {_show(value)}")
    try:
        parse_server_name(value)
    except InvalidIdentifier as e:
        raise ValueError(
            f"must be a DNS name or IP literal (with optional :port): {e.reason}, "
            f"got {_show(value)}"
        ) from None
    return value


def _url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a URL string, got {_show(value)}")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {_show(value)}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"must not have a path, query or fragment, got {_show(value)}")
    try:
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        raise ValueError(f"has an invalid port, got {_show(value)}") from None
    return value.rstrip("/")


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of CIDR ranges, got {_show(value)}")
    out = []
    for item in value:
        try:
            out.append(ipaddress.ip_network(item))
        except (ValueError, TypeError):
            raise ValueError(f"{_show(item)} is not a CIDR range like '10.0.0.0/8'") from None
    return tuple(out)


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a list of strings, got {_show(value)}")
    return tuple(value)


def _trusted_key_servers(value: Any) -> tuple[TrustedKeyServer, ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of tables, got {_show(value)}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"[{i}] must be a table, got {_show(item)}")
        unknown = set(item) - {"server_name", "verify_keys"}
        if unknown:
            raise ValueError(f"[{i}] has unknown keys {sorted(unknown)}")
        try:
            name = _server_name(item.get("server_name"))
        except ValueError as e:
            raise ValueError(f"[{i}].server_name {e}") from None
        keys = item.get("verify_keys", {})
        if not isinstance(keys, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in keys.items()
        ):
            raise ValueError(f"[{i}].verify_keys must map key ids to base64 keys")
        out.append(TrustedKeyServer(name, dict(keys)))
    return tuple(out)


def _server(r: _Reader, t: Mapping[str, Any]) -> ServerConfig | None:
    r.check_keys("server", t, {"server_name", "signing_key_path"})
    name = r.get("server", t, "server_name", _MISSING, _server_name)
    key_path = r.get("server", t, "signing_key_path", None, r.path)
    if key_path is not None and not key_path.is_file():
        r.problem("server.signing_key_path", f"file not found: {key_path}")
    if name is _MISSING:
        return None
    return ServerConfig(server_name=name, signing_key_path=key_path)


def _homeserver(r: _Reader, t: Mapping[str, Any]) -> HomeserverConfig:
    d = HomeserverConfig()
    s = "homeserver"
    r.check_keys(s, t, {"url", "connect_timeout", "read_timeout", "expose_admin_api"})
    return HomeserverConfig(
        url=r.get(s, t, "url", d.url, _url),
        connect_timeout=r.get(s, t, "connect_timeout", d.connect_timeout, _seconds),
        read_timeout=r.get(s, t, "read_timeout", d.read_timeout, _seconds),
        expose_admin_api=r.get(s, t, "expose_admin_api", d.expose_admin_api, _boolean),
    )


def _public(r: _Reader, t: Mapping[str, Any]) -> PublicConfig:
    d = PublicConfig()
    s = "public"
    r.check_keys(
        s,
        t,
        {
            "bind",
            "tls_certificate_path",
            "tls_private_key_path",
            "max_body_size",
            "workers",
            "request_timeout",
            "x_forwarded",
            "max_concurrent_per_origin",
            "http_server",
            "max_connections",
        },
    )
    cert = r.get(s, t, "tls_certificate_path", None, r.path)
    key = r.get(s, t, "tls_private_key_path", None, r.path)
    if (cert is None) != (key is None):
        missing = "tls_private_key_path" if key is None else "tls_certificate_path"
        r.problem(f"public.{missing}", "must be set too when the other TLS path is set")
    for name, p in (("tls_certificate_path", cert), ("tls_private_key_path", key)):
        if p is not None and not p.is_file():
            r.problem(f"public.{name}", f"file not found: {p}")
    return PublicConfig(
        bind=r.get(s, t, "bind", d.bind, _bind),
        tls_certificate_path=cert,
        tls_private_key_path=key,
        max_body_size=r.get(s, t, "max_body_size", d.max_body_size, _integer(1)),
        workers=r.get(s, t, "workers", d.workers, _workers),
        request_timeout=r.get(s, t, "request_timeout", d.request_timeout, _seconds),
        x_forwarded=r.get(s, t, "x_forwarded", d.x_forwarded, _boolean),
        max_concurrent_per_origin=r.get(
            s, t, "max_concurrent_per_origin", d.max_concurrent_per_origin, _integer(1, 100_000)
        ),
        http_server=r.get(s, t, "http_server", d.http_server, _choice("builtin", "hypercorn")),
        max_connections=r.get(s, t, "max_connections", d.max_connections, _max_connections),
    )


def _internal(r: _Reader, t: Mapping[str, Any]) -> InternalConfig:
    d = InternalConfig()
    r.check_keys("internal", t, {"bind"})
    bind = r.get("internal", t, "bind", d.bind, _bind)
    if not _is_loopback(bind.host):
        r.problem(
            "internal.bind",
            f"must be a loopback address (127.0.0.1, ::1 or localhost), got {bind.host!r}: "
            "it serves metrics and the homeserver's notary",
        )
    return InternalConfig(bind=bind)


def _log(r: _Reader, t: Mapping[str, Any]) -> LogConfig:
    d = LogConfig()
    r.check_keys("log", t, {"format", "level"})
    return LogConfig(
        format=r.get("log", t, "format", d.format, _choice("auto", "json", "console")),
        level=r.get("log", t, "level", d.level, _choice("debug", "info", "warning", "error")),
    )


def _store(r: _Reader, t: Mapping[str, Any]) -> StoreConfig:
    d = StoreConfig()
    s = "store"
    r.check_keys(s, t, {"backend", "sqlite_path", "postgres_dsn"})
    backend = r.get(s, t, "backend", d.backend, _choice("sqlite", "postgres"))
    default_path: Path | None = r.base_dir / d.sqlite_path
    sqlite_path = r.get(s, t, "sqlite_path", default_path, r.path)
    dsn = r.get(s, t, "postgres_dsn", d.postgres_dsn, _string)
    if sqlite_path is None:
        r.problem("store.sqlite_path", "must not be empty")
        sqlite_path = d.sqlite_path
    if backend == "postgres" and not dsn:
        r.problem("store.postgres_dsn", 'must be set when store.backend = "postgres"')
    return StoreConfig(backend=backend, sqlite_path=sqlite_path, postgres_dsn=dsn)


def _federation(r: _Reader, t: Mapping[str, Any]) -> FederationConfig:
    d = FederationConfig()
    s = "federation"
    r.check_keys(
        s,
        t,
        {
            "ip_range_blacklist",
            "ip_range_whitelist",
            "federation_certificate_verification_whitelist",
            "trusted_key_servers",
            "request_timeout",
        },
    )
    return FederationConfig(
        ip_range_blacklist=r.get(s, t, "ip_range_blacklist", d.ip_range_blacklist, _networks),
        ip_range_whitelist=r.get(s, t, "ip_range_whitelist", d.ip_range_whitelist, _networks),
        federation_certificate_verification_whitelist=r.get(
            s,
            t,
            "federation_certificate_verification_whitelist",
            d.federation_certificate_verification_whitelist,
            _strings,
        ),
        trusted_key_servers=r.get(
            s, t, "trusted_key_servers", d.trusted_key_servers, _trusted_key_servers
        ),
        request_timeout=r.get(s, t, "request_timeout", d.request_timeout, _seconds),
    )


def _notary(r: _Reader, t: Mapping[str, Any], internal: InternalConfig) -> NotaryConfig:
    d = NotaryConfig()
    s = "notary"
    r.check_keys(s, t, {"server_name", "state_dir", "delegation_key_lifetime"})
    name = r.get(s, t, "server_name", "", _string)
    if name:
        try:
            name = _server_name(name)
        except ValueError as e:
            r.problem("notary.server_name", str(e))
    elif internal.bind.port:
        name = f"localhost:{internal.bind.port}"
    default_dir: Path | None = r.base_dir / d.state_dir
    state_dir = r.get(s, t, "state_dir", default_dir, r.path)
    lifetime = r.get(s, t, "delegation_key_lifetime", d.delegation_key_lifetime, _seconds)
    if not 2.0 <= lifetime <= 3600.0:
        r.problem(
            "notary.delegation_key_lifetime",
            f"must be between 2 and 3600 seconds (the homeserver caches keys until they "
            f"expire, and they cannot be revoked), got {lifetime}",
        )
    return NotaryConfig(
        server_name=name,
        state_dir=state_dir if state_dir is not None else r.base_dir / d.state_dir,
        delegation_key_lifetime=lifetime,
    )


#: Synapse gives up on its proxy after 90 s; the gateway must answer before that.
_SYNAPSE_PROXY_TIMEOUT = 90.0


def _outbound(r: _Reader, t: Mapping[str, Any]) -> OutboundConfig:
    d = OutboundConfig()
    s = "outbound"
    r.check_keys(
        s,
        t,
        {
            "enabled",
            "bind",
            "secret",
            "secret_path",
            "invite_version",
            "invite_version_memory",
            "request_timeout",
        },
    )
    enabled = r.get(s, t, "enabled", d.enabled, _boolean)
    bind = r.get(s, t, "bind", d.bind, _bind)
    if not _is_loopback(bind.host):
        r.problem(
            "outbound.bind",
            f"must be a loopback address (127.0.0.1, ::1 or localhost), got {bind.host!r}: "
            "only the homeserver sends here",
        )
    secret = r.get(s, t, "secret", "", _string)
    secret_path = r.get(s, t, "secret_path", None, r.path)
    if secret and secret_path is not None:
        r.problem("outbound.secret_path", "set outbound.secret or outbound.secret_path, not both")
    elif secret_path is not None:
        try:
            secret = secret_path.read_text(encoding="utf8").strip()
        except (OSError, UnicodeDecodeError) as e:
            r.problem("outbound.secret_path", f"cannot read the file: {e}")
    if enabled and not secret and "secret_path" not in t:
        r.problem(
            "outbound.secret",
            "must be set when outbound.enabled = true: the homeserver's "
            "worker_replication_secret (or outbound.secret_path, a file holding it)",
        )
    elif secret and len(secret) < 16:
        r.problem("outbound.secret", "must be at least 16 characters (it guards the egress)")
    timeout = r.get(s, t, "request_timeout", d.request_timeout, _seconds)
    if timeout >= _SYNAPSE_PROXY_TIMEOUT:
        r.problem(
            "outbound.request_timeout",
            f"must be under {_SYNAPSE_PROXY_TIMEOUT:g} seconds (Synapse gives up on its "
            f"proxy then), got {timeout:g}",
        )
    return OutboundConfig(
        enabled=enabled,
        bind=bind,
        secret=secret,
        invite_version=r.get(
            s, t, "invite_version", d.invite_version, _choice("v3", "unstable", "v2")
        ),
        invite_version_memory=r.get(
            s, t, "invite_version_memory", d.invite_version_memory, _seconds
        ),
        request_timeout=timeout,
    )


def _token_bucket(r: _Reader, key: str, value: Any, default: TokenBucket) -> TokenBucket:
    if not isinstance(value, dict):
        r.problem(
            key, f"must be a table like {{ capacity = 5, per_second = 0.05 }}, got {_show(value)}"
        )
        return default
    r.check_keys(key, value, {"capacity", "per_second"})
    numbers: dict[str, float] = {}
    for name in ("capacity", "per_second"):
        number = value.get(name, getattr(default, name))
        if isinstance(number, bool) or not isinstance(number, int | float) or not number > 0:
            r.problem(f"{key}.{name}", f"must be a number > 0, got {_show(number)}")
            number = getattr(default, name)
        numbers[name] = float(number)
    return TokenBucket(**numbers)


_HTTP_METHODS = ("GET", "PUT", "POST", "DELETE")
_ENDPOINT_SEGMENT = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}|[^{}/\s]*")


def _endpoint(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string like 'GET /sync', got {_show(value)}")
    method, sep, path = value.partition(" ")
    if not sep or method not in _HTTP_METHODS or not path.startswith("/"):
        raise ValueError(
            f"must be 'METHOD /path' with METHOD one of {', '.join(_HTTP_METHODS)} and the path "
            f"after /_matrix/client/<version>, got {_show(value)}"
        )
    if path.startswith(("/_matrix/", "/v3/", "/r0/", "/v1/")):
        raise ValueError(
            f"the path is relative to /_matrix/client/<version> ('GET /sync'), got {_show(value)}"
        )
    for segment in path[1:].split("/"):
        if not _ENDPOINT_SEGMENT.fullmatch(segment):
            raise ValueError(
                f"{_show(segment)} must be a literal segment or a whole {{parameter}}, in "
                f"{_show(value)}"
            )
    return value


def _guests(r: _Reader, t: Mapping[str, Any]) -> GuestsConfig:
    d = GuestsConfig()
    s = "guests"
    r.check_keys(
        s,
        t,
        {
            "enabled",
            "whoami_cache_seconds",
            "whoami_cache_size",
            "state_rate",
            "send_rate",
            "restrict_endpoints",
            "allowed_endpoints",
        },
    )
    ttl = r.get(s, t, "whoami_cache_seconds", d.whoami_cache_seconds, _seconds)
    if ttl > 300:
        r.problem(
            "guests.whoami_cache_seconds",
            f"must be at most 300 seconds (a logged-out or upgraded guest's token is judged by "
            f"the old answer until then), got {ttl:g}",
        )
    endpoints: list[str] = []
    value = t.get("allowed_endpoints", list(d.allowed_endpoints))
    if not isinstance(value, list):
        r.problem("guests.allowed_endpoints", f"must be a list of strings, got {_show(value)}")
    else:
        for i, item in enumerate(value):
            try:
                endpoints.append(_endpoint(item))
            except ValueError as e:
                r.problem(f"guests.allowed_endpoints[{i}]", str(e))
    return GuestsConfig(
        enabled=r.get(s, t, "enabled", d.enabled, _boolean),
        whoami_cache_seconds=ttl,
        whoami_cache_size=r.get(s, t, "whoami_cache_size", d.whoami_cache_size, _integer(1, 10**6)),
        state_rate=_token_bucket(r, "guests.state_rate", t.get("state_rate", {}), d.state_rate),
        send_rate=_token_bucket(r, "guests.send_rate", t.get("send_rate", {}), d.send_rate),
        restrict_endpoints=r.get(s, t, "restrict_endpoints", d.restrict_endpoints, _boolean),
        allowed_endpoints=tuple(endpoints),
    )


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ORIGIN = re.compile(
    r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?"
)


def _header_names(value: Any) -> tuple[str, ...]:
    names = _strings(value)
    for name in names:
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{_show(name)} is not an HTTP header name")
    return names


def _methods(value: Any) -> tuple[str, ...]:
    methods = _strings(value)
    for method in methods:
        if not _HEADER_NAME.fullmatch(method) or method != method.upper():
            raise ValueError(f"{_show(method)} is not an HTTP method in upper case")
    return methods


def _allow_origin(value: Any) -> str:
    if value == "*" or (isinstance(value, str) and _ORIGIN.fullmatch(value)):
        return str(value)
    raise ValueError(
        f"must be '*' or one origin such as 'https://app.example.org' (scheme, host, optional "
        f"port; no path), got {_show(value)}"
    )


def _cors(r: _Reader, t: Mapping[str, Any]) -> CorsConfig:
    d = CorsConfig()
    s = "cors"
    r.check_keys(
        s,
        t,
        {"enabled", "allow_origin", "allow_methods", "allow_headers", "expose_headers", "max_age"},
    )
    return CorsConfig(
        enabled=r.get(s, t, "enabled", d.enabled, _boolean),
        allow_origin=r.get(s, t, "allow_origin", d.allow_origin, _allow_origin),
        allow_methods=r.get(s, t, "allow_methods", d.allow_methods, _methods),
        allow_headers=r.get(s, t, "allow_headers", d.allow_headers, _header_names),
        expose_headers=r.get(s, t, "expose_headers", d.expose_headers, _header_names),
        max_age=r.get(s, t, "max_age", d.max_age, _integer(0, 86400)),
    )


def _policy(r: _Reader, t: Mapping[str, Any]) -> PolicySettings:
    d = PolicySettings()
    r.check_keys("policy", t, {"audit_allows"})
    return PolicySettings(audit_allows=r.get("policy", t, "audit_allows", d.audit_allows, _boolean))
