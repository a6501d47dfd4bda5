"""Fixtures shared by the test modules: a PostgreSQL database of the test's own (skipped with
a message where PostgreSQL is not running, failed instead under FOREWARN_REQUIRE_SERVICES=1,
see tests/pg.py) and a pool on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import pg


@pytest.fixture
def url() -> Iterator[str]:
    yield from pg.database()


@pytest.fixture
def pool(url: str) -> Iterator[object]:
    from forewarn import store_pg

    pool = store_pg.connect(url)
    yield pool
    pool.close()
