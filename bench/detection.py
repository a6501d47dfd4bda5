"""Detection quality on simulated worlds: each example trigger against the simulator's ground
truth; prints JSON.

A seeded world (`forewarn.simulate`) streams through the example playbooks and the default
policy in-process (as `forewarn replay` would run them), every firing kept. Each trigger is
matched to the problem kind it is meant to catch (TARGETS); a firing is a true positive when
its subject has a problem of that kind whose onset lies at or before the firing and at most
HORIZON before it. Per trigger:

- `precision`: true-positive firings / firings;
- `recall`: problems of the kind caught by at least one such firing / problems of the kind
  (all of them, including those too early in the world for the trigger's baseline to exist:
  `recall_eligible` counts only problems that start once the world has run long enough for
  the trigger's baseline);
- `delay_to_firing_s` / `delay_to_outreach_s`: the median time from a caught problem's onset to
  its first firing, and to the first message decided `send` (its send time: the priority window
  and quiet hours included), with the 90th percentile beside it.

Triggers no simulated problem corresponds to are reported with their firings and `target: null`.

    python bench/detection.py [--quick] [--accounts N] [--days D] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from forewarn import simulate
from forewarn.engine import Firing
from forewarn.playbook import Trigger
from forewarn.settings import policy as policy_settings
from forewarn.simulate_outreach import EngineReach
from forewarn.sources import load_playbooks

ROOT = Path(__file__).resolve().parents[1]
PLAYBOOKS = ROOT / "examples" / "playbooks"
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY_MS = simulate.DAY_MS
# trigger -> the simulated problem kind it is meant to catch (None: no simulated problem)
TARGETS: dict[str, str | None] = {
    "error-spike": "error_spike",
    "known-bug": None,  # the simulated errors carry no known-bug fingerprint
    "storage-85": "storage_limit",
    "renewal-at-risk": "usage_decay",  # nobody logging in before a renewal: churn
    "payment-failed": "payment_failed",
    "onboarding-stalled": "stalled_onboarding",
    "settings-dwell": "stuck_in_settings",
    "usage-drop": "usage_decay",
    "reports-unused": None,  # feature use in the world is random: no problem behind it
}
HORIZON_MS = {kind: 7 * DAY_MS for kind in simulate.PROBLEMS}
HORIZON_MS["usage_decay"] = 21 * DAY_MS  # decay runs over two weeks


def history_needed_ms(trigger: Trigger) -> int:
    """How much history the trigger needs before it can fire (spike/drop baselines)."""
    when = trigger.when
    window = getattr(when, "window_ms", 0) or 0
    baseline = getattr(when, "baseline_ms", 0) or 0
    return int(window + baseline)


def measure(accounts: int, days: int, seed: int) -> dict[str, Any]:
    triggers = load_playbooks(PLAYBOOKS)
    firings: list[Firing] = []
    reach = EngineReach(triggers, policy_settings(), firings.append)
    started = time.process_time()
    world, messages = simulate.generate(accounts, days, seed, START_MS, reach=reach)
    count = sum(1 for _ in messages)
    end_ms = START_MS + (days + 3) * DAY_MS
    reach.finish(end_ms)
    cpu_s = time.process_time() - started

    problems: dict[tuple[str, str], list[simulate.Truth]] = defaultdict(list)
    for truth in world.truth:
        problems[(truth.kind, truth.subject)].append(truth)
    rows = []
    for t in triggers:
        kind = TARGETS.get(t.id)
        mine = [f for f in firings if f.trigger == t.id]
        row: dict[str, Any] = {"trigger": t.id, "target": kind, "firings": len(mine)}
        if kind is None:
            rows.append(row)
            continue
        horizon = HORIZON_MS[kind]
        caught: dict[int, tuple[int, int | None]] = {}  # id(truth) -> first firing, first send
        hits = 0
        for f in mine:
            match = [
                p
                for p in problems.get((kind, f.subject), ())
                if p.onset_ms <= f.at_ms <= p.onset_ms + horizon
            ]
            if not match:
                continue
            hits += 1
            for p in match:
                first, sent = caught.get(id(p), (f.at_ms, None))
                if f.decision == "send" and sent is None:
                    sent = f.send_at_ms if f.send_at_ms is not None else f.at_ms
                caught[id(p)] = (min(first, f.at_ms), sent)
        of_kind = [p for p in world.truth if p.kind == kind]
        need = history_needed_ms(t)
        eligible = [p for p in of_kind if p.onset_ms - START_MS >= need]
        onset = {id(p): p.onset_ms for p in of_kind}
        to_firing = [(first - onset[k]) / 1000 for k, (first, _) in caught.items()]
        to_send = [(sent - onset[k]) / 1000 for k, (_, sent) in caught.items() if sent]
        row.update(
            problems=len(of_kind),
            caught=len(caught),
            precision=_ratio(hits, len(mine)),
            recall=_ratio(len(caught), len(of_kind)),
            recall_eligible=_ratio(sum(1 for p in eligible if id(p) in caught), len(eligible)),
            delay_to_firing_s=_quantiles(to_firing),
            delay_to_outreach_s=_quantiles(to_send),
        )
        rows.append(row)
    return {
        "world": {"accounts": accounts, "days": days, "seed": seed, "events": count},
        "cpu_s": round(cpu_s, 1),
        "triggers": rows,
    }


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 3) if b else None


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
    return {"median": round(statistics.median(values), 1), "p90": round(p90, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small world, seconds")
    parser.add_argument("--accounts", type=int, help="default 2000 (quick: 200)")
    parser.add_argument("--days", type=int, help="default 45 (quick: 40)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    accounts = args.accounts or (200 if args.quick else 2000)
    days = args.days or (40 if args.quick else 45)
    print(json.dumps(measure(accounts, days, args.seed), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
