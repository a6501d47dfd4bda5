"""Detection quality on real labelled data; prints JSON.

1. Microsoft cloud-monitoring series (../shared/datasets/ms-cloud-monitoring): every CSV is one
   series, fed sample by sample. A labelled anomaly run counts as detected once if an alarm falls
   inside it or up to LEAD samples before it; alarms anywhere else are false alarms. Precision is
   detected runs / (detected runs + false alarms). Compared: forewarn.detect.Detector at each
   sensitivity, the fixed `spike` rule (count ≥ 5 × the mean of the previous 7 days and ≥ a
   minimum, rising edge), an EWMA mean/variance z-score, a Poisson tail probability on an EW mean,
   and the detector without its seasonal profile.
2. Simulated worlds (bench/detection.py): each example trigger's precision and recall against
   the simulator's ground truth, and the delay from a problem's onset to the outreach.
3. Online Retail (../shared/datasets/onlineretail): at the end of the calibration period
   (2011-09-01), predict "no purchase in the holdout" with `overdue` (forewarn.detect.Gaps) and a
   `drop`-like rule, beside the simple inactivity baselines of baseline_trigger_eval.csv.

    python bench/quality.py [--quick]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from forewarn.detect import DAY_MS, Detector, Gaps

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detection

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MONITORING = DATASETS / "ms-cloud-monitoring" / "data"
RETAIL = DATASETS / "onlineretail"
LEAD = 3  # an alarm up to 3 samples before a run detects it
CRASH = ("application-crash-rate-1", "application-crash-rate-2")


# --------------------------------------------------------------------------- series


class Series(msgspec.Struct):
    domain: str
    name: str
    period_ms: int
    counts: bool  # every value an integer: an event count
    times: list[int]
    values: list[float]
    labels: list[int]


def load_series(quick: bool = False) -> list[Series]:
    out = []
    for path in sorted(MONITORING.glob("*/*.csv")):
        times, values, labels = [], [], []
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if not row["Value"].strip():
                    continue  # a few files have empty values: no sample
                when = datetime.fromisoformat(row["TimeStamp"].strip('"')).replace(tzinfo=UTC)
                times.append(int(when.timestamp() * 1000))
                values.append(float(row["Value"]))
                labels.append(int(row["Label"]))
        steps = sorted(b - a for a, b in itertools.pairwise(times))
        period = steps[len(steps) // 2]
        if quick and len(times) > 3000:
            continue
        counts = all(v == int(v) for v in values)
        out.append(Series(path.parent.name, path.name, period, counts, times, values, labels))
    return out


def runs_of(labels: list[int]) -> list[tuple[int, int]]:
    runs, i = [], 0
    while i < len(labels):
        if labels[i]:
            j = i
            while j + 1 < len(labels) and labels[j + 1]:
                j += 1
            runs.append((i, j))
            i = j + 1
        else:
            i += 1
    return runs


class Outcome(msgspec.Struct):
    runs: int
    detected: int
    false_alarms: int
    delays: list[int]


def score_alarms(alarms: list[int], labels: list[int]) -> Outcome:
    runs = runs_of(labels)
    owner = [-1] * len(labels)
    for k, (a, b) in enumerate(runs):
        for i in range(max(0, a - LEAD), b + 1):
            if owner[i] < 0:
                owner[i] = k
    first: dict[int, int] = {}
    false_alarms = 0
    for i in alarms:
        k = owner[i]
        if k < 0:
            false_alarms += 1
        elif k not in first:
            first[k] = i
    delays = [max(0, i - runs[k][0]) for k, i in first.items()]
    return Outcome(len(runs), len(first), false_alarms, delays)


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    runs = sum(o.runs for o in outcomes)
    hits = sum(o.detected for o in outcomes)
    false = sum(o.false_alarms for o in outcomes)
    delays = [d for o in outcomes for d in o.delays]
    precision = hits / (hits + false) if hits + false else 0.0
    recall = hits / runs if runs else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "series": len(outcomes),
        "runs": runs,
        "detected": hits,
        "false_alarms": false,
        "f1": round(f1, 3),
        "precision": round(precision, 3),
        "recall": round(recall, 3),
        "false_alarms_per_series": round(false / max(1, len(outcomes)), 2),
        "median_delay_samples": statistics.median(delays) if delays else None,
    }


Judge = Callable[[int, float], bool]  # (t_ms, value) -> alarm


def detector_judge(**kwargs: Any) -> Callable[[Series], Judge]:
    def make(s: Series) -> Judge:
        detector = Detector(s.period_ms, counts=s.counts, **kwargs)
        state = detector.new_state()
        return lambda t, v: detector.update(state, t, v).alarm

    return make


def seasonless_judge(**kwargs: Any) -> Callable[[Series], Judge]:
    """The detector with its seasonal profile switched off (bench only)."""

    def make(s: Series) -> Judge:
        detector = Detector(s.period_ms, counts=s.counts, **kwargs)
        detector._use_day = detector._use_week = False
        detector.warm_samples = 12
        state = detector.new_state()
        return lambda t, v: detector.update(state, t, v).alarm

    return make


def fixed_rule_judge(factor: float = 5.0, min_count: float = 10.0) -> Callable[[Series], Judge]:
    """The `spike` rule: value ≥ factor × mean of the previous 7 days and ≥ min_count; eligible
    after 7 days of history; alarms on the rising edge."""

    def make(s: Series) -> Judge:
        size = 7 * DAY_MS // s.period_ms
        window: list[float] = []
        total = [0.0]
        previous = [False]

        def judge(t: int, v: float) -> bool:
            on = False
            if len(window) >= size:
                on = v >= factor * total[0] / len(window) and v >= min_count
            alarm = on and not previous[0]
            previous[0] = on
            window.append(v)
            total[0] += v
            if len(window) > size:
                total[0] -= window.pop(0)
            return alarm

        return judge

    return make


class _Rearm:
    """The detector's once-per-incident rule, for the other candidates."""

    def __init__(self, threshold: float, warm: int) -> None:
        self.threshold, self.warm, self.n, self.wait = threshold, warm, 0, 0

    def __call__(self, deviation: float) -> bool:
        self.n += 1
        if self.n <= self.warm:
            return False
        if self.wait == 0:
            if deviation >= self.threshold:
                self.wait = 3
                return True
            return False
        self.wait = self.wait - 1 if deviation < 0.6 * self.threshold else 3
        return False


