"""The live engine: the core run over the committed event log, on the wall clock.

Each step reads the batches committed since the last step, runs the timers due by the wall
clock (each at its own due moment), applies the new events in log order, and commits, in one
transaction, the step's firings, how far it read (`cursor`) and its clock (a `tick`). The state
itself is kept in memory and written as a snapshot now and then, in the transaction of a step.

So the committed record is: a snapshot, then the ticks after it, then the log. The engine is
deterministic, so after a crash (or kill -9) the state is rebuilt exactly by loading the
snapshot and redoing each tick after it — timers up to its clock, then the batches up to its
cursor — with the firings it had recorded not recorded again. A batch committed but not yet
stepped over is simply read by the next step. Nothing accepted is lost, no firing is repeated,
and a timer that came due while the server was down fires at the first step after restart
(stamped with its due time).

Events are applied as they arrive, not held back for stragglers: in a live step an event
stamped before the clock is applied at the clock, counted in its own time bucket; an event
stamped after its batch was received (a client clock running ahead) is taken as received then.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from forewarn import decide, engine, forgotten, store_outbox, store_sqlite
from forewarn.engine import Firing, Subject, Timer
from forewarn.errors import EventError, ForewarnError
from forewarn.model import Event, event_from_dict, format_time
from forewarn.playbook import Trigger
from forewarn.policy import POLICY_TRAITS, Outreach
from forewarn.runner import Runner
from forewarn.signals import NEVER

log = logging.getLogger("forewarn.live")

SNAPSHOT_EVERY_MS = 60_000
READ_LIMIT = 200  # batches per read


@dataclass
class Committed:
    """A batch just committed to the log, handed over in memory with its events already
    decoded (the log is read only when something was not handed over)."""

    id: int
    received_ms: int
    events: list[Event]


class Snapshot(msgspec.Struct):
    cursor: int
    clock_ms: int | None
    applied_ms: int
    users: dict[str, Subject]
    accounts: dict[str, Subject]
    aliases: dict[str, str]
    members: dict[str, list[str]]
    urgent: dict[str, list[str]] = {}


_encode = msgspec.msgpack.Encoder().encode
_decode_snapshot = msgspec.msgpack.Decoder(Snapshot).decode


Kept = tuple[tuple[str, ...], tuple[str, ...]]  # traits (user, account) kept for the messages


def playbook(triggers: list[Trigger], keep: Kept = ((), ())) -> engine.Playbook:
    """The triggers compiled as every host of the live engine runs them: keeping, besides the
    traits they read, those the policy reads and those the messages name (`keep`)."""
    return engine.Playbook(triggers, keep=(POLICY_TRAITS + keep[0], POLICY_TRAITS + keep[1]))


def fingerprint(triggers: list[Trigger], keep: Kept = ((), ())) -> str:
    """Changes whenever the state layout could: a snapshot is only reused under the same
    fingerprint. The layout is the triggers' and the slots of the traits kept, which the
    messages' templates change too (a template naming a trait no trigger reads moves the
    others). Traits kept that change no slot (one a trigger reads already) leave the
    fingerprint as the triggers alone make it, so editing a template's text rebuilds nothing."""
    text = repr(triggers)
    if keep != ((), ()):
        kept = _layout(playbook(triggers, keep))
        if kept != _layout(playbook(triggers)):
            text += repr(kept)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _layout(book: engine.Playbook) -> tuple[Any, ...]:
    """Where a subject's state keeps each trait, per scope."""
    return (book.trait_keys, book.date_slots, book.trait_width)


class StateForgotten(Exception):
    """Someone was forgotten since this engine's state was built: the step is not committed,
    and the engine is to be rebuilt from the log, which no longer holds them."""


