"""Fixtures for the policy tests: stores on both backends (from the store tests), and a way
to write policy modules to files."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

# The store fixtures: SQLite in a temporary file and a real PostgreSQL database (the tests
# fail when PostgreSQL cannot be reached).
from tests.unit.store.conftest import (  # noqa: F401
    clean_postgres,
    postgres_dsn,
    store,
    store_config,
)


@pytest.fixture
def write_policy(tmp_path: Path) -> Callable[[str, str], Path]:
    """``write_policy(name, source)`` writes ``name.py`` and returns its path."""

    def write(name: str, source: str) -> Path:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source), encoding="utf8")
        return path

    return write
