"""A gateway in this process, in front of a fake homeserver that answers like a real one,
for the bulk of the hostile traffic; and what is needed to aim the generator at it.

The gateway runs with admission policies (so the v1/v2 invite, join and knock policy paths
run too), a keyring that knows only ``REMOTE``'s key (other origins are refused at once,
as an unreachable server would be), a 1 MiB body limit and a 3 s request timeout.

Its logs are watched while it runs (:class:`LogWatch`): structlog events and records of the
standard library's logging (the HTTP servers'), so a test can say "no traceback".
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import httpx
import signedjson.key
import structlog
import trio
from signedjson.types import SigningKey

from gateway.app import PUBLIC_ROUTES, Listening, serve
from gateway.config import GatewayConfig, parse_config
from gateway.federation.keys import KeyUnavailableError, VerifyKeyWithExpiry
from gateway.http import Router
from gateway.logging import configure_logging
from gateway.services import Services
from tests.robustness.hostile import Samples, Target
from tests.support.inprocess_gateway import (
    HS,
    HS_KEY,
    REMOTE,
    REMOTE_KEY,
    FakeHomeserverApp,
    HomeserverRequest,
    serve_fake_homeserver,
)
from tests.support.pdus import event_id_of, make_remote_room, sign_pdu

#: The user of ours that valid invites are for.
LOCAL_USER = f"@victim:{HS}"
#: A user of the remote server, who joins and knocks.
REMOTE_USER = f"@bob:{REMOTE}"
MAX_BODY_SIZE = 1024 * 1024
REQUEST_TIMEOUT = 3.0


def _matrix_error(status: int, errcode: str, error: str) -> tuple[int, bytes]:
    return status, json.dumps({"errcode": errcode, "error": error}).encode()


class OneServerKeyring:
    """Knows one server's key (``REMOTE``'s by default), as the real keyring answers (with
    a validity), and fails at once for every other server, as the keyring does for one that
    cannot be reached."""

    def __init__(self, server_name: str = REMOTE, signing_key: SigningKey = REMOTE_KEY) -> None:
        self.server_name = server_name
        self.key_id = f"ed25519:{signing_key.version}"
        self.verify_key = signedjson.key.get_verify_key(signing_key)

    async def get_verify_key(
        self, server_name: str, key_id: str, *, minimum_valid_until_ts: int
    ) -> VerifyKeyWithExpiry:
        if (server_name, key_id) == (self.server_name, self.key_id):
            return VerifyKeyWithExpiry(key_id, self.verify_key, 4_000_000_000_000)
        raise KeyUnavailableError(server_name, key_id, minimum_valid_until_ts)


class RealisticHomeserver(FakeHomeserverApp):
    """Answers as a homeserver that is in no room would: invites accepted (echoing the event,
    as Synapse signs and returns it), joins and knocks to unknown rooms refused, key queries
    and versions answered, the client API answered with empty objects."""

    def __init__(self) -> None:
        self.requests = 0

    def handle(self, request: HomeserverRequest) -> tuple[int, bytes]:
        self.requests += 1
        path = request.raw_path
        if path == "/_matrix/federation/v1/version":
            return 200, b'{"server":{"name":"Fake","version":"1"}}'
        if path.startswith("/_matrix/federation/v2/invite/") and request.method == "PUT":
            try:
                body = json.loads(request.body)
                return 200, json.dumps({"event": body["event"]}).encode()
            except (ValueError, KeyError, TypeError):
                return _matrix_error(400, "M_BAD_JSON", "bad invite")
        if path.startswith("/_matrix/federation/v1/invite/") and request.method == "PUT":
            try:
                return 200, json.dumps([200, {"event": json.loads(request.body)}]).encode()
            except ValueError:
                return _matrix_error(400, "M_BAD_JSON", "bad invite")
        if path.startswith(("/_matrix/federation/v1/make_", "/_matrix/federation/v1/state")):
            return _matrix_error(404, "M_NOT_FOUND", "Unknown room")
        if "/send_join/" in path or "/send_knock/" in path:
            return _matrix_error(403, "M_FORBIDDEN", "Host not in room")
        if path.startswith("/_matrix/federation/v1/timestamp_to_event/"):
            return _matrix_error(404, "M_NOT_FOUND", "Unknown room")
        if path.startswith("/_matrix/key/"):
            return 200, b'{"server_keys":[]}'
        if path.startswith("/_matrix/client/"):
            return 200, b'{"versions":["v1.11"]}'
        return _matrix_error(404, "M_UNRECOGNIZED", "Unrecognized request")


@dataclass
class LogWatch:
    """Structlog events and standard-library log records seen while active."""

    events: list[dict[str, Any]] = field(default_factory=list)
    records: list[logging.LogRecord] = field(default_factory=list)

    def tracebacks(self) -> list[str]:
        """Every logged exception or error, one line each."""
        found = [
            f"{e.get('event')}: {e.get('exception') or ''}"
            for e in self.events
            if e.get("exception") or e.get("log_level") in ("error", "critical")
        ]
        found += [
            f"{r.name}: {r.getMessage()}\n"
            + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")
            for r in self.records
            if r.exc_info is not None or r.levelno >= logging.ERROR
        ]
        return found


class _Records(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


@contextmanager
def watching_logs() -> Iterator[LogWatch]:
    """Captures every structlog event (exceptions rendered as text in ``exception``) and
    every standard-library record while active; the previous configuration comes back."""
    watch = LogWatch()
    handler = _Records(watch.records)
    root = logging.getLogger()
    root.addHandler(handler)
    old = structlog.get_config()
    capture = structlog.testing.LogCapture()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            capture,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    watch.events = capture.entries
    try:
        yield watch
    finally:
        structlog.configure(**old)
        root.removeHandler(handler)


def robustness_config(tmp_path: Path, homeserver_url: str, **sections: Any) -> GatewayConfig:
    key_path = tmp_path / "hs.signing.key"
    key_path.write_text(
        f"ed25519 {HS_KEY.version} {signedjson.key.encode_signing_key_base64(HS_KEY)}\n"
    )
    data: dict[str, Any] = {
        "server": {"server_name": HS, "signing_key_path": str(key_path)},
        "homeserver": {"url": homeserver_url, "connect_timeout": 2.0, "read_timeout": 5.0},
        "public": {
            "bind": "127.0.0.1:0",
            "max_body_size": MAX_BODY_SIZE,
            "request_timeout": REQUEST_TIMEOUT,
        },
        "internal": {"bind": "127.0.0.1:0"},
        "log": {"format": "json"},
        "store": {"sqlite_path": str(tmp_path / "gateway.db")},
        "policies": [
            {
                "module": "policies.server_rules",
                "name": "server_rules",
                "options": {"deny_origins": ["denied.example"]},
            },
            {
                "module": "tests.support.policies_for_tests",
                "name": "by_localpart",
                "timeout": 0.3,
            },
        ],
    }
    for name, values in sections.items():
        if isinstance(values, list):
            data[name] = values
        else:
            data.setdefault(name, {}).update(values)
    return parse_config(data, base_dir=tmp_path)


@dataclass
class RunningGateway:
    listening: Listening
    services: Services
    router: Router
    homeserver: Any

    @property
    def host_port(self) -> tuple[str, int]:
        url = httpx.URL(self.listening.public_url)
        assert url.port is not None
        return url.host, url.port

    def routes(self) -> tuple[tuple[str, str], ...]:
        return tuple((r.method, r.template) for r in self.router.routes)


@asynccontextmanager
async def gateway_for_hostile_traffic(
    nursery: trio.Nursery,
    tmp_path: Path,
    *,
    remote_key: SigningKey = REMOTE_KEY,
    homeserver: Any = None,
    keyring: Any = None,
    **sections: Any,
) -> AsyncIterator[RunningGateway]:
    """``homeserver`` (an ASGI app) replaces the :class:`RealisticHomeserver`, ``keyring``
    the one that knows ``REMOTE`` by ``remote_key``; ``sections`` add configuration."""
    homeserver = homeserver if homeserver is not None else RealisticHomeserver()
    url = await serve_fake_homeserver(nursery, homeserver)
    config = robustness_config(tmp_path, url, **sections)
    installed: list[tuple[Router, Services]] = []
    keys = keyring if keyring is not None else OneServerKeyring(REMOTE, remote_key)

    def install(router: Router, services: Services) -> None:
        services.keyring = cast(Any, keys)
        installed.append((router, services))

    listening: Listening = await nursery.start(
        lambda task_status: serve(config, public_routes=[install], task_status=task_status)
    )
    router, services = installed[0]
    assert len(router.routes) >= len(PUBLIC_ROUTES)
    yield RunningGateway(listening, services, router, homeserver)


# --- valid material ----------------------------------------------------------------------


def make_samples(
    origin: str, key: SigningKey, local_user: str, remote_user: str, room_version: str = "11"
) -> Samples:
    """A remote room with a v3 invite for ``local_user`` and a join and a knock of
    ``remote_user`` (signed by ``origin``)."""
    room = make_remote_room(room_version, origin, key)
    invite = room.make_invite(local_user)
    body = {
        "event": invite,
        "invite_room_state": [
            {
                "type": "m.room.name",
                "state_key": "",
                "sender": room.creator,
                "content": {"name": "x"},
            }
        ],
        "state": [room.create, *room.state],
    }

    def member(membership: str) -> dict[str, Any]:
        event = room._event(
            type="m.room.member",
            state_key=remote_user,
            sender=remote_user,
            content={"membership": membership},
        )
        return sign_pdu(event, room_version, origin, key)

    join, knock = member("join"), member("knock")
    return Samples(
        room_id=room.room_id,
        v3_invite=body,
        invite_event_id=event_id_of(invite, room_version),
        join_event=join,
        join_event_id=event_id_of(join, room_version),
        knock_event=knock,
        knock_event_id=event_id_of(knock, room_version),
    )


def inprocess_target(gateway: RunningGateway) -> Target:
    host, port = gateway.host_port
    return fake_homeserver_target(f"{host}:{port}", gateway.routes())


def owned_routes() -> tuple[tuple[str, str], ...]:
    """(method, template) of every owned route, as ``gateway.app.PUBLIC_ROUTES`` installs
    them (installers only register routes; the services are for their handlers)."""
    router = Router()
    for install in PUBLIC_ROUTES:
        install(router, cast(Services, object()))
    return tuple((r.method, r.template) for r in router.routes)


def fake_homeserver_target(
    host: str, routes: Sequence[tuple[str, str]], remote_key: SigningKey = REMOTE_KEY
) -> Target:
    """The generator's target for a gateway of this module (in this process or not)."""
    return Target(
        host=host,
        server_name=HS,
        origin=REMOTE,
        signing_key=remote_key,
        local_user=LOCAL_USER,
        remote_user=REMOTE_USER,
        samples=make_samples(REMOTE, remote_key, LOCAL_USER, REMOTE_USER),
        routes=tuple(routes),
        max_body_size=MAX_BODY_SIZE,
        request_timeout=REQUEST_TIMEOUT,
    )