class LiveEngine:
    """One workspace's engine. Not thread-safe: one thread steps it."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        workspace: int,
        triggers: list[Trigger],
        snapshot_every_ms: int = SNAPSHOT_EVERY_MS,
        write_lock: contextlib.AbstractContextManager[Any] | None = None,
        policy: decide.Policy | None = None,
        compose: Compose | None = None,
        keep: Kept = ((), ()),
    ) -> None:
        self.conn = conn
        # taken around each commit when another thread writes to the same file: waiting on it
        # wakes at once, where SQLite's busy handler sleeps for milliseconds
        self.write_lock = write_lock or contextlib.nullcontext()
        self.workspace = workspace
        self.triggers = triggers
        self.playbooks = fingerprint(triggers, keep)
        self.snapshot_every_ms = snapshot_every_ms
        self.runner = Runner(engine.State(playbook(triggers, keep)), lateness_ms=0)
        self.by_id = {t.id: t for t in triggers}
        self.outreach = Outreach(self.runner.state, triggers, policy, self._standing)
        self.compose = compose or plain_message
        self._now_ms = 0
        self.cursor = 0
        self.subjects = store_sqlite.SubjectIndex(workspace)
        self.tick = 0
        self.last_snapshot_ms: int | None = None
        self.firings_recorded = 0
        self.forgotten_mark = forgotten.mark(conn, workspace)  # read before the state is
        self._recover()
        self._load_history()

    # --- recovery ---------------------------------------------------------------------

    def _recover(self) -> None:
        row = store_sqlite.load_engine(self.conn, self.workspace)
        if row is None:
            return
        self.tick = row.tick
        if row.playbooks != self.playbooks:
            # other playbooks: rebuild from the whole log as a replay would, and go on from
            # there; what they would have fired in the past is not fired now
            self._redo_batches(row.cursor)
            self.runner.advance(row.clock_ms or 0)
        else:
            first = 0
            if row.snapshot is not None:
                self._restore(_decode_snapshot(store_sqlite.uncompressed(row.snapshot)))
                first = row.snapshot_tick
            for _, cursor, clock_ms in store_sqlite.ticks_after(self.conn, self.workspace, first):
                self.runner.advance(clock_ms)  # a step runs its timers, then its batches
                self._redo_batches(cursor)
        self.cursor = row.cursor

    def _restore(self, snap: Snapshot) -> None:
        state = self.runner.state
        state.users, state.accounts = snap.users, snap.accounts
        state.aliases, state.members = snap.aliases, snap.members
        state.urgent = snap.urgent
        self.runner.clock_ms = snap.clock_ms
        self.runner.applied_ms = snap.applied_ms
        self.cursor = snap.cursor
        # the timers are the deadlines filed in the states
        for ct in state.book.triggers:
            for key, subject in state.subjects(ct.account).items():
                ts = subject.states[ct.slot] if subject.states else None
                if ts is not None and ts[engine.FILED] != NEVER:
                    self.runner._timers.add(Timer(ts[engine.FILED], ct.index, key))

    def _redo_batches(self, cursor: int) -> None:
        """Apply the log up to `cursor` again, its firings already recorded."""
        while self.cursor < cursor:
            batches = store_sqlite.read_log(self.conn, self.workspace, self.cursor, READ_LIMIT)
            batches = [b for b in batches if b.id <= cursor]
            if not batches:
                return
            for batch in batches:
                self._apply(batch.received_ms, events_of(batch), [])
                self.cursor = batch.id

    # --- stepping ---------------------------------------------------------------------

    def step(
        self, now_ms: int, wall_ms: int | None = None, handed: list[Committed] | None = None
    ) -> int:
        """Run timers due by `now_ms` and every batch committed since the last step (those in
        `handed` without reading the log, when nothing before them is missing); commit,
        stamping the firings recorded at `wall_ms` (default `now_ms`). Returns the number of
        events applied."""
        if forgotten.mark(self.conn, self.workspace) != self.forgotten_mark:
            raise StateForgotten(f"workspace {self.workspace}: someone was forgotten")
        firings = self.runner.advance(now_ms)
        applied = 0
        cursor = self.cursor
        batches = [b for b in handed or () if b.id > cursor]
        if not batches or self._missing_before(batches[0].id):
            batches = [
                Committed(b.id, b.received_ms, events_of(b))
                for b in store_sqlite.read_log(self.conn, self.workspace, cursor, READ_LIMIT)
            ]
        for batch in batches:
            applied += self._apply(batch.received_ms, batch.events, firings)
            cursor = batch.id
        if not firings and cursor == self.cursor and not self._snapshot_due(now_ms):
            return 0  # nothing happened: nothing to commit
        self._now_ms = now_ms
        if firings:
            self._apply_overrides()
        displaced: list[int] = []
        for f in firings:
            displaced.extend(self.outreach.decide(f))
        self.tick += 1
        snapshot = None
        if self._snapshot_due(now_ms):
            snapshot = self._snapshot(cursor)
            self.last_snapshot_ms = now_ms
        with collector_paused(), self.write_lock, self._forgetting_on_failure():
            ids = store_sqlite.commit_step(
                self.conn,
                self.workspace,
                self.tick,
                cursor,
                self.runner.clock_ms or now_ms,
                [_row(f) for f in firings],
                self.playbooks,
                snapshot,
                recorded_ms=now_ms if wall_ms is None else wall_ms,
                then=lambda conn, ids: self._record(conn, batches, firings, ids, displaced, now_ms),
            )
        for f, fid in zip(firings, ids, strict=True):
            self.outreach.recorded(f, fid)
        self.cursor = cursor
        self.firings_recorded += len(firings)
        return applied

    @contextlib.contextmanager
    def _forgetting_on_failure(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.subjects.forget()  # what the failed step recorded was rolled back
            raise

    def _record(
        self,
        conn: sqlite3.Connection,
        batches: list[Committed],
        firings: list[Firing],
        ids: list[int],
        displaced: list[int],
        now_ms: int,
    ) -> None:
        """In the step's transaction: which subjects the applied batches hold, and the outbox.
        Refuses to commit a state that may still hold someone forgotten meanwhile."""
        if forgotten.mark(conn, self.workspace) != self.forgotten_mark:
            raise StateForgotten(f"workspace {self.workspace}: someone was forgotten")
        self.subjects.record(conn, ((b.id, b.events) for b in batches))
        self._enqueue(conn, firings, ids, displaced, now_ms)

    def _enqueue(
        self,
        conn: sqlite3.Connection,
        firings: list[Firing],
        ids: list[int],
        displaced: list[int],
        now_ms: int,
    ) -> None:
        """In the step's transaction: an outbox row for each firing to send, and the earlier
        ones a higher priority displaced."""
        for f, fid in zip(firings, ids, strict=True):
            if f.decision != decide.SEND:
                continue
            own, account = self.outreach.apart(f.scope, f.subject)
            args = outbox_args(
                self.workspace,
                self.compose,
                self.by_id[f.trigger],
                f,
                fid,
                (own, account),
                self._accounts(f.scope, f.subject),
                now_ms,
            )
            conn.execute(store_outbox.ENQUEUE, args)
        if displaced:
            store_outbox.displace(conn, displaced, now_ms)

    def _accounts(self, scope: str, subject: str) -> list[str]:
        """A user's accounts (their suppression covers it); none for an account."""
        if scope != "user":
            return []
        user = self.runner.state.users.get(subject)
        return list(user.accounts or []) if user is not None else []

    def _apply_overrides(self) -> None:
        """Triggers paused or put in shadow since the playbooks loaded decide as such."""
        overrides = store_outbox.trigger_overrides(self.conn, self.workspace)
        for t in self.triggers:
            spec = self.outreach.specs[t.id]
            mode = overrides.get(t.id, {}).get("mode", t.mode)
            if spec.mode != mode:
                self.outreach.specs[t.id] = spec._replace(mode=mode)

    def _standing(
        self, scope: str, subject: str, traits: dict[str, Any]
    ) -> tuple[frozenset[str], bool, str | None]:
        s = store_outbox.standing(
            self.conn,
            self.workspace,
            scope,
            subject,
            traits.get("email"),
            self._now_ms,
            self._accounts(scope, subject),
        )
        return s.unsubscribed, s.bounced, s.suppressed

    def _load_history(self) -> None:
        """The policy's history: the outreach recorded within its horizon."""
        clock = self.runner.clock_ms or 0
        since = clock - self.outreach.policy.horizon_ms()
        for fid, trig, scope, subject, channel, at_ms, send_at in store_outbox.recent_outreach(
            self.conn, self.workspace, since
        ):
            record = self.outreach.stored(trig, channel, at_ms, send_at, fid)
            self.outreach.history.add(scope, subject, record)

    def _missing_before(self, batch_id: int) -> bool:
        """Whether the log holds a batch of this workspace between the cursor and `batch_id`."""
        row = self.conn.execute(
            "SELECT 1 FROM batches WHERE workspace = ? AND id > ? AND id < ? LIMIT 1",
            (self.workspace, self.cursor, batch_id),
        ).fetchone()
        return row is not None

    def _snapshot_due(self, now_ms: int) -> bool:
        last = self.last_snapshot_ms
        return last is None or now_ms - last >= self.snapshot_every_ms

    def _apply(self, received_ms: int, events: list[Event], firings: list[Firing]) -> int:
        for event in events:
            if event.timestamp_ms > received_ms:
                event.timestamp_ms = received_ms
            self.runner._apply(event, firings)
        return len(events)

    def _snapshot(self, cursor: int) -> bytes:
        """The state, compressed: a busy workspace's is megabytes, written while the other
        writers wait."""
        state = self.runner.state
        return store_sqlite.compressed(
            _encode(
                Snapshot(
                    cursor,
                    self.runner.clock_ms,
                    self.runner.applied_ms,
                    state.users,
                    state.accounts,
                    state.aliases,
                    state.members,
                    state.urgent,
                )
            )
        )

    def lag(self) -> int:
        """Batches committed and not yet applied."""
        return store_sqlite.log_end(self.conn, self.workspace) - self.cursor