def ewma_judge(threshold: float, alpha: float = 0.05) -> Callable[[Series], Judge]:
    """EW mean and variance, upward z-score."""

    def make(s: Series) -> Judge:
        rearm = _Rearm(threshold, 24)
        m = [math.nan, 0.0, 0]

        def judge(t: int, v: float) -> bool:
            if m[2] == 0:
                m[0], m[2] = v, 1
                return False
            z = (v - m[0]) / (math.sqrt(m[1]) or 1e-12)
            a = max(alpha, 1.0 / (m[2] + 1))
            d = v - m[0]
            m[0] += a * d
            m[1] = (1 - a) * (m[1] + a * d * d)
            m[2] += 1
            return rearm(z)

        return judge

    return make


def poisson_judge(threshold: float, alpha: float = 0.05) -> Callable[[Series], Judge]:
    """EW mean rate μ (clipped updates); alarm when -log10 P(X ≥ x | Poisson(μ)) ≥ threshold."""

    def make(s: Series) -> Judge:
        rearm = _Rearm(threshold, 24)
        m = [math.nan, 0]

        def judge(t: int, v: float) -> bool:
            if m[1] == 0:
                m[0], m[1] = v, 1
                return False
            mu = max(m[0], 0.01)
            k = math.floor(v)
            surprise = 0.0
            if k > mu:
                log_tail = k * math.log(mu) - mu - math.lgamma(k + 1) - math.log(1 - mu / (k + 1))
                surprise = -log_tail / math.log(10)
            a = max(alpha, 1.0 / (m[1] + 1))
            m[0] += a * (min(v, 5 * mu + 5) - m[0])
            m[1] += 1
            return rearm(surprise)

        return judge

    return make


def evaluate(
    series: list[Series], make: Callable[[Series], Judge], direction_up_only: bool = True
) -> dict[str, Any]:
    by_domain: dict[str, list[Outcome]] = defaultdict(list)
    for s in series:
        judge = make(s)
        alarms = [i for i, (t, v) in enumerate(zip(s.times, s.values, strict=True)) if judge(t, v)]
        by_domain[s.domain].append(score_alarms(alarms, s.labels))
    every = [o for outcomes in by_domain.values() for o in outcomes]
    crash = [o for d in CRASH for o in by_domain.get(d, [])]
    return {
        "overall": summarise(every),
        "application-crash-rate": summarise(crash),
        "domains": {d: summarise(o) for d, o in sorted(by_domain.items())},
    }


