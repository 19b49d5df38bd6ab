"""Versioned schema migrations, applied in order when a store is opened.

To add tables, append a :class:`Migration` with the next version number to
:data:`MIGRATIONS`. Never edit a migration that has shipped: databases that already ran it
will not run it again. Write portable SQL (``TEXT``, ``BIGINT``, ``INTEGER``) when you can;
give ``postgres_statements`` when PostgreSQL needs different text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    #: Statements for SQLite, and for PostgreSQL unless ``postgres_statements`` is given.
    statements: tuple[str, ...]
    postgres_statements: tuple[str, ...] | None = None

    def statements_for(self, dialect: str) -> tuple[str, ...]:
        if dialect == "postgres" and self.postgres_statements is not None:
            return self.postgres_statements
        return self.statements


def _policy_tables(id_column: str) -> tuple[str, ...]:
    """Migration 2's tables; the backends differ only in how the audit row id is made."""
    return (
        f"""
        CREATE TABLE policy_audit (
            id {id_column},
            ts BIGINT NOT NULL,
            point TEXT NOT NULL,
            origin TEXT NOT NULL,
            room_id TEXT NOT NULL,
            sender TEXT NOT NULL,
            target TEXT,
            policy TEXT NOT NULL,
            decision TEXT NOT NULL,
            reason TEXT NOT NULL,
            errcode TEXT,
            status INTEGER,
            request_id TEXT NOT NULL,
            mode TEXT NOT NULL
        )
        """,
        "CREATE INDEX policy_audit_ts ON policy_audit (ts)",
        """
        CREATE TABLE policy_rate_limits (
            bucket TEXT PRIMARY KEY,
            tokens DOUBLE PRECISION NOT NULL,
            updated_ts BIGINT NOT NULL,
            full_ts BIGINT NOT NULL
        )
        """,
        "CREATE INDEX policy_rate_limits_full_ts ON policy_rate_limits (full_ts)",
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        description="cached server keys; key-value entries with expiry",
        statements=(
            """
            CREATE TABLE server_keys (
                server_name TEXT NOT NULL,
                key_id TEXT NOT NULL,
                verify_key TEXT NOT NULL,
                valid_until_ts BIGINT NOT NULL,
                expired_ts BIGINT,
                fetched_ts BIGINT NOT NULL,
                source TEXT NOT NULL,
                key_json TEXT NOT NULL,
                PRIMARY KEY (server_name, key_id)
            )
            """,
            """
            CREATE TABLE kv (
                namespace TEXT NOT NULL,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                expires_ts BIGINT,
                PRIMARY KEY (namespace, key)
            )
            """,
            "CREATE INDEX kv_expires_ts ON kv (expires_ts)",
        ),
    ),
    Migration(
        version=2,
        description="policy decisions audit log; policy rate-limit token buckets",
        statements=_policy_tables("INTEGER PRIMARY KEY AUTOINCREMENT"),
        postgres_statements=_policy_tables("BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
    ),
)


def check_migrations(migrations: tuple[Migration, ...]) -> None:
    """Versions must be 1, 2, 3, ... in order; a gap means a lost or misnumbered migration."""
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise ValueError(
                f"migration {migration.description!r} has version {migration.version},"
                f" expected {expected}"
            )


check_migrations(MIGRATIONS)
