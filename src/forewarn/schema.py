"""The schema of both stores, SQLite (embedded) and PostgreSQL (scale-out), as one list of
versioned migrations.

Each migration is written once, in the SQL both databases read, with SQLite's spelling of the
few types that differ; `statements` renders it for the database at hand. On PostgreSQL an
`INTEGER` becomes a `BIGINT` (times are milliseconds), a `BLOB` a `BYTEA`, an `id INTEGER
PRIMARY KEY` an identity column, and `WITHOUT ROWID` is dropped. A migration that only one
store needs (the scale-out tables) names its database; the other store still counts the
version, so a schema version means the same on both.

SQLite keeps its version in `PRAGMA user_version`; PostgreSQL in the `schema_version` table.
Both stores apply what they lack when they open, and `forewarn migrate` applies it on demand.
"""

from __future__ import annotations

import re
from typing import NamedTuple

DIALECTS = ("sqlite", "postgresql")


class Only(NamedTuple):
    """A migration for one database only."""

    dialect: str
    sql: str


# Each entry brings the schema from the previous version to this one.
# the audit log's table, the same on both stores (7 on SQLite, 8 on PostgreSQL)
_AUDIT = """
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        workspace INTEGER NOT NULL,
        at_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX audit_workspace ON audit (workspace, id);
"""