# --- the same gateway in a process of its own ------------------------------------------------


@dataclass
class GatewayProcess:
    """A gateway of this module in a child process (the traffic's sender keeps this
    process's core); its log, one JSON object per line, is ``log_path``."""

    public_url: str
    internal_url: str
    routes: tuple[tuple[str, str], ...]
    remote_key: SigningKey
    log_path: Path
    process: subprocess.Popen[bytes]

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(encoding="utf8", errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"event": line, "log_level": "unparsed"})
        return events

    def tracebacks(self) -> list[str]:
        """Logged exceptions and errors, and any line that is not a log event."""
        return [
            f"{e.get('event')}: {e.get('exception', '')}"
            for e in self.log_events()
            if e.get("exception")
            or e.get("level") in ("error", "critical")
            or any(word in str(e.get("event")) for word in ("Traceback", "Error", "Exception"))
        ]


@contextmanager
def gateway_process(tmp_path: Path, http_server: str = "builtin") -> Iterator[GatewayProcess]:
    """Starts ``python -m tests.robustness.harness`` in ``tmp_path`` with a fresh remote key
    (and ``public.http_server``) and stops it on exit."""
    remote_key = signedjson.key.generate_signing_key("r1")
    seed = signedjson.key.encode_signing_key_base64(remote_key)
    log_path = tmp_path / "gateway.log"
    ready = tmp_path / "listening.json"
    root = Path(__file__).resolve().parent.parent.parent
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.robustness.harness", str(tmp_path), seed, http_server],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        yield GatewayProcess(
            public_url=info["public_url"],
            internal_url=info["internal_url"],
            routes=tuple((m, t) for m, t in info["routes"]),
            remote_key=remote_key,
            log_path=log_path,
            process=process,
        )
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def _serve_until_stopped(tmp_path: Path, remote_key: SigningKey, http_server: str) -> None:
    async with trio.open_nursery() as nursery:
        async with gateway_for_hostile_traffic(
            nursery, tmp_path, remote_key=remote_key, public={"http_server": http_server}
        ) as gateway:
            info = {
                "public_url": gateway.listening.public_url,
                "internal_url": gateway.listening.internal_url,
                "routes": gateway.routes(),
            }
            written = tmp_path / "listening.json.tmp"
            written.write_text(json.dumps(info))
            written.rename(tmp_path / "listening.json")
            await trio.sleep_forever()


def main(argv: Sequence[str]) -> int:
    """``python -m tests.robustness.harness DIR REMOTE_KEY_SEED [HTTP_SERVER]``: serves
    until SIGINT."""
    directory, seed = Path(argv[0]), argv[1]
    http_server = argv[2] if len(argv) > 2 else "builtin"
    configure_logging("json", "info", stream=sys.stderr)
    remote_key = signedjson.key.decode_signing_key_base64("ed25519", "r1", seed)
    try:
        trio.run(_serve_until_stopped, directory, remote_key, http_server)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))


def q(identifier: str) -> str:
    return quote(identifier, safe="")
