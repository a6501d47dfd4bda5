"""The scale-out worker: claims partitions of the event queue on PostgreSQL with the database's
own locks, runs the engine and the policy over them, and commits everything in one transaction.

A step, in one transaction:

1. picks candidate partitions: those owning the oldest queued events, and those with a timer
   due by now;
2. takes `pg_try_advisory_xact_lock` on each (a partition another worker holds is skipped,
   not waited for), then its queued events in order with `FOR UPDATE SKIP LOCKED`;
3. loads each partition's state (the engine's subjects, its clock and the policy's history),
   applies the events in log order, each after the timers due by its time, then the timers
   due by now;
4. decides every firing (a user's from their outreach in every partition, read under their
   lock: `history_pg`), and writes the firings, the outbox rows of those to send, the new
   state with its next due time, and deletes the claimed queue rows; then commits.

The locks end with the transaction. A worker killed mid-step commits nothing: its partitions'
events are still queued, and the next worker to try them gets the lock. Nothing is lost, and
nothing is applied twice, because the state and the queue change in the same commit. No lock
is ever waited for while others are held (a user's partition an account adopts, and a person
decided for, are only tried too), so workers cannot deadlock.

A step that fails on its data is retried a partition at a time, and what still fails is set
aside (`dead_letters`). A worker claims only while its playbooks are the newest generation
recorded in the database (`register`), so old and new workers in a rolling restart do not
start afresh each other's partitions.

Partitions: an event belongs to its account (`context.groupId`, or the account a `group` call
joins), else to its user. A partition's users and its account live in one state, so an
account-scoped trigger sees every event attributed to its account and a user-scoped one sees
its user's events in that account. (The embedded engine also counts an event without
`context.groupId` for every account its user joined; here it counts for the user alone.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg

from forewarn import (
    dead_letters,
    decide,
    engine,
    history_pg,
    homes,
    live,
    partition,
    schema,
    store_outbox,
    store_pg,
    store_sqlite,
)
from forewarn.dead_letters import BadEvent, BadState, timed_out, transient
from forewarn.engine import Firing
from forewarn.model import Event
from forewarn.partition import Part
from forewarn.playbook import Trigger
from forewarn.policy import Outreach
from forewarn.runner import Runner

log = logging.getLogger("forewarn.worker")

PARTS_PER_STEP = 64
EVENTS_PER_STEP = 2_000
TIMEOUT_RETRIES = 3  # a partition timing out alone this many times in a row is set aside
SCAN = 5_000  # queued events looked at to find candidate partitions
GEN = "playbooks"  # the advisory lock under which a worker records its playbooks' generation


_decode_event = msgspec.msgpack.Decoder(tuple[Any, ...]).decode


@dataclass
class Stepped:
    parts: int = 0
    events: int = 0
    firings: int = 0
    dead: int = 0  # events or partition states set aside as dead letters
    stale: bool = False  # newer playbooks are current: this worker claimed nothing

    def add(self, other: Stepped) -> None:
        self.parts += other.parts
        self.events += other.events
        self.firings += other.firings
        self.dead += other.dead
        self.stale = self.stale or other.stale


_CANDIDATES = """
SELECT part FROM (
    SELECT part, min(id) AS first FROM (
        SELECT part, id FROM queue WHERE workspace = %(ws)s ORDER BY id LIMIT %(scan)s
    ) q GROUP BY part
    UNION ALL
    SELECT part, -1 FROM parts WHERE workspace = %(ws)s AND due_ms <= %(now)s
) c
GROUP BY part ORDER BY min(first) LIMIT %(many)s
"""

_LOCK = """
SELECT part FROM unnest(%s::text[], %s::bigint[]) AS c(part, key)
WHERE pg_try_advisory_xact_lock(key) LIMIT %s
"""

_CLAIM = """
SELECT q.id, q.part, e.received_ms, e.event FROM queue q JOIN events e ON e.id = q.id
WHERE q.workspace = %s AND q.part = ANY(%s) ORDER BY q.id LIMIT %s
FOR UPDATE OF q SKIP LOCKED
"""

_SAVE = """
INSERT INTO parts (workspace, part, state, due_ms, playbooks)
SELECT %(ws)s, part, state, due_ms, %(playbooks)s
FROM unnest(%(part)s::text[], %(state)b::bytea[], %(due)s::bigint[]) AS s(part, state, due_ms)
ON CONFLICT (workspace, part) DO UPDATE SET state = excluded.state, due_ms = excluded.due_ms,
    playbooks = excluded.playbooks, timeouts = 0
