"""What each dashboard page loads, given the request, who is looking and a connection to
either store (`dashboard_store`): the dict its template renders and its JSON twin answers.
Edge.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from forewarn import (
    clock,
    dashboard_data,
    dashboard_more,
    report,
    store_outbox,
    store_sqlite,
)
from forewarn.dashboard_auth import Viewer
from forewarn.dashboard_store import call
from forewarn.errors import InputError, NotFoundError
from forewarn.playbook import Trigger, parse_duration

if TYPE_CHECKING:
    from forewarn.api import Forewarn

PERIODS = ("1d", "7d", "30d", "90d")
REPORT_FOR_MS = 30_000
_reports: dict[tuple[int, int, tuple[str, ...]], tuple[float, dict[str, Any]]] = {}
_reports_lock = threading.Lock()


def period(request: Request) -> tuple[str, int]:
    """The period asked for (`?since=`, 7 days unless given) as text and in milliseconds."""
    text = request.query_params.get("since") or "7d"
    try:
        span = parse_duration(text)
    except ValueError as exc:
        raise InputError(f"since={text!r}: {exc}; e.g. 7d") from None
    return text, min(span, clock.now_ms())  # longer than the epoch: everything


def report_of(app: Forewarn, conn: Any, workspace: int, span_ms: int) -> dict[str, Any]:
    """The report of the loaded triggers over the last `span_ms`: the same as
    `GET /api/v1/reports`, kept for `REPORT_FOR_MS` (reading the log for it takes a second or
    two on a large one, and people move between the triggers and their pages)."""
    triggers = app.engines.triggers
    key = (workspace, span_ms, tuple(t.id for t in triggers))
    with _reports_lock:
        kept = _reports.get(key)
    if kept is not None and clock.monotonic_ms() - kept[0] < REPORT_FOR_MS:
        return kept[1]
    now = clock.now_ms()
    found: dict[str, Any] = call(report.live_report, conn, workspace, triggers, now - span_ms, now)
    with _reports_lock:
        if len(_reports) > 64:
            _reports.clear()
        _reports[key] = (clock.monotonic_ms(), found)
    return found


def trigger_named(app: Forewarn, request: Request) -> Trigger:
    name = request.path_params["trigger"].removesuffix(".json")
    for t in app.engines.triggers:
        if t.id == name:
            return t
    raise NotFoundError(f"no trigger '{name}' in the loaded playbooks: see /triggers")


def overview(app: Forewarn, request: Request, viewer: Viewer, conn: Any) -> dict[str, Any]:
    since, span = period(request)
    now = clock.now_ms()
    data = dashboard_data.overview(conn, viewer.workspace, now, now - span)
    data["period"], data["periods"] = since, PERIODS
    data["engine"] = call(engine_lag, conn, app, viewer.workspace)
    return data


def triggers(app: Forewarn, request: Request, viewer: Viewer, conn: Any) -> dict[str, Any]:
    since, span = period(request)
    found = report_of(app, conn, viewer.workspace, span)
    overrides = call(store_outbox.trigger_overrides, conn, viewer.workspace)
    now = clock.now_ms()
    per_day = dashboard_data.daily(conn, viewer.workspace, now - span, now)
    data = dashboard_data.triggers(app.engines.triggers, found, overrides, per_day)
    data["period"], data["periods"] = since, PERIODS
    return data


def trigger(app: Forewarn, request: Request, viewer: Viewer, conn: Any) -> dict[str, Any]:
    trigger = trigger_named(app, request)
    since, span = period(request)
    now = clock.now_ms()
    found = report_of(app, conn, viewer.workspace, span)
    override = call(store_outbox.trigger_overrides, conn, viewer.workspace).get(trigger.id)
    data = dashboard_data.trigger_detail(
        conn, viewer.workspace, trigger, found, override, now, now - span
    )
    data["period"], data["periods"] = since, PERIODS
    return data


def customer(app: Forewarn, request: Request, viewer: Viewer, conn: Any) -> dict[str, Any]:
    subject = request.path_params["subject"]
    if request.url.path.endswith(".json"):
        subject = subject.removesuffix(".json")
    found = call(engine_states, conn, app, viewer.workspace, subject)
    events = call(store_sqlite.recent_events, conn, viewer.workspace, subject, 100)
    data = dashboard_data.customer(conn, viewer.workspace, subject, found, events)
    if not found and not data["timeline"]:
        raise NotFoundError(f"no customer '{subject}' in this workspace's events")
    # the triggers of the customer's own scope first: those are the ones that can fire for it
    scopes = {s["scope"] for s in found}
    ordered = sorted(app.engines.triggers, key=lambda t: t.scope not in scopes)
    data["triggers"] = [t.id for t in ordered]
    asked = request.query_params.get("why")
    data["why"] = None
    if asked:
        if asked not in data["triggers"]:
            raise InputError(f"why={asked!r}: no such trigger in the loaded playbooks")
        data["why"] = call(engine_why, conn, app, viewer.workspace, subject, asked, clock.now_ms())
    return data


# --- what the engine knows: asked of the embedded server's engine; in scale-out mode read on
# the page's own connection from the states the workers stored (their twins in dashboard_pg)


def engine_lag(conn: Any, app: Forewarn, workspace: int) -> dict[str, Any]:
    """Whether the engine answers, and what it has yet to apply of the workspace's log."""
    stats = app.engines.stats_view()
    return {"up": stats.up, "lag": stats.lag.get(workspace, 0), "lag_unit": "batches"}


