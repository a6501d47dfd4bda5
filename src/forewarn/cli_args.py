"""What the command modules share: the parsing of option values, and opening the database a
command is pointed at."""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TypeAlias

from forewarn import settings
from forewarn.errors import InputError
from forewarn.model import parse_time_ms

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def env(name: str) -> str | None:
    """The FOREWARN_* setting `name`; a function of its own because commands name a local
    `settings`."""
    return settings.env(name)


def until_arg(text: str | None) -> int | None:
    """--until as milliseconds, or None."""
    if not text:
        return None
    try:
        return parse_time_ms(text)
    except ValueError:
        raise InputError(
            f"--until {text!r} is not an ISO 8601 time, e.g. 2026-11-23T00:00:00Z"
        ) from None


def duration_arg(option: str, text: str) -> int:
    """A duration option, e.g. --since 30d, as milliseconds."""
    from forewarn.playbook import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise InputError(f"{option}: {exc}") from None


def count_arg(text: str) -> int:
    """An argument type: a whole number of 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return value


@contextlib.contextmanager
def workspace_db(db: str, workspace: str) -> Iterator[tuple[sqlite3.Connection, int]]:
    """The server's database and the workspace's id in it, for commands that read them."""
    from forewarn import store_sqlite

    if not Path(db).exists():
        raise InputError(f"no database {db}: give the server's --db")
    conn = store_sqlite.connect(db)
    try:
        ws = store_sqlite.workspace_id(conn, workspace)
        if ws is None:
            raise InputError(f"no workspace '{workspace}' in {db}")
        yield conn, ws
    finally:
        conn.close()


def embedded(args: argparse.Namespace, what: str) -> tuple[sqlite3.Connection, int]:
    """The SQLite file's connection and the workspace's id, for the embedded-only commands."""
    from forewarn import store_sqlite

    if env("DATABASE_URL"):
        raise InputError(
            f"{what} works on the embedded SQLite store only: unset FOREWARN_DATABASE_URL "
            "(the scale-out mode does not support it yet)"
        )
    conn = store_sqlite.connect(args.db)
    ws = store_sqlite.workspace_id(conn, args.workspace)
    if ws is None:
        conn.close()
        raise InputError(f"no workspace '{args.workspace}' in {args.db}: check --workspace")
    return conn, ws
