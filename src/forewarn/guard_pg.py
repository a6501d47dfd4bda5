"""The auto-guard in the scale-out mode: `guard`'s judgement over PostgreSQL, run by the
worker processes.

Every worker process whose playbooks are the current ones looks every `FOREWARN_GUARD_EVERY`
(1 hour by default, the embedded server's setting) whether the guard is due, and the first
to find it due runs it: under an advisory lock (`pg_try_advisory_xact_lock`, as pruning
takes its own), it reads when the guard last ran (kept with the deployment's other named
values, in `secrets`, as `guard-run:<workspace>`) and, if an interval has passed, writes
the new time and commits; the others then find it not due. The run itself holds no lock
nor transaction: the report reads the log in short statements (`report_pg`), so a long
report never holds a transaction open. A worker that dies mid-run loses that run; the next
comes an interval later. The first run comes an interval after the first worker started,
as in the embedded server.

What it writes is what the workers and the delivery processes read: the trigger's override
(`outreach_pg.override_trigger`, with its audit row, by `auto-guard`), so the workers decide
its next firings `suppressed` (`paused`, or `shadow`) and the delivery processes hold back
its messages already waiting, and the team's webhook in the outbox, for a delivery process.
The outcomes whose windows have closed are recorded in `outcomes`, as the embedded server
does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from forewarn import clock, guard, outreach_pg, report_pg, store_outbox, store_pg
from forewarn.playbook import Trigger
from forewarn.schema import placeholders

log = logging.getLogger("forewarn.worker")

Conn = psycopg.Connection[Any]
GUARD = "guard"  # the advisory lock (as a partition name) of the worker claiming a run
LOOK_MS = 60_000  # how often a worker looks whether the guard is due, at most

_UNSUBSCRIBED = placeholders(guard.UNSUBSCRIBED)
_ENQUEUE = placeholders(store_outbox.ENQUEUE)
_SECRET = placeholders(store_outbox.SECRET)
_SET_SECRET = placeholders(store_outbox.SET_SECRET)


def _unsubscribed(conn: Conn, workspace: int, trigger: str, since_ms: int) -> int:
    row = conn.execute(_UNSUBSCRIBED, (workspace, since_ms, trigger)).fetchone()
    return int(row[0]) if row else 0


def _stop(conn: Conn, workspace: int, found: guard.Judgement, now_ms: int, webhook: bool) -> None:
    with conn.transaction():
        outreach_pg.override_trigger(
            conn, workspace, found.trigger, found.mode, found.reason, "auto-guard", now_ms
        )
        if webhook:
            args = store_outbox.enqueue_args(*guard.team_message(workspace, found, now_ms))
            conn.execute(_ENQUEUE, args)


STORE = guard.Store(outreach_pg.trigger_overrides, report_pg.live_report, _unsubscribed, _stop)


def window_ms(keep_events_ms: int) -> int:
    """The period the guard judges: `guard.WINDOW_MS`, or less when the workers keep events
    for less (`FOREWARN_PG_KEEP_EVENTS`; 0: for ever). A firing in it has all the events
    that settle its outcome still in the log (they came after it); an older one's tickets
    may have been pruned, and would read as none."""
    return min(guard.WINDOW_MS, keep_events_ms) if keep_events_ms else guard.WINDOW_MS


def run(
    conn: Conn,
    workspace: int,
    triggers: list[Trigger],
    now_ms: int,
    webhook: bool = True,
    keep_events_ms: int = 0,
) -> list[guard.Judgement]:
    """Record the outcomes whose windows have closed, then judge every guarded trigger and
    stop those that must be (`guard.run`), over `window_ms(keep_events_ms)`."""
    window = window_ms(keep_events_ms)
    since = now_ms - window
    result = report_pg.live_report(conn, workspace, triggers, since, now_ms, record=True)
    return guard.run(
        conn, workspace, triggers, now_ms, webhook, result=result, store=STORE, window_ms=window
    )


def due(conn: Conn, workspace: int, now_ms: int, every_ms: int) -> bool:
    """Whether this process is the one to run the guard now; if so, the run is recorded as
    started (so that no other process runs it within `every_ms`)."""
    name = f"guard-run:{workspace}"
    with conn.transaction():
        key = store_pg.lock_key(workspace, GUARD)
        locked = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,)).fetchone()
        if not (locked and locked[0]):
            return False  # another worker is looking this very moment
        row = conn.execute(_SECRET, (name,)).fetchone()
        last = int(row[0]) if row is not None else None
        if last is not None and now_ms - last < every_ms:
            return False
        conn.execute(_SET_SECRET, (name, str(now_ms)))
        return last is not None  # the first look only starts the clock


def run_guards(
    pool: store_pg.Pool,
    workspace: int,
    triggers: list[Trigger],
    every_ms: int,
    stop: threading.Event,
    current: Callable[[], bool] = lambda: True,
    now_ms: Callable[[], int] = clock.now_ms,
    keep_events_ms: int = 0,
) -> None:
    """Run the guard when it is due, until `stop` is set. A worker whose playbooks are not
    the current ones (`current`) leaves it to those that are. The guard must never stop the
    worker: a failure is logged, and tried again at the next look. `keep_events_ms`: how
    long the workers keep events (`window_ms`)."""
    look_s = min(every_ms, LOOK_MS) / 1000
    while not stop.wait(look_s):
        if not current():
            continue
        try:
            now = now_ms()
            with pool.connection() as conn:
                if not due(conn, workspace, now, every_ms):
                    continue
                for found in run(conn, workspace, triggers, now, True, keep_events_ms):
                    log.warning("auto-guard: %s %s: %s", found.trigger, found.mode, found.reason)
        except Exception:
            log.exception("the auto-guard failed; it will try again")
