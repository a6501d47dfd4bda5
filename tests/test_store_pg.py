"""The PostgreSQL store on a real server: migrations from the shared schema, keys, and the
ingest path's dedup and queue."""

from __future__ import annotations

import psycopg
import pytest

from forewarn import audit_pg, schema, store_pg
from forewarn.errors import InputError
from forewarn.store_sqlite import ENV_KEY_NAME, Append, StoreError
from tests.factories import T0_MS, at, events, group, track


def test_migrates_to_the_schema_version_once(url: str) -> None:
    pool = store_pg.connect(url)
    try:
        assert store_pg.migrate(pool) == schema.VERSION  # again: nothing to do
        with pool.connection() as conn:
            assert store_pg.version(conn) == schema.VERSION
            tables = {
                r[0]
                for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            }
    finally:
        pool.close()
    assert {"batches", "firings", "outbox", "consent", "events", "queue", "parts"} <= tables


def test_a_newer_database_is_refused(url: str) -> None:
    pool = store_pg.connect(url)
    try:
        with pool.connection() as conn:
            conn.execute("UPDATE schema_version SET version = %s", (schema.VERSION + 1,))
        with pytest.raises(StoreError, match="newer than this Forewarn"):
            store_pg.migrate(pool)
    finally:
        pool.close()


def test_the_same_migrations_render_for_both_databases() -> None:
    for version in schema.MIGRATIONS:
        for statement in schema.statements(version, "postgresql"):
            assert "BLOB" not in statement and "WITHOUT ROWID" not in statement
    assert schema.statements(5, "sqlite") == []  # the scale-out tables live on PostgreSQL
    with pytest.raises(ValueError, match="unknown database dialect"):
        schema.statements(1, "mysql")


def test_a_bad_url_or_an_absent_server_says_what_to_do() -> None:
    with pytest.raises(InputError, match="postgresql:// URL"):
        store_pg.connect("mysql://somewhere/db")
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL"):
        store_pg.connect("postgresql://nobody@127.0.0.1:1/none", timeout_s=1.0)


def test_keys_from_the_environment_are_added_once(pool: store_pg.Pool) -> None:
    ws = store_pg.ensure_workspace(
        pool, "default", T0_MS, "fw_wk_0123456789abcdef", "fw_ak_0123456789abcdef"
    )
    again = store_pg.ensure_workspace(
        pool, "default", T0_MS, "fw_wk_0123456789abcdef", "fw_ak_0123456789abcdef"
    )
    assert ws == again
    with pool.connection() as conn:
        key = store_pg.find_key(conn, "fw_wk_0123456789abcdef")
        assert key is not None and key.kind == "write" and key.workspace == ws
        assert store_pg.find_key(conn, "fw_wk_unknown-key-000") is None
    with pytest.raises(InputError, match="already a write key"):
        store_pg.ensure_workspace(pool, "other", T0_MS, admin_key="fw_wk_0123456789abcdef")


def _append(ws: int, messages: list[dict[str, object]]) -> Append:
    return Append(
        ws, "segment", T0_MS, messages, [str(m["messageId"]) for m in messages], events(messages)
    )


def test_a_resent_batch_adds_nothing_and_events_queue_by_partition(pool: store_pg.Pool) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    batch = [
        track("Error", at(), user="u1", account="acme"),
        group(at(), "acme", user="u2"),
        track("Login", at(), user="solo"),
    ]
    batch.append(dict(batch[0]))  # the same message id twice in one request
    first = store_pg.append_batches(pool, [_append(ws, batch)])[0]
    assert (first.stored, first.duplicates, first.kept) == (3, [3], [0, 1, 2])
    again = store_pg.append_batches(pool, [_append(ws, batch)])[0]
    assert (again.batch, again.stored, again.duplicates) == (None, 0, [0, 1, 2, 3])
    with pool.connection() as conn:
        assert store_pg.count_events(conn, ws) == 3
        assert store_pg.pending(conn, ws) == 3
        parts = [r[0] for r in conn.execute("SELECT part FROM queue ORDER BY id")]
    assert parts == ["account:acme", "account:acme", "user:solo"]


def test_standing_reads_consent_bounces_and_account_suppressions(pool: store_pg.Pool) -> None:
    with pool.connection() as conn:
        assert store_pg.standing(conn, 1, "user", "u1", "A@x.io", T0_MS) == store_pg.Standing(
            frozenset(), False, None
        )
        conn.execute("INSERT INTO consent VALUES (1, 'user', 'u1', 'email', 0, 'link')")
        conn.execute("INSERT INTO bounces VALUES (1, 'a@x.io', 'hard bounce', 0)")
        conn.execute(
            "INSERT INTO suppressions VALUES (1, 'account', 'acme', 'incident', %s, 0)",
            (T0_MS + 1,),
        )
        now = store_pg.standing(conn, 1, "user", "u1", " A@x.io", T0_MS, ["other", "acme"])
        later = store_pg.standing(conn, 1, "user", "u1", None, T0_MS + 1, ["acme"])
    assert now == store_pg.Standing(frozenset({"email"}), True, "incident")
    assert later == store_pg.Standing(frozenset({"email"}), False, None)  # the suppression ended


