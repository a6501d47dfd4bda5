"""What the command modules share: the options several commands take, written once; the parsing
of option values; and opening the database a command is pointed at."""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeAlias

from forewarn import settings
from forewarn.errors import InputError
from forewarn.model import parse_time_ms

PLAYBOOKS_HELP = "a playbook file or folder"

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def env(name: str) -> str | None:
    """The FOREWARN_* setting `name`; a function of its own because commands name a local
    `settings`."""
    return settings.env(name)


def add_playbooks(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """--playbooks: required by the offline commands, FOREWARN_PLAYBOOKS by default for those of
    the server."""
    if required:
        parser.add_argument("--playbooks", required=True, help=PLAYBOOKS_HELP)
    else:
        parser.add_argument("--playbooks", default=env("PLAYBOOKS"), help=PLAYBOOKS_HELP)


def add_db(parser: argparse.ArgumentParser, note: str | None = None) -> None:
    """--db, FOREWARN_DB by default."""
    parser.add_argument(
        "--db", default=env("DB"), help="the SQLite file" + (f", {note}" if note else "")
    )


def add_workspace(parser: argparse.ArgumentParser, note: str | None = None) -> None:
    """--workspace, FOREWARN_WORKSPACE by default."""
    parser.add_argument("--workspace", default=env("WORKSPACE"), help=note)


def add_store(parser: argparse.ArgumentParser, note: str | None = None) -> None:
    """--db and --workspace, for the commands that read or change one workspace's data."""
    add_db(parser, note)
    add_workspace(parser, note)


def add_address(parser: argparse.ArgumentParser) -> None:
    """--host and --port of a server, FOREWARN_HOST and FOREWARN_PORT by default."""
    parser.add_argument("--host", default=env("HOST"))
    parser.add_argument("--port", type=int, default=env("PORT"))


def add_format(parser: argparse.ArgumentParser, *choices: str) -> None:
    """--format, the first choice by default."""
    parser.add_argument("--format", choices=choices, default=choices[0])


def columns(lines: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells (a header first) as text lines, each column as wide as its widest cell."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]


def time_arg(option: str, text: str | None) -> int | None:
    """A time option, e.g. --until, as milliseconds; None when it is not given."""
    if not text:
        return None
    try:
        return parse_time_ms(text)
    except ValueError:
        raise InputError(
            f"{option} {text!r} is not an ISO 8601 time, e.g. 2026-11-23T00:00:00Z"
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
