"""The auto-guard: stop a trigger whose outreach does harm, annoys, or does no good. Edge (reads
and writes the database).

For each trigger with a holdout and `guard.action` other than `off`, from its report over the
last `WINDOW` (firings with their outcomes, read from the log):

- harm: the failure rate of treated subjects is higher than the held-out one's, by a sequential
  test that keeps its false-alarm rate under `ALPHA` however often the guard looks;
- annoyance: the lower bound of the 95% interval of the share of treated subjects who
  unsubscribed after the message, or of in-app and chat messages dismissed, is above the
  trigger's `max_unsubscribes` / `max_dismissals`;
- no good: the planned sample (enough to see `effect` on the failure rate) is reached and the
  interval of the difference lies within ±`effect`.

The trigger is then put in shadow or paused (`store_outbox.override_trigger`, by `auto-guard`),
and the team webhook gets a message. A trigger already paused or in shadow is left as it is:
a person resumes it. The embedded server runs it in its engine loop; in the scale-out mode,
the worker processes do, one at a time (`guard_pg`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, NamedTuple

from forewarn import report, stats, store_outbox, store_sqlite
from forewarn.engine import State
from forewarn.playbook import Trigger

WINDOW_MS = 30 * 86_400_000
ALPHA = 0.05
MIN_TREATED = 20  # no judgement on fewer treated subjects than this


class Judgement(NamedTuple):
    trigger: str
    mode: str  # shadow | paused
    reason: str


def judge(trigger: Trigger, row: dict[str, Any], unsubscribed: int) -> Judgement | None:
    """The guard's verdict on one trigger's report row; None to leave it alone."""
    guard = trigger.guard
    if guard.action == "off" or trigger.holdout <= 0:
        return None
    treated, control = row.get("treated"), row.get("held_out")
    if not treated or not control or treated["n"] < MIN_TREATED:
        return None
    mode = "shadow" if guard.action == "shadow" else "paused"
    n1, n2 = treated["n"], control["n"]
    if trigger.failure is not None:
        x1, x2 = treated["failures"], control["failures"]
        if stats.Sequential(alpha=ALPHA).harmful(x1, n1, x2, n2, bad="higher"):
            return Judgement(
                trigger.id,
                mode,
                f"reaching out raises failures: {x1}/{n1} treated against {x2}/{n2} held out",
            )
    low = stats.wilson(unsubscribed, n1).low
    if low > guard.max_unsubscribes:
        return Judgement(
            trigger.id,
            mode,
            f"{unsubscribed} of {n1} treated subjects unsubscribed after it (at least "
            f"{low:.1%}, over the {guard.max_unsubscribes:.0%} allowed)",
        )
    dismissed = treated.get("dismissed", 0)
    if trigger.action.channel in ("in_app", "chat"):
        low = stats.wilson(dismissed, n1).low
        if low > guard.max_dismissals:
            return Judgement(
                trigger.id,
                mode,
                f"{dismissed} of {n1} messages dismissed (at least {low:.0%}, over the "
                f"{guard.max_dismissals:.0%} allowed)",
            )
    if trigger.failure is not None:
        x1, x2 = treated["failures"], control["failures"]
        baseline = min(max(x2 / n2 if n2 else 0.0, guard.effect + 0.01), 0.99 - guard.effect)
        planned = max(
            stats.sample_size(baseline, e, holdout=trigger.holdout)
            for e in (guard.effect, -guard.effect)
        )
        said = stats.verdict(
            "failure", x1, n1, x2, n2, holdout=trigger.holdout, effect=guard.effect, planned=planned
        )
        if said.word == "no effect":
            return Judgement(trigger.id, mode, f"no effect after {n1 + n2} firings: {said.text}")
    return None


class Store(NamedTuple):
    """What the guard reads and writes in one store: the triggers' overrides, the report, the
    unsubscribes a trigger caused since a moment (`UNSUBSCRIBED`), and stopping a trigger
    (its override, by `auto-guard`, and the team's message, in one transaction)."""

    overrides: Callable[[Any, int], dict[str, Any]]
    report: Callable[..., dict[str, Any]]
    unsubscribed: Callable[[Any, int, str, int], int]
    stop: Callable[[Any, int, Judgement, int, bool], None]


def run(
    conn: Any,
    workspace: int,
    triggers: list[Trigger],
    now_ms: int,
    webhook: bool = True,
    state: State | None = None,
    result: dict[str, Any] | None = None,
    store: Store | None = None,
    window_ms: int = WINDOW_MS,
) -> list[Judgement]:
    """Judge every guarded trigger; stop those that must be, and tell the team. `state`: the
    live engine's, for which accounts each user belongs to; `result`: the report of the last
    `window_ms` already made (for these triggers or more), so the log is not read again;
    `store`: the embedded store's (`SQLITE`) unless another is given (`guard_pg.STORE`)."""
    store = store or SQLITE
    overrides = store.overrides(conn, workspace)
    watched = [
        t
        for t in triggers
        if t.guard.action != "off" and t.holdout > 0 and t.id not in overrides and t.mode == "live"
    ]
    if not watched:
        return []
    since = now_ms - window_ms
    if result is None:
        result = store.report(conn, workspace, watched, since, now_ms, state=state)
    rows = {r["trigger"]: r for r in result["triggers"]}
    stopped = []
    for t in watched:
        unsubscribed = store.unsubscribed(conn, workspace, t.id, since)
        found = judge(t, rows.get(t.id, {}), unsubscribed)
        if found is None:
            continue
        store.stop(conn, workspace, found, now_ms, webhook)
        stopped.append(found)
    return stopped


# Unsubscribes a trigger caused: those whose latest message before them (on that channel, or
# any for an unsubscribe from everything) was the trigger's. (Both stores read it.)
UNSUBSCRIBED = (
    "SELECT count(*) FROM consent c WHERE c.workspace = ? AND c.at_ms >= ? AND ("
    " SELECT o.trig FROM outbox o WHERE o.workspace = c.workspace AND o.scope = c.scope"
    " AND o.subject = c.subject AND o.status = 'sent' AND o.done_ms <= c.at_ms"
    " AND o.channel != 'webhook' AND (c.channel = '*' OR o.channel = c.channel)"
    " ORDER BY o.done_ms DESC, o.id DESC LIMIT 1) = ?"
)


def _unsubscribed(conn: sqlite3.Connection, workspace: int, trigger: str, since_ms: int) -> int:
    row = conn.execute(UNSUBSCRIBED, (workspace, since_ms, trigger)).fetchone()
    return int(row[0])


def _stop(
    conn: sqlite3.Connection, workspace: int, found: Judgement, now_ms: int, webhook: bool
) -> None:
    with store_sqlite.transaction(conn):
        store_outbox.override_trigger(
            conn, workspace, found.trigger, found.mode, found.reason, "auto-guard", now_ms
        )
        if webhook:
            store_outbox.enqueue(conn, *team_message(workspace, found, now_ms))


def team_message(workspace: int, found: Judgement, now_ms: int) -> tuple[Any, ...]:
    """The outbox row (as `store_outbox.enqueue` takes it, after the connection) of the
    webhook telling the team a trigger was stopped."""
    verb = "put in shadow" if found.mode == "shadow" else "paused"
    text = f"Forewarn {verb} trigger '{found.trigger}': {found.reason}."
    key = f"guard:{workspace}:{found.trigger}:{now_ms}"
    message = store_outbox.Message(
        title=f"Trigger {found.trigger} {verb}",
        text=text,
        data={"payload": {"type": "trigger.guarded", "data": found._asdict()}},
    )
    return (workspace, 0, key, "webhook", found.trigger, "account", "team", message, now_ms, now_ms)


SQLITE = Store(store_outbox.trigger_overrides, report.live_report, _unsubscribed, _stop)