MIGRATIONS: dict[int, str | Only] = {
    1: """
    CREATE TABLE workspaces (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE keys (
        id INTEGER PRIMARY KEY,
        workspace INTEGER NOT NULL REFERENCES workspaces(id),
        kind TEXT NOT NULL CHECK (kind IN ('write', 'admin')),
        prefix TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL DEFAULT '',
        created_ms INTEGER NOT NULL,
        revoked_ms INTEGER
    );
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY,
        workspace INTEGER NOT NULL,
        received_ms INTEGER NOT NULL,
        source TEXT NOT NULL,
        count INTEGER NOT NULL,
        ids BLOB NOT NULL,
        events BLOB,
        messages BLOB NOT NULL
    );
    CREATE INDEX batches_workspace ON batches (workspace, id);
    CREATE TABLE firings (
        id INTEGER PRIMARY KEY,
        workspace INTEGER NOT NULL,
        trig TEXT NOT NULL,
        subject TEXT NOT NULL,
        scope TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        evidence TEXT NOT NULL,
        decision TEXT NOT NULL,
        reason TEXT,
        channel TEXT NOT NULL,
        cursor INTEGER NOT NULL
    );
    CREATE INDEX firings_at ON firings (workspace, at_ms);
    CREATE INDEX firings_subject ON firings (workspace, subject, at_ms);
    CREATE TABLE engine (
        workspace INTEGER PRIMARY KEY,
        cursor INTEGER NOT NULL,
        clock_ms INTEGER,
        tick INTEGER NOT NULL,
        snapshot BLOB,
        snapshot_tick INTEGER NOT NULL,
        playbooks TEXT NOT NULL
    );
    CREATE TABLE ticks (
        workspace INTEGER NOT NULL,
        tick INTEGER NOT NULL,
        cursor INTEGER NOT NULL,
        clock_ms INTEGER NOT NULL,
        PRIMARY KEY (workspace, tick)
    ) WITHOUT ROWID;
    """,
    2: """
    ALTER TABLE firings ADD COLUMN recorded_ms INTEGER;
    """,
    # outreach: see store_outbox
    3: """
    ALTER TABLE firings ADD COLUMN send_at_ms INTEGER;
    CREATE INDEX firings_decided ON firings (workspace, trig, subject);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        workspace INTEGER NOT NULL,
        firing INTEGER NOT NULL,
        key TEXT NOT NULL,
        channel TEXT NOT NULL,
        trig TEXT NOT NULL,
        subject TEXT NOT NULL,
        scope TEXT NOT NULL,
        message BLOB NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        reason TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        due_ms INTEGER NOT NULL,
        lease_ms INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL,
        done_ms INTEGER,
        detail TEXT,
        UNIQUE (workspace, key)
    );
    CREATE INDEX outbox_due ON outbox (due_ms) WHERE status = 'pending';
    CREATE INDEX outbox_subject ON outbox (workspace, subject, id);
    CREATE INDEX outbox_firing ON outbox (firing);
    CREATE TABLE consent (
        workspace INTEGER NOT NULL,
        scope TEXT NOT NULL,
        subject TEXT NOT NULL,
        channel TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        source TEXT NOT NULL,
        PRIMARY KEY (workspace, scope, subject, channel)
    ) WITHOUT ROWID;
    CREATE TABLE bounces (
        workspace INTEGER NOT NULL,
        address TEXT NOT NULL,
        detail TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        PRIMARY KEY (workspace, address)
    ) WITHOUT ROWID;
    CREATE TABLE suppressions (
        workspace INTEGER NOT NULL,
        scope TEXT NOT NULL,
        subject TEXT NOT NULL,
        reason TEXT NOT NULL,
        until_ms INTEGER,
        at_ms INTEGER NOT NULL,
        PRIMARY KEY (workspace, scope, subject)
    ) WITHOUT ROWID;
    CREATE TABLE inbox (
        id INTEGER PRIMARY KEY,
        workspace INTEGER NOT NULL,
        scope TEXT NOT NULL,
        subject TEXT NOT NULL,
        key TEXT NOT NULL,
        trig TEXT NOT NULL,
        kind TEXT NOT NULL,
        title TEXT NOT NULL,
        text TEXT NOT NULL,
        html TEXT NOT NULL,
        engagement_url TEXT NOT NULL DEFAULT '',
        created_ms INTEGER NOT NULL,
        read_ms INTEGER,
        dismissed_ms INTEGER,
        UNIQUE (workspace, key)
    );
    CREATE INDEX inbox_subject ON inbox (workspace, scope, subject, id);
    CREATE TABLE push_subscriptions (
        workspace INTEGER NOT NULL,
        scope TEXT NOT NULL,
        subject TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        p256dh TEXT NOT NULL,
        auth TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (workspace, endpoint)
    ) WITHOUT ROWID;
    CREATE INDEX push_subject ON push_subscriptions (workspace, scope, subject);
    CREATE TABLE disabled_endpoints (
        workspace INTEGER NOT NULL,
        url TEXT NOT NULL,
        detail TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        PRIMARY KEY (workspace, url)
    ) WITHOUT ROWID;
    CREATE TABLE secrets (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    # chat conversations in the widget: see store_outbox
    4: """
    ALTER TABLE inbox ADD COLUMN context TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE inbox ADD COLUMN escalated_ms INTEGER;
    CREATE TABLE conversation_messages (
        id INTEGER PRIMARY KEY,
        workspace INTEGER NOT NULL,
        conversation INTEGER NOT NULL,
        author TEXT NOT NULL,
        text TEXT NOT NULL,
        at_ms INTEGER NOT NULL
    );
    CREATE INDEX conversation_messages_by ON conversation_messages (conversation, id);
    CREATE TABLE outcomes (
        firing INTEGER PRIMARY KEY,
        workspace INTEGER NOT NULL,
        trig TEXT NOT NULL,
        goal INTEGER,
        failure INTEGER,
        engaged TEXT NOT NULL,
        closed_ms INTEGER NOT NULL
    );
    CREATE INDEX outcomes_trigger ON outcomes (workspace, trig);
    CREATE TABLE backtests (
        id INTEGER PRIMARY KEY,
        workspace INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        status TEXT NOT NULL,
        params TEXT NOT NULL,
        result TEXT,
        done_ms INTEGER
    );
    CREATE TABLE trigger_overrides (
        workspace INTEGER NOT NULL,
        trig TEXT NOT NULL,
        mode TEXT NOT NULL,
        reason TEXT NOT NULL,
        "by" TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        PRIMARY KEY (workspace, trig)
    ) WITHOUT ROWID;
    """,
    # the scale-out mode (store_pg, worker): the log one row per event, deduplicated by the
    # hash of its message id; the queue of events not yet applied, by partition (an account,
    # or a user without one); each partition's engine and policy state, with the earliest
    # moment one of its timers is due; each user's home: the first account seen for them
    5: Only(
        "postgresql",
        """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        workspace INTEGER NOT NULL,
        hash INTEGER NOT NULL,
        part TEXT NOT NULL,
        received_ms INTEGER NOT NULL,
        source TEXT NOT NULL,
        event BLOB NOT NULL,
        message BLOB NOT NULL
    );
    CREATE UNIQUE INDEX events_seen ON events (workspace, hash);
    CREATE TABLE queue (
        id INTEGER NOT NULL PRIMARY KEY,
        workspace INTEGER NOT NULL,
        part TEXT NOT NULL
    );
    CREATE INDEX queue_part ON queue (workspace, part, id);
    CREATE TABLE parts (
        workspace INTEGER NOT NULL,
        part TEXT NOT NULL,
        state BLOB NOT NULL,
        due_ms INTEGER NOT NULL,
        playbooks TEXT NOT NULL,
        PRIMARY KEY (workspace, part)
    );
    CREATE INDEX parts_due ON parts (workspace, due_ms);
    CREATE TABLE homes (
        workspace INTEGER NOT NULL,
        person TEXT NOT NULL,
        account TEXT NOT NULL,
        PRIMARY KEY (workspace, person)
    );
    """,
    ),
    # the embedded engine's index of which blocks of batches (`batch` is the batch id divided
    # by store_sqlite.SUBJECT_BLOCK) hold a subject's events, for timelines; `subject_index`
    # says from which batch on it is complete
    6: Only(
        "sqlite",
        """
    CREATE TABLE subject_batches (
        workspace INTEGER NOT NULL,
        subject TEXT NOT NULL,
        batch INTEGER NOT NULL,
        PRIMARY KEY (workspace, subject, batch)
    ) WITHOUT ROWID;
    CREATE TABLE subject_index (
        workspace INTEGER PRIMARY KEY,
        since_batch INTEGER NOT NULL
    );
    """,
    ),
    # privacy (see privacy, audit): the hashes of forgotten people, whose events ingest refuses;
    # the append-only log of admin actions, which triggers keep from being changed or deleted
    7: Only(
        "sqlite",
        """
    CREATE TABLE forgotten (
        id INTEGER PRIMARY KEY,
        workspace INTEGER NOT NULL,
        hash TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        UNIQUE (workspace, hash)
    );
    """
        + _AUDIT
        + """
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: its rows cannot be changed'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: its rows cannot be deleted'); END;
    """,
    ),
    # the audit log on PostgreSQL too (see audit_pg), append-only as on SQLite: a trigger
    # refuses every UPDATE and DELETE
    8: Only(
        "postgresql",
        _AUDIT
        + """
    CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'the audit log is append-only: its rows cannot be changed or deleted';
    END $$;
    CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
    """,
    ),
    # the scale-out admin API's timelines (see admin_pg): each event's person (user id, else
    # anonymous id), filled in for the events already stored, and the log indexed by person
    # (with the partitions their events went to) and by partition. (A `\u0000` escape in a
    # message's text, which PostgreSQL's json cannot read, is read as a space for this.)
    9: Only(
        "postgresql",
        r"""
    ALTER TABLE events ADD COLUMN person TEXT;
    UPDATE events SET person = (
        SELECT coalesce(nullif(m->>'userId', ''), nullif(m->>'anonymousId', ''))
        FROM (SELECT replace(convert_from(message, 'UTF8'), '\u0000', '\u0020')::json AS m) x
    );
    CREATE INDEX events_person ON events (workspace, person, part, id);
    CREATE INDEX events_part ON events (workspace, part, id);
    """,
    ),
    # the scale-out worker (worker): events and partition states it could not apply, set aside
    # with the error (an event's row stays in `events` until it is replayed or discarded);
    # the playbooks each generation of workers started with, the newest being current
    10: Only(
        "postgresql",
        """
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY,
        workspace INTEGER NOT NULL,
        part TEXT NOT NULL,
        event INTEGER UNIQUE,
        state BLOB,
        error TEXT NOT NULL,
        at_ms INTEGER NOT NULL
    );
    CREATE INDEX dead_letters_workspace ON dead_letters (workspace, id);
    CREATE TABLE playbook_generations (
        workspace INTEGER NOT NULL,
        generation INTEGER NOT NULL,
        fingerprint TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        PRIMARY KEY (workspace, generation),
        UNIQUE (workspace, fingerprint)
    );
    """,
    ),
    # privacy in the scale-out mode (see privacy_pg): the hashes of forgotten people, as on
    # SQLite; and the partitions whose state a forget dropped, which workers rebuild from their
    # events up to `upto` (but the ids in `fresh`, still unapplied then) without firing again,
    # the policy's history kept in `state`
    11: Only(
        "postgresql",
        """
    CREATE TABLE forgotten (
        id INTEGER PRIMARY KEY,
        workspace INTEGER NOT NULL,
        hash TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        UNIQUE (workspace, hash)
    );
    CREATE INDEX forgotten_mark ON forgotten (workspace, id);
    CREATE TABLE rebuilds (
        workspace INTEGER NOT NULL,
        part TEXT NOT NULL,
        upto INTEGER NOT NULL,
        clock_ms INTEGER,
        fresh INTEGER[] NOT NULL,
        state BLOB NOT NULL,
        playbooks TEXT NOT NULL,
        PRIMARY KEY (workspace, part)
    );
    """,
    ),
    # the scale-out worker (dead_letters.timed_out): how many times in a row a partition's step
    # hit the statement timeout on its own, kept on what it would set aside (its oldest queued
    # event, else its state) so that a worker restart does not forget it, and applying the
    # event (its row deleted) or saving the state (set to 0) ends the run
    12: Only(
        "postgresql",
        """
    ALTER TABLE queue ADD COLUMN timeouts SMALLINT NOT NULL DEFAULT 0;
    ALTER TABLE parts ADD COLUMN timeouts SMALLINT NOT NULL DEFAULT 0;
    """,
    ),
    # the embedded engine's latest snapshot, apart from the `engine` row that each step updates:
    # SQLite writes a row again whole when it is updated, and a snapshot of a busy workspace is
    # megabytes (`engine.snapshot` stays, always NULL)
    13: Only(
        "sqlite",
        """
    CREATE TABLE engine_snapshots (
        workspace INTEGER PRIMARY KEY,
        snapshot BLOB NOT NULL
    );
    INSERT INTO engine_snapshots (workspace, snapshot)
        SELECT workspace, snapshot FROM engine WHERE snapshot IS NOT NULL;
    UPDATE engine SET snapshot = NULL WHERE snapshot IS NOT NULL;
    """,
    ),
}

VERSION = max(MIGRATIONS)

_POSTGRESQL = (
    (
        re.compile(r"\bid INTEGER PRIMARY KEY\b"),
        "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\)\s*WITHOUT ROWID"), ")"),
)


def statements(version: int, dialect: str) -> list[str]:
    """The statements that bring a database of `dialect` from `version - 1` to `version`."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown database dialect {dialect!r}: one of {', '.join(DIALECTS)}")
    step = MIGRATIONS[version]
    if isinstance(step, Only):
        if step.dialect != dialect:
            return []
        script = step.sql
    else:
        script = step
    if dialect == "postgresql":
        for pattern, replacement in _POSTGRESQL:
            script = pattern.sub(replacement, script)
    return _split(script)


def placeholders(sql: str) -> str:
    """A statement written with SQLite's `?` placeholders as psycopg reads it (`%s`; a literal
    `%` doubled): for statements both stores share, rewritten once, at import."""
    return sql.replace("%", "%%").replace("?", "%s")


def _split(script: str) -> list[str]:
    """The statements of a script: split at `;`, except inside a trigger's BEGIN … END."""
    found: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending = f"{pending};{piece}" if pending else piece
        if len(_BEGIN.findall(pending)) > len(_END.findall(pending)):
            continue  # inside a trigger's body: its statements end in `;` too
        if pending.strip():
            found.append(pending.strip())
        pending = ""
    if pending.strip():
        found.append(pending.strip())
    return found


_BEGIN = re.compile(r"\bBEGIN\b")
_END = re.compile(r"\bEND\b")