# (workspace, trigger, firing, the subject's own traits, its account's) -> the message
Compose = Callable[[int, Trigger, Firing, dict[str, Any], dict[str, Any]], store_outbox.Message]


def plain_message(
    workspace: int,
    trigger: Trigger,
    firing: Firing,
    own: dict[str, Any],
    account: dict[str, Any],
) -> store_outbox.Message:
    """The message as the playbook wrote it, unrendered: for hosts without templates."""
    text = trigger.action.message or trigger.action.template or trigger.id
    email = own.get("email") or account.get("email")
    return store_outbox.Message(
        to=str(email or "") if firing.channel == "email" else "",
        title=trigger.action.title or trigger.description or trigger.id,
        text=text,
        data={"evidence": firing.evidence},
        settings=dict(trigger.action.settings),
    )


def _row(f: Firing) -> store_sqlite.FiringRow:
    return (
        f.trigger,
        f.subject,
        f.scope,
        f.at_ms,
        msgspec.json.encode(f.evidence).decode(),
        f.decision,
        f.reason,
        f.channel,
        f.send_at_ms,
    )


def firing_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    """A `firings` row in the shape `forewarn replay` prints."""
    trig, subject, scope, at_ms, evidence, decision, reason, channel, send_at_ms = row
    return {
        "trigger": trig,
        "subject": subject,
        "scope": scope,
        "at": format_time(at_ms),
        "evidence": msgspec.json.decode(evidence),
        "decision": decision,
        "reason": reason,
        "channel": channel,
        "send_at": None if send_at_ms is None else format_time(send_at_ms),
    }


