"""The commands that keep a workspace: its keys, forgetting a person, purging old data, and the
scale-out workers' dead letters."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import msgspec

from forewarn import settings
from forewarn.cli_args import Commands, add_format, add_store, columns, embedded, env
from forewarn.errors import InputError

if TYPE_CHECKING:
    import psycopg

    from forewarn.store_pg import Pool


def add_keys(commands: Commands) -> None:
    keys = commands.add_parser(
        "keys",
        help="create a write or admin key",
        description="Create a key for a workspace (created if missing); the key is printed once "
        "and only its hash is stored.",
    )
    keys.add_argument(
        "action",
        choices=("create", "vapid", "identity"),
        metavar="ACTION",
        help="create (a write or admin key), vapid (a Web Push key pair, printed as settings) "
        "or identity (the secret that signs the widget's user tokens)",
    )
    add_store(keys)
    keys.add_argument("--kind", choices=("write", "admin"), default="write")
    keys.add_argument("--name", help="a note to recognise the key by")
    keys.set_defaults(run=_keys)


def _keys(args: argparse.Namespace) -> int:
    from forewarn import clock, store_sqlite

    if args.action == "identity":
        from forewarn import widget

        url = env("DATABASE_URL")
        if url:  # the scale-out API processes read it from PostgreSQL
            from forewarn import outreach_pg, store_pg

            pool = store_pg.connect(url, max_size=1)
            try:
                made = store_pg.ensure_workspace(pool, args.workspace, clock.now_ms())
                with pool.connection() as pg:
                    print(outreach_pg.identity_secret(pg, made))
            finally:
                pool.close()
        else:
            conn = store_sqlite.connect(args.db)
            ws = store_sqlite.ensure_workspace(conn, args.workspace, clock.now_ms())
            print(widget.identity_secret(conn, ws))
            conn.close()
        print(
            f"the identity secret of workspace '{args.workspace}': your backend signs each "
            "user's widget token with it (JWT HS256, sub = user id, exp); keep it secret",
            file=sys.stderr,
        )
        return 0
    if args.action == "vapid":
        from forewarn.channel_push import generate_vapid_keys

        private, public = generate_vapid_keys()
        print(f"FOREWARN_VAPID_PRIVATE_KEY={private}")
        print(f"FOREWARN_VAPID_PUBLIC_KEY={public}")
        print("a new Web Push key pair: keep the private key secret", file=sys.stderr)
        return 0

    url = env("DATABASE_URL")
    if url:  # the scale-out mode's keys are in PostgreSQL, as is its audit log
        from forewarn import store_pg

        pool = store_pg.connect(url, max_size=1)
        try:
            ws = store_pg.ensure_workspace(pool, args.workspace, clock.now_ms())
            with pool.connection() as pg:
                token = store_pg.add_key(pg, ws, args.kind, clock.now_ms(), name=args.name or "")
        finally:
            pool.close()
    else:
        conn = store_sqlite.connect(args.db)
        ws = store_sqlite.ensure_workspace(conn, args.workspace, clock.now_ms())
        token = store_sqlite.add_key(conn, ws, args.kind, clock.now_ms(), name=args.name or "")
        conn.close()
    print(token)
    print(
        f"a new {args.kind} key for workspace '{args.workspace}': it is shown only now",
        file=sys.stderr,
    )
    return 0


def add_forget(commands: Commands) -> None:
    forget = commands.add_parser(
        "forget",
        help="remove everything kept about a person and refuse their events from now on",
        description="Remove a person's events, engine state, firings, messages, inbox and "
        "conversations, consent, push subscriptions and outcomes from the SQLite file (from "
        "PostgreSQL when FOREWARN_DATABASE_URL is set), and refuse their future events (only a "
        "hash of the id is kept for that). Works while the server runs. Prints what was "
        "removed, as JSON.",
    )
    forget.add_argument("user", metavar="USER", help="the user id or anonymous id")
    add_store(forget)
    forget.set_defaults(run=_forget)


def _forget(args: argparse.Namespace) -> int:
    from forewarn import clock, privacy

    url = env("DATABASE_URL")
    if url:  # the scale-out mode: the workers rebuild the partitions it held
        import psycopg

        from forewarn import privacy_pg
        from forewarn.store_sqlite import StoreError

        pool, ws = _scale_out(url, args.workspace)
        try:
            done = privacy_pg.forget(pool, ws, args.user, "cli", clock.now_ms())
        except psycopg.Error as exc:
            raise StoreError(
                f"PostgreSQL failed during the forget ({exc}): the person may be refused "
                "already with their data still there; run the same forewarn forget again"
            ) from None
        finally:
            pool.close()
        where = "events"
    else:
        conn, ws = embedded(args, "forget")
        try:
            done = privacy.forget(conn, ws, args.user, "cli", clock.now_ms())
        finally:
            conn.close()
        where = f"events in {done.batches} batches"
    print(msgspec.json.encode({"forgotten": True, **done.to_dict()}).decode())
    print(
        f"forgot {done.events} {where} and everything else kept about that person in "
        f"workspace '{args.workspace}'; their events are refused from now on",
        file=sys.stderr,
    )
    return 0


def _scale_out(url: str, workspace: str) -> tuple[Pool, int]:
    """The PostgreSQL pool (one connection) and the workspace's id."""
    from forewarn import store_pg

    pool = store_pg.connect(url, max_size=1)
    with pool.connection() as conn:
        ws = store_pg.workspace_id(conn, workspace)
    if ws is None:
        pool.close()
        raise InputError(f"no workspace '{workspace}' in PostgreSQL: check --workspace")
    return pool, ws


