"""forewarn.stats: published values, coverage and error rates measured on seeded simulations,
and properties that hold for any counts."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forewarn.stats import (
    Interval,
    Sequential,
    lift,
    newcombe,
    plan,
    prevented,
    sample_size,
    verdict,
    wilson,
)

# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3.
WILSON = [
    (81, 263, (0.2553, 0.3662)),
    (15, 148, (0.0624, 0.1605)),
    (0, 20, (0.0, 0.1611)),
    (1, 29, (0.0061, 0.1718)),
]

# Newcombe (1998), "Interval estimation for the difference between independent proportions",
# Table II, method 10.
NEWCOMBE = [
    (56, 70, 48, 80, (0.0524, 0.3339)),
    (9, 10, 3, 10, (0.1705, 0.8090)),
    (5, 56, 0, 29, (-0.0381, 0.1926)),
    (0, 10, 0, 20, (-0.1611, 0.2775)),
    (0, 10, 0, 10, (-0.2775, 0.2775)),
    (10, 10, 0, 20, (0.6791, 1.0)),
    (10, 10, 0, 10, (0.6075, 1.0)),
]


@pytest.mark.parametrize(("x", "n", "expected"), WILSON)
def test_wilson_matches_newcombe_table_i(x, n, expected):
    assert wilson(x, n) == pytest.approx(expected, abs=5e-5)


@pytest.mark.parametrize(("x1", "n1", "x2", "n2", "expected"), NEWCOMBE)
def test_newcombe_matches_newcombe_table_ii(x1, n1, x2, n2, expected):
    assert newcombe(x1, n1, x2, n2) == pytest.approx(expected, abs=5e-5)


def test_empty_groups_give_the_widest_intervals():
    assert wilson(0, 0) == (0.0, 1.0)
    assert newcombe(0, 0, 3, 10) == (-1.0, 1.0)
    assert newcombe(3, 10, 0, 0) == (-1.0, 1.0)
    assert wilson(5, 5).high == 1.0 and wilson(0, 5).low == 0.0


def test_impossible_counts_are_refused():
    with pytest.raises(ValueError, match="successes"):
        wilson(6, 5)
    with pytest.raises(ValueError, match="successes"):
        newcombe(-1, 5, 0, 5)
    with pytest.raises(ValueError, match="confidence"):
        wilson(1, 5, confidence=1.0)


def _binomial(rng: random.Random, n: int, p: float) -> int:
    return sum(rng.random() < p for _ in range(n))


SPLITS = [(1800, 200), (1000, 1000), (180, 20)]  # a 10% holdout, an even split, a small one


@pytest.mark.parametrize(("n_treated", "n_control"), SPLITS)
def test_newcombe_covers_the_true_difference(n_treated, n_control):
    """Tickets 20% held out, 15% treated: the 95% interval holds -0.05 in at least 93% of 1000
    seeded runs (measured: 942, 958, 950). A thousand, not a hundred: an interval of exactly 95%
    falls to 92 of 100 or fewer about one time in eight, so 100 runs would test the seed."""
    p_treated, p_control = 0.15, 0.20
    rng = random.Random(f"coverage {n_treated}/{n_control}")
    covered = 0
    for _ in range(1000):
        low, high = newcombe(
            _binomial(rng, n_treated, p_treated),
            n_treated,
            _binomial(rng, n_control, p_control),
            n_control,
        )
        covered += low <= p_treated - p_control <= high
    assert covered >= 930


def _pmf(n: int, p: float) -> list[float]:
    return [
        math.exp(
            math.lgamma(n + 1)
            - math.lgamma(k + 1)
            - math.lgamma(n - k + 1)
            + k * math.log(p)
            + (n - k) * math.log(1 - p)
        )
        for k in range(n + 1)
    ]


@pytest.mark.parametrize(("n_treated", "n_control"), SPLITS)
def test_newcombe_exact_coverage_is_near_95(n_treated, n_control):
    """The same, without simulation noise: every outcome weighed by its binomial probability."""
    treated, control = _pmf(n_treated, 0.15), _pmf(n_control, 0.20)
    coverage = 0.0
    for x1, w1 in enumerate(treated):
        if w1 < 1e-12:
            continue
        for x2, w2 in enumerate(control):
            if w2 >= 1e-12:
                low, high = newcombe(x1, n_treated, x2, n_control)
                coverage += w1 * w2 * (low <= -0.05 <= high)
    assert 0.94 <= coverage <= 0.97  # measured: 0.9503, 0.9502, 0.9548


def test_sample_size_matches_the_textbook():
    # Fleiss: 20% against 25%, alpha .05 two-sided, power .8: 1094 per group.
    assert sample_size(0.2, 0.05, holdout=0.5) == 2 * 1094
    # a 10% holdout costs far more firings than an even split, about 1 / (4 h (1 - h)) as many
    ten = sample_size(0.2, 0.05, holdout=0.1)
    assert 2188 / (4 * 0.1 * 0.9) * 0.9 < ten < 2188 / (4 * 0.1 * 0.9) * 1.1
    # smaller effects, more power and a stricter alpha all need more firings
    assert sample_size(0.2, 0.02) > sample_size(0.2, 0.05)
    assert sample_size(0.2, 0.05, power=0.9) > sample_size(0.2, 0.05)
    assert sample_size(0.2, 0.05, alpha=0.01) > sample_size(0.2, 0.05)


def test_sample_size_is_refused_when_it_cannot_be_right():
    for args in [(0.2, 0.0), (0.02, -0.05), (0.98, 0.05), (1.2, 0.05)]:
        with pytest.raises(ValueError):
            sample_size(*args)
    with pytest.raises(ValueError, match="holdout"):
        sample_size(0.2, 0.05, holdout=0.0)


def test_plan_counts_the_firings_and_the_days_left():
    p = plan(0.2, 0.05, firings_per_day=100, holdout=0.5, so_far=188)
    assert p["firings"] == 2188 and p["treated"] + p["held_out"] == 2188
    assert p["remaining"] == 2000 and p["days"] == pytest.approx(20.0)
    assert plan(0.2, 0.05, firings_per_day=0, holdout=0.5)["days"] is None
    assert plan(0.2, 0.05, firings_per_day=10, holdout=0.5, so_far=10_000)["remaining"] == 0


def test_lift_compares_the_groups():
    result = lift(150, 1000, 40, 200)
    assert result.treated_rate == pytest.approx(0.15) and result.control_rate == pytest.approx(0.2)
    assert result.absolute == pytest.approx(-0.05)
    assert result.absolute_ci == newcombe(150, 1000, 40, 200)
    assert result.relative == pytest.approx(-0.25)
    assert result.relative_ci is not None
    # Katz: exp(log(0.75) ± 1.96 sqrt(1/150 - 1/1000 + 1/40 - 1/200)) - 1
    se = math.sqrt(1 / 150 - 1 / 1000 + 1 / 40 - 1 / 200)
    expected = (0.75 * math.exp(-1.959964 * se) - 1, 0.75 * math.exp(1.959964 * se) - 1)
    assert result.relative_ci == pytest.approx(expected, abs=1e-5)


def test_lift_edge_cases_answer_none_not_an_error():
    assert lift(0, 0, 0, 0) == (None, None, None, None, None, None)
    assert lift(3, 10, 0, 0).treated_rate == 0.3 and lift(3, 10, 0, 0).absolute is None
    none_held_out_failed = lift(3, 10, 0, 10)
    assert none_held_out_failed.absolute == pytest.approx(0.3)
    assert none_held_out_failed.relative is None and none_held_out_failed.relative_ci is None
    none_treated_failed = lift(0, 100, 5, 20)
    assert none_treated_failed.relative == -1.0
    assert none_treated_failed.relative_ci is not None
    assert none_treated_failed.relative_ci.low == -1.0 < none_treated_failed.relative_ci.high < 0
    everyone = lift(5, 5, 3, 3)
    assert everyone.relative == 0.0
    assert everyone.relative_ci is not None
    assert everyone.relative_ci.low < 0 < everyone.relative_ci.high


@pytest.mark.parametrize(
    ("kind", "counts", "word"),
    [
        ("failure", (1000, 10_000, 200, 1000), "helps"),  # tickets 10% against 20%
        ("failure", (3000, 10_000, 200, 1000), "hurts"),
        ("goal", (6000, 10_000, 400, 1000), "helps"),  # tasks done 60% against 40%
        ("goal", (3000, 10_000, 400, 1000), "hurts"),
        ("failure", (2000, 10_000, 200, 1000), "no effect"),
        ("goal", (50, 100, 2, 10), "no evidence yet"),
        ("failure", (0, 0, 0, 0), "no evidence yet"),
        ("failure", (5, 10, 0, 0), "no evidence yet"),
    ],
)
def test_verdict_words(kind, counts, word):
    result = verdict(kind, *counts, holdout=0.1)
    assert result.word == word
    assert result.text.startswith(word + ":")


def test_no_evidence_yet_says_how_many_more_firings():
    result = verdict("failure", 150, 1000, 40, 200, holdout=0.1)
    needed = sample_size(190 / 1200, 0.05, holdout=0.1)
    assert result.word == "no evidence yet"
    assert f"about {needed - 1200:,} more firings needed to see a 5-point effect" in result.text
    # a planned sample given up front is the one counted down
    planned = verdict("failure", 150, 1000, 40, 200, holdout=0.1, planned=5000)
    assert "about 3,800 more firings" in planned.text


def test_no_effect_waits_for_the_planned_sample():
    # the same flat result: not yet "no effect" while short of the plan
    early = verdict("failure", 2000, 10_000, 200, 1000, holdout=0.1, planned=20_000)
    assert early.word == "no evidence yet"
    # the plan reached but the interval wider than ±5 points: more firings, not "no effect"
    wide = verdict("failure", 200, 1000, 20, 100, holdout=0.1, planned=1000)
    assert wide.word == "no evidence yet" and "more firings" in wide.text


def test_prevented_counts_failures_saved_and_caused():
    saved, interval = prevented(1000, 10_000, 200, 1000)
    assert saved == pytest.approx(1000.0)
    assert 0 < interval.low < saved < interval.high
    low, high = newcombe(200, 1000, 1000, 10_000)
    assert interval == pytest.approx((10_000 * low, 10_000 * high))
    caused, worse = prevented(3000, 10_000, 200, 1000)
    assert caused == pytest.approx(-1000.0) and worse.high < 0
    assert prevented(0, 0, 5, 10) == (0.0, Interval(0.0, 0.0))
    assert prevented(1, 10, 0, 0) == (0.0, Interval(-10.0, 10.0))


def _monitor(rng: random.Random, p_treated: float, p_control: float, holdout: float) -> bool:
    """Feed 5000 firings, asking the test after every 50; True if it ever cried harm."""
    test = Sequential()
    x1 = n1 = x2 = n2 = 0
    for i in range(1, 5001):
        if rng.random() < holdout:
            n2 += 1
            x2 += rng.random() < p_control
        else:
            n1 += 1
            x1 += rng.random() < p_treated
        if i % 50 == 0 and test.harmful(x1, n1, x2, n2):
            return True
    return False


@pytest.mark.parametrize("holdout", [0.1, 0.5])
def test_sequential_false_alarms_stay_near_alpha_under_continuous_monitoring(holdout):
    rng = random.Random(f"null {holdout}")
    alarms = sum(_monitor(rng, 0.2, 0.2, holdout) for _ in range(200))
    assert alarms <= 14  # 7% of 200: alpha .05 plus simulation noise (measured: 2 and 5)


@pytest.mark.parametrize("holdout", [0.1, 0.5])
def test_sequential_detects_real_harm(holdout):
    rng = random.Random(f"harm {holdout}")
    detected = sum(_monitor(rng, 0.3, 0.2, holdout) for _ in range(200))
    assert detected >= 180  # 90% (measured: 197 and 200)


def test_sequential_is_sticky_one_sided_and_restorable():
    test = Sequential()
    assert not test.harmful(10, 20, 0, 5)  # too few to say anything
    assert test.p_value(10, 20, 0, 5) == 1.0
    assert not test.harmful(200, 1000, 300, 1000)  # the treated do better: no harm
    assert test.harmful(300, 1000, 200, 1000)
    # the evidence once seen stays: the p-value is the least over every look
    assert test.harmful(1000, 5000, 1000, 5000)
    again = Sequential(state=test.state)
    assert again.harmful(1000, 5000, 1000, 5000)
    # for goals, harm is a lower treated rate
    goals = Sequential()
    assert goals.harmful(200, 1000, 300, 1000, bad="lower")
    assert not Sequential().harmful(300, 1000, 200, 1000, bad="lower")
    with pytest.raises(ValueError, match="bad"):
        goals.harmful(1, 2, 1, 2, bad="worse")


counts = st.integers(0, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))


@given(counts)
def test_wilson_holds_the_rate_inside_zero_one(xn):
    x, n = xn
    low, high = wilson(x, n)
    assert 0.0 <= low <= high <= 1.0
    if n:
        assert low <= x / n <= high
        assert high - low > 0


@given(counts, counts)
def test_newcombe_holds_the_difference_and_mirrors(a, b):
    (x1, n1), (x2, n2) = a, b
    low, high = newcombe(x1, n1, x2, n2)
    assert -1.0 <= low <= high <= 1.0
    if n1 and n2:
        assert low <= x1 / n1 - x2 / n2 <= high
    mirror = newcombe(x2, n2, x1, n1)
    assert mirror == pytest.approx((-high, -low), abs=1e-12)


@given(counts, counts)
def test_lift_and_verdict_never_fail_on_any_counts(a, b):
    (x1, n1), (x2, n2) = a, b
    result = lift(x1, n1, x2, n2)
    if result.relative is not None:
        assert result.relative_ci is not None
        assert result.relative_ci.low <= result.relative <= result.relative_ci.high
        assert result.relative_ci.low >= -1.0
    for kind in ("failure", "goal"):
        assert verdict(kind, x1, n1, x2, n2, holdout=0.1).word in {
            "helps",
            "hurts",
            "no evidence yet",
            "no effect",
        }
    saved, interval = prevented(x1, n1, x2, n2)
    assert interval.low <= saved <= interval.high


@given(st.lists(st.tuples(counts, counts), min_size=1, max_size=10))
def test_sequential_p_value_only_goes_down(looks):
    test = Sequential()
    last = 1.0
    for (x1, n1), (x2, n2) in looks:
        p = test.p_value(x1, n1, x2, n2)
        assert 0.0 <= p <= last
        last = p
