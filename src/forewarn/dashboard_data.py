"""What each dashboard page shows, as plain data: one function per page, reading the database
(and the report and the engine's answers it is given). The HTML page and its JSON twin are
both made from the dict these return, so they never disagree. Edge (reads the database:
either store, `dashboard_store`).

Times come in as arguments (`now_ms`) and go out as ISO 8601 text.
"""

from __future__ import annotations

from typing import Any

import msgspec

from forewarn import describe, stats, store_outbox, store_sqlite
from forewarn.dashboard_store import call, dialect, execute
from forewarn.model import format_time, parse_time_ms
from forewarn.playbook import Trigger

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
LATEST = 20  # firings in the overview's "latest" list
EXAMPLES = 10  # example subjects on a trigger's page
# the events received in a period: the embedded log holds batches, the scale-out log events
EVENTS_RECEIVED = {
    "sqlite": "SELECT coalesce(sum(count), 0) FROM batches"
    " WHERE workspace = ? AND received_ms >= ?",
    "postgresql": "SELECT count(*) FROM events WHERE workspace = ? AND received_ms >= ?",
}


def _time(ms: int | None) -> str | None:
    return None if ms is None else format_time(ms)


def _iso(stamp: Any) -> str | None:
    """An event's timestamp in the one format the timeline sorts by (UTC, milliseconds)."""
    if not isinstance(stamp, str):
        return None
    try:
        return format_time(parse_time_ms(stamp))
    except ValueError:
        return stamp


# --- overview ---------------------------------------------------------------------------------


def overview(conn: Any, workspace: int, now_ms: int, since_ms: int) -> dict[str, Any]:
    """Counts over the period (events received, firings and their decisions, messages sent),
    firings per hour by decision, and the latest firings."""
    events = execute(conn, EVENTS_RECEIVED[dialect(conn)], (workspace, since_ms)).fetchone()[0]
    decisions: dict[str, int] = {}
    suppressed: dict[str, int] = {}
    for decision, reason, n in execute(
        conn,
        "SELECT decision, reason, count(*) FROM firings WHERE workspace = ? AND at_ms >= ?"
        " GROUP BY decision, reason",
        (workspace, since_ms),
    ):
        decisions[decision] = decisions.get(decision, 0) + n
        if decision == "suppressed":
            suppressed[reason or "unknown"] = n
    sent = execute(
        conn,
        "SELECT count(*) FROM outbox WHERE workspace = ? AND status = 'sent' AND created_ms >= ?",
        (workspace, since_ms),
    ).fetchone()[0]
    return {
        "since": format_time(since_ms),
        "until": format_time(now_ms),
        "counts": {
            "events": int(events),
            "firings": sum(decisions.values()),
            "sent": int(sent),
            "held_out": decisions.get("held_out", 0),
            "suppressed": decisions.get("suppressed", 0),
        },
        "decisions": dict(sorted(decisions.items())),
        "suppressed_by_reason": dict(sorted(suppressed.items(), key=lambda kv: (-kv[1], kv[0]))),
        "per_hour": firings_series(conn, workspace, None, since_ms, now_ms, HOUR_MS),
        "latest": latest_firings(conn, workspace, LATEST),
    }


def latest_firings(
    conn: Any, workspace: int, limit: int, trigger: str | None = None
) -> list[dict[str, Any]]:
    rows = call(store_outbox.query_outreach, conn, workspace, None, trigger, None, limit)
    return [_outreach_row(r) for r in rows]