def test_keys_added_are_in_the_audit_log_which_cannot_be_changed(pool: store_pg.Pool) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS, admin_key="fw_ak_0123456789abcdef")
    with pool.connection() as conn:
        store_pg.add_key(conn, ws, "write", T0_MS + 1, name="ci")
        rows = audit_pg.read(conn, ws)
        assert [(r["actor"], r["action"], r["detail"]) for r in rows] == [
            ("cli", "key.created", {"kind": "write", "name": "ci"}),
            ("environment", "key.created", {"kind": "admin", "name": ENV_KEY_NAME}),
        ]
        assert rows[1]["target"] == "fw_ak_0123"  # the key's prefix, never the key
        assert audit_pg.read(conn, ws, before=rows[0]["id"]) == rows[1:]
        assert audit_pg.read(conn, ws, action="key.revoked") == []
        assert audit_pg.read(conn, ws + 1) == []  # another workspace's log
        for statement in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(statement)
        assert len(audit_pg.read(conn, ws)) == 2


def test_events_stored_before_version_9_get_their_person(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:  # a database left at version 8
        conn.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (8)")
        for version in range(1, 9):
            for statement in schema.statements(version, "postgresql"):
                conn.execute(statement.encode())
        for n, message in enumerate(
            [
                b'{"type":"track","userId":"u1","properties":{"note":"a\\u0000b \\\\u0000"}}',
                b'{"type":"page","userId":null,"anonymousId":"anon-7"}',
                b'{"type":"group","userId":"","anonymousId":"anon-8","groupId":"acme"}',
            ]
        ):
            conn.execute(
                "INSERT INTO events (workspace, hash, part, received_ms, source, event, message)"
                " VALUES (1, %s, 'account:acme', 0, 'segment', '', %s)",
                (n, message),
            )
    pool = store_pg.connect(url)
    try:
        with pool.connection() as conn:
            people = [r[0] for r in conn.execute("SELECT person FROM events ORDER BY id")]
            ws = store_pg.ensure_workspace(pool, "default", T0_MS)
            store_pg.append_batches(pool, [_append(ws, [track("Login", at(), user="u9")])])
            newest = conn.execute("SELECT person FROM events ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        pool.close()
    assert people == ["u1", "anon-7", "anon-8"]
    assert newest == ("u9",)


def _show(pool: store_pg.Pool, name: str) -> str:
    with pool.connection() as conn:
        row = conn.execute(f"SHOW {name}").fetchone()
    assert row is not None
    return str(row[0])


def test_connections_have_timeouts_and_keepalives_by_default(url: str) -> None:
    pool = store_pg.connect(url)
    try:
        assert _show(pool, "statement_timeout") == "30s"
        assert _show(pool, "idle_in_transaction_session_timeout") == "1min"
        with pool.connection() as conn:
            given = conn.info.get_parameters()
    finally:
        pool.close()
    assert (given["keepalives"], given["keepalives_idle"]) == ("1", "30")
    assert (given["keepalives_interval"], given["keepalives_count"]) == ("10", "3")


def test_a_statement_past_the_timeout_is_cancelled_by_the_server(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    monkeypatch.setenv("FOREWARN_PG_STATEMENT_TIMEOUT", "1s")
    pool = store_pg.connect(url)
    try:
        with pytest.raises(psycopg.errors.QueryCanceled), pool.connection() as conn:
            conn.execute("SELECT pg_sleep(5)")
        assert _show(pool, "idle_in_transaction_session_timeout") == "2s"
    finally:
        pool.close()


def test_the_urls_own_parameters_win_and_off_sets_none(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = store_pg.connect(url + "?options=-c%20statement_timeout%3D5s&keepalives_idle=7")
    try:
        assert _show(pool, "statement_timeout") == "5s"
        assert _show(pool, "idle_in_transaction_session_timeout") == "0"
        with pool.connection() as conn:
            assert conn.info.get_parameters()["keepalives_idle"] == "7"
    finally:
        pool.close()
    monkeypatch.setenv("FOREWARN_PG_STATEMENT_TIMEOUT", "off")
    monkeypatch.setenv("FOREWARN_PG_KEEPALIVE", "off")
    assert store_pg.session_parameters(url) == {}
    monkeypatch.setenv("FOREWARN_PG_KEEPALIVE", "soon")
    with pytest.raises(InputError, match="FOREWARN_PG_KEEPALIVE"):
        store_pg.connect(url)