def add_purge(commands: Commands) -> None:
    purge = commands.add_parser(
        "purge",
        help="delete data older than the retention",
        description="Delete the events, firings, outcomes, finished messages and inbox items "
        "older than the retention, then exit; `serve` does the same every hour when "
        "FOREWARN_RETENTION is set. Prints the rows deleted per table, as JSON.",
    )
    add_store(purge)
    purge.add_argument(
        "--retention",
        default=env("RETENTION"),
        help="how long to keep data, e.g. 400d (at least 8d)",
    )
    purge.set_defaults(run=_purge)


def _purge(args: argparse.Namespace) -> int:
    from forewarn import clock, privacy

    keep_ms = settings.retention_ms(args.retention)
    if not keep_ms:
        raise InputError("no retention: give --retention 400d or set FOREWARN_RETENTION")
    url = env("DATABASE_URL")
    if url:
        import psycopg

        from forewarn import privacy_pg
        from forewarn.store_sqlite import StoreError

        pool, ws = _scale_out(url, args.workspace)
        try:
            now = clock.now_ms()
            found = privacy_pg.purge(pool, ws, now - keep_ms, "cli", now)
        except psycopg.Error as exc:
            raise StoreError(
                f"PostgreSQL failed during the purge ({exc}): what it deleted before stays "
                "deleted; run it again"
            ) from None
        finally:
            pool.close()
        if found is None:
            raise InputError("another process is purging this database now: try again later")
        counts = found
    else:
        conn, ws = embedded(args, "purge")
        try:
            now = clock.now_ms()
            counts = privacy.purge(conn, ws, now - keep_ms, "cli", now)
        finally:
            conn.close()
    print(msgspec.json.encode(counts).decode())
    return 0


def add_dead_letters(commands: Commands) -> None:
    letters = commands.add_parser(
        "dead-letters",
        help="list, replay or discard what the scale-out workers set aside",
        description="The events and partition states the scale-out workers could not apply "
        "and set aside (FOREWARN_DATABASE_URL): list them, queue events again once the cause "
        "is fixed, or discard them. Replays and discards are written to the audit log.",
    )
    letters.add_argument(
        "action",
        choices=("list", "replay", "discard"),
        metavar="ACTION",
        help="list (one line each), replay (queue events again) or discard (forget them)",
    )
    letters.add_argument(
        "ids", nargs="*", type=int, metavar="ID", help="the dead letters to replay or discard"
    )
    letters.add_argument(
        "--all", action="store_true", help="replay or discard every dead letter (of --workspace)"
    )
    letters.add_argument(
        "--workspace", help="this workspace's dead letters only (default: every workspace's)"
    )
    add_format(letters, "table", "jsonl")
    letters.set_defaults(run=_dead_letters, more="ids")


