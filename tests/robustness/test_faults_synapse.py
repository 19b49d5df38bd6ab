"""Faults around the gateway, each against a real Synapse behind it.

One stack of this module's own (``gateway.demo.stack.prepare_stack`` and ``StackProcesses``), so
killing its Synapse breaks no other test. Its gateway keeps its state in PostgreSQL (a fresh
database on the machine's server), runs the tests' localpart policy (``deny-*`` denied,
``slow-*`` hangs past the hook's timeout, ``boom-*`` raises; on_error closed) and a lenient
copy for ``open-*`` users (on_error open), audits every decision, and has short timeouts:
``public.request_timeout`` 10 s (so idle connections close after 10 s) and
``federation.request_timeout`` 3 s.

The faults:

* the homeserver killed in the middle of traffic, then started again;
* remote servers whose key endpoint hangs or answers garbage;
* 500 idle connections and slow-loris clients next to normal traffic;
* PostgreSQL dropping the gateway's connections (``pg_terminate_backend``: the machine's
  server is shared, so it is not restarted), and the SQLite store of a second gateway
  locked by another process;
* policies that hang or raise while traffic goes on.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import psycopg
import pytest

from gateway.demo.stack import Stack, StackProcesses, prepare_stack
from gateway.demo.synapse import RegisteredUser, free_port, synapse_process
from gateway.demo.synapse import register_user as register
from gateway.features import invites
from tests.integration.test_v3_invites import send_v3_invite, v3_invite_body
from tests.robustness.harness import watching_logs
from tests.support import policies_for_tests
from tests.support.inprocess_gateway import gateway_thread
from tests.support.pdus import event_id_of, make_remote_room
from tests.support.remote_server import RemoteServer
from tests.support.stack_fixtures import store_config

pytestmark = pytest.mark.integration

TIMEOUT = httpx.Timeout(30.0)
POLICY_FILE = "localpart_policy.py"
HOOK_TIMEOUT = 0.5
REQUEST_TIMEOUT = 10.0
FEDERATION_TIMEOUT = 3.0
ROOM_VERSION = "11"


@dataclass
class FaultStack:
    processes: StackProcesses
    dsn: str
    database: str
    #: how far the gateway's log was when the current test started
    log_offset: int = 0
    users: dict[str, RegisteredUser] = field(default_factory=dict)

    @property
    def stack(self) -> Stack:
        return self.processes.stack

    def user(self, word: str) -> RegisteredUser:
        """A registered user whose localpart starts with ``word`` (one per word)."""
        if word not in self.users:
            self.users[word] = register(
                self.stack.homeserver_url,
                self.stack.registration_shared_secret,
                f"{word}{secrets.token_hex(4)}",
                secrets.token_urlsafe(12),
            )
        return self.users[word]

    def log_events(self) -> list[dict[str, Any]]:
        """Gateway log events since the current test started."""
        with self.stack.gateway_log_path.open("rb") as f:
            f.seek(self.log_offset)
            text = f.read().decode("utf8", errors="replace")
        events = []
        for line in text.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": line, "unparsed": True}
            events.append(event if isinstance(event, dict) else {"event": line})
        return events

    def tracebacks(self) -> list[str]:
        return [
            f"{e.get('event')}: {str(e.get('exception', ''))[-1500:]}"
            for e in self.log_events()
            if e.get("exception")
            or e.get("level") in ("error", "critical")
            or (e.get("unparsed") and "Traceback" in str(e.get("event")))
        ]

    def unexpected_tracebacks(self) -> list[str]:
        """Tracebacks but those of the test policy's ``boom-`` hook, which raises on
        purpose (logged as ``policy.hook_failed``)."""
        return [
            t for t in self.tracebacks() if not (t.startswith("policy.hook_failed") and "boom" in t)
        ]

    def restart_synapse(self) -> None:
        """A new Synapse process on the same data (the old one must have ended)."""
        self.processes.synapse = synapse_process(self.stack.synapse)
        self.processes.synapse.start()
        self.processes.synapse.wait_until_ready(timeout=90)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    data_dir = tmp_path_factory.mktemp("faults")
    shutil.copyfile(policies_for_tests.__file__, data_dir / POLICY_FILE)
    policies = [
        {"module": POLICY_FILE, "name": "by_localpart", "timeout": HOOK_TIMEOUT},
        {
            "module": POLICY_FILE,
            "name": "lenient",
            "options": {"prefix": "open-"},
            "timeout": HOOK_TIMEOUT,
            "on_error": "open",
        },
    ]
    with store_config("postgres", "faults") as store:
        stack = prepare_stack(
            data_dir,
            port=free_port(),
            log_format="json",
            user_config={
                "store": store,
                "policies": policies,
                "policy": {"audit_allows": True},
                "federation": {"request_timeout": FEDERATION_TIMEOUT},
            },
        )
        # [public] belongs to the demo: the request timeout is set in the written file.
        text = stack.gateway_config_path.read_text(encoding="utf8")
        head, public, rest = text.partition("[public]\n")
        section, next_header, tail = rest.partition("\n[")
        assert "request_timeout = 60.0" in section, text
        section = section.replace("request_timeout = 60.0", f"request_timeout = {REQUEST_TIMEOUT}")
        stack.gateway_config_path.write_text(
            head + public + section + next_header + tail, encoding="utf8"
        )
        processes = StackProcesses(stack)
        processes.start()
        try:
            dsn = store["postgres_dsn"]
            database = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
            yield FaultStack(processes, dsn, str(database))
        finally:
            processes.stop()


@pytest.fixture
def fs(faults: FaultStack) -> Iterator[FaultStack]:
    """The module's stack, its log read from this test on; Synapse must be up."""
    faults.log_offset = faults.stack.gateway_log_path.stat().st_size
    if faults.processes.synapse.poll() is not None:
        faults.restart_synapse()
    yield faults


