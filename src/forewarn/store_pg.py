"""The scale-out store: PostgreSQL, through a pool of connections (psycopg 3).

Selected by `FOREWARN_DATABASE_URL=postgresql://…`. It has the tables of the embedded store
(one schema definition, `schema`) and three of its own:

- `events`: the log, one row per accepted event (its fields as the engine reads them, and its
  normalised message), with a unique index on (workspace, 64-bit hash of its message id): a
  client resending a batch adds nothing, whichever API process it reaches. A request is
  acknowledged only once its transaction has committed.
- `queue`: the events not yet applied, each under its partition: `account:ID` for an event
  attributed to an account (its `context.groupId`, or the account a `group` call joins),
  `user:ID` for one without. Workers claim a partition with the database's locks (`worker`).
- `parts`: each partition's engine and policy state, and when its earliest timer is due.

Every process opens its own pool with `connect`.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg
from psycopg_pool import ConnectionPool

from forewarn import audit_pg, schema, settings
from forewarn.errors import InputError
from forewarn.forgotten import Forgotten, people_of, subject_hash
from forewarn.model import Event, event_from_dict
from forewarn.store_sqlite import (
    ENV_KEY_NAME,
    EVENTS_FORMAT_PLAIN,
    FIRING_COLUMNS,
    KEY_KINDS,
    Append,
    Appended,
    FiringRow,
    Key,
    StoreError,
    hash_key,
    id_hash,
    new_key_token,
)

MIGRATE_LOCK = 0x666F72657761726E  # "forewarn": one process migrates at a time
_pack = msgspec.msgpack.Encoder().encode
_json = msgspec.json.Encoder().encode


def is_url(text: str | None) -> bool:
    return bool(text) and str(text).startswith(("postgresql://", "postgres://"))


def connect(
    url: str,
    min_size: int = 1,
    max_size: int = 8,
    timeout_s: float = 10.0,
    wait_s: float | None = None,
) -> Pool:
    """A pool of connections to `url`, the schema migrated. A server that cannot be reached
    is a StoreError saying so. `wait_s` (default `timeout_s`): how long a caller waits for a
    connection later on, before the pool gives up (an API process answers 503 then)."""
    if not is_url(url):
        raise InputError(
            f"FOREWARN_DATABASE_URL must be a postgresql:// URL, not {url!r}: "
            "e.g. postgresql://forewarn@db.internal/forewarn"
        )
    extra = session_parameters(url)
    pool = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        open=False,
        timeout=timeout_s if wait_s is None else wait_s,
        kwargs={"autocommit": True, **extra},
        name="forewarn",
    )
    try:
        pool.open(wait=True, timeout=timeout_s)
    except Exception as exc:  # the pool reports any failure to connect as its own timeout
        pool.close()
        _refused_options(url, extra)
        raise StoreError(
            f"cannot connect to PostgreSQL at {_redact(url)}: {exc}; check that it runs and "
            "that FOREWARN_DATABASE_URL names a database this user may use"
        ) from None
    migrate(pool)
    return pool


Pool = ConnectionPool[psycopg.Connection[tuple[Any, ...]]]


def _refused_options(url: str, extra: dict[str, Any]) -> None:
    """A StoreError saying what to do when the server (a PgBouncer, say) refuses the timeouts
    Forewarn sets on connecting: the pool's own timeout hides the server's reason, so ask once
    more, directly."""
    if "options" not in extra:
        return
    try:
        psycopg.connect(url, connect_timeout=2, **extra).close()
    except psycopg.Error as exc:
        if "startup parameter" in str(exc):
            raise StoreError(
                f"PostgreSQL at {_redact(url)} (a PgBouncer?) refuses the timeouts Forewarn "
                f"sets on connecting ({exc}); set FOREWARN_PG_STATEMENT_TIMEOUT=off and set "
                "statement_timeout and idle_in_transaction_session_timeout on the database "
                "role instead (docs/deploy.md)"
            ) from None


def session_parameters(url: str) -> dict[str, Any]:
    """Connection parameters Forewarn adds to those of the URL (which win): TCP keepalives, so
    that a connection to a server gone silent (a failover, a dropped route) is noticed within
    about a minute instead of the operating system's two hours, and a server-side
    `statement_timeout` (`FOREWARN_PG_STATEMENT_TIMEOUT`), with twice it for
    `idle_in_transaction_session_timeout`, so that a hung process releases its locks."""
    given = psycopg.conninfo.conninfo_to_dict(url)
    extra: dict[str, Any] = {}
    keepalive_s = settings.pg_keepalive_s()
    if keepalive_s and "keepalives" not in given and "keepalives_idle" not in given:
        extra |= {
            "keepalives": 1,
            "keepalives_idle": keepalive_s,
            "keepalives_interval": max(1, keepalive_s // 3),
            "keepalives_count": 3,
        }
    timeout_ms = settings.pg_statement_timeout_ms()
    if timeout_ms and "options" not in given and not os.environ.get("PGOPTIONS"):
        extra["options"] = (
            f"-c statement_timeout={timeout_ms}"
            f" -c idle_in_transaction_session_timeout={2 * timeout_ms}"
        )
    return extra


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    info.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in info.items()) or url


def version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT to_regclass('schema_version')").fetchone()
    if row is None or row[0] is None:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0) if row else 0


def migrate(pool: Pool) -> int:
    """Apply the migrations the database lacks, in one transaction, one process at a time;
    returns the version."""
    with pool.connection() as conn, conn.transaction():
        # a migration may rewrite large tables, and waits for another process's
        conn.execute("SET LOCAL statement_timeout = 0")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        found = version(conn)
        if found > schema.VERSION:
            raise StoreError(
                f"the database is at schema version {found}, newer than this Forewarn "
                f"({schema.VERSION}): upgrade Forewarn"
            )
        if found == schema.VERSION:
            return found
        if found == 0:
            conn.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (0)")
        for step in range(found + 1, schema.VERSION + 1):
            for statement in schema.statements(step, "postgresql"):
                conn.execute(statement.encode())  # (a literal %: not a placeholder)
        conn.execute("UPDATE schema_version SET version = %s", (schema.VERSION,))
    return schema.VERSION


# --- workspaces and keys ------------------------------------------------------------------


def workspace_id(conn: psycopg.Connection[Any], name: str) -> int | None:
    row = conn.execute("SELECT id FROM workspaces WHERE name = %s", (name,)).fetchone()
    return int(row[0]) if row else None


def find_key(conn: psycopg.Connection[Any], token: str) -> Key | None:
    row = conn.execute(
        "SELECT workspace, kind, prefix FROM keys WHERE hash = %s AND revoked_ms IS NULL",
        (hash_key(token),),
    ).fetchone()
    return Key(int(row[0]), str(row[1]), str(row[2])) if row else None


def add_key(
    conn: psycopg.Connection[Any],
    workspace: int,
    kind: str,
    now_ms: int,
    token: str | None = None,
    name: str = "",
    actor: str = "cli",
) -> str:
    """Store a key (a new random one unless `token` is given); returns the token. The audit
    log records who (`actor`) created it, in the same transaction."""
    if kind not in KEY_KINDS:
        raise InputError(f"unknown key kind '{kind}': use one of {', '.join(KEY_KINDS)}")
    token = token or new_key_token(kind)
    if len(token) < 16:
        raise InputError("a key must be at least 16 characters long: use a random one")
    try:
        with conn.transaction():
            conn.execute(
                "INSERT INTO keys (workspace, kind, prefix, hash, name, created_ms)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (workspace, kind, token[:10], hash_key(token), name, now_ms),
            )
            detail = {"kind": kind, "name": name}
            audit_pg.record(conn, workspace, actor, "key.created", token[:10], now_ms, detail)
    except psycopg.errors.UniqueViolation:
        raise InputError("that key is in use already: create a new one") from None
    return token


def ensure_workspace(
    pool: Pool,
    name: str,
    now_ms: int,
    write_key: str | None = None,
    admin_key: str | None = None,
) -> int:
    """The workspace called `name`, created if missing, with the given keys added unless
    known; many processes may start at once, so it runs under a lock of its own."""
    with pool.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        ws = workspace_id(conn, name)
        if ws is None:
            row = conn.execute(
                "INSERT INTO workspaces (name, created_ms) VALUES (%s, %s) RETURNING id",
                (name, now_ms),
            ).fetchone()
            assert row is not None
            ws = int(row[0])
        for kind, token in (("write", write_key), ("admin", admin_key)):
            if token:
                known = find_key(conn, token)
                if known is None:
                    add_key(conn, ws, kind, now_ms, token, ENV_KEY_NAME, "environment")
                elif known.kind != kind or known.workspace != ws:
                    raise InputError(
                        f"the {kind} key from the environment is already a {known.kind} key "
                        "of another workspace: give each key one use"
                    )
    return ws


# --- the event log and its queue ----------------------------------------------------------


def person(event: Event) -> str:
    return event.user_id or event.anonymous_id or ""


def partition(event: Event, homes: dict[str, str]) -> str:
    """The partition an event is applied in: its account's; for one without, its user's
    home account's (`homes`, by user), else its user's own."""
    if event.account_id is not None:
        return "account:" + event.account_id
    who = person(event)
    home = homes.get(who)
    return "account:" + home if home is not None else "user:" + who


def lock_key(workspace: int, part: str) -> int:
    """The 64-bit advisory lock key of a partition (the same in every process)."""
    digest = hashlib.blake2b(f"{workspace}\x1f{part}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_APPEND = """