def monitoring(quick: bool) -> dict[str, Any]:
    series = load_series(quick)
    candidates: dict[str, Callable[[Series], Judge]] = {}
    for sensitivity in ("low", "medium", "high"):
        candidates[f"detector:{sensitivity}"] = detector_judge(
            direction="up", sensitivity=sensitivity
        )
    candidates["detector:medium,both"] = detector_judge(direction="both")
    candidates["fixed:5x,min10"] = fixed_rule_judge(5.0, 10.0)
    candidates["fixed:5x,min3"] = fixed_rule_judge(5.0, 3.0)
    candidates["fixed:5x,min0"] = fixed_rule_judge(5.0, 0.0)
    if not quick:
        candidates["detector-no-season:medium"] = seasonless_judge(direction="up")
        for threshold in (4.0, 6.0):
            candidates[f"ewma-z:{threshold:g}"] = ewma_judge(threshold)
        for threshold in (6.0, 10.0):
            candidates[f"poisson-tail:1e-{threshold:g}"] = poisson_judge(threshold)
    results = {name: evaluate(series, make) for name, make in candidates.items()}
    return {
        "series": len(series),
        "samples": sum(len(s.values) for s in series),
        "lead_samples": LEAD,
        "candidates": results,
    }


# --------------------------------------------------------------------------- retail

CAL_START = datetime(2010, 12, 1, tzinfo=UTC)
CUTOFF = datetime(2011, 9, 1, tzinfo=UTC)
HOLDOUT_END = datetime(2011, 12, 10, tzinfo=UTC)


def _ms(d: datetime) -> int:
    return int(d.timestamp() * 1000)