"""

_GENERATION = """
SELECT generation, fingerprint FROM playbook_generations WHERE workspace = %s
ORDER BY generation DESC LIMIT 1
"""

_FIRING = (
    f"INSERT INTO firings (workspace, {store_sqlite.FIRING_COLUMNS}, cursor, recorded_ms)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id"
)

_OUTBOX = schema.placeholders(store_outbox.ENQUEUE)


class Worker:
    """One worker process's engine for one workspace; any number run side by side."""

    def __init__(
        self,
        pool: store_pg.Pool,
        workspace: int,
        triggers: list[Trigger],
        policy: decide.Policy | None = None,
        compose: live.Compose | None = None,
        keep: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
        parts_per_step: int = PARTS_PER_STEP,
        events_per_step: int = EVENTS_PER_STEP,
        timeout_retries: int = TIMEOUT_RETRIES,
    ) -> None:
        self.pool = pool
        self.workspace = workspace
        self.triggers = triggers
        self.by_id = {t.id: t for t in triggers}
        self.policy = policy or decide.Policy()
        self.compose = compose or live.plain_message
        self.book = live.playbook(triggers, keep)
        self.playbooks = live.fingerprint(triggers, keep)
        self.parts_per_step = parts_per_step
        self.events_per_step = events_per_step
        self.timeout_retries = timeout_retries
        self.registered = False  # its playbooks recorded as a generation (`register`)
        self.current = True  # its playbooks are the newest generation's
        self.dead_letters = 0  # set aside by this worker since it started
        self._tried: list[str] = []  # the partitions the last step locked

    def register(self, now_ms: int) -> bool:
        """Record this worker's playbooks as the current generation, unless they are known
        already; returns whether they are the current ones. A worker started with playbooks
        new to the database makes them current, so the workers still running older ones stop
        claiming (instead of starting afresh the partitions the newer ones build)."""
        with self.pool.connection() as conn, conn.transaction():
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s)", (store_pg.lock_key(self.workspace, GEN),)
            )
            latest = conn.execute(_GENERATION, (self.workspace,)).fetchone()
            known = conn.execute(
                "SELECT generation FROM playbook_generations WHERE workspace = %s"
                " AND fingerprint = %s",
                (self.workspace, self.playbooks),
            ).fetchone()
            if known is None:
                generation = int(latest[0]) + 1 if latest else 1
                conn.execute(
                    "INSERT INTO playbook_generations VALUES (%s, %s, %s, %s)",
                    (self.workspace, generation, self.playbooks, now_ms),
                )
                log.info("playbooks %s are generation %d", self.playbooks, generation)
                latest = (generation, self.playbooks)
        self.registered = True
        return self._current(latest)

    def _current(self, latest: tuple[Any, ...] | None) -> bool:
        """Whether this worker's playbooks are the newest generation's; says so in the log
        when that changes."""
        current = latest is not None and str(latest[1]) == self.playbooks
        if not current and self.current:
            newer = f"generation {latest[0]}" if latest else "none"
            log.warning(
                "the current playbooks are %s, not this worker's (%s): it claims nothing until "
                "it is restarted with the current playbooks",
                newer,
                self.playbooks,
            )
        elif current and not self.current:
            log.warning("this worker's playbooks are current again: it claims partitions")
        self.current = current
        return current

    def step(self, now_ms: int) -> Stepped:
        """Claim what this worker can, apply it and commit; an empty result when there was
        nothing to do or every partition with work was held by other workers.

        A step that fails on the data of what it claimed (a state that no longer decodes, an
        event the engine cannot apply) is not retried as a whole: its partitions are tried
        again one at a time, so the healthy ones go on, and in a partition that fails alone
        the event at fault (or, failing that, its oldest one; or its state, when it is the
        state that fails) is set aside as a dead letter. A step that hits the statement
        timeout is tried a partition at a time too; a partition that still does, alone,
        `timeout_retries` times in a row is set aside likewise, so that it does not take a
        worker's time for ever. When every one of several partitions fails alone, the fault
        is not in their data (a bug, an upgrade that reads no state, a database overloaded):
        nothing is set aside and the error is raised. Any other failure of the database
        itself (down, restarting) is raised, for the caller to retry the step."""
        if not self.registered:
            self.register(now_ms)
        self._tried = []
        try:
            return self._step(now_ms, None, self.events_per_step)
        except Exception as exc:
            if transient(exc) and not timed_out(exc):
                raise
            parts = list(self._tried)
            if not parts:
                raise
            log.warning(
                "a worker step over %d partition(s) failed (%s: %s): trying each alone",
                len(parts),
                type(exc).__name__,
                exc,
            )
        done = Stepped()
        failed: list[tuple[str, Exception]] = []
        for part in parts:
            one, error = self._alone(now_ms, part)
            done.add(one)
            if error is not None:
                failed.append((part, error))
        if len(parts) > 1 and len(failed) == len(parts):
            log.error(
                "each of the %d partitions of a step failed on its own (%s): not a fault of "
                "their data, so nothing is set aside; retrying",
                len(parts),
                failed[0][1],
            )
            raise failed[0][1]
        for part, error in failed:
            done.add(self._dead_letter(part, error, now_ms))
        return done

    def _alone(self, now_ms: int, part: str) -> tuple[Stepped, Exception | None]:
        """One partition on its own, after a step over several failed. If it fails again,
        and not on a known event or its state, its events are applied one per transaction
        up to the one that fails (the statement timeout included). Returns what was done, and
        the failure that remains."""
        try:
            return self._step(now_ms, [part], self.events_per_step), None
        except Exception as exc:
            if transient(exc) and not timed_out(exc):
                raise
            if isinstance(exc, (BadEvent, BadState)):
                return Stepped(), exc
        done = Stepped()
        for _ in range(self.events_per_step):
            try:
                one = self._step(now_ms, [part], 1)
            except Exception as exc:
                if transient(exc) and not timed_out(exc):
                    raise
                return done, exc
            done.add(one)
            if not one.events:
                break
        return done, None

    def _dead_letter(self, part: str, exc: BaseException, now_ms: int) -> Stepped:
        """Set aside what made `part` fail alone; after a timeout, only once it has timed out
        alone `timeout_retries` times in a row (counted in the database, so a restart does
        not start the count again)."""
        with self.pool.connection() as conn, conn.transaction():
            if timed_out(exc):
                times = dead_letters.count_timeout(conn, self.workspace, part)
                if not times:  # another worker holds it now, and meets the same
                    return Stepped()
                if times < self.timeout_retries:
                    log.warning(
                        "partition %s timed out on its own (%d of %d times in a row before "
                        "it is set aside): %s",
                        part,
                        times,
                        self.timeout_retries,
                        exc,
                    )
                    return Stepped()
            if not dead_letters.set_aside(conn, self.workspace, part, exc, now_ms):
                return Stepped()
        self.dead_letters += 1
        return Stepped(dead=1)

    def _step(self, now_ms: int, only: list[str] | None, limit: int) -> Stepped:
        """One transaction over the candidate partitions (or `only` those), claiming at most
        `limit` events. A partition that is to decide for a person another worker is deciding
        for at this moment (`history_pg`) is left for a later step: the transaction is rolled
        back and run again without it."""
        busy: set[str] = set()
        while True:
            try:
                return self._claim(now_ms, only, limit, busy)
            except history_pg.PersonBusy as exc:
                log.info("%s: left for a later step", exc)
                busy.add(exc.part)

    def _claim(self, now_ms: int, only: list[str] | None, limit: int, busy: set[str]) -> Stepped:
        done = Stepped()
        with self.pool.connection() as conn, conn.transaction():
            if not self._current(conn.execute(_GENERATION, (self.workspace,)).fetchone()):
                done.stale = True
                return done
            if only is not None:
                candidates = only
            else:
                candidates = [
                    str(p)
                    for (p,) in conn.execute(
                        _CANDIDATES,
                        {
                            "ws": self.workspace,
                            "scan": SCAN,
                            "now": now_ms,
                            "many": 4 * self.parts_per_step,
                        },
                    )
                ]
            candidates = [p for p in candidates if p not in busy]
            if not candidates:
                return done
            keys = [store_pg.lock_key(self.workspace, p) for p in candidates]
            parts = [
                str(p) for (p,) in conn.execute(_LOCK, (candidates, keys, self.parts_per_step))
            ]
            if not parts:
                return done
            self._tried = parts
            claimed: dict[str, list[tuple[int, int, bytes]]] = {p: [] for p in parts}
            ids: list[int] = []
            for qid, part, received_ms, raw in conn.execute(_CLAIM, (self.workspace, parts, limit)):
                claimed[part].append((int(qid), int(received_ms), bytes(raw)))
                ids.append(int(qid))
            # partitions with events still queued past this step's claim: their timers may
            # not run past what was applied (a queued event could end an absence, say)
            behind: set[str] = set()
            if len(ids) >= limit:
                behind = {
                    str(p)
                    for (p,) in conn.execute(
                        "SELECT DISTINCT part FROM queue WHERE workspace = %s AND part = ANY(%s)"
                        " AND NOT (id = ANY(%s))",
                        (self.workspace, parts, ids),
                    )
                }
            stored = {
                str(p): (bytes(s), str(b))
                for p, s, b in conn.execute(
                    "SELECT part, state, playbooks FROM parts WHERE workspace = %s"
                    " AND part = ANY(%s)",
                    (self.workspace, parts),
                )
            }
            rebuilding = _rebuilds(conn, self.workspace, parts)
            for name, redo in rebuilding.items():
                if name not in stored:  # its state was dropped: start from the history kept
                    stored[name] = (redo.state, redo.playbooks)
            loaded = [self._load(p, stored.get(p), claimed[p]) for p in parts]
            homes.send_home(conn, self.workspace, loaded)
            users = {p.name: p for p in loaded if p.name.startswith("user:")}
            modes = store_pg.trigger_overrides(conn, self.workspace)
            # users' own partitions first: a user an account adopts below brings all of it
            for p in users.values():
                again = rebuilding.get(p.name)
                done.firings += self._run(conn, p, now_ms, modes, p.name in behind, again)
            accounts = [p for p in loaded if p.name not in users]
            deferred = homes.adopt(
                conn, self.workspace, self.playbooks, accounts, users, self._load
            )
            accounts = [p for p in accounts if p.name not in deferred]
            for p in accounts:
                again = rebuilding.get(p.name)
                done.firings += self._run(conn, p, now_ms, modes, p.name in behind, again)
            ran = [p for p in loaded if p.name not in deferred]
            done.parts = len(ran)
            done.events = sum(len(p.events) for p in ran)
            states = [p.runner.state for p in ran]
            conn.execute(
                _SAVE,
                {
                    "ws": self.workspace,
                    "playbooks": self.playbooks,
                    "part": [p.name for p in ran],
                    "state": [partition.snapshot(p.runner, p.outreach) for p in ran],
                    "due": [partition.next_due(st.users, st.accounts) for st in states],
                },
            )
            # what was applied leaves the queue; a deferred partition's events stay queued
            # (moved ones were given to their home's queue in `homes.send_home`)
            applied = [i for p in ran for i in p.ids]
            if applied:
                conn.execute("DELETE FROM queue WHERE id = ANY(%s)", (applied,))
        return done

    def run_until_idle(self, now_ms: int) -> Stepped:
        """Step until a step finds nothing to claim (tests, benchmarks, `forewarn replay`)."""
        total = Stepped()
        while True:
            s = self.step(now_ms)
            if not s.parts and not s.dead:
                total.stale = s.stale
                return total
            total.add(s)

    # --- one partition ---------------------------------------------------------------------

    def _load(
        self, name: str, stored: tuple[bytes, str] | None, claimed: list[tuple[int, int, bytes]]
    ) -> Part:
        state = engine.State(self.book)
        part = Part(name, Runner(state, lateness_ms=0), Outreach(state, self.triggers, self.policy))
        if stored is not None:
            if stored[1] == self.playbooks:
                try:
                    partition.restore(part.runner, part.outreach, partition.decode(stored[0]))
                except Exception as exc:
                    raise BadState(name, exc) from exc
            else:  # other playbooks: this partition starts again from its next event
                log.warning("partition %s: playbooks changed, its state starts afresh", name)
        for qid, received_ms, raw in claimed:
            try:
                event = Event(*_decode_event(raw[1:]))
                if event.timestamp_ms > received_ms:  # a client clock running ahead
                    event.timestamp_ms = received_ms
            except Exception as exc:
                raise BadEvent(name, qid, exc) from exc
            part.events.append(event)
            part.ids.append(qid)
        return part

    def _run(
        self,
        conn: psycopg.Connection[Any],
        p: Part,
        now_ms: int,
        modes: dict[str, str],
        behind: bool = False,
        again: Rebuild | None = None,
    ) -> int:
        """Apply a partition's events and due timers, decide and record the firings; `behind`:
        it has more events queued, so its timers run only up to the last event applied;
        `again`: it is being rebuilt, and the firings of what it had applied before are not
        recorded again. Returns the number of firings."""
        runner, outreach, state = p.runner, p.outreach, p.runner.state
        firings: list[Firing] = []
        replaying = False
        past: list[Firing] = []  # a rebuild's: what it had applied before, fired before
        for qid, event in zip(p.ids, p.events, strict=True):
            redone = again is not None and qid <= again.upto and qid not in again.fresh
            try:
                runner._apply(event, past if redone else firings)
            except Exception as exc:
                raise BadEvent(p.name, qid, exc) from exc
        if again is not None:
            replaying = behind and not (p.ids and p.ids[-1] >= again.upto)
            if not replaying:
                if again.clock_ms is not None:
                    runner.advance(again.clock_ms)  # timers that had fired: not again
                conn.execute(
                    "DELETE FROM rebuilds WHERE workspace = %s AND part = %s",
                    (self.workspace, p.name),
                )
        last = p.ids[-1] if p.ids else 0
        until = now_ms
        if behind:
            until = min(now_ms, max((e.timestamp_ms for e in p.events), default=0))
        due = runner.advance(until)
        if not replaying:  # (while replaying, only timers that had fired come due)
            firings.extend(due)
        for t in self.triggers:
            spec = outreach.specs[t.id]
            mode = modes.get(t.id, t.mode)
            if spec.mode != mode:
                outreach.specs[t.id] = spec._replace(mode=mode)

        def consent(
            scope: str, subject: str, traits: dict[str, Any]
        ) -> tuple[frozenset[str], bool, str | None]:
            s = store_pg.standing(
                conn,
                self.workspace,
                scope,
                subject,
                traits.get("email"),
                now_ms,
                _accounts(state, scope, subject),
            )
            return s.unsubscribed, s.bounced, s.suppressed

        outreach.consent = consent
        who = history_pg.people(firings)
        if who:  # their outreach decided in every partition, under their locks
            since = min(f.at_ms for f in firings) - self.policy.horizon_ms()
            history_pg.take(conn, self.workspace, p.name, who, outreach, since)
        displaced: list[int] = []
        for f in firings:
            displaced.extend(int(d) for d in outreach.decide(f))
        for f in firings:
            row = conn.execute(_FIRING, (self.workspace, *live._row(f), last, now_ms)).fetchone()
            assert row is not None
            fid = int(row[0])
            outreach.recorded(f, fid)
            if f.decision == decide.SEND:
                self._enqueue(conn, state, outreach, f, fid, now_ms)
        if displaced:
            _displace(conn, displaced, now_ms)
        return len(firings)

    def _enqueue(
        self,
        conn: psycopg.Connection[Any],
        state: engine.State,
        outreach: Outreach,
        f: Firing,
        fid: int,
        now_ms: int,
    ) -> None:
        """The outbox row of a firing to send, in the step's transaction."""
        args = live.outbox_args(
            self.workspace,
            self.compose,
            self.by_id[f.trigger],
            f,
            fid,
            outreach.apart(f.scope, f.subject),
            _accounts(state, f.scope, f.subject),
            now_ms,
        )
        conn.execute(_OUTBOX, args)