WITH rows AS (
    SELECT * FROM unnest(%(hash)b::bigint[], %(part)b::text[], %(event)b::bytea[],
                         %(message)b::bytea[], %(person)b::text[])
                  WITH ORDINALITY AS r(hash, part, event, message, person, n)
), stored AS (
    INSERT INTO events (workspace, hash, part, received_ms, source, event, message, person)
    SELECT %(workspace)s, hash, part, %(received_ms)s, %(source)s, event, message, person
    FROM rows ORDER BY n
    ON CONFLICT (workspace, hash) DO NOTHING
    RETURNING id, part, hash
), queued AS (
    INSERT INTO queue (id, workspace, part) SELECT id, %(workspace)s, part FROM stored
)
SELECT hash, id FROM stored
"""


def append_batches(pool: Pool, appends: Sequence[Append]) -> list[Appended]:
    """Store several requests in one transaction; a message id already stored in its
    workspace, by any process, or earlier in the same request, is not stored again."""
    results: list[Appended] = []
    learnt: dict[int, dict[str, str]] = {}
    with pool.connection() as conn, conn.transaction():
        db = _database(conn)
        forgotten = _forgotten_in(conn, db, sorted({a.workspace for a in appends}))
        for a in appends:
            results.append(_append(conn, a, learnt.setdefault(a.workspace, {}), forgotten))
    if len(_HOMES) > _HOMES_MAX or time.monotonic() - _HOMES_SINCE[0] > HOMES_FOR_S:
        _HOMES.clear()
        _HOMES_SINCE[0] = time.monotonic()
    for workspace, homes in learnt.items():  # committed: now they are known
        _HOMES.update(((db, workspace, p), a) for p, a in homes.items())
    return results


def _append(
    conn: psycopg.Connection[Any], a: Append, learnt: dict[str, str], forgotten: Forgotten
) -> Appended:
    events = a.events if a.events is not None else [event_from_dict(m) for m in a.messages]
    hashes: list[int] = []
    order: list[int] = []  # indexes of the messages offered, each id once
    offered: set[int] = set()
    duplicates: list[int] = []
    refused: list[int] = []
    check = bool(forgotten.hashes.get(a.workspace))
    for i, mid in enumerate(a.ids):
        if check and forgotten.holds(a.workspace, a.messages[i]):
            refused.append(i)  # before deduplication, as on SQLite
            continue
        h = id_hash(a.workspace, mid)
        if h in offered:
            duplicates.append(i)
            continue
        offered.add(h)
        hashes.append(h)
        order.append(i)
    homes = _homes(conn, a.workspace, [events[i] for i in order], learnt)
    rows = conn.execute(
        _APPEND,
        {
            "hash": hashes,
            "part": [partition(events[i], homes) for i in order],
            "event": [
                EVENTS_FORMAT_PLAIN + _pack(msgspec.structs.astuple(events[i])) for i in order
            ],
            "message": [_json(a.messages[i]) for i in order],
            "person": [person(events[i]) or None for i in order],
            "workspace": a.workspace,
            "received_ms": a.received_ms,
            "source": a.source,
        },
    ).fetchall()
    stored = {int(h): int(i) for h, i in rows}
    kept = [i for h, i in zip(hashes, order, strict=True) if h in stored]
    duplicates = sorted(
        duplicates + [i for h, i in zip(hashes, order, strict=True) if h not in stored]
    )
    if not kept:
        return Appended(None, 0, duplicates, forgotten=refused)
    partial = duplicates or refused
    return Appended(max(stored.values()), len(kept), duplicates, kept if partial else None, refused)


# Each append takes this workspace lock shared, and a forget takes it exclusive while it
# records a person (privacy_pg): an append either commits before the forget's statements run,
# or reads the person's hash after it committed.
def forget_lock(workspace: int) -> int:
    return lock_key(workspace, "forget")


_LOCK_SHARED = """
SELECT pg_advisory_xact_lock_shared(key) FROM (
    SELECT key FROM unnest(%s::bigint[]) WITH ORDINALITY AS k(key, n) ORDER BY n
) ordered
"""
_MARKS = """
SELECT w, (SELECT coalesce(max(id), 0) FROM forgotten WHERE workspace = w)
FROM unnest(%s::bigint[]) AS w
"""


class _Known:
    """The forgotten hashes this process has read, per workspace, and the mark (the newest
    row's id) they were read at: each append compares the marks, one index lookup per
    workspace, and reads a workspace's hashes again only when its mark moved."""

    def __init__(self) -> None:
        self.people = Forgotten()
        self.marks: dict[int, int] = {}
        self.lock = threading.Lock()


_FORGOTTEN: dict[str, _Known] = {}  # by database


def _forgotten_in(conn: psycopg.Connection[Any], db: str, workspaces: list[int]) -> Forgotten:
    """The forgotten people of these workspaces, as of this transaction: the lock first, in a
    statement of its own, so that the marks are read after any forget holding it committed."""
    conn.execute(_LOCK_SHARED, ([forget_lock(w) for w in workspaces],))
    known = _FORGOTTEN.setdefault(db, _Known())
    with known.lock:
        for w, mark in conn.execute(_MARKS, (workspaces,)).fetchall():
            if known.marks.get(int(w), 0) != int(mark):
                rows = conn.execute("SELECT hash FROM forgotten WHERE workspace = %s", (w,))
                known.people.load(int(w), {str(h) for (h,) in rows})
                known.marks[int(w)] = int(mark)
    return known.people


def _forgotten_among(
    conn: psycopg.Connection[Any], workspace: int, messages: Sequence[dict[str, Any]]
) -> Forgotten:
    """The forgotten hashes these messages' people have: a lookup per id, for the few events
    Forewarn logs itself (delivery results)."""
    found = Forgotten()
    hashes = sorted({subject_hash(workspace, p) for m in messages for p in people_of(m)})
    if hashes:
        rows = conn.execute(
            "SELECT hash FROM forgotten WHERE workspace = %s AND hash = ANY(%s)",
            (workspace, hashes),
        )
        found.load(workspace, {str(h) for (h,) in rows})
    return found


_HOMES_SQL = """
WITH new AS (
    INSERT INTO homes (workspace, person, account)
    SELECT %(ws)s, p, a FROM unnest(%(p)s::text[], %(a)s::text[]) AS h(p, a)
    ON CONFLICT (workspace, person) DO NOTHING RETURNING person, account
), moved AS (
    UPDATE queue SET part = 'account:' || new.account FROM new
    WHERE queue.workspace = %(ws)s AND queue.part = 'user:' || new.person
)
SELECT person, account FROM new
UNION ALL
SELECT person, account FROM homes WHERE workspace = %(ws)s AND person = ANY(%(ask)s)
"""

# Each user's home account, as far as this process has learnt it: a home, once set, does not
# change, so it is looked up in the database once per process and per HOMES_FOR_S (pruning
# deletes the homes of people with no state left anywhere: see `pruning`).
_HOMES: dict[tuple[str, int, str], str] = {}  # (database, workspace, user) -> account
_HOMES_MAX = 1_000_000
_HOMES_SINCE = [time.monotonic()]
HOMES_FOR_S = 600.0


def _database(conn: psycopg.Connection[Any]) -> str:
    info = conn.info
    return f"{info.host}:{info.port}/{info.dbname}"


def _homes(
    conn: psycopg.Connection[Any], workspace: int, events: list[Event], learnt: dict[str, str]
) -> dict[str, str]:
    """The home account of each user of `events` without an account who has one; `learnt`
    gets the homes read or set (kept by the process once committed). A user's first event
    with an account makes that account their home: their events queued in their own
    partition so far move to it (and their state follows, see `worker`)."""
    db = _database(conn)
    first: dict[str, str] = {}
    lone: set[str] = set()
    for event in events:
        who = person(event)
        if event.account_id is None:
            lone.add(who)
        elif who not in first and (db, workspace, who) not in _HOMES:
            first[who] = event.account_id
    ask = [p for p in lone | set(first) if (db, workspace, p) not in _HOMES]
    if first or ask:
        # one statement: homes set by this request (and the user's events queued so far
        # moved to them), then those set before
        learnt.update(
            (str(p), str(a))
            for p, a in conn.execute(
                _HOMES_SQL,
                {"ws": workspace, "p": list(first), "a": list(first.values()), "ask": ask},
            )
        )
    found = {}
    for who in lone:
        home = learnt.get(who) or _HOMES.get((db, workspace, who))
        if home is not None:
            found[who] = home
    return found


def pending(conn: psycopg.Connection[Any], workspace: int) -> int:
    """Events accepted and not yet applied."""
    row = conn.execute("SELECT count(*) FROM queue WHERE workspace = %s", (workspace,)).fetchone()
    return int(row[0]) if row else 0


def count_events(conn: psycopg.Connection[Any], workspace: int) -> int:
    row = conn.execute("SELECT count(*) FROM events WHERE workspace = %s", (workspace,)).fetchone()
    return int(row[0]) if row else 0


# --- what the workers read and write --------------------------------------------------------


@dataclass(frozen=True)
class Standing:
    unsubscribed: frozenset[str]
    bounced: bool
    suppressed: str | None


def standing(
    conn: psycopg.Connection[Any],
    workspace: int,
    scope: str,
    subject: str,
    email: str | None,
    now_ms: int,
    accounts: Iterable[str] = (),
) -> Standing:
    """What stands between a subject and a message (as `store_outbox.standing`), in one
    query."""
    address = email.strip().lower() if isinstance(email, str) and email else None
    held = [(scope, subject)] + [("account", a) for a in accounts]
    row = conn.execute(
        _STANDING,
        {
            "ws": workspace,
            "scope": scope,
            "subject": subject,
            "address": address,
            "scopes": [s for s, _ in held],
            "subjects": [s for _, s in held],
            "now": now_ms,
        },
    ).fetchone()
    assert row is not None
    return Standing(frozenset(str(c) for c in row[0]), bool(row[1]), row[2])


_STANDING = """
SELECT
    array(SELECT channel FROM consent
          WHERE workspace = %(ws)s AND scope = %(scope)s AND subject = %(subject)s),
    %(address)s::text IS NOT NULL AND EXISTS (
        SELECT 1 FROM bounces WHERE workspace = %(ws)s AND address = %(address)s::text),
    (SELECT s.reason FROM suppressions s
     JOIN unnest(%(scopes)s::text[], %(subjects)s::text[]) WITH ORDINALITY AS h(scope, subject, n)
       ON s.scope = h.scope AND s.subject = h.subject
     WHERE s.workspace = %(ws)s AND (s.until_ms IS NULL OR s.until_ms > %(now)s)
     ORDER BY h.n LIMIT 1)
"""


def trigger_overrides(conn: psycopg.Connection[Any], workspace: int) -> dict[str, str]:
    """Trigger id -> the mode set since the playbooks loaded (paused, shadow)."""
    return {
        str(t): str(m)
        for t, m in conn.execute(
            "SELECT trig, mode FROM trigger_overrides WHERE workspace = %s", (workspace,)
        )
    }


def query_firings(
    conn: psycopg.Connection[Any],
    workspace: int,
    trigger: str | None = None,
    subject: str | None = None,
    limit: int = 1000,
    since_ms: int | None = None,
) -> list[FiringRow]:
    rows = conn.execute(
        f"SELECT {FIRING_COLUMNS} FROM firings WHERE workspace = %s"
        " AND (%s::text IS NULL OR trig = %s) AND (%s::text IS NULL OR subject = %s)"
        " AND (%s::bigint IS NULL OR at_ms >= %s)"
        " ORDER BY at_ms, id LIMIT %s",
        (workspace, trigger, trigger, subject, subject, since_ms, since_ms, limit),
    ).fetchall()
    return [tuple(r) for r in rows]


def append_within(conn: psycopg.Connection[Any], a: Append) -> Appended:
    """Store one batch inside the caller's transaction (events Forewarn makes itself, such as
    delivery results); those about a forgotten person are left out."""
    return _append(conn, a, {}, _forgotten_among(conn, a.workspace, a.messages))