# --- helpers ---------------------------------------------------------------------------------


def q(identifier: str) -> str:
    return quote(identifier, safe="")


def invite(
    remote: RemoteServer, client: httpx.Client, stack: Stack, user: RegisteredUser
) -> tuple[str, httpx.Response]:
    room = make_remote_room(ROOM_VERSION, remote.server_name, remote.signing_key)
    body = v3_invite_body(room, room.make_invite(user.user_id))
    return room.room_id, send_v3_invite(remote, client, stack, room.room_id, body)


def matrix_error(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("errcode"), str) else None


def health(stack: Stack) -> int:
    return httpx.get(f"{stack.internal_url}/health", verify=False, timeout=10).status_code


@dataclass
class Traffic:
    """Requests sent in threads until stopped: (kind, status or None, body, started, took)."""

    results: list[tuple[str, int | None, bytes, float, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self, kind: str, send: Callable[[httpx.Client], httpx.Response], url: str) -> None:
        def loop() -> None:
            with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
                while not self.stop.is_set():
                    started = time.monotonic()
                    try:
                        r = send(client)
                        self.results.append(
                            (kind, r.status_code, r.content, started, time.monotonic() - started)
                        )
                    except httpx.HTTPError as e:
                        self.results.append(
                            (kind, None, repr(e).encode(), started, time.monotonic() - started)
                        )
                    time.sleep(0.05)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


# --- the homeserver killed mid-traffic ------------------------------------------------------


def test_homeserver_killed_mid_traffic_gives_matrix_errors_then_recovers(
    fs: FaultStack, remote_server: RemoteServer
) -> None:
    stack = fs.stack
    invitee = fs.user("ok-")
    traffic = Traffic()
    traffic.run("client", lambda c: c.get("/_matrix/client/versions"), stack.gateway_url)
    traffic.run("federation", lambda c: c.get("/_matrix/federation/v1/version"), stack.gateway_url)
    traffic.run("invite", lambda c: invite(remote_server, c, stack, invitee)[1], stack.gateway_url)
    try:
        time.sleep(2)
        killed_at = time.monotonic()
        fs.processes.synapse.stop(timeout=0)  # SIGTERM, then SIGKILL at once
        time.sleep(3)
        down_health = health(stack)
        time.sleep(1)
        restarted_at = time.monotonic()
        fs.restart_synapse()
        back_at = time.monotonic()
        time.sleep(2)
    finally:
        traffic.finish()

    assert down_health == 503
    assert health(stack) == 200
    failures = [r for r in traffic.results if r[1] is None]
    assert failures == [], failures[:5]
    server_errors = [r for r in traffic.results if r[1] is not None and r[1] >= 500]
    assert {r[1] for r in server_errors} <= {502, 503, 504}, server_errors[:5]
    for kind, _status, body, _, _ in server_errors:
        error = json.loads(body)
        assert error["errcode"] == "M_UNKNOWN" and error["retry_after_ms"] > 0, (kind, body)
    during = [r for r in traffic.results if killed_at + 0.5 < r[3] < restarted_at]
    assert during and all(r[1] in (502, 503, 504) for r in during), during[:5]
    assert all(r[4] < 5 for r in during), max(r[4] for r in during)
    after = [r for r in traffic.results if r[3] > back_at]
    assert {r[0] for r in after} == {"client", "federation", "invite"}
    assert all(r[1] == 200 for r in after), [r[:3] for r in after if r[1] != 200][:5]
    print(
        f"homeserver killed: {len(traffic.results)} requests, {len(during)} while down "
        f"(statuses {sorted({r[1] for r in during})}), slowest while down "
        f"{max(r[4] for r in during):.2f} s, back after {back_at - restarted_at:.1f} s"
    )
    assert fs.tracebacks() == []


# --- remote servers whose key endpoint misbehaves -------------------------------------------


def _key_answers(remote: RemoteServer) -> dict[str, Callable[[Any], tuple[int, Any]]]:
    def hangs(_request: Any) -> tuple[int, Any]:
        time.sleep(40)
        return 200, remote.key_document()

    def wrong_server(_request: Any) -> tuple[int, Any]:
        document = remote.key_document()
        document["server_name"] = "other.example"
        return 200, document

    def bad_signature(_request: Any) -> tuple[int, Any]:
        document = remote.key_document()
        name = remote.server_name
        document["signatures"][name][remote.key_id] = "A" * 86
        return 200, document

    def expired(_request: Any) -> tuple[int, Any]:
        remote.key_validity_ms = -3600 * 1000
        return 200, remote.key_document()

    return {
        "hangs": hangs,
        "a string": lambda _r: (200, "garbage"),
        "a list": lambda _r: (200, [1, 2, 3]),
        "an error": lambda _r: (500, {"errcode": "M_UNKNOWN"}),
        "no keys": lambda _r: (200, {"server_name": remote.server_name}),
        "another server": wrong_server,
        "a bad signature": bad_signature,
        "expired keys": expired,
        "11 MB": lambda _r: (200, {"server_name": remote.server_name, "x": "y" * 11_000_000}),
    }


BEHAVIOURS = (
    "hangs",
    "a string",
    "a list",
    "an error",
    "no keys",
    "another server",
    "a bad signature",
    "expired keys",
    "11 MB",
)


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_remote_whose_key_endpoint_misbehaves_is_refused_in_bounded_time(
    behaviour: str, fs: FaultStack, remote_server: RemoteServer
) -> None:
    stack = fs.stack
    invitee = fs.user("ok-")
    with RemoteServer() as bad:
        bad.add_route("GET", "/_matrix/key/v2/server", _key_answers(bad)[behaviour])
        with (
            ThreadPoolExecutor(4) as pool,
            httpx.Client(base_url=stack.gateway_url, timeout=TIMEOUT) as client,
        ):
            started = time.monotonic()
            refused = pool.submit(invite, bad, client, stack, invitee)
            time.sleep(0.5)
            # Meanwhile others are served as usual.
            others_started = time.monotonic()
            _, good = invite(remote_server, client, stack, invitee)
            versions = client.get("/_matrix/client/versions")
            others_took = time.monotonic() - others_started
            _, answer = refused.result(timeout=60)
            took = time.monotonic() - started
    assert answer.status_code == 401, answer.text
    assert matrix_error(answer) is not None and answer.json()["errcode"] == "M_UNAUTHORIZED"
    # Direct fetch bounded twice over by federation.request_timeout (the keyring's bound).
    assert took < 2 * FEDERATION_TIMEOUT + 3, took
    assert good.status_code == 200, good.text
    assert versions.status_code == 200
    assert others_took < 3, others_took
    print(f"key endpoint {behaviour}: refused after {took:.2f} s, others took {others_took:.2f} s")
    assert fs.tracebacks() == []


# --- idle connections and slow clients -----------------------------------------------------


def test_idle_connections_and_slow_loris_clients_leave_normal_requests_fast(
    fs: FaultStack, remote_server: RemoteServer
) -> None:
    stack = fs.stack
    address = urlsplit(stack.gateway_url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    invitee = fs.user("ok-")
    idle = [socket.create_connection((host, port), timeout=5) for _ in range(500)]
    slow_heads: list[socket.socket] = []
    slow_bodies: list[socket.socket] = []
    stop = threading.Event()

    def trickle() -> None:
        # One header line a second (slow loris), one body byte a second.
        for s in slow_heads:
            s.sendall(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n")
        uri = f"/_matrix/federation/v3/invite/{q('!r:' + remote_server.server_name)}"
        for s in slow_bodies:
            s.sendall(f"PUT {uri} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode())
        while not stop.wait(1.0):
            for s in slow_heads:
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass
            for s in slow_bodies:
                try:
                    s.sendall(b"{")
                except OSError:
                    pass

    for _ in range(50):
        slow_heads.append(socket.create_connection((host, port), timeout=30))
        slow_bodies.append(socket.create_connection((host, port), timeout=30))
    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    latencies: dict[str, list[float]] = {"federation": [], "client": [], "invite": []}
    try:
        with httpx.Client(base_url=stack.gateway_url, timeout=TIMEOUT) as client:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                for kind, send in (
                    ("federation", lambda: client.get("/_matrix/federation/v1/version")),
                    ("client", lambda: client.get("/_matrix/client/versions")),
                    ("invite", lambda: invite(remote_server, client, stack, invitee)[1]),
                ):
                    started = time.monotonic()
                    answer = send()
                    latencies[kind].append(time.monotonic() - started)
                    assert answer.status_code == 200, answer.text
        # The gateway ends what never completes: heads after the keep-alive timeout (the
        # request timeout here, 10 s), bodies with 408 after the request timeout.
        closed_at = time.monotonic() + REQUEST_TIMEOUT + 5
        answers: list[bytes] = []
        for s in slow_bodies:
            s.settimeout(max(0.1, closed_at - time.monotonic()))
            try:
                answers.append(s.recv(4096))
            except OSError:
                answers.append(b"")
        heads_closed = 0
        for s in slow_heads:
            s.settimeout(max(0.1, closed_at - time.monotonic()))
            try:
                heads_closed += s.recv(4096) == b""
            except OSError:
                heads_closed += 1
    finally:
        stop.set()
        trickler.join(5)
        for s in [*idle, *slow_heads, *slow_bodies]:
            s.close()

    slowest = {kind: max(values) for kind, values in latencies.items()}
    print(f"500 idle, 50 slow heads, 50 slow bodies: slowest normal request {slowest}")
    assert all(value < 2.0 for value in slowest.values()), slowest
    assert sum(1 for a in answers if a.startswith(b"HTTP/1.1 408")) == len(slow_bodies), answers[:3]
    assert heads_closed == len(slow_heads)
    assert fs.tracebacks() == []


# --- the store: PostgreSQL connections dropped, SQLite locked -------------------------------


def terminate_backends(database: str) -> int:
    """Ends every connection to ``database`` but our own; returns how many."""
    with psycopg.connect(
        "host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True
    ) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return len(rows)


def audit_rows(dsn: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        cursor = conn.execute("SELECT room_id, decision, policy, request_id FROM policy_audit")
        return [
            {"room_id": r[0], "decision": r[1], "policy": r[2], "request_id": r[3]}
            for r in cursor.fetchall()
        ]


#: The localpart word -> the answer the policies give, by their failure modes.
EXPECTED = {"ok-": 200, "deny-": 403, "slow-": 403, "boom-": 403, "open-slow-": 200}


def test_postgres_dropping_connections_changes_no_decision_and_loses_no_audit_row(
    fs: FaultStack, remote_server: RemoteServer
) -> None:
    stack = fs.stack
    users = {word: fs.user(word) for word in EXPECTED}
    stop = threading.Event()
    terminated: list[int] = []

    def drop_connections() -> None:
        while not stop.wait(0.3):
            terminated.append(terminate_backends(fs.database))

    dropper = threading.Thread(target=drop_connections, daemon=True)
    sent: list[tuple[str, str, httpx.Response]] = []
    with httpx.Client(base_url=stack.gateway_url, timeout=TIMEOUT) as client:
        dropper.start()
        try:
            for _ in range(6):
                for word, user in users.items():
                    room_id, answer = invite(remote_server, client, stack, user)
                    sent.append((word, room_id, answer))
                    time.sleep(0.1)
        finally:
            stop.set()
            dropper.join(10)
    assert sum(terminated) > 0
    wrong = [(w, a.status_code, a.text[:200]) for w, _, a in sent if a.status_code != EXPECTED[w]]
    assert wrong == []
    rows = audit_rows(fs.dsn)
    decided = {room_id for room_id in {r["room_id"] for r in rows}}
    missing = [(w, room_id) for w, room_id, _ in sent if room_id not in decided]
    assert missing == []
    print(
        f"postgres: {sum(terminated)} connections terminated during {len(sent)} invites; "
        f"every decision as its failure mode says, {len(rows)} audit rows"
    )
    assert fs.unexpected_tracebacks() == []


#: Holds SQLite's write lock on a database for some seconds, as a backup tool or an
#: operator's ``sqlite3`` shell in a transaction would.
LOCK_SCRIPT = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""
#: Longer than the store's busy timeout (10 s): writes give up while it is held.
LOCK_SECONDS = 12.0


def v2_invite(
    remote: RemoteServer, client: httpx.Client, stack: Stack, user: RegisteredUser
) -> tuple[str, httpx.Response]:
    """A v2 invite (no notary involved): checked, decided by the policies, passed on."""
    room = make_remote_room(ROOM_VERSION, remote.server_name, remote.signing_key)
    event = room.make_invite(user.user_id)
    body = {"room_version": ROOM_VERSION, "event": event, "invite_room_state": []}
    uri = f"/_matrix/federation/v2/invite/{q(room.room_id)}/{q(event_id_of(event, ROOM_VERSION))}"
    answer = remote.federation_request(
        client, "PUT", uri, destination=stack.server_name, content=body
    )
    return room.room_id, answer


def test_sqlite_store_locked_by_another_process_delays_but_loses_no_decision(
    fs: FaultStack, remote_server: RemoteServer, tmp_path: Path
) -> None:
    """A second gateway, in a thread of this process, in front of the same Synapse with an
    SQLite store; another process holds the database's write lock for longer than the
    store waits for it."""
    stack = fs.stack
    text = stack.gateway_config_path.read_text(encoding="utf8")
    assert 'backend = "postgres"' in text
    config_path = stack.gateway_config_path.with_name("gateway-sqlite.toml")
    config_path.write_text(text.replace('backend = "postgres"', 'backend = "sqlite"'))
    db_path = tmp_path / "gateway.db"
    users = {word: fs.user(word) for word in ("ok-", "deny-", "slow-", "after-")}
    with (
        watching_logs() as watch,
        gateway_thread(config_path, db_path, invites.install, name="sqlite-gateway") as url,
        httpx.Client(base_url=url, timeout=TIMEOUT) as client,
        ThreadPoolExecutor(4) as pool,
    ):
        # The remote's key is fetched and stored first (a write).
        _, warm = v2_invite(remote_server, client, stack, users["ok-"])
        assert warm.status_code == 200, warm.text
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCK_SCRIPT, str(db_path), str(LOCK_SECONDS)],
            stdout=subprocess.PIPE,
        )
        try:
            assert locker.stdout is not None and locker.stdout.readline() == b"locked\n"
            locked_at = time.monotonic()
            decisions = {
                word: pool.submit(v2_invite, remote_server, client, stack, users[word])
                for word in ("ok-", "deny-", "slow-")
            }
            passthrough_started = time.monotonic()
            versions = client.get("/_matrix/federation/v1/version")
            passthrough_took = time.monotonic() - passthrough_started
            answers = {word: f.result(timeout=60) for word, f in decisions.items()}
            answered_after = time.monotonic() - locked_at
        finally:
            locker.wait(30)
        after_room, after = v2_invite(remote_server, client, stack, users["after-"])
    assert versions.status_code == 200 and passthrough_took < 1.0, passthrough_took
    statuses = {word: answer.status_code for word, (_, answer) in answers.items()}
    assert statuses == {"ok-": 200, "deny-": 403, "slow-": 403}, statuses
    assert after.status_code == 200, after.text
    failed_writes = [e for e in watch.events if e.get("event") == "policy.audit_write_failed"]
    assert failed_writes, "the lock outlasted the busy timeout: some write must have failed"
    with sqlite3.connect(db_path) as conn:
        audited = {row[0] for row in conn.execute("SELECT room_id FROM policy_audit")}
    rooms = {room_id for room_id, _ in answers.values()} | {after_room}
    assert rooms <= audited, rooms - audited
    assert [t for t in watch.tracebacks() if "audit_write_failed" not in t] == []
    print(
        f"sqlite locked {LOCK_SECONDS:g} s: decisions answered within {answered_after:.1f} s, "
        f"{len(failed_writes)} audit writes failed and were written later, passthrough "
        f"{passthrough_took * 1000:.0f} ms"
    )
    assert fs.tracebacks() == []


def test_policies_that_hang_or_raise_under_load_decide_by_their_failure_mode(
    fs: FaultStack, remote_server: RemoteServer
) -> None:
    stack = fs.stack
    users = {word: fs.user(word) for word in EXPECTED}
    with (
        ThreadPoolExecutor(10) as pool,
        httpx.Client(base_url=stack.gateway_url, timeout=TIMEOUT) as client,
    ):
        started = time.monotonic()
        futures = [
            (word, pool.submit(invite, remote_server, client, stack, users[word]))
            for _ in range(4)
            for word in EXPECTED
        ]
        versions = client.get("/_matrix/client/versions")
        results = [(word, f.result(timeout=60)) for word, f in futures]
        took = time.monotonic() - started
    assert versions.status_code == 200
    wrong = [(w, a.status_code) for w, (_, a) in results if a.status_code != EXPECTED[w]]
    assert wrong == []
    for word, (_, answer) in results:
        if EXPECTED[word] == 403:
            assert answer.json()["errcode"] == "M_FORBIDDEN"
    failures = [
        e for e in fs.log_events() if e.get("event") == "policy.decision" and e.get("failure")
    ]
    assert {e["failure"] for e in failures} == {"timeout", "exception"}
    print(f"{len(results)} invites with hanging and raising policies in {took:.1f} s")
    assert fs.unexpected_tracebacks() == []
