"""``gateway demo-peer``: a remote homeserver on this machine that talks to the running demo.

Each run starts a peer named ``localhost:PORT`` (a free port) with a new ed25519 key. It
serves ``/_matrix/key/v2/server`` over TLS on loopback, with a self-made certificate for
``localhost``: the demo's gateway and Synapse allow loopback addresses and do not check
certificates of ``localhost`` (see ``gateway.demo.stack``), so both can fetch and verify its key.
It builds and signs its events with ``gateway.matrix``, signs its requests with X-Matrix,
sends them to the demo's gateway (``demo.json`` in the data directory says where) and prints
what the gateway decided: the status and Matrix error of each answer, and the decisions the
policies wrote to the audit trail (the same rows ``gateway decisions`` lists).

    gateway demo-peer invite [--to @alice:localhost:8448] [--from bob]
    gateway demo-peer join   [--from bob] [--as alice]
    gateway demo-peer knock  [--from bob] [--as alice]

``invite`` sends a v3 invite (``PUT /_matrix/federation/v3/invite/{roomId}``, the room's
create event in ``state``) into a room of the peer's own. ``join`` has the demo user (``--as``,
registered if needed) create a public room and a restricted room that members of the public
one may join, then tries make_join/send_join as the peer's user: before and after it joined
the public room. ``knock`` has the demo user create a room one knocks to enter and sends
make_knock/send_knock. The peer exists only while the command runs: events the homeserver
sends it afterwards (for example when an invite is accepted) go nowhere.
"""

from __future__ import annotations

import argparse
import json
import secrets
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit

import httpx
import signedjson.key
import trio
from nacl.signing import SigningKey

from gateway.config import ConfigError, load_config
from gateway.demo.synapse import HomeserverError, register_user
from gateway.matrix.canonical_json import encode_canonical_json
from gateway.matrix.events import JsonDict, compute_event_id, compute_room_id
from gateway.matrix.room_versions import ROOM_VERSIONS, Disposition, get_room_version
from gateway.matrix.signing import key_id_of, sign_event, sign_json
from gateway.matrix.unpadded_base64 import encode_base64
from gateway.matrix.xmatrix import sign_request
from gateway.policy.audit import AuditRecord, query_decisions