def engine_states(conn: Any, app: Forewarn, workspace: int, subject: str) -> list[dict[str, Any]]:
    """The subject's states (traits, trigger states), none when the engine has none."""
    try:
        return app.engines.subject_state(workspace, subject)
    except NotFoundError:
        return []  # the engine has not started yet: the stored record still shows


def engine_why(
    conn: Any, app: Forewarn, workspace: int, subject: str, trigger: str, now_ms: int
) -> dict[str, Any]:
    """Why `trigger` is or is not firing for the subject (`engine.explain`)."""
    return app.engines.why(workspace, subject, trigger, now_ms)


def outreach(app: Forewarn, request: Request, viewer: Viewer, conn: Any) -> dict[str, Any]:
    q = request.query_params
    status = q.get("status") or None
    allowed = (*store_outbox.STATUSES, "held_out")
    if status is not None and status not in allowed:
        raise InputError(f"status={status!r}: give one of {', '.join(allowed)}")
    data = dashboard_data.outreach(
        conn, viewer.workspace, q.get("trigger") or None, status, q.get("subject") or None, 200
    )
    data["triggers"] = [t.id for t in app.engines.triggers]
    return data


def outbox(app: Forewarn, request: Request, viewer: Viewer, conn: Any) -> dict[str, Any]:
    return dashboard_more.outbox(conn, viewer.workspace, clock.now_ms())


def backtests(app: Forewarn, request: Request, viewer: Viewer, conn: Any) -> dict[str, Any]:
    data = dashboard_more.backtests(conn, viewer.workspace)
    data["triggers"] = [t.id for t in app.engines.triggers]
    books: dict[str, list[str]] = {}
    for t in app.engines.triggers:
        books.setdefault(Path(t.file).name if t.file else "playbooks", []).append(t.id)
    data["playbooks"] = [{"file": f, "triggers": ids} for f, ids in books.items()]
    data["periods"] = PERIODS
    return data


def backtest(app: Forewarn, request: Request, viewer: Viewer, conn: Any) -> dict[str, Any]:
    raw = request.path_params["id"].removesuffix(".json")
    found: dict[str, Any] | None = None
    if raw.isdigit():
        found = call(report.read_backtest, conn, viewer.workspace, int(raw))
    if found is None:
        raise NotFoundError(f"no backtest {raw}: see /backtests")
    return found


def settings(app: Forewarn, request: Request, viewer: Viewer, conn: Any) -> dict[str, Any]:
    return dashboard_more.settings_view(conn, viewer.workspace)


def customers(app: Forewarn, request: Request, viewer: Viewer, conn: Any) -> dict[str, Any]:
    return dashboard_more.recent_customers(conn, viewer.workspace)
