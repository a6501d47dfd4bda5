"""`anomaly` and `overdue` in the engine: they learn each subject's normal from its events and
fire on what is unusual for that subject, with evidence; and `forewarn detect` on CSV."""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest

from forewarn import describe, engine
from forewarn.cli import main
from forewarn.errors import PlaybookError
from forewarn.live import Snapshot
from forewarn.model import event_from_dict, order_key
from forewarn.runner import Runner

from .factories import DAY, HOUR, MINUTE, T0_MS, at, events, replay, times, track, trigger

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def _errors(
    rng: random.Random, days: int, per_hour: float, account: str = "acme"
) -> list[dict[str, Any]]:
    """Errors at a steady rate with a daily rhythm (busier by day), as Poisson arrivals."""
    out: list[dict[str, Any]] = []
    t = 0.0
    end = days * DAY
    while True:
        hour = int(t // HOUR) % 24
        rate = per_hour * (1.6 if 8 <= hour < 20 else 0.4)
        t += rng.expovariate(rate / HOUR)
        if t >= end:
            return out
        out.append(track("Error", at(int(t)), "u1", account))


ERRORS = "{anomaly: {name: Error, window: 10m}}"


def test_a_burst_fires_once_as_it_happens_and_steady_noise_does_not():
    rng = random.Random(5)
    history = _errors(rng, 21, per_hour=6)
    burst_at = 21 * DAY + 14 * HOUR + 3 * MINUTE
    burst = [track("Error", at(burst_at + i * 5_000), "u1", "acme") for i in range(60)]
    after = [track("Error", at(21 * DAY + 16 * HOUR + i * 600_000), "u1", "acme") for i in range(6)]
    fired = replay(trigger(ERRORS, scope="account"), history + burst + after)
    assert len(fired) == 1
    (f,) = fired
    # inside the window the burst began in, before it is over
    assert burst_at <= f.at_ms - T0_MS < burst_at // 600_000 * 600_000 + 600_000
    ev = f.evidence
    assert ev["condition"] == "anomaly" and ev["warm"] is True
    assert ev["observed"] > ev["expected"] and 0 < ev["score"] <= 1


def test_nothing_is_judged_before_the_detector_has_learned():
    rng = random.Random(6)
    start = [track("Error", at(i * 30_000), "u1", "acme") for i in range(100)]  # a busy first hour
    assert replay(trigger(ERRORS, scope="account"), start + _errors(rng, 1, per_hour=6)) == []


def test_down_notices_a_silence_without_a_new_event():
    # 30 calls every 10 minutes for three days, then none: a drop of the busy API
    steady = [track("Api Call", at(i * 20_000), "u1") for i in range(3 * 24 * 180)]
    down = "{anomaly: {name: Api Call, window: 10m, direction: down}}"
    fired = replay(trigger(down), steady, until=at(days=3, hours=2))
    assert len(fired) == 1
    silence_from = T0_MS + 3 * DAY
    assert silence_from <= fired[0].at_ms <= silence_from + HOUR
    assert fired[0].evidence["observed"] < fired[0].evidence["expected"]


def test_a_value_far_from_its_normal_fires():
    rng = random.Random(8)
    calls = [
        track("Api Call", at(i * 120_000), "u1", ms=rng.gauss(100, 10)) for i in range(14 * 24 * 30)
    ]
    slow_from = 14 * DAY + 10 * HOUR
    slow = [
        track("Api Call", at(slow_from + i * 60_000), "u1", ms=rng.gauss(900, 50))
        for i in range(30)
    ]
    cond = "{anomaly: {name: Api Call, value: properties.ms, window: 10m, direction: both}}"
    fired = replay(trigger(cond), calls + slow)
    assert len(fired) == 1 and fired[0].at_ms >= T0_MS + slow_from
    assert fired[0].evidence["value"] == "properties.ms"


@pytest.mark.parametrize(
    ("cond", "says"),
    [
        (
            "{anomaly: {name: E, direction: sideways}}",
            "anomaly.direction 'sideways': give one of up, down, both",
        ),
        ("{anomaly: {name: E, sensitivity: extreme}}", "give one of low, medium, high"),
        ("{anomaly: {name: E, window: 30s}}", "anomaly.window must be at least 1m"),
        ("{anomaly: {name: E, value: traits.seats}}", "reads the event's properties.* only"),
        ("{anomaly: {name: E, value: 'properties.ms +'}}", "anomaly.value does not parse"),
        ("{overdue: {name: E, min_events: 1}}", "overdue.min_events must be at least 2"),
        ("{overdue: {name: E, factor: 0.5}}", "overdue.factor"),
        ("{overdue: {name: E, lapse: 0.3}}", "overdue.lapse must be between 0.5 and 0.999"),
        (
            "{overdue: {name: E, factor: 2, lapse: 0.6}}",
            "factor (silence against the typical gap) or lapse",
        ),
    ],
)
def test_bad_settings_are_refused_with_what_to_write(cond, says):
    with pytest.raises(PlaybookError) as caught:
        trigger(cond)
    assert says in str(caught.value)


def test_overdue_fires_at_its_own_rhythm_and_rearms_at_the_next_event():
    weekly = [track("Order", at(days=7 * i), "u1") for i in range(5)]
    fortnightly = [track("Order", at(days=14 * i), "u2") for i in range(5)]
    cond = "{overdue: {name: Order, factor: 2, min_events: 3}}"
    fired = replay(trigger(cond), weekly + fortnightly, until=at(days=150))
    by = {f.subject: f for f in fired}
    assert sorted(by) == ["u1", "u2"] and len(fired) == 2
    # last order + 2 x the typical gap
    assert by["u1"].at_ms == T0_MS + (28 + 14) * DAY
    assert by["u2"].at_ms == T0_MS + (56 + 28) * DAY
    ev = by["u1"].evidence
    assert (ev["expected"], ev["observed"], ev["threshold"], ev["score"]) == (
        "7d",
        "14d",
        "14d",
        1.0,
    )
    again = replay(trigger(cond), [*weekly, track("Order", at(days=50), "u1")], until=at(days=150))
    # overdue on day 42, re-armed by the order on day 50, overdue again later
    assert len(again) == 2 and times(again)[0] == at(days=42)
    assert again[1].at_ms > T0_MS + 50 * DAY


def test_overdue_with_lapse_fires_when_stopping_is_likely_and_rearms_at_the_next_event():
    weekly = [track("Order", at(days=7 * i), "u1") for i in range(5)]
    cond = "{overdue: {name: Order, lapse: 0.7, min_events: 3}}"
    fired = replay(trigger(cond), weekly, until=at(days=150))
    assert len(fired) == 1
    ev = fired[0].evidence
    assert ev["lapse"] == 0.7 and ev["expected"] == "7d" and 0.7 <= ev["stopped"] == ev["score"]
    silent_days = (fired[0].at_ms - T0_MS) / DAY - 28
    assert 14 < silent_days < 35  # past the factor-2 point, the record of 4 repeats trusted
    back = track("Order", at(days=60), "u1")
    again = replay(trigger(cond), [*weekly, back], until=at(days=200))
    assert (
        len(again) == 2 and again[0].at_ms == fired[0].at_ms and again[1].at_ms > T0_MS + 60 * DAY
    )


def test_check_says_what_each_overdue_rule_waits_for():
    (by_factor,) = trigger("{overdue: {name: Order, factor: 2.5}}")
    (by_lapse,) = trigger("{overdue: {name: Order, lapse: 0.7}}")
    assert "longer than 2.5x its own typical gap" in describe.trigger(by_factor)
    assert "probably stopped 'Order'" in describe.trigger(by_lapse)
    assert "at least 70%" in describe.trigger(by_lapse)


def test_overdue_waits_for_min_events():
    two = [track("Order", at(days=7 * i), "u1") for i in range(2)]
    assert replay(trigger("{overdue: {name: Order, min_events: 3}}"), two, until=at(days=400)) == []


def test_learned_state_survives_a_snapshot():
    """The detector's state is plain numbers: a runner restored from a snapshot taken halfway
    fires exactly as one that ran through."""
    rng = random.Random(9)
    history = _errors(rng, 15, per_hour=6)
    burst_at = 15 * DAY + 13 * HOUR
    burst = [track("Error", at(burst_at + i * 5_000), "u1", "acme") for i in range(60)]
    triggers = trigger(ERRORS, scope="account")
    expected = replay(triggers, history + burst)
    assert len(expected) == 1
    evs = sorted(events(history + burst), key=order_key)
    half = len(history) // 2
    first = Runner(engine.State(engine.Playbook(triggers)), lateness_ms=0)
    assert first.push_many(evs[:half]) == []
    state = first.state
    snap = Snapshot(0, first.clock_ms, first.applied_ms, state.users, state.accounts, {}, {})
    restored = msgspec.msgpack.decode(msgspec.msgpack.encode(snap), type=Snapshot)
    second = Runner(engine.State(engine.Playbook(triggers)), lateness_ms=0)
    second.state.users, second.state.accounts = restored.users, restored.accounts
    second.clock_ms, second.applied_ms = restored.clock_ms, restored.applied_ms
    fired = second.push_many(evs[half:])
    assert [(f.subject, f.at_ms, f.evidence) for f in fired] == [
        (f.subject, f.at_ms, f.evidence) for f in expected
    ]


# --- forewarn detect --------------------------------------------------------------------------


def _detect(capsys, path: Path, *extra: str) -> tuple[int, list[dict[str, str]], str]:
    code = main(
        ["detect", "--input", str(path), "--time-column", "t", "--value-column", "v", *extra]
    )
    out, err = capsys.readouterr()
    return code, list(csv.DictReader(io.StringIO(out))), err


def test_detect_scores_every_row_in_order_and_flags_the_outlier(tmp_path, capsys):
    rng = random.Random(2)
    rows = [(T0_MS // 1000 + i * 3600, max(0, round(rng.gauss(20, 3)))) for i in range(24 * 21)]
    rows[24 * 20 + 5] = (rows[24 * 20 + 5][0], 200)
    path = tmp_path / "s.csv"
    path.write_text(
        "t,v\n" + "".join(f"{t},{v}\n" for t, v in rows) + "2026-02-01T00:00:00Z,oops\n"
    )
    code, out, err = _detect(capsys, path, "--direction", "up")
    assert code == 0
    assert [r["value"] for r in out] == [str(v) for _, v in rows] + ["oops"]
    assert list(out[0]) == ["timestamp", "value", "score", "alarm"]
    alarms = [i for i, r in enumerate(out) if r["alarm"] == "1"]
    assert alarms == [24 * 20 + 5]
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in out[:-1])
    assert out[-1]["score"] == "" and "line " + str(len(rows) + 2) in err and "'oops'" in err


def test_detect_names_a_missing_column(tmp_path, capsys):
    path = tmp_path / "s.csv"
    path.write_text("time,value\n1,2\n")
    code, _, err = _detect(capsys, path)
    assert code == 2 and "no column 't' in the CSV header; it has: time, value" in err


def test_detect_on_a_real_crash_rate_series(capsys):
    series = SHARED / "ms-cloud-monitoring" / "data" / "application-crash-rate-2" / "app2-01.csv"
    if not series.is_file():
        pytest.skip(f"{series} is not here: the shared datasets sit beside the repository")
    code = main(
        ["detect", "--input", str(series), "--time-column", "TimeStamp", "--value-column", "Value"]
    )
    out, _ = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(out)))
    with series.open() as f:
        labels = [row["Label"] for row in csv.DictReader(f)]
    assert code == 0 and len(rows) == len(labels)
    alarms = [i for i, r in enumerate(rows) if r["alarm"] == "1"]
    assert alarms, "no alarm on a series with labelled anomalies"
    hits = sum(1 for i in alarms if "1" in labels[max(0, i - 3) : i + 4])
    assert hits / len(alarms) >= 0.5, "most alarms should be at or near a labelled anomaly"


def test_the_engine_keeps_anomaly_state_compact():
    rng = random.Random(3)
    triggers = trigger(ERRORS, scope="account")
    state = engine.State(engine.Playbook(triggers))
    for e in sorted(_errors(rng, 8, per_hour=6), key=lambda m: m["timestamp"]):
        event = event_from_dict(e)
        engine.apply(state, event, event.timestamp_ms)
    states = state.accounts["acme"].states
    assert states is not None
    ts = states[0]
    assert len(msgspec.msgpack.encode(ts)) < 160  # the detector packed in 56 bytes, and the window
