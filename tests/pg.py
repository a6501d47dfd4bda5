"""A PostgreSQL database of its own for a test: created with a unique name on the server at
FOREWARN_TEST_PG (default: localhost, as this machine's CI runs it) and dropped afterwards.
Tests skip when no server answers, and fail instead under FOREWARN_REQUIRE_SERVICES=1."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

SERVER = os.environ.get("FOREWARN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(SERVER, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        missing = f"PostgreSQL is not reachable at {SERVER} ({exc}); set FOREWARN_TEST_PG"
        if os.environ.get("FOREWARN_REQUIRE_SERVICES") == "1":
            pytest.fail(missing + " (FOREWARN_REQUIRE_SERVICES=1)")
        pytest.skip(missing)


def database() -> Iterator[str]:
    """The URL of a new, empty database; dropped when the generator closes."""
    name = "forewarn_test_" + uuid.uuid4().hex[:12]
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = SERVER.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        with _admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