def _outreach_row(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for name in ("at_ms", "send_at_ms", "done_ms"):
        out[name[:-3]] = _time(out.pop(name))
    return out


def firings_series(
    conn: Any,
    workspace: int,
    trigger: str | None,
    since_ms: int,
    until_ms: int,
    step_ms: int,
) -> dict[str, list[int]]:
    """Firings per `step_ms` bucket from `since_ms`, by decision: {"t": [bucket starts, in
    seconds], "send": [...], "held_out": [...], "suppressed": [...]} (other decisions count
    with `suppressed`: they were not sent either)."""
    start = since_ms - since_ms % step_ms
    n = max(1, (until_ms - start) // step_ms + 1)
    series: dict[str, list[int]] = {
        "t": [(start + i * step_ms) // 1000 for i in range(n)],
        "send": [0] * n,
        "held_out": [0] * n,
        "suppressed": [0] * n,
    }
    where, args = store_sqlite.filters(
        ("workspace = ?", workspace), ("trig = ?", trigger), ("at_ms >= ?", start)
    )
    for bucket, decision, count in execute(
        conn,
        f"SELECT (at_ms - ?) / ?, decision, count(*) FROM firings WHERE {where} GROUP BY 1, 2",
        [start, step_ms, *args],
    ):
        if 0 <= bucket < n:
            name = decision if decision in ("send", "held_out") else "suppressed"
            series[name][bucket] += count
    return series


# --- triggers ---------------------------------------------------------------------------------


def status_of(trigger: Trigger, override: dict[str, Any] | None) -> str:
    """live | shadow | paused: what the trigger does now (an override wins over the playbook)."""
    if override is not None:
        return str(override["mode"])
    return trigger.mode


def _lift(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """The lift to show for a trigger: on its failure rate when it has one, else its goal."""
    if row is None:
        return None
    for kind in ("failure", "goal"):
        found = row.get(f"{kind}_lift")
        if found:
            return {"on": kind, **found}
    return None


def daily(conn: Any, workspace: int, since_ms: int, until_ms: int) -> dict[str, list[int]]:
    """Firings per day of each trigger over the period (oldest day first), for sparklines."""
    start = since_ms - since_ms % DAY_MS
    n = max(1, (until_ms - start) // DAY_MS + 1)
    out: dict[str, list[int]] = {}
    for trig, day, count in execute(
        conn,
        "SELECT trig, (at_ms - ?) / ?, count(*) FROM firings WHERE workspace = ? AND at_ms >= ?"
        " GROUP BY 1, 2",
        (start, DAY_MS, workspace, start),
    ):
        if 0 <= day < n:
            out.setdefault(trig, [0] * n)[day] = count
    return out


def triggers(
    loaded: list[Trigger],
    report: dict[str, Any],
    overrides: dict[str, dict[str, Any]],
    per_day: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Each loaded trigger: its status, volume (and firings per day, when given), precision,
    lift with its interval and verdict, and, when it is paused or in shadow by hand or by the
    auto-guard, who did it and why."""
    rows = {r["trigger"]: r for r in report.get("triggers", [])}
    days = len(next(iter(per_day.values()))) if per_day else 0
    out = []
    for t in loaded:
        override = overrides.get(t.id)
        row = rows.get(t.id)
        out.append(
            {
                "id": t.id,
                "description": t.description,
                "channel": t.action.channel,
                "playbook_mode": t.mode,
                "status": status_of(t, override),
                "override": None
                if override is None
                else {**override, "at": _time(override.get("at_ms"))},
                "firings": row["firings"] if row else 0,
                "firings_per_day": row["firings_per_day"] if row else 0.0,
                "precision": row["precision"] if row else None,
                "lift": _lift(row),
                "per_day": (per_day or {}).get(t.id, [0] * days),
            }
        )
    return {
        "since": _time(report.get("since")),
        "until": _time(report.get("until")),
        "triggers": out,
    }


def _rate(x: int, n: int) -> dict[str, Any]:
    ci = stats.wilson(x, n)
    return {
        "x": x,
        "n": n,
        "rate": None if n == 0 else round(x / n, 4),
        "ci": [round(ci.low, 4), round(ci.high, 4)],
    }


def rates(row: dict[str, Any] | None, trigger: Trigger) -> list[dict[str, Any]]:
    """Goal and failure rates, treated against held out, each with its 95% Wilson interval."""
    if row is None:
        return []
    treated = row.get("treated") or {"n": 0}
    control = row.get("held_out") or {"n": 0}
    out = []
    for kind, what, signal in (
        ("goal", "goals", trigger.goal),
        ("failure", "failures", trigger.failure),
    ):
        if signal is None:
            continue
        out.append(
            {
                "kind": kind,
                "event": signal.event,
                "treated": _rate(treated.get(what, 0), treated["n"]),
                "held_out": _rate(control.get(what, 0), control["n"]),
            }
        )
    return out


def trigger_detail(
    conn: Any,
    workspace: int,
    trigger: Trigger,
    report: dict[str, Any],
    override: dict[str, Any] | None,
    now_ms: int,
    since_ms: int,
) -> dict[str, Any]:
    """One trigger: what it watches, its status, firings per day, goal and failure rates of
    treated and held-out subjects with intervals, suppression reasons, example subjects."""
    row = next((r for r in report.get("triggers", []) if r["trigger"] == trigger.id), None)
    reasons = {
        str(reason or "unknown"): n
        for reason, n in execute(
            conn,
            "SELECT reason, count(*) FROM firings WHERE workspace = ? AND trig = ?"
            " AND at_ms >= ? AND decision = 'suppressed' GROUP BY reason ORDER BY 2 DESC, 1",
            (workspace, trigger.id, since_ms),
        )
    }
    return {
        "id": trigger.id,
        "description": trigger.description,
        "summary": describe.condition(trigger.when, trigger.scope),
        "scope": trigger.scope,
        "channel": trigger.action.channel,
        "holdout": trigger.holdout,
        "playbook_mode": trigger.mode,
        "status": status_of(trigger, override),
        "override": None if override is None else {**override, "at": _time(override["at_ms"])},
        "since": format_time(since_ms),
        "until": format_time(now_ms),
        "firings": row["firings"] if row else 0,
        "decisions": row["decisions"] if row else {},
        "precision": row["precision"] if row else None,
        "lift": _lift(row),
        "goal_lift": row.get("goal_lift") if row else None,
        "failure_lift": row.get("failure_lift") if row else None,
        "rates": rates(row, trigger),
        "per_day": firings_series(conn, workspace, trigger.id, since_ms, now_ms, DAY_MS),
        "suppressed_by_reason": reasons,
        "examples": latest_firings(conn, workspace, EXAMPLES, trigger.id),
    }


# --- a customer -------------------------------------------------------------------------------


def customer(
    conn: Any,
    workspace: int,
    subject: str,
    found: list[dict[str, Any]],
    events: list[dict[str, Any]],
) -> dict[str, Any]:
    """One user or account on one timeline, newest first: events, firings with their evidence,
    decisions with reasons, messages with their delivery, replies and outcomes. `found` is the
    engine's view of the subject (traits, trigger states), `events` its latest messages."""
    timeline: list[dict[str, Any]] = []
    for m in events:
        kind = m.get("type")
        name = m.get("event") if kind == "track" else m.get("name")
        timeline.append(
            {
                "at": _iso(m.get("timestamp")),
                "kind": "reply" if name == "Message Replied" else "event",
                "type": kind,
                "name": name,
                "properties": m.get("properties") or {},
                "traits": m.get("traits") or {},
            }
        )
    rows = execute(
        conn,
        "SELECT f.id, f.trig, f.scope, f.at_ms, f.evidence, f.decision, f.reason, f.channel,"
        " o.status, o.done_ms, o.detail, o.message, oc.goal, oc.failure, oc.engaged, oc.closed_ms"
        " FROM firings f LEFT JOIN outbox o ON o.firing = f.id"
        " LEFT JOIN outcomes oc ON oc.firing = f.id"
        " WHERE f.workspace = ? AND f.subject = ? ORDER BY f.at_ms DESC, f.id DESC LIMIT 200",
        (workspace, subject),
    ).fetchall()
    for fid, trig, scope, at, evidence, decision, reason, channel, *rest in rows:
        status, done, detail, message, goal, failure, engaged, closed = rest
        timeline.append(
            {
                "at": format_time(at),
                "kind": "firing",
                "firing": fid,
                "trigger": trig,
                "scope": scope,
                "channel": channel,
                "decision": decision,
                "reason": reason,
                "evidence": msgspec.json.decode(evidence),
            }
        )
        if message is not None:
            sent = msgspec.json.decode(message)
            timeline.append(
                {
                    "at": format_time(done) if done else format_time(at),
                    "kind": "message",
                    "firing": fid,
                    "trigger": trig,
                    "channel": channel,
                    "status": status,
                    "detail": detail,
                    "title": sent.get("title", ""),
                    "text": sent.get("text", ""),
                }
            )
        if closed is not None:
            timeline.append(
                {
                    "at": format_time(closed),
                    "kind": "outcome",
                    "firing": fid,
                    "trigger": trig,
                    "goal": None if goal is None else bool(goal),
                    "failure": None if failure is None else bool(failure),
                    "engaged": [e for e in str(engaged).split(",") if e],
                }
            )
    # the assistant's side of chat conversations (the customer's side is its reply events)
    for trig, author, text, at in execute(
        conn,
        "SELECT i.trig, c.author, c.text, c.at_ms FROM conversation_messages c"
        " JOIN inbox i ON i.id = c.conversation WHERE i.workspace = ? AND i.subject = ?"
        " AND c.author != 'user' ORDER BY c.id DESC LIMIT 200",
        (workspace, subject),
    ):
        timeline.append(
            {"at": format_time(at), "kind": "chat", "trigger": trig, "author": author, "text": text}
        )
    timeline.sort(key=lambda item: str(item["at"] or ""), reverse=True)
    return {
        "id": subject,
        "as": found,
        "timeline": timeline,
        "suppressions": [
            {"scope": s, "reason": r, "until": _time(u), "at": format_time(a)}
            for s, r, u, a in execute(
                conn,
                "SELECT scope, reason, until_ms, at_ms FROM suppressions"
                " WHERE workspace = ? AND subject = ?",
                (workspace, subject),
            )
        ],
        "unsubscribed": [
            {"scope": s, "channel": c, "at": format_time(a), "source": src}
            for s, c, a, src in execute(
                conn,
                "SELECT scope, channel, at_ms, source FROM consent"
                " WHERE workspace = ? AND subject = ?",
                (workspace, subject),
            )
        ],
    }


# --- the outreach log -------------------------------------------------------------------------


def outreach(
    conn: Any,
    workspace: int,
    trigger: str | None,
    status: str | None,
    subject: str | None,
    limit: int,
) -> dict[str, Any]:
    rows = call(store_outbox.query_outreach, conn, workspace, subject, trigger, status, limit)
    return {
        "filters": {"trigger": trigger, "status": status, "subject": subject},
        "statuses": [*store_outbox.STATUSES, "held_out"],
        "outreach": [_outreach_row(r) for r in rows],
    }
