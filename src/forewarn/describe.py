"""Plain words for what a trigger will do, as `forewarn check` prints it."""

from __future__ import annotations

from forewarn import playbook as pb
from forewarn.playbook import format_duration as dur


def _where(where: pb.Where) -> str:
    if not where.pairs:
        return ""
    parts = []
    for key, values in where.pairs:
        shown = " or ".join(repr(v) for v in values)
        parts.append(f"{key} is {shown}")
    return " where " + " and ".join(parts)


def condition(cond: pb.Condition, scope: str) -> str:
    who = "the account" if scope == "account" else "the user"
    if isinstance(cond, pb.EventCond):
        what = f"'{cond.name}'{_where(cond.where)}"
        if cond.within_ms is None:
            return f"{who} sends {what}"
        times = "once" if cond.count == 1 else f"{cond.count} times"
        return f"{who} sent {what} at least {times} in the last {dur(cond.within_ms)}"
    if isinstance(cond, pb.SpikeCond):
        return (
            f"'{cond.name}'{_where(cond.where)} in the last {dur(cond.window_ms)} reaches "
            f"{cond.factor:g}x {who}'s usual rate over the previous {dur(cond.baseline_ms)} "
            f"and at least {cond.min_count} (once {who} has that much history)"
        )
    if isinstance(cond, pb.DropCond):
        return (
            f"'{cond.name}'{_where(cond.where)} in the last {dur(cond.window_ms)} falls to "
            f"{cond.below * 100:g}% or less of {who}'s rate over the previous "
            f"{dur(cond.baseline_ms)}"
        )
    if isinstance(cond, pb.AbsentCond):
        return f"{who} did '{cond.name}'{_where(cond.where)} before but not for {dur(cond.for_ms)}"
    if isinstance(cond, pb.AnomalyCond):
        what = f"'{cond.name}'{_where(cond.where)}"
        measured = f"the {cond.value.source} of {what}" if cond.value else f"the count of {what}"
        way = {"up": "unusually high", "down": "unusually low", "both": "unusual"}[cond.direction]
        return (
            f"{measured} per {dur(cond.window_ms)} is {way} against {who}'s own normal "
            f"(daily and weekly rhythm included; {cond.sensitivity} sensitivity)"
        )
    if isinstance(cond, pb.OverdueCond) and cond.lapse is not None:
        return (
            f"{who} has probably stopped '{cond.name}'{_where(cond.where)}: the chance, judged "
            f"from its own rhythm and how long it has been silent, is at least "
            f"{cond.lapse:.0%} (after {cond.min_events} of them)"
        )
    if isinstance(cond, pb.OverdueCond):
        return (
            f"{who} has been silent on '{cond.name}'{_where(cond.where)} for longer than "
            f"{cond.factor:g}x its own typical gap between them (after {cond.min_events} of them)"
        )
    if isinstance(cond, pb.ThresholdCond):
        return f"{cond.value.source} {cond.op} {cond.target:g}"
    if isinstance(cond, pb.DwellCond):
        unless = ""
        if cond.unless:
            unless = " without " + " or ".join(f"'{u}'" for u in cond.unless)
        return f"the user stays on a page matching {cond.page} for {dur(cond.for_ms)}{unless}"
    if isinstance(cond, pb.DateCond):
        return f"the date in {pb.ref_name(cond.trait)} is within the next {dur(cond.within_ms)}"
    if isinstance(cond, pb.AgeCond):
        return f"at least {dur(cond.at_least_ms)} have passed since {pb.ref_name(cond.since)}"
    if isinstance(cond, pb.EverCond):
        return f"{who} has done '{cond.name}'{_where(cond.where)} at least once"
    if isinstance(cond, pb.TraitsCond):
        parts = [
            f"{pb.ref_name(ref)} is " + " or ".join(repr(v) for v in values)
            for ref, values in cond.pairs
        ]
        return " and ".join(parts)
    if isinstance(cond, pb.AllCond):
        return "(" + " AND ".join(condition(c, scope) for c in cond.of) + ")"
    if isinstance(cond, pb.AnyCond):
        return "(" + " OR ".join(condition(c, scope) for c in cond.of) + ")"
    return "NOT (" + condition(cond.of, scope) + ")"


def trigger(t: pb.Trigger) -> str:
    lines = [f"{t.id} ({t.file}:{t.line})"]
    if t.description:
        lines.append(f"  {t.description}")
    lines.append(f"  fires for each {t.scope} when {condition(t.when, t.scope)}")
    what = f"template '{t.action.template}'" if t.action.template else "an inline message"
    if t.mode == "shadow":
        lines.append(
            f"  shadow mode: records what it would send ({t.action.channel}), sends nothing"
        )
    else:
        lines.append(f"  reaches out by {t.action.channel} with {what}")
    if t.cooldown_ms:
        lines.append(
            f"  at most once per {dur(t.cooldown_ms)} per {t.scope}; "
            "episodes inside the cooldown are recorded as suppressed"
        )
    else:
        lines.append("  no cooldown: every new episode is acted on")
    if t.holdout:
        lines.append(f"  {t.holdout * 100:g}% of {t.scope}s held out as a control group")
    if t.priority:
        lines.append(f"  priority {t.priority}")
    if t.goal:
        lines.append(
            f"  goal: '{t.goal.event}'{_where(t.goal.where)} within {dur(t.goal.within_ms)}"
        )
    if t.failure:
        lines.append(
            f"  failure: '{t.failure.event}'{_where(t.failure.where)} "
            f"within {dur(t.failure.within_ms)}"
        )
    return "\n".join(lines)