@dataclass(frozen=True)
class Rebuild:
    """A partition whose state a forget dropped (`privacy_pg`): its events up to `upto`, but
    those in `fresh`, were applied before, and its clock had reached `clock_ms`."""

    upto: int
    fresh: frozenset[int]
    clock_ms: int | None
    state: bytes
    playbooks: str


def _rebuilds(
    conn: psycopg.Connection[Any], workspace: int, parts: list[str]
) -> dict[str, Rebuild]:
    return {
        str(p): Rebuild(int(u), frozenset(int(i) for i in f), c, bytes(s), str(b))
        for p, u, f, c, s, b in conn.execute(
            "SELECT part, upto, fresh, clock_ms, state, playbooks FROM rebuilds"
            " WHERE workspace = %s AND part = ANY(%s)",
            (workspace, parts),
        )
    }


def _accounts(state: engine.State, scope: str, subject: str) -> list[str]:
    if scope != "user":
        return []
    user = state.users.get(subject)
    return list(user.accounts or []) if user is not None else []


def _displace(conn: psycopg.Connection[Any], firing_ids: list[int], now_ms: int) -> None:
    """Stored firings a higher priority took the place of (as `store_outbox.displace`)."""
    for fid in firing_ids:
        cur = conn.execute(
            "UPDATE outbox SET status = %s, reason = 'lower_priority', done_ms = %s"
            " WHERE firing = %s AND status = %s AND lease_ms <= %s",
            (store_outbox.CANCELLED, now_ms, fid, store_outbox.PENDING, now_ms),
        )
        held_out = conn.execute(
            "SELECT 1 FROM firings WHERE id = %s AND decision = 'held_out'", (fid,)
        ).fetchone()
        if cur.rowcount or held_out:
            conn.execute(
                "UPDATE firings SET decision = 'suppressed', reason = 'lower_priority',"
                " send_at_ms = NULL WHERE id = %s",
                (fid,),
            )
