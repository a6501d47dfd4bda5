"""Backtests: what playbooks would have done over history, with the full policy on a virtual
clock, and how their firings turned out. Edge (reads files and the event log).

The events come from a file (as `forewarn replay` reads them) or from the server's own log. They
run through the same engine and policy as the live server; every firing is watched for its
goal, failure and engagement (`outcomes`). The report per trigger: firings per day, subjects
hit more than once, overlap with the other triggers, what the caps, the quiet hours and the
rest of the policy would have done, the goal and failure rates of treated and held-out
subjects, and precision and recall against the failure signal (tickets) in that history.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from itertools import combinations
from typing import Any

from forewarn import decide, engine, stats
from forewarn.engine import Firing
from forewarn.model import Event
from forewarn.outcomes import Outcome, Outcomes, tally
from forewarn.playbook import Trigger
from forewarn.policy import POLICY_TRAITS, Holding, Outreach
from forewarn.runner import Runner

DAY_MS = 86_400_000


def run(
    triggers: list[Trigger],
    events: Sequence[Event],
    policy: decide.Policy,
    until_ms: int | None = None,
    keep_firings: bool = False,
) -> dict[str, Any]:
    """Replay `events` (sorted) through the playbooks and the policy; the report (and every
    firing as `forewarn replay` prints it, with `keep_firings`)."""
    keep = (POLICY_TRAITS, POLICY_TRAITS)
    runner = Runner(engine.State(engine.Playbook(triggers, keep=keep)), lateness_ms=0)
    outreach = Outreach(runner.state, triggers, policy)
    outcomes = Outcomes(triggers, runner.state)
    firings: list[Firing] = []
    done: list[Outcome] = []

    holding = Holding(outreach, firings.append)

    def decided(f: Firing) -> None:
        holding(f)  # decides it (and prints the ones no longer open to displacement)
        outcomes.fired(f)  # watched from the moment it fired, whatever happens to it later

    def watched(stream: Iterable[Event]) -> Iterator[Event]:
        for event in stream:
            done.extend(outcomes.close(event.timestamp_ms))
            outcomes.observe(event)
            yield event

    end = until_ms if until_ms is not None else (events[-1].timestamp_ms if events else None)
    runner.replay(watched(events), end, decided)
    holding.release()
    done.extend(outcomes.finish())
    start = events[0].timestamp_ms if events else 0
    days = max(1.0, ((end or start) - start) / DAY_MS)
    result = report(triggers, firings, done, outcomes, days, len(events))
    if keep_firings:
        result["firings"] = [f.to_dict() for f in firings]
    return result


def report(
    triggers: list[Trigger],
    firings: list[Firing],
    outcomes: list[Outcome],
    outcome_state: Outcomes,
    days: float,
    events: int,
) -> dict[str, Any]:
    counts = tally(outcomes)
    hits: dict[str, Counter[str]] = defaultdict(Counter)
    subjects: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for f in firings:
        hits[f.trigger][f.subject] += 1
        subjects[f.trigger].add((f.scope, f.subject))
    rows = []
    for t in triggers:
        row = counts.get(t.id) or {"firings": 0, "subjects": 0, "decisions": {}}
        treated, control = row.get("treated"), row.get("control")
        recall = outcome_state.recall.get(t.id)
        rows.append(
            {
                "trigger": t.id,
                "firings": row["firings"],
                "firings_per_day": round(row["firings"] / days, 2),
                "subjects": row["subjects"],
                "subjects_hit_more_than_once": sum(1 for n in hits[t.id].values() if n > 1),
                "decisions": dict(sorted(row["decisions"].items())),
                "treated": treated,
                "held_out": control,
                "goal_rate": _rates(t.goal is not None, treated, control, "goals"),
                "failure_rate": _rates(t.failure is not None, treated, control, "failures"),
                # of the held-out subjects it fired for, how many had the problem anyway
                "goal_lift": _lift(t, "goals", treated, control) if t.goal is not None else None,
                "failure_lift": _lift(t, "failures", treated, control)
                if t.failure is not None
                else None,
                "dismissal_rate": _share(treated, "dismissed"),
                "escalation_rate": _share(treated, "escalated"),
                "precision": _share(control, "failures") if t.failure is not None else None,
                "recall": None if recall is None else _round(recall.rate),
                "failures_in_history": None if recall is None else recall.failures,
            }
        )
    overlap = []
    for a, b in combinations([t.id for t in triggers], 2):
        both = len(subjects[a] & subjects[b])
        if both:
            overlap.append({"triggers": [a, b], "subjects": both})
    return {"events": events, "days": round(days, 2), "triggers": rows, "overlap": overlap}


def _lift(
    t: Trigger, what: str, treated: dict[str, int] | None, control: dict[str, int] | None
) -> dict[str, Any] | None:
    """Treated against held out: the difference with its 95% interval, the verdict, and, for
    failures, how many were prevented among the treated."""
    if not treated or not control or not treated["n"] or not control["n"]:
        return None
    x1, n1, x2, n2 = treated[what], treated["n"], control[what], control["n"]
    lift = stats.lift(x1, n1, x2, n2)
    kind = "goal" if what == "goals" else "failure"
    said = stats.verdict(kind, x1, n1, x2, n2, holdout=max(t.holdout, 0.01))
    out: dict[str, Any] = {
        "absolute": _round(lift.absolute),
        "absolute_ci": None if lift.absolute_ci is None else [_round(v) for v in lift.absolute_ci],
        "relative": _round(lift.relative),
        "relative_ci": None if lift.relative_ci is None else [_round(v) for v in lift.relative_ci],
        "verdict": said.word,
        "says": said.text,
    }
    if kind == "failure":
        estimate, interval = stats.prevented(x1, n1, x2, n2)
        out["prevented"] = round(estimate, 1)
        out["prevented_ci"] = [round(interval.low, 1), round(interval.high, 1)]
    return out


def _rates(
    has: bool, treated: dict[str, int] | None, control: dict[str, int] | None, what: str
) -> dict[str, float | None] | None:
    if not has:
        return None
    return {"treated": _share(treated, what), "held_out": _share(control, what)}


def _share(group: dict[str, int] | None, what: str) -> float | None:
    if not group or not group["n"]:
        return None
    return _round(group.get(what, 0) / group["n"])


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def table(result: dict[str, Any]) -> str:
    """The report as an aligned text table, one row per trigger."""
    head = (
        "trigger",
        "firings",
        "per day",
        "subjects",
        "repeat",
        "sent",
        "held out",
        "suppressed",
        "goal t/c",
        "failure t/c",
        "precision",
        "recall",
    )
    lines = [head]
    for r in result["triggers"]:
        d = r["decisions"]
        suppressed = ", ".join(
            f"{k.split(':', 1)[1]} {v}" for k, v in d.items() if k.startswith("suppressed:")
        )
        lines.append(
            (
                r["trigger"],
                str(r["firings"]),
                f"{r['firings_per_day']:g}",
                str(r["subjects"]),
                str(r["subjects_hit_more_than_once"]),
                str(d.get("send", 0)),
                str(d.get("held_out", 0)),
                suppressed or "0",
                _pair(r["goal_rate"]),
                _pair(r["failure_rate"]),
                _pct(r["precision"]),
                _pct(r["recall"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    for o in result["overlap"]:
        a, b = o["triggers"]
        out.append(f"overlap: {a} and {b} both hit {o['subjects']} subjects")
    for r in result["triggers"]:
        for what, label in (("failure_lift", "failures"), ("goal_lift", "goals")):
            lift = r.get(what)
            if lift:
                out.append(f"{r['trigger']} {label}: {lift['says']}")
    return "\n".join(out) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _pair(rates: dict[str, float | None] | None) -> str:
    if rates is None:
        return "-"
    return f"{_pct(rates['treated'])}/{_pct(rates['held_out'])}"