def events_of(batch: store_sqlite.LogBatch) -> list[Event]:
    """The events of a batch read back from the log: from the events stored with it when they
    are in the current format (they were validated at the door), else from its messages, where
    one that no longer reads (a damaged or hand-edited log) is skipped."""
    rows = batch.event_rows()
    if rows is not None:
        try:
            return [Event(*row) for row in rows]
        except TypeError:
            pass  # fields that do not fit: read the messages
    events = []
    for message in batch.messages:
        try:
            events.append(event_from_dict(message))
        except EventError:
            continue
    return events


def outbox_args(
    workspace: int,
    compose: Compose,
    trigger: Trigger,
    f: Firing,
    fid: int,
    traits: tuple[dict[str, Any], dict[str, Any]],
    accounts: list[str],
    now_ms: int,
) -> tuple[Any, ...]:
    """`store_outbox.ENQUEUE`'s arguments for a firing to send, in either store: its message
    composed from the subject's own and account `traits`, naming the `accounts` it concerns
    (so that suppressing an account stops its users' messages); or, if its template broke
    since it was checked, a dead letter saying why."""
    failed = None
    try:
        message = compose(workspace, trigger, f, *traits)
        if accounts:
            message = msgspec.structs.replace(message, data={**message.data, "accounts": accounts})
    except ForewarnError as exc:
        log.warning("trigger %s: cannot compose its message: %s", f.trigger, exc)
        message, failed = store_outbox.Message(), exc.message
    key = store_outbox.idempotency_key(workspace, f.trigger, f.scope, f.subject, f.at_ms, f.channel)
    due = f.send_at_ms if f.send_at_ms is not None else f.at_ms
    return store_outbox.enqueue_args(
        workspace, fid, key, f.channel, f.trigger, f.scope, f.subject, message, due, now_ms, failed
    )


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cycle collection while a step holds the write lock: a full pass over the engine's
    state (60-150 ms at 60,000 subjects, growing with them) would hold every commit up. The
    pass the step's allocations call for runs right after it, the lock let go."""
    if not gc.isenabled():  # someone else's pause: theirs to end
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
