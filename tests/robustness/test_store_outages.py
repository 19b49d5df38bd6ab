"""What a failing store does to requests and to the audit trail.

Each test failed before its fix:

* PostgreSQL ending the gateway's idle connections (a restart, ``pg_terminate_backend``):
  the next transaction on each pooled connection failed, and the request with it (500);
  now it runs on a new connection. So does work whose connection ended before COMMIT, or
  during a COMMIT the server rolled back; a commit whose acknowledgement was lost stands.
* A store that fails (down, locked past its busy timeout, closed): an unhandled exception
  and a 500; now 503 ``M_UNKNOWN`` with ``retry_after_ms``, logged without a traceback.
* An audit row whose write failed was lost; now it waits and is written with the next.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import psycopg
import pytest
import trio
from psycopg.conninfo import make_conninfo

from gateway.policy import engine as engine_module
from gateway.policy.api import InviteContext, deny
from gateway.policy.audit import query_decisions
from gateway.policy.engine import PolicyEngine
from gateway.policy.loading import LoadedPolicy, PolicySet, PolicySpec
from gateway.services import open_services
from gateway.store import Dialect, Store, StoreError, Transaction, open_store
from gateway.store._postgres import ATTEMPTS, PostgresStore
from tests.robustness.harness import (
    LOCAL_USER,
    REMOTE_USER,
    gateway_for_hostile_traffic,
    make_samples,
    q,
    robustness_config,
    watching_logs,
)
from tests.support.inprocess_gateway import HS, HS_KEY, REMOTE, REMOTE_KEY, signed_request
from tests.support.remote_server import x_matrix_authorization
from tests.support.stack_fixtures import PG_ADMIN_DSN, postgres_database

T = TypeVar("T")

pytestmark = pytest.mark.postgres


def terminate_backends(dsn: str) -> int:
    database = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return len(rows)


async def _kv_set(store: Store, key: str) -> None:
    await store.kv_set("t", key, "v", expires_ts=None)


async def test_postgres_connections_ended_while_idle_cost_no_transaction() -> None:
    with postgres_database("outage") as dsn:
        store = await PostgresStore.open(dsn)
        try:
            # Fill the pool with several connections, then have the server end them all.
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(_kv_set, store, f"k{i}")
            ended = await trio.to_thread.run_sync(terminate_backends, dsn)
            assert ended >= 1
            for i in range(6):
                await store.kv_set("t", f"after{i}", "v", expires_ts=None)
                assert await store.kv_get("t", f"after{i}", now_ts=0) == "v"
        finally:
            await store.aclose()


async def test_work_whose_connection_ends_before_commit_runs_again_on_a_new_one() -> None:
    with postgres_database("outage") as dsn:
        store = await PostgresStore.open(dsn)
        calls = 0

        def work(tx: Transaction) -> int:
            nonlocal calls
            calls += 1
            tx.execute(
                "INSERT INTO kv (namespace, key, value) VALUES (?, ?, ?)",
                ("t", f"try{calls}", "v"),
            )
            if calls == 1:
                tx.fetch_one("SELECT pg_terminate_backend(pg_backend_pid())")
            return calls

        try:
            assert await store.run_transaction(work) == 2
            # The first try's row went with its connection: the server rolled it back.
            assert await store.kv_get("t", "try1", now_ts=0) is None
            assert await store.kv_get("t", "try2", now_ts=0) == "v"
        finally:
            await store.aclose()


async def test_work_whose_connections_keep_ending_fails_after_the_last_attempt() -> None:
    with postgres_database("outage") as dsn:
        store = await PostgresStore.open(dsn)
        calls = 0

        def work(tx: Transaction) -> None:
            nonlocal calls
            calls += 1
            tx.fetch_one("SELECT pg_terminate_backend(pg_backend_pid())")

        try:
            with pytest.raises(StoreError):
                await store.run_transaction(work)
            assert calls == ATTEMPTS
            assert await store.run_transaction(lambda tx: tx.fetch_one("SELECT 1")) == (1,)
        finally:
            await store.aclose()


#: A deferred constraint trigger runs at COMMIT: this one ends its own connection there the
#: first time (a sequence counts outside transactions), so the client sees its connection
#: break after COMMIT was sent, and the server rolls that transaction back.
COMMIT_KILLER = """
CREATE TABLE commit_killer (id integer);
CREATE SEQUENCE commit_kills;
CREATE FUNCTION end_own_backend() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('commit_kills') = 1 THEN
        PERFORM pg_terminate_backend(pg_backend_pid());
        PERFORM pg_sleep(1);
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER end_at_commit AFTER INSERT ON commit_killer
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION end_own_backend();
"""


def _insert_call(counter: list[int]) -> Callable[[Transaction], int]:
    def work(tx: Transaction) -> int:
        counter.append(len(counter) + 1)
        tx.execute("INSERT INTO commit_killer (id) VALUES (?)", (counter[-1],))
        return counter[-1]

    return work


def _ids(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM commit_killer ORDER BY id")]


async def test_a_transaction_rolled_back_during_commit_runs_again() -> None:
    with postgres_database("outage") as dsn:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(COMMIT_KILLER)
        store = await PostgresStore.open(dsn)
        calls: list[int] = []
        try:
            # The first COMMIT ends its connection; its outcome, looked up, is "aborted".
            assert await store.run_transaction(_insert_call(calls)) == 2
            assert calls == [1, 2]
            assert _ids(dsn) == [2]
        finally:
            await store.aclose()


class _LoseCommitAcknowledgement:
    """A TCP relay to PostgreSQL that hangs up on the client instead of passing on the
    server's answer to a COMMIT: the transaction committed, the client never heard."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                # CommandComplete ('C') carrying the tag COMMIT.
                if answers and b"C\x00\x00\x00\x0bCOMMIT\x00" in data:
                    self.dropped += 1
                    break
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            # shutdown, not only close: it wakes the other pump, blocked in recv on it.
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._listener.close()


async def test_a_commit_whose_acknowledgement_was_lost_stands_and_is_not_repeated() -> None:
    with postgres_database("outage") as dsn:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("CREATE TABLE commit_killer (id integer)")
        store = await PostgresStore.open(dsn)
        relay = _LoseCommitAcknowledgement(("127.0.0.1", 5432))
        relayed = PostgresStore(make_conninfo(dsn, port=relay.port, sslmode="disable"))
        calls: list[int] = []
        try:
            assert await relayed.run_transaction(_insert_call(calls)) == 1
            assert relay.dropped == 1
            assert calls == [1]
            assert _ids(dsn) == [1]
        finally:
            relay.close()
            await relayed.aclose()
            await store.aclose()


async def test_a_failing_store_is_a_503_not_a_500(nursery: trio.Nursery, tmp_path: Path) -> None:
    samples = make_samples(REMOTE, REMOTE_KEY, LOCAL_USER, REMOTE_USER)
    with watching_logs() as watch:
        async with gateway_for_hostile_traffic(nursery, tmp_path, policies=[]) as gateway:
            # The notary records whom it vouched for in the store before the invite goes on.
            assert gateway.services.store is not None
            await gateway.services.store.aclose()
            async with httpx.AsyncClient(base_url=gateway.listening.public_url) as client:
                uri = f"/_matrix/federation/v3/invite/{q(samples.room_id)}"
                answer = await signed_request(client, "PUT", uri, samples.v3_invite)
    assert answer.status_code == 503, answer.text
    assert answer.json()["errcode"] == "M_UNKNOWN"
    assert answer.json()["retry_after_ms"] > 0
    assert [t for t in watch.tracebacks() if "unhandled" in t] == []
    assert any(e.get("event") == "store unavailable" for e in watch.events)


async def test_a_failing_store_costs_the_notary_no_answer(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The notary answers what it has (200), never an error: Synapse backs off a notary that
    # failed once for ten minutes, and would verify no remote server's key meanwhile.
    with watching_logs() as watch:
        async with gateway_for_hostile_traffic(nursery, tmp_path, policies=[]) as gateway:
            notary, store = gateway.services.notary, gateway.services.store
            assert notary is not None and store is not None
            # Whom the notary vouched for is kept in the store.
            await store.aclose()
            uri = f"/_matrix/key/v2/query/{REMOTE}"
            authorization = x_matrix_authorization(
                method="GET",
                uri=uri,
                origin=HS,
                destination=notary.key.server_name,
                signing_key=HS_KEY,
                content=None,
            )
            internal = gateway.listening.internal_url
            async with httpx.AsyncClient(base_url=internal, verify=False) as client:
                answer = await client.get(uri, headers={"Authorization": authorization})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"server_keys": []}
    failed = [e for e in watch.events if e.get("event") == "notary.query_failed"]
    assert [e["server_name"] for e in failed] == [REMOTE]
    assert "store is closed" in failed[0]["error"]
    assert watch.tracebacks() == []


class FailingWhenTold:
    """A store that fails every transaction while ``failing`` is set."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.failing = False

    @property
    def dialect(self) -> Dialect:
        return self.store.dialect

    async def run_transaction(self, work: Callable[[Transaction], T], *, write: bool = True) -> T:
        if self.failing:
            raise StoreError("SQLite: database is locked")
        return await self.store.run_transaction(work, write=write)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def _deny_all(ctx: InviteContext, options: Any) -> Any:
    return deny("no")


def _engine(store: Any) -> PolicyEngine:
    spec = PolicySpec(module="deny_all", name="deny_all")
    loaded = LoadedPolicy(
        spec=spec, module=cast(Any, None), hooks={"invite": _deny_all}, options={}
    )
    return PolicyEngine(PolicySet(policies=(loaded,), generation=1), store=store)


def _ctx(room: str) -> InviteContext:
    return InviteContext(
        event={},
        inviter="@a:remote.test",
        invitee="@b:hs.test",
        origin="remote.test",
        room_id=room,
        room_version="11",
        create_event=None,
        create_event_verified=False,
        creator_servers=(),
        stripped_state_untrusted=(),
        endpoint="v3",
        request_id=room,
    )


async def test_an_audit_row_whose_write_failed_is_written_with_the_next(tmp_path: Path) -> None:
    store = await open_store("sqlite", sqlite_path=str(tmp_path / "audit.db"))
    flaky = FailingWhenTold(store)
    engine = _engine(flaky)
    try:
        flaky.failing = True
        with watching_logs() as watch:
            first = await engine.decide_invite(_ctx("!first:remote.test"))
        assert first.denied  # the decision stands
        assert any(e.get("event") == "policy.audit_write_failed" for e in watch.events)
        assert engine.metrics.audit_rows_waiting._value.get() == 1
        flaky.failing = False
        await engine.decide_invite(_ctx("!second:remote.test"))
        rows = await query_decisions(store)
        assert [r.room_id for r in rows] == ["!first:remote.test", "!second:remote.test"]
        assert engine.metrics.audit_rows_waiting._value.get() == 0
    finally:
        await store.aclose()


async def test_audit_rows_still_waiting_are_written_when_the_worker_stops(
    tmp_path: Path,
) -> None:
    store = await open_store("sqlite", sqlite_path=str(tmp_path / "audit.db"))
    flaky = FailingWhenTold(store)
    engine = _engine(flaky)
    try:
        flaky.failing = True
        await engine.decide_invite(_ctx("!waiting:remote.test"))
        assert engine.metrics.audit_rows_waiting._value.get() == 1
        flaky.failing = False  # the store is back, but no decision comes to write the row
        with trio.CancelScope() as scope:
            scope.cancel()  # a stopping worker is being cancelled: the write still happens
            await engine.aclose()
        assert [r.room_id for r in await query_decisions(store)] == ["!waiting:remote.test"]
        assert engine.metrics.audit_rows_waiting._value.get() == 0
    finally:
        await store.aclose()


async def test_audit_rows_the_store_refuses_to_the_end_are_logged_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "MAX_UNWRITTEN_AUDIT_ROWS", 2)
    store = await open_store("sqlite", sqlite_path=str(tmp_path / "audit.db"))
    flaky = FailingWhenTold(store)
    engine = _engine(flaky)
    try:
        flaky.failing = True
        with watching_logs() as watch:
            for room in ("!one:remote.test", "!two:remote.test", "!three:remote.test"):
                await engine.decide_invite(_ctx(room))
            # Beyond the limit: the oldest row is given up, into the log.
            lost = [e for e in watch.events if e.get("event") == "policy.audit_row_lost"]
            assert [e["row"]["room_id"] for e in lost] == ["!one:remote.test"]
            await engine.aclose()
        lost = [e for e in watch.events if e.get("event") == "policy.audit_row_lost"]
        rows = [e["row"] for e in lost]
        assert [r["room_id"] for r in rows] == [
            f"!{n}:remote.test" for n in ("one", "two", "three")
        ]
        assert all(r["decision"] == "deny" and r["policy"] == "deny_all" for r in rows)
        assert all("database is locked" in e["error"] for e in lost)
        assert engine.metrics.audit_rows_dropped._value.get() == 3
        assert engine.metrics.audit_rows_waiting._value.get() == 0
        assert await query_decisions(store) == []
    finally:
        await store.aclose()


async def test_a_stopping_worker_writes_waiting_audit_rows_before_closing_its_store(
    tmp_path: Path,
) -> None:
    config = robustness_config(tmp_path, "http://127.0.0.1:9")
    async with open_services(config) as services:
        engine = services.policy
        assert engine is not None and services.store is not None
        flaky = FailingWhenTold(services.store)
        engine._store = flaky  # the engine's store fails for one decision
        flaky.failing = True
        # server_rules denies this origin: a deny is always audited.
        denied = dataclasses.replace(_ctx("!at-stop:remote.test"), origin="denied.example")
        assert (await engine.decide_invite(denied)).denied
        flaky.failing = False
    store = await open_store("sqlite", sqlite_path=str(config.store.sqlite_path))
    try:
        assert "!at-stop:remote.test" in [r.room_id for r in await query_decisions(store)]
    finally:
        await store.aclose()