def _dead_letters(args: argparse.Namespace) -> int:
    from forewarn import store_pg

    url = env("DATABASE_URL")
    if not url:
        raise InputError(
            "dead letters exist only in scale-out mode, where the PostgreSQL workers set aside "
            "what they cannot apply; the embedded server has none. Set FOREWARN_DATABASE_URL "
            "to the workers' database"
        )
    if args.action == "list" and (args.ids or args.all):
        raise InputError("list takes no ID and no --all: give --workspace to narrow it")
    if args.action != "list" and bool(args.ids) == args.all:
        raise InputError(f"{args.action}: give the dead letters' IDs (from list), or --all")
    pool = store_pg.connect(url, max_size=1)
    try:
        with pool.connection() as conn:
            names = {int(i): str(n) for i, n in conn.execute("SELECT id, name FROM workspaces")}
            ws = None
            if args.workspace is not None:
                ws = store_pg.workspace_id(conn, args.workspace)
                if ws is None:
                    raise InputError(f"no workspace '{args.workspace}' in PostgreSQL")
            if args.action == "list":
                _list_dead_letters(conn, ws, names, args.format)
            else:
                _settle_dead_letters(conn, ws, names, args)
    finally:
        pool.close()
    return 0


LISTED = 10_000  # dead letters `list` prints at most


def _list_dead_letters(
    conn: psycopg.Connection[Any], ws: int | None, names: dict[int, str], form: str
) -> None:
    from forewarn import dead_letters
    from forewarn.model import format_time

    found = dead_letters.listed(conn, ws, LISTED)
    rows = [
        {
            "workspace": names.get(d.workspace, str(d.workspace)),
            "id": d.id,
            "kind": "event" if d.event is not None else "state",
            "partition": d.part,
            "event": d.event,
            "error": d.error,
            "at": format_time(d.at_ms),
        }
        for d in found
    ]
    if form == "jsonl":
        for row in rows:
            print(msgspec.json.encode(row).decode())
    elif rows:
        head = ("workspace", "id", "kind", "partition", "event", "error", "at")
        cells = [
            tuple(
                "-" if r[k] is None else str(r[k]).splitlines()[0] if k == "error" else str(r[k])
                for k in head
            )
            for r in rows
        ]
        print("\n".join(columns([head, *cells])))
    waiting = sum(n for w, n in dead_letters.count(conn).items() if ws is None or w == ws)
    if waiting > len(found):
        print(f"the first {len(found)} of {waiting} dead letters", file=sys.stderr)
    elif not found:
        print("no dead letters", file=sys.stderr)


def _settle_dead_letters(
    conn: psycopg.Connection[Any], ws: int | None, names: dict[int, str], args: argparse.Namespace
) -> None:
    """Replay or discard the dead letters named (or all), in one transaction with an audit
    row per workspace; nothing is done when an ID names no dead letter."""
    from forewarn import audit_pg, clock, dead_letters

    replay = args.action == "replay"
    where = f" in workspace '{args.workspace}'" if ws is not None else ""
    with conn.transaction():
        found = dead_letters.listed(conn, ws, None, args.ids or None)
        missing = sorted(set(args.ids) - {d.id for d in found})
        if missing:
            raise InputError(
                f"no dead letter {', '.join(map(str, missing))}{where}: "
                "`forewarn dead-letters list` shows those there are (none was "
                f"{'replayed' if replay else 'discarded'})"
            )
        states = [d.id for d in found if d.event is None]
        if replay and states and args.ids:
            raise InputError(
                f"dead letter {', '.join(map(str, states))} is a partition's state, which is "
                "never replayed (the partition started afresh): discard it"
            )
        chosen = [d for d in found if not (replay and d.event is None)]
        done: list[int] = []
        now = clock.now_ms()
        for w in sorted({d.workspace for d in chosen}):
            ids = [d.id for d in chosen if d.workspace == w]
            act = dead_letters.replay if replay else dead_letters.discard
            n = act(conn, w, ids)
            left = {d.id for d in dead_letters.listed(conn, w, None, ids)}
            settled = [i for i in ids if i not in left]
            done.extend(settled)
            action = "dead_letter.replayed" if replay else "dead_letter.discarded"
            target = "all" if args.all else ",".join(map(str, ids))
            audit_pg.record(conn, w, "cli", action, target, now, {"ids": settled, "count": n})
    verb = "replayed" if replay else "discarded"
    print(msgspec.json.encode({verb: len(done), "ids": done}).decode())
    note = f"{verb} {len(done)} dead letter(s){where}"
    if replay:
        note += ": their events are queued again, for the workers to apply as late events"
    print(note, file=sys.stderr)
    stuck = [d.id for d in chosen if d.id not in done]
    if stuck:
        print(
            f"dead letter {', '.join(map(str, stuck))} not {verb}: its event is no longer in "
            "the log (a forget removed it); discard it",
            file=sys.stderr,
        )
    if replay and states:
        print(
            f"{len(states)} partition state(s) set aside are not replayed: discard them",
            file=sys.stderr,
        )
