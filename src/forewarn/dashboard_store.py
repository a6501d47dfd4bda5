"""How the dashboard speaks to its store, SQLite (embedded) or PostgreSQL (scale-out): its
pages are written once, over a connection to either. Edge.

- Statements are written once, with SQLite's `?` placeholders; `execute` runs them on a
  PostgreSQL connection through `schema.placeholders`. A statement that differs per store
  is looked up by `dialect` (as `audit.SQL[dialect]`).
- What another module does in a store (`store_outbox`, `report`, `store_sqlite`), and what
  the embedded engine answers (`dashboard_pages.engine_*`), is called through `call`: the
  function itself on SQLite, its twin on PostgreSQL (`dashboard_pg.TWINS`, which holds
  `outreach_pg`'s).
- `transaction` is a write transaction that another one doing the same cannot interleave with:
  SQLite's `BEGIN IMMEDIATE`, or a PostgreSQL transaction holding an advisory lock.

The routes run their work through a `run(fn, *args)`, as `api_outreach.routes` do: its
`sqlite_run`, or `dashboard_pg.runner` over a pool.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

from forewarn import store_sqlite
from forewarn.schema import placeholders


def dialect(conn: Any) -> str:
    """`sqlite` or `postgresql`: the store `conn` is a connection to."""
    return "sqlite" if isinstance(conn, sqlite3.Connection) else "postgresql"


@lru_cache(maxsize=256)
def _postgresql(sql: str) -> str:
    return placeholders(sql)


def execute(conn: Any, sql: str, args: Any = ()) -> Any:
    """`sql` (written with `?`) run on either store; its cursor."""
    if isinstance(conn, sqlite3.Connection):
        return conn.execute(sql, args)
    return conn.execute(_postgresql(sql), args)


def call(fn: Callable[..., Any], conn: Any, *args: Any) -> Any:
    """`fn(conn, *args)`: on PostgreSQL, its twin there (a function the dashboard writes for
    both stores is its own twin)."""
    if isinstance(conn, sqlite3.Connection):
        return fn(conn, *args)
    from forewarn import dashboard_pg

    twin = dashboard_pg.TWINS.get(fn)
    if twin is None:
        if not fn.__module__.startswith("forewarn.dashboard"):  # a bug, not the caller's error
            raise RuntimeError(f"{fn.__qualname__} has no PostgreSQL twin in dashboard_pg")
        twin = fn
    return twin(conn, *args)


@contextlib.contextmanager
def transaction(conn: Any, workspace: int, name: str) -> Iterator[None]:
    """A write transaction; two of the same `name` in a workspace run one after the other
    (on PostgreSQL under an advisory lock, since its reads do not wait for writers)."""
    if isinstance(conn, sqlite3.Connection):
        with store_sqlite.transaction(conn):
            yield
        return
    from forewarn import store_pg

    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (store_pg.lock_key(workspace, name),))
        yield