def load_purchases() -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    with gzip.open(RETAIL / "invoices_by_customer.csv.gz", "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["is_cancellation"] == "True":
                continue
            when = datetime.fromisoformat(row["InvoiceDate"]).replace(tzinfo=UTC)
            out[row["CustomerID"]].append(_ms(when))
    return {c: sorted(t) for c, t in out.items()}


def auc(scores: list[float], outcomes: list[bool]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    ranked = sorted(zip(scores, outcomes, strict=True))
    rank_sum, positives, i = 0.0, 0, 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        mid = (i + j) / 2 + 1
        for k in range(i, j + 1):
            if ranked[k][1]:
                rank_sum += mid
                positives += 1
        i = j + 1
    negatives = len(ranked) - positives
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def rule_row(
    population: str, rule: str, threshold: float | str, fires: Iterable[bool], outcome: list[bool]
) -> dict[str, Any]:
    fired = list(fires)
    hits = sum(f and o for f, o in zip(fired, outcome, strict=True))
    n_fired = sum(fired)
    return {
        "population": population,
        "rule": rule,
        "threshold": threshold,
        "fires": n_fired,
        "precision": round(hits / n_fired, 4) if n_fired else None,
        "recall": round(hits / max(1, sum(outcome)), 4),
    }


def retail() -> dict[str, Any]:
    purchases = load_purchases()
    cut = _ms(CUTOFF)
    end = _ms(HOLDOUT_END)
    calib = {c: [t for t in ts if t < cut] for c, ts in purchases.items()}
    calib = {c: ts for c, ts in calib.items() if ts}
    churned = {c: not any(cut <= t < end for t in purchases[c]) for c in calib}
    frequency = {c: len({t // DAY_MS for t in ts}) - 1 for c, ts in calib.items()}
    populations = {
        "all_customers": [c for c in calib],
        "repeaters_freq>=1": [c for c in calib if frequency[c] >= 1],
        "regulars_freq>=3": [c for c in calib if frequency[c] >= 3],
    }
    rows: list[dict[str, Any]] = []
    aucs: list[dict[str, Any]] = []
    for pop, members in populations.items():
        outcome = [churned[c] for c in members]
        days_since = [(cut - calib[c][-1]) / DAY_MS for c in members]
        aucs.append(
            {
                "population": pop,
                "score": "days_since_last (baseline)",
                "auc": round(auc(days_since, outcome), 4),
            }
        )
        # overdue: silence / typical gap (factor), and the probability of having stopped
        # (lapse), both from forewarn.detect.Gaps, fed the customer's purchases in order
        gaps = Gaps(factor=2.0, min_events=2)
        ratio, stopped = [], []
        for c in members:
            state = gaps.new_state()
            for t in calib[c]:
                gaps.update(state, t)
            typical = gaps.typical_gap_ms(state)
            ratio.append((cut - calib[c][-1]) / typical if typical else math.nan)
            p = gaps.stopped(state, cut)
            stopped.append(math.nan if p is None else p)
        for score, values in (
            ("overdue (factor): silence / typical gap", ratio),
            ("overdue (lapse): probability of having stopped", stopped),
        ):
            known = [(r, o) for r, o in zip(values, outcome, strict=True) if not math.isnan(r)]
            if known:
                aucs.append(
                    {
                        "population": pop,
                        "score": score,
                        "scored": len(known),
                        "auc": round(auc([r for r, _ in known], [o for _, o in known]), 4),
                    }
                )
        for factor in (1.5, 2.0, 3.0, 4.0):
            rows.append(
                rule_row(
                    pop,
                    "overdue: factor",
                    factor,
                    (not math.isnan(r) and r >= factor for r in ratio),
                    outcome,
                )
            )
        for lapse in (0.5, 0.6, 0.7, 0.8):
            rows.append(
                rule_row(
                    pop,
                    "overdue: lapse",
                    lapse,
                    (not math.isnan(p) and p >= lapse for p in stopped),
                    outcome,
                )
            )
        # the arithmetic mean gap, as in the baselines
        mean_ratio = []
        for c in members:
            days = sorted({t // DAY_MS for t in calib[c]})
            if len(days) < 2:
                mean_ratio.append(math.nan)
                continue
            mean_gap = (days[-1] - days[0]) / (len(days) - 1)
            mean_ratio.append((cut / DAY_MS - days[-1]) / mean_gap)
        known = [(r, o) for r, o in zip(mean_ratio, outcome, strict=True) if not math.isnan(r)]
        aucs.append(
            {
                "population": pop,
                "score": "silence / mean gap (baseline)",
                "scored": len(known),
                "auc": round(auc([r for r, _ in known], [o for _, o in known]), 4),
            }
        )
        # drop: purchase days in the last 90 days vs the customer's own rate before them
        window = 90 * DAY_MS
        base_start, base_end = _ms(CAL_START), cut - window
        share = window / (base_end - base_start)
        eligible, ratios, drop_outcome = [], [], []
        for c, o in zip(members, outcome, strict=True):
            active_days = {t // DAY_MS for t in calib[c]}
            before = sum(1 for d in active_days if d * DAY_MS < base_end)
            if not before:
                continue  # `drop` needs baseline activity
            recent = len(active_days) - before
            eligible.append(c)
            ratios.append(recent / (before * share))
            drop_outcome.append(o)
        aucs.append(
            {
                "population": pop,
                "score": "drop: 1 - recent / baseline rate",
                "scored": len(eligible),
                "auc": round(auc([-r for r in ratios], drop_outcome), 4),
            }
        )
        for below in (0.25, 0.5):
            rows.append(
                rule_row(
                    pop,
                    "drop: 90d vs own earlier rate",
                    below,
                    (r <= below for r in ratios),
                    drop_outcome,
                )
            )
    baselines = []
    with (RETAIL / "baseline_trigger_eval.csv").open(newline="", encoding="utf-8") as f:
        baselines = list(csv.DictReader(f))
    return {
        "cutoff": CUTOFF.date().isoformat(),
        "outcome": "no non-cancelled invoice 2011-09-01..2011-12-09",
        "rules": rows,
        "auc": aucs,
        "baselines (baseline_trigger_eval.csv)": baselines,
    }


# --------------------------------------------------------------------------- cost


def cost() -> dict[str, Any]:
    detector = Detector(600_000, counts=True)
    state = detector.new_state()
    t = 1_700_000_000_000 - 1_700_000_000_000 % 600_000
    values = [float((i * 7919) % 13) for i in range(20_000)]
    for i, v in enumerate(values[:2000]):
        detector.update(state, t + i * 600_000, v)
    timings = []
    for _ in range(3):
        start = time.process_time()
        for i, v in enumerate(values):
            detector.update(state, t + i * 600_000, v)
        timings.append((time.process_time() - start) / len(values) * 1e6)
    encoded = msgspec.msgpack.encode(state)
    objects = sys.getsizeof(state) + sum(
        sys.getsizeof(x) for x in state if not (isinstance(x, int) and -5 <= x <= 256)
    )
    gaps = Gaps()
    gstate = gaps.new_state()
    for i in range(10):
        gaps.update(gstate, t + i * DAY_MS)
    return {
        "update_us_median_of_3": round(statistics.median(timings), 2),
        "state_numbers": len(state),
        "state_msgpack_bytes": len(encoded),
        "state_python_bytes": objects,
        "gaps_state_msgpack_bytes": len(msgspec.msgpack.encode(gstate)),
    }


def engine_cost(events: int = 200_000, subjects: int = 2_000) -> dict[str, Any]:
    """What an `anomaly` trigger adds per event in the engine, against a windowed `event`
    count over the same events, and its state per subject."""
    from forewarn import engine
    from forewarn.model import Event
    from forewarn.playbook import parse_playbooks
    from forewarn.runner import Runner

    rng = random.Random(4)
    t0 = 1_767_571_200_000
    span = 14 * DAY_MS
    stamps = sorted(rng.randrange(span) for _ in range(events))
    stream = [
        Event("track", "Error", f"u{rng.randrange(subjects)}", None, None, {}, {}, t0 + t)
        for t in stamps
    ]
    conditions = {
        "event_within": "{event: {name: Error, count: 100000000, within: 10m}}",
        "anomaly_up": "{anomaly: {name: Error, window: 10m}}",
        "anomaly_both": "{anomaly: {name: Error, window: 10m, direction: both}}",
    }
    out: dict[str, Any] = {"events": events, "subjects": subjects}
    for label, when in conditions.items():
        text = (
            f"triggers:\n  - id: t\n    when: {when}\n    action: {{channel: email, message: x}}\n"
        )
        triggers = parse_playbooks([("bench.yaml", text)])
        best = float("inf")
        for _ in range(3):
            runner = Runner(engine.State(engine.Playbook(triggers)), lateness_ms=0)
            start = time.process_time()
            runner.replay(stream, t0 + span, lambda f: None)
            best = min(best, time.process_time() - start)
        states = [s.states[0] for s in runner.state.users.values() if s.states]
        size = statistics.median(len(msgspec.msgpack.encode(st)) for st in states)
        out[label] = {"us_per_event": round(best / events * 1e6, 2), "state_msgpack_bytes": size}
    base = out["event_within"]["us_per_event"]
    for label in ("anomaly_up", "anomaly_both"):
        out[label]["added_us_per_event"] = round(out[label]["us_per_event"] - base, 2)
    return out


def detect_cli_cost(rows: int = 1_000_000) -> dict[str, Any]:
    """`forewarn detect` over a CSV of `rows` rows, in this process, output discarded."""
    import io
    import os
    import tempfile

    from forewarn import series

    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "series.csv")
        with open(path, "w", encoding="utf-8") as f:
            f.write("t,v\n")
            t = 1_700_000_000
            for i in range(rows):
                f.write(f"{t + i * 60},{rng.randrange(40)}\n")
        start = time.perf_counter()
        with open(path, encoding="utf-8", newline="") as source:
            alarms = series.run(source, io.StringIO(), "t", "v", err=io.StringIO())
        seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": round(seconds, 2), "alarms": alarms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on a subset")
    parser.add_argument(
        "--no-simulated", action="store_true", help="skip the simulated world (bench/detection.py)"
    )
    args = parser.parse_args(argv)
    if not DATASETS.is_dir():
        print(json.dumps({"error": f"datasets not found: {DATASETS}"}))
        return 1
    started = time.perf_counter()
    out: dict[str, Any] = {"monitoring": monitoring(args.quick)}
    if not args.no_simulated:
        out["simulated"] = detection.measure(*((200, 40) if args.quick else (2000, 45)), seed=1)
    if not args.quick:
        out["retail"] = retail()
    out["cost"] = cost()
    out["engine"] = engine_cost(20_000 if args.quick else 200_000)
    out["detect_cli"] = detect_cli_cost(100_000 if args.quick else 1_000_000)
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