__all__ = ["DemoInfo", "Peer", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
TIMEOUT = httpx.Timeout(30.0)
#: Every stable room version, for make_join/make_knock's ``ver`` parameters.
_STABLE_VERSIONS = [v for v, r in ROOM_VERSIONS.items() if r.disposition is Disposition.STABLE]


class PeerError(Exception):
    """The command cannot go on; the message says why."""


def _q(value: str) -> str:
    return quote(value, safe="")


# --- the demo ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoInfo:
    """What ``demo.json`` says about the running demo."""

    server_name: str
    gateway_url: str
    homeserver_url: str
    registration_shared_secret: str
    gateway_config: Path

    @classmethod
    def read(cls, data_dir: Path | None) -> DemoInfo:
        # Imported here: building the `gateway` command line must stay light.
        from gateway.demo.stack import DEFAULT_DATA_DIR, DEMO_FILE

        path = (data_dir or DEFAULT_DATA_DIR) / DEMO_FILE
        try:
            data = json.loads(path.read_text(encoding="utf8"))
        except FileNotFoundError:
            raise PeerError(
                f"{path} does not exist: start the demo first (./scripts/demo.sh), or pass "
                "the --data-dir it uses"
            ) from None
        except (OSError, ValueError) as e:
            raise PeerError(f"cannot read {path}: {e}") from None
        try:
            return cls(
                server_name=str(data["server_name"]),
                gateway_url=str(data["gateway_url"]),
                homeserver_url=str(data["homeserver_url"]),
                registration_shared_secret=str(data["registration_shared_secret"]),
                gateway_config=Path(data["gateway_config"]),
            )
        except KeyError as e:
            raise PeerError(f"{path} has no {e.args[0]!r}: is it a demo's?") from None


# --- the peer: keys, a TLS key server, signed requests --------------------------------------


def _new_signing_key(version: str) -> SigningKey:
    # signedjson's keys are nacl's, with the ``alg`` and ``version`` that name them.
    return cast(SigningKey, signedjson.key.generate_signing_key(version))


@dataclass
class Peer:
    """A homeserver named ``localhost:PORT`` with its own key, serving it over TLS."""

    #: Chosen by the kernel when serving starts.
    port: int = 0
    signing_key: SigningKey = field(default_factory=lambda: _new_signing_key("peer"))
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def server_name(self) -> str:
        if not self.port:
            raise RuntimeError("the peer is named after its port: start serving first")
        return f"localhost:{self.port}"

    @property
    def key_id(self) -> str:
        return key_id_of(self.signing_key)

    def user(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    def key_document(self) -> JsonDict:
        """The self-signed answer of ``/_matrix/key/v2/server``, valid for an hour."""
        verify_key = encode_base64(bytes(self.signing_key.verify_key))
        document = {
            "server_name": self.server_name,
            "valid_until_ts": int(time.time() * 1000) + 3600 * 1000,
            "verify_keys": {self.key_id: {"key": verify_key}},
            "old_verify_keys": {},
        }
        return sign_json(document, self.server_name, self.signing_key)

    def _answer(self, method: str, path: str) -> tuple[int, Any]:
        if method == "GET" and path.startswith("/_matrix/key/v2/server"):
            return 200, self.key_document()
        if method == "PUT" and path.startswith("/_matrix/federation/v1/send/"):
            # Transactions the homeserver sends to the rooms' members: taken, not kept.
            return 200, {"pdus": {}}
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}

    @contextmanager
    def serving(self) -> Iterator[Peer]:
        """Serves the key (and accepts transactions) on https://localhost:PORT meanwhile."""
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                status, body = peer._answer(self.command, urlsplit(self.path).path)
                data = encode_canonical_json(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        from gateway.notary.certificate import ensure_self_signed_certificate

        with tempfile.TemporaryDirectory(prefix="gateway-demo-peer-") as directory:
            cert, key = ensure_self_signed_certificate(Path(directory), "localhost")
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = server.server_address[1]
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)

    def request(
        self,
        client: httpx.Client,
        method: str,
        uri: str,
        destination: str,
        content: Any | None = None,
    ) -> httpx.Response:
        """Sends a request signed with X-Matrix; ``uri`` is the raw path and query."""
        headers = {
            "Authorization": sign_request(
                method, uri, self.server_name, destination, content, self.signing_key
            )
        }
        body = None
        if content is not None:
            body = encode_canonical_json(content)
            headers["Content-Type"] = "application/json"
        request = client.build_request(method, uri, headers=headers, content=body)
        # Sent exactly as signed: httpx would otherwise normalise the percent-encoding.
        request.url = request.url.copy_with(raw_path=uri.encode("ascii"))
        return client.send(request)

    def sign(self, event: Mapping[str, Any], room_version: str) -> JsonDict:
        return sign_event(event, room_version, self.server_name, self.signing_key)


# --- a room of the peer's own (for the v3 invite) --------------------------------------------


@dataclass
class PeerRoom:
    """A room created on the peer: create event, creator's join, power levels, join rules."""

    peer: Peer
    room_version: str
    creator: str
    room_id: str = ""
    create: JsonDict = field(default_factory=dict)
    state: list[JsonDict] = field(default_factory=list)

    def event_id(self, event: JsonDict) -> str:
        return compute_event_id(event, self.room_version)

    def _auth_ids(self, *keys: tuple[str, str]) -> list[str]:
        wanted = set(keys) | {("m.room.power_levels", ""), ("m.room.member", self.creator)}
        ids = (
            []
            if get_room_version(self.room_version).room_id_from_create_event
            else [self.event_id(self.create)]
        )
        return ids + [self.event_id(e) for e in self.state if (e["type"], e["state_key"]) in wanted]

    def event(self, *, auth: Sequence[tuple[str, str]] = (), **fields: Any) -> JsonDict:
        previous = self.state[-1] if self.state else self.create
        event: JsonDict = {
            "room_id": self.room_id,
            "origin": self.peer.server_name,
            "origin_server_ts": int(time.time() * 1000),
            "depth": len(self.state) + 2,
            "prev_events": [self.event_id(previous)],
            "auth_events": self._auth_ids(*auth),
            **fields,
        }
        return self.peer.sign(event, self.room_version)

    @classmethod
    def create_room(cls, peer: Peer, room_version: str, creator: str) -> PeerRoom:
        version = get_room_version(room_version)
        room = cls(peer, room_version, creator)
        content: dict[str, Any] = {"room_version": room_version}
        if version.event_format.create_has_creator:
            content["creator"] = creator
        create: JsonDict = {
            "type": "m.room.create",
            "state_key": "",
            "sender": creator,
            "content": content,
            "origin": peer.server_name,
            "origin_server_ts": int(time.time() * 1000),
            "depth": 1,
            "prev_events": [],
            "auth_events": [],
        }
        if version.room_id_from_create_event:
            room.create = peer.sign(create, room_version)
            room.room_id = compute_room_id(room.create, room_version)
        else:
            room.room_id = f"!{secrets.token_hex(9)}:{peer.server_name}"
            room.create = peer.sign({**create, "room_id": room.room_id}, room_version)
        member = {"membership": "join"}
        room.state.append(
            room.event(type="m.room.member", state_key=creator, sender=creator, content=member)
        )
        power = {"users": {creator: 100}, "invite": 0}
        room.state.append(
            room.event(type="m.room.power_levels", state_key="", sender=creator, content=power)
        )
        rules = {"join_rule": "invite"}
        room.state.append(
            room.event(type="m.room.join_rules", state_key="", sender=creator, content=rules)
        )
        return room

    def invite(self, invitee: str) -> JsonDict:
        return self.event(
            type="m.room.member",
            state_key=invitee,
            sender=self.creator,
            content={"membership": "invite"},
            auth=[("m.room.join_rules", "")],
        )


# --- what the gateway decided ---------------------------------------------------------------


class Reporter:
    """Prints each answer, and the audit rows the peer's requests added since the last one."""

    def __init__(self, demo: DemoInfo, origin: str, out: Callable[[str], None]) -> None:
        self.demo = demo
        self.origin = origin
        self.out = out
        self.since_ms = int(time.time() * 1000) - 1000
        self._seen: set[int] = set()
        try:
            self._store = load_config(demo.gateway_config).store
        except ConfigError as e:
            raise PeerError(f"cannot read the demo's gateway config: {e.describe()}") from None

    def answer(self, what: str, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        line = f"  {what} -> {response.status_code}"
        if "errcode" in body:
            line += f" {body['errcode']}: {body.get('error', '')}"
        self.out(line)
        return body

    def decisions(self) -> list[AuditRecord]:
        """The policy decisions on the peer's requests not shown yet (printed too)."""
        records = trio.run(self._query)
        new = [r for r in records if r.origin == self.origin and r.id not in self._seen]
        for r in new:
            if r.id is not None:
                self._seen.add(r.id)
            if not r.policy:
                self.out(f"  policies: every policy allowed {r.point}")
                continue
            shadow = " (shadow mode: not applied)" if r.mode == "shadow" else ""
            self.out(f"  policy {r.policy}: {r.decision} at {r.point}{shadow}: {r.reason}")
        return new

    async def _query(self) -> list[AuditRecord]:
        from gateway.store import open_store

        store = await open_store(
            self._store.backend,
            sqlite_path=str(self._store.sqlite_path),
            postgres_dsn=self._store.postgres_dsn or None,
        )
        try:
            return await query_decisions(store, since_ts=self.since_ms, limit=1000)
        finally:
            await store.aclose()

    def result(self, text: str) -> None:
        self.out(f"  result: {text}")

    def refused(self, response: httpx.Response, records: Sequence[AuditRecord]) -> None:
        code = f"{response.status_code} {_errcode(response)}".strip()
        denied = _enforced(records, "deny")
        if denied is not None:
            self.result(f"refused by policy {denied.policy} ({code})")
        else:
            self.result(f"refused ({code}), not by a policy")


def _errcode(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("errcode", "")) if isinstance(body, dict) else ""


def _enforced(records: Sequence[AuditRecord], decision: str) -> AuditRecord | None:
    return next((r for r in records if r.decision == decision and r.mode == "enforce"), None)


# --- demo users (the local side) ----------------------------------------------------------------


def _local_user(demo: DemoInfo, localpart: str, password: str, out: Callable[[str], None]) -> str:
    """An access token of the demo's user ``localpart``: logged in, or registered first."""
    login = httpx.post(
        f"{demo.gateway_url}/_matrix/client/v3/login",
        json={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
        },
        timeout=TIMEOUT,
    )
    if login.status_code == 200:
        token: str = login.json()["access_token"]
        return token
    try:
        user = register_user(
            demo.homeserver_url, demo.registration_shared_secret, localpart, password
        )
    except HomeserverError as e:
        raise PeerError(
            f"cannot log in as {localpart!r} (is --password right?) nor register it: {e}"
        ) from None
    out(f"registered the demo user {user.user_id} (password {password!r})")
    return user.access_token


def _create_room(demo: DemoInfo, token: str, **body: Any) -> str:
    response = httpx.post(
        f"{demo.gateway_url}/_matrix/client/v3/createRoom",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=TIMEOUT,
    )
    if response.status_code != 200:
        raise PeerError(f"createRoom answered {response.status_code}: {response.text}")
    room_id: str = response.json()["room_id"]
    return room_id


def _localpart(user_id: str) -> str:
    return user_id[1:].split(":", 1)[0]


# --- the commands ------------------------------------------------------------------------------


def _invite(args: argparse.Namespace, demo: DemoInfo, peer: Peer, report: Reporter) -> None:
    invitee = args.to or f"@alice:{demo.server_name}"
    if invitee.endswith(f":{demo.server_name}"):
        # The invitee must exist on the demo's homeserver.
        _local_user(demo, _localpart(invitee), args.password, report.out)
    sender = peer.user(args.sender)
    room = PeerRoom.create_room(peer, args.room_version, sender)
    event = room.invite(invitee)
    report.out(
        f"v3 invite: {sender} invites {invitee} to {room.room_id} "
        f"(room version {args.room_version}, create event in 'state')"
    )
    body = {
        "event": event,
        "invite_room_state": [
            {
                "type": "m.room.name",
                "state_key": "",
                "sender": sender,
                "content": {"name": "A room on the demo peer"},
            }
        ],
        "state": [room.create, *room.state],
    }
    with httpx.Client(base_url=demo.gateway_url, timeout=TIMEOUT) as client:
        uri = f"/_matrix/federation/v3/invite/{_q(room.room_id)}"
        response = peer.request(client, "PUT", uri, demo.server_name, body)
    answer = report.answer(f"PUT {uri}", response)
    records = report.decisions()
    if response.status_code != 200:
        report.refused(response, records)
    elif (dropped := _enforced(records, "drop")) is not None:
        report.result(f"dropped by policy {dropped.policy}: the homeserver never saw the invite")
    else:
        signed = answer.get("event", {}).get("signatures", {})
        by = "signed by " + ", ".join(sorted(signed)) if isinstance(signed, dict) else ""
        report.result(f"delivered to the homeserver ({by})")


def _join_once(
    demo: DemoInfo, peer: Peer, report: Reporter, client: httpx.Client, room_id: str, user: str
) -> bool:
    """make_join, then send_join; prints the result and says whether the user joined."""
    versions = "&".join(f"ver={_q(v)}" for v in _STABLE_VERSIONS)
    uri = f"/_matrix/federation/v1/make_join/{_q(room_id)}/{_q(user)}?{versions}"
    made = peer.request(client, "GET", uri, demo.server_name)
    answer = report.answer("make_join", made)
    if "event" not in answer:
        report.refused(made, report.decisions())
        return False
    template = dict(answer["event"], origin_server_ts=int(time.time() * 1000))
    via = template.get("content", {}).get("join_authorised_via_users_server")
    if via:
        report.out(f"  (the join is authorised via {via}, a member who may invite)")
    event = peer.sign(template, answer.get("room_version", "1"))
    event_id = compute_event_id(event, answer.get("room_version", "1"))
    uri = f"/_matrix/federation/v2/send_join/{_q(room_id)}/{_q(event_id)}"
    response = peer.request(client, "PUT", uri, demo.server_name, event)
    report.answer("send_join", response)
    records = report.decisions()
    if response.status_code != 200:
        report.refused(response, records)
        return False
    report.result("joined")
    return True


def _join(args: argparse.Namespace, demo: DemoInfo, peer: Peer, report: Reporter) -> None:
    token = _local_user(demo, args.local, args.password, report.out)
    local = f"@{args.local}:{demo.server_name}"
    lobby = _create_room(demo, token, preset="public_chat", room_version=args.room_version)
    rules = {
        "join_rule": "restricted",
        "allow": [{"type": "m.room_membership", "room_id": lobby}],
    }
    restricted = _create_room(
        demo,
        token,
        room_version=args.room_version,
        initial_state=[{"type": "m.room.join_rules", "state_key": "", "content": rules}],
    )
    user = peer.user(args.sender)
    report.out(
        f"{local} created the public room {lobby} and the restricted room {restricted}, "
        "which members of the public room may join"
    )
    with httpx.Client(base_url=demo.gateway_url, timeout=TIMEOUT) as client:
        report.out(f"restricted join: {user} asks to join {restricted}, before joining {lobby}")
        if _join_once(demo, peer, report, client, restricted, user):
            return
        report.out(f"join: {user} joins the public room {lobby}")
        if not _join_once(demo, peer, report, client, lobby, user):
            return
        report.out(f"restricted join: {user} asks again, now a member of {lobby}")
        _join_once(demo, peer, report, client, restricted, user)


def _knock(args: argparse.Namespace, demo: DemoInfo, peer: Peer, report: Reporter) -> None:
    token = _local_user(demo, args.local, args.password, report.out)
    rules = {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}
    room = _create_room(demo, token, room_version=args.room_version, initial_state=[rules])
    user = peer.user(args.sender)
    report.out(f"knock: {user} knocks on {room}, a room of @{args.local}:{demo.server_name}")
    versions = "&".join(f"ver={_q(v)}" for v in _STABLE_VERSIONS)
    with httpx.Client(base_url=demo.gateway_url, timeout=TIMEOUT) as client:
        uri = f"/_matrix/federation/v1/make_knock/{_q(room)}/{_q(user)}?{versions}"
        made = peer.request(client, "GET", uri, demo.server_name)
        answer = report.answer("make_knock", made)
        if "event" not in answer:
            report.refused(made, report.decisions())
            return
        version = answer.get("room_version", args.room_version)
        event = peer.sign(dict(answer["event"], origin_server_ts=int(time.time() * 1000)), version)
        event_id = compute_event_id(event, version)
        uri = f"/_matrix/federation/v1/send_knock/{_q(room)}/{_q(event_id)}"
        response = peer.request(client, "PUT", uri, demo.server_name, event)
    report.answer("send_knock", response)
    records = report.decisions()
    if response.status_code == 200:
        report.result(f"knocked: the homeserver shows {user}'s knock to the room's members")
    else:
        report.refused(response, records)


_COMMANDS: dict[str, Callable[[argparse.Namespace, DemoInfo, Peer, Reporter], None]] = {
    "invite": _invite,
    "join": _join,
    "knock": _knock,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="peer_command", metavar="ACTION", required=True)

    def action(name: str, help: str, default_version: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help, description=help)
        sub.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            metavar="DIR",
            help="the running demo's data directory (default: demo-data)",
        )
        sub.add_argument(
            "--from",
            dest="sender",
            default="bob",
            metavar="LOCALPART",
            help="the peer's user who acts (default: bob)",
        )
        sub.add_argument(
            "--room-version",
            default=default_version,
            choices=[v for v in _STABLE_VERSIONS if v not in ("1", "2")],
            help=f"room version of the room used (default: {default_version})",
        )
        sub.add_argument(
            "--password",
            default=None,
            help="the demo user's password, to log in or register it (default: LOCALPART-password)",
        )
        return sub

    invite = action("invite", "send a v3 invite from the peer to a demo user", "10")
    invite.add_argument(
        "--to", default=None, metavar="USER_ID", help="the invitee (default: @alice:DEMO)"
    )
    for name, help in (
        ("join", "try a restricted join, before and after joining the allowed room"),
        ("knock", "knock on a room of a demo user"),
    ):
        sub = action(name, help, "10")
        sub.add_argument(
            "--as",
            dest="local",
            default="alice",
            metavar="LOCALPART",
            help="the demo user who creates the rooms (registered if needed; default: alice)",
        )


def main(args: argparse.Namespace) -> int:
    """Runs ``gateway demo-peer ACTION``; returns the exit status (0 whatever the gateway
    decided, 1 when the action could not be carried out)."""

    def out(line: str) -> None:
        print(line, flush=True)

    try:
        demo = DemoInfo.read(args.data_dir)
        if args.password is None:
            local = getattr(args, "local", None) or _localpart(
                args.to or f"@alice:{demo.server_name}"
            )
            args.password = f"{local}-password"
        peer = Peer()
        with peer.serving():
            report = Reporter(demo, peer.server_name, out)
            out(f"demo peer {peer.server_name}: key {peer.key_id}, served over TLS on loopback")
            _COMMANDS[args.peer_command](args, demo, peer, report)
    except PeerError as e:
        print(f"gateway demo-peer: {e}", file=sys.stderr)
        return EXIT_ERROR
    except httpx.HTTPError as e:
        print(f"gateway demo-peer: the demo does not answer: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK
