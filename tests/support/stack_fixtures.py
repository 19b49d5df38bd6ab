"""Fixtures for tests that need a real Synapse with the gateway in front.

The fixtures are synchronous (pytest-trio has no session-scoped async fixtures): the two
servers run as child processes and tests talk to them with httpx. If Synapse or the gateway
cannot start, every test that uses them errors with the tail of their logs; nothing is
skipped.

Fixtures (all session-scoped unless noted):

- ``stack_processes``: ``gateway.demo.stack.StackProcesses``, the running Synapse and gateway
  (``.stack``, ``.synapse``, ``.gateway`` with ``.logs()``).
- ``stack``: ``gateway.demo.stack.Stack``: ``server_name``, ``gateway_url``, ``internal_url``,
  ``homeserver_url``, ``registration_shared_secret``, ``gateway_config_path``, ``synapse``
  (``SynapseConfig``: ``config_path``, ``signing_key_path``, ``log_path``).
- ``server_name``, ``gateway_url``, ``homeserver_url``: the strings above.
- ``register_user(localpart=None, *, password=None, admin=False) -> RegisteredUser``:
  registers straight at Synapse with the shared secret; a fresh localpart when none is given.
- ``login(user) -> str``: a password login through the gateway; returns the access token.
- ``gateway_client``, ``homeserver_client`` (per test): ``httpx.Client`` with the base URL.
- ``remote_server``: ``tests.support.remote_server.RemoteServer``, a homeserver named
  ``localhost:PORT`` with its own key, serving it over TLS; it signs requests with X-Matrix.
- ``store_backend``: ``"sqlite"`` or ``"postgres"``, the store of the stack's gateway. A module
  marked ``pytest.mark.both_stores`` runs once per backend (the PostgreSQL server on
  127.0.0.1:5432, a fresh database per stack); others run on SQLite only.
  ``store_config(store_backend, name)`` gives the ``[store]`` table for stacks of a module's own.
"""

from __future__ import annotations

import itertools
import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from gateway.demo.stack import Stack, StackProcesses, prepare_stack
from gateway.demo.synapse import RegisteredUser, free_port
from gateway.demo.synapse import register_user as register
from tests.support.remote_server import RemoteServer

# Every request a test makes has a bound; Synapse on a busy 2-core machine can be slow.
TIMEOUT = httpx.Timeout(30.0)


STORE_BACKENDS = ("sqlite", "postgres")
PG_ADMIN_DSN = os.environ.get(
    "GATEWAY_TEST_POSTGRES_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_stores: run the module's stack tests on SQLite and on PostgreSQL"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Every test that reaches a stack is parametrized, the SQLite-only ones too, so a
    # session keeps one stack per backend instead of restarting it between modules.
    if "store_backend" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("both_stores") is not None
        metafunc.parametrize(
            "store_backend",
            STORE_BACKENDS if both else STORE_BACKENDS[:1],
            indirect=True,
            scope="session",
        )


@pytest.fixture(scope="session")
def store_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@contextmanager
def postgres_database(label: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for one stack; dropped afterwards. Fails loudly when
    the server does not answer: a silently skipped backend would hide regressions."""
    name = f"gateway_it_{label}_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL is required for the integration tests ({PG_ADMIN_DSN}): {e}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(PG_ADMIN_DSN, dbname=name)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def store_config(backend: str, label: str) -> Iterator[dict[str, Any]]:
    """The ``[store]`` table of a stack on ``backend``."""
    if backend == "sqlite":
        yield {"backend": "sqlite", "sqlite_path": "gateway.db", "postgres_dsn": ""}
        return
    with postgres_database(label) as dsn:
        yield {"backend": "postgres", "postgres_dsn": dsn}


@pytest.fixture(scope="session")
def stack_processes(
    tmp_path_factory: pytest.TempPathFactory, store_backend: str
) -> Iterator[StackProcesses]:
    data_dir = tmp_path_factory.mktemp(f"stack-{store_backend}")
    with store_config(store_backend, "stack") as store:
        stack = prepare_stack(
            data_dir, port=free_port(), log_format="json", user_config={"store": store}
        )
        processes = StackProcesses(stack)
        processes.start()
        try:
            yield processes
        finally:
            processes.stop()


@pytest.fixture(scope="session")
def stack(stack_processes: StackProcesses) -> Stack:
    return stack_processes.stack


@pytest.fixture(scope="session")
def server_name(stack: Stack) -> str:
    return stack.server_name


@pytest.fixture(scope="session")
def gateway_url(stack: Stack) -> str:
    return stack.gateway_url


@pytest.fixture(scope="session")
def homeserver_url(stack: Stack) -> str:
    return stack.homeserver_url


@pytest.fixture
def gateway_client(gateway_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
def homeserver_client(homeserver_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=homeserver_url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="session")
def register_user(stack: Stack) -> Callable[..., RegisteredUser]:
    counter = itertools.count(1)

    def register_user(
        localpart: str | None = None, *, password: str | None = None, admin: bool = False
    ) -> RegisteredUser:
        return register(
            stack.homeserver_url,
            stack.registration_shared_secret,
            localpart or f"user{next(counter)}-{secrets.token_hex(3)}",
            password or secrets.token_urlsafe(12),
            admin=admin,
        )

    return register_user


@pytest.fixture(scope="session")
def login(stack: Stack) -> Callable[[RegisteredUser], str]:
    def login(user: RegisteredUser) -> str:
        response = httpx.post(
            f"{stack.gateway_url}/_matrix/client/v3/login",
            json={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user.localpart},
                "password": user.password,
            },
            timeout=TIMEOUT,
        )
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    return login


@pytest.fixture(scope="session")
def remote_server() -> Iterator[RemoteServer]:
    with RemoteServer() as server:
        yield server
