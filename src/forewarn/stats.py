"""Stats: did reaching out help? Pure.

Every trigger holds out a random share of its firings (the holdout). Each firing ends with a
goal reached or not and a failure or not (`outcomes`). This module compares the rates of the
treated (contacted) firings with those of the held-out ones:

1. `wilson` gives an interval for one rate, and `newcombe` one for the difference of two rates
   (treated minus held out). Both stay inside [0, 1] and [-1, 1] and remain sensible with 0 or
   100% successes and small groups, where the textbook normal (Wald) interval fails.
2. `lift` puts together both rates, their difference with its interval, and the relative change
   (risk ratio minus one) with Katz's log interval.
3. `sample_size` and `plan` say how many firings a test needs to see an effect of a given size,
   given the holdout share, and how long that takes at the current volume.
4. `verdict` puts the comparison into a word and a sentence: helps, hurts, no evidence yet,
   no effect. `prevented` counts the failures reaching out saved.
5. `Sequential` watches for harm while the data comes in: it may be asked after every firing
   and still raises a false alarm with probability at most `alpha`.

Counts are `x` successes (goals reached, or failures) out of `n` firings; group 1 is always the
treated, group 2 the held out. The functions never fail on empty groups or 0 or 100% rates:
they answer `None` or the widest interval instead. They raise `ValueError` only for arguments
that cannot be right (more successes than firings, a negative count, a holdout of 0).

Only the standard library: `math`, and `statistics.NormalDist` for normal quantiles.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple, TypedDict

_NORMAL = NormalDist()


class Interval(NamedTuple):
    low: float
    high: float


def _check(x: int, n: int) -> None:
    if n < 0 or x < 0 or x > n:
        raise ValueError(f"counts must satisfy 0 <= successes <= n, got {x} of {n}")


def _z(confidence: float) -> float:
    """The two-sided normal quantile: 1.96 for 95%."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    return _NORMAL.inv_cdf(0.5 + confidence / 2)


def _fraction(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name} must be strictly between 0 and 1, got {value}")


def wilson(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval for a proportion `successes / n`.

    It is the set of rates p for which the score test of p would not reject: solving
    |x/n - p| <= z * sqrt(p (1 - p) / n) for p gives

        (x + z²/2) / (n + z²)  ±  z / (n + z²) * sqrt(x (n - x) / n + z²/4)

    Why: unlike the Wald interval p ± z sqrt(p(1-p)/n) it never leaves [0, 1], is not a single
    point at 0 or n successes, and keeps close to its nominal coverage for small n and rates
    near 0 or 1 (Newcombe 1998, method 3; Brown, Cai and DasGupta 2001). With n = 0 nothing is
    known: the interval is [0, 1].
    """
    _check(successes, n)
    z = _z(confidence)
    if n == 0:
        return Interval(0.0, 1.0)
    z2 = z * z
    centre = (successes + z2 / 2) / (n + z2)
    half = z / (n + z2) * math.sqrt(successes * (n - successes) / n + z2 / 4)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(low, high)


def newcombe(x1: int, n1: int, x2: int, n2: int, confidence: float = 0.95) -> Interval:
    """Newcombe's hybrid score interval (1998, method 10) for p1 - p2, treated minus held out.

    With d = p1 - p2 and (l1, u1), (l2, u2) the Wilson intervals of each rate:

        low  = d - sqrt((p1 - l1)² + (u2 - p2)²)
        high = d + sqrt((u1 - p1)² + (p2 - l2)²)

    Why: each side of the difference borrows the Wilson interval's honest asymmetry near 0 and 1,
    so it stays inside [-1, 1], is never empty or a point at 0% or 100%, and holds its coverage
    with a small held-out group, where the Wald interval for a difference is too narrow. It needs
    no iteration. Swapping the groups mirrors it. With an empty group the difference could be
    anything: [-1, 1].
    """
    _check(x1, n1)
    _check(x2, n2)
    if n1 == 0 or n2 == 0:
        _z(confidence)  # still refuse a confidence out of range
        return Interval(-1.0, 1.0)
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson(x1, n1, confidence)
    l2, u2 = wilson(x2, n2, confidence)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return Interval(max(-1.0, low), min(1.0, high))


class Lift(NamedTuple):
    """Treated against held out: each rate, the absolute and the relative difference."""

    treated_rate: float | None  # None without treated firings
    control_rate: float | None  # None without held-out firings
    absolute: float | None  # p1 - p2
    absolute_ci: Interval | None  # Newcombe's
    relative: float | None  # p1 / p2 - 1; None when p2 is 0
    relative_ci: Interval | None  # Katz's log interval of the ratio, minus 1


def lift(x1: int, n1: int, x2: int, n2: int, confidence: float = 0.95) -> Lift:
    """Compare the treated (x1 of n1) with the held out (x2 of n2).

    The relative change is the risk ratio p1/p2 minus one ("-25%": a quarter fewer tickets). Its
    interval is Katz's: log(p1/p2) ± z * sqrt(1/x1 - 1/n1 + 1/x2 - 1/n2), which is the usual
    one for a ratio of proportions and behaves well once each group has a few successes. When a
    count is 0 or equals its group (the log or its variance is then undefined) each group gets
    half a success and one firing more (the Haldane-Anscombe correction); with none treated the
    ratio's lower end is 0, so the relative one is -1. With no held-out successes the ratio is
    unbounded: `relative` and its interval are None.
    """
    _check(x1, n1)
    _check(x2, n2)
    z = _z(confidence)
    p1 = x1 / n1 if n1 else None
    p2 = x2 / n2 if n2 else None
    if p1 is None or p2 is None:
        return Lift(p1, p2, None, None, None, None)
    absolute_ci = newcombe(x1, n1, x2, n2, confidence)
    if x2 == 0:
        return Lift(p1, p2, p1 - p2, absolute_ci, None, None)
    relative = p1 / p2 - 1
    a, m1, c, m2 = float(x1), float(n1), float(x2), float(n2)
    if 0 in (x1, n1 - x1, x2, n2 - x2):
        a, m1, c, m2 = a + 0.5, m1 + 1, c + 0.5, m2 + 1
    log_ratio = math.log((a / m1) / (c / m2))
    se = math.sqrt(1 / a - 1 / m1 + 1 / c - 1 / m2)
    low = -1.0 if x1 == 0 else math.exp(log_ratio - z * se) - 1
    high = math.exp(log_ratio + z * se) - 1
    # the correction shifts the centre a little: keep the estimate inside its interval
    relative_ci = Interval(min(low, relative), max(high, relative))
    return Lift(p1, p2, p1 - p2, absolute_ci, relative, relative_ci)


def sample_size(
    baseline: float,
    effect: float,
    alpha: float = 0.05,
    power: float = 0.8,
    holdout: float = 0.1,
) -> int:
    """Total firings (treated and held out together) needed to detect a change of `effect`.

    The held-out rate is `baseline` and the treated one `baseline + effect` (so a drop in
    tickets from 20% to 15% is `effect=-0.05`). Of N firings, a share h = `holdout` is held out.
    The two-sided test of the difference at level `alpha` detects the change with probability
    `power` when (the normal approximation; Fleiss, Levin and Paik, unequal groups)

        N = [z_a sqrt(pq (1/(1-h) + 1/h)) + z_b sqrt(p1 q1/(1-h) + p2 q2/h)]² / effect²

    with p1 = baseline + effect (treated), p2 = baseline (held out), p = (1-h) p1 + h p2 the
    pooled rate, q = 1 - p, z_a the normal quantile at 1 - alpha/2 and z_b at `power`. With
    h = 1/2 this is twice the classic per-group formula (1094 per group from 20% to 25%).

    Why: it is the formula behind the textbook tables, and shows the cost of a small holdout:
    the held-out group bounds the precision, so N grows roughly as 1/(h (1-h)). The answer is
    rounded up; it is a planning figure, good to a few percent.
    """
    p2 = baseline
    p1 = baseline + effect
    if not 0 <= p2 <= 1 or not 0 <= p1 <= 1:
        raise ValueError(
            f"baseline {baseline} and baseline + effect {p1} must both be rates in [0, 1]"
        )
    if effect == 0:
        raise ValueError("effect must not be 0: no sample can detect a change of nothing")
    _fraction("alpha", alpha)
    _fraction("power", power)
    _fraction("holdout", holdout)
    h = holdout
    z_a = _NORMAL.inv_cdf(1 - alpha / 2)
    z_b = _NORMAL.inv_cdf(power)
    pooled = (1 - h) * p1 + h * p2
    null_sd = math.sqrt(pooled * (1 - pooled) * (1 / (1 - h) + 1 / h))
    alt_sd = math.sqrt(p1 * (1 - p1) / (1 - h) + p2 * (1 - p2) / h)
    return math.ceil((z_a * null_sd + z_b * alt_sd) ** 2 / effect**2)


class Plan(TypedDict):
    firings: int  # needed in total
    treated: int
    held_out: int
    so_far: int
    remaining: int
    days: float | None  # for the remaining firings at the current volume; None without volume


def plan(
    baseline: float,
    effect: float,
    firings_per_day: float,
    holdout: float,
    alpha: float = 0.05,
    power: float = 0.8,
    so_far: int = 0,
) -> Plan:
    """How many firings a test needs (`sample_size`), and how many days the rest take at the
    current volume of `firings_per_day`. `so_far` firings already counted are subtracted."""
    firings = sample_size(baseline, effect, alpha, power, holdout)
    held_out = math.ceil(firings * holdout)
    remaining = max(0, firings - max(0, so_far))
    days = remaining / firings_per_day if firings_per_day > 0 else None
    return Plan(
        firings=firings,
        treated=firings - held_out,
        held_out=held_out,
        so_far=so_far,
        remaining=remaining,
        days=days,
    )


class Verdict(NamedTuple):
    word: str  # "helps" | "hurts" | "no evidence yet" | "no effect"
    text: str  # one plain sentence for the report


KINDS = {"failure": "had a failure", "goal": "reached the goal"}


def _needed(rate: float, effect: float, holdout: float) -> int:
    """Firings to see a change of `effect` either way from `rate`: the larger of the two."""
    sizes = [
        sample_size(rate, signed, holdout=holdout)
        for signed in (effect, -effect)
        if 0 <= rate + signed <= 1
    ]
    return max(sizes) if sizes else 0


def _pct(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def _points(diff: float) -> str:
    return f"{diff * 100:.1f}".replace("-", "−")


def verdict(
    kind: str,
    x1: int,
    n1: int,
    x2: int,
    n2: int,
    *,
    holdout: float,
    effect: float = 0.05,
    planned: int | None = None,
) -> Verdict:
    """Did reaching out help? One word and one sentence.

    `kind` is "failure" (lower is better: tickets) or "goal" (higher is better: task done);
    group 1 the treated, group 2 the held out. With Newcombe's 95% interval of p1 - p2:

    - "helps" / "hurts": the interval excludes 0, on the good or the bad side;
    - "no effect": the planned number of firings is reached and the whole interval lies within
      ±`effect`: any effect there is smaller than the one worth looking for;
    - otherwise "no evidence yet", with about how many more firings it takes to see an effect of
      `effect` (`sample_size` at the pooled rate, the larger of a rise and a fall, minus the
      firings so far). Past the planned number it is the number that would narrow the interval
      to ±`effect`, as intervals narrow with the square root of the firings.

    `planned` is the total decided on before the test started (see `plan`); without it, the
    sample size at the rate seen so far. Deciding on the number in advance, and not stopping
    at the first "helps", is what keeps the 5% error rate of the interval honest; `Sequential`
    is the test that may be looked at all the time.
    """
    if kind not in KINDS:
        raise ValueError(f'kind must be "failure" or "goal", got {kind!r}')
    _check(x1, n1)
    _check(x2, n2)
    _fraction("holdout", holdout)
    if not 0 < effect < 1:
        raise ValueError(f"effect must be a difference of rates between 0 and 1, got {effect}")
    so_far = n1 + n2
    size = f"{effect * 100:g}-point effect"
    rate = (x1 + x2) / so_far if so_far else 0.5  # before any data: the widest variance
    target = planned if planned is not None else _needed(rate, effect, holdout)
    if n1 == 0 or n2 == 0:
        missing = "treated" if n1 == 0 else "held-out"
        return Verdict(
            "no evidence yet",
            f"no evidence yet: about {max(target - so_far, 0):,} more firings needed to see a "
            f"{size}; there are no {missing} firings so far",
        )
    p1, p2 = x1 / n1, x2 / n2
    low, high = newcombe(x1, n1, x2, n2, 0.95)
    diff = p1 - p2
    rates = (
        f"{_pct(p1)} of the contacted {KINDS[kind]} against {_pct(p2)} of those held out "
        f"({n1:,} and {n2:,} firings)"
    )
    span = f"95% interval {_points(low)} to {_points(high)} points"
    better = high < 0 if kind == "failure" else low > 0
    worse = low > 0 if kind == "failure" else high < 0
    if better or worse:
        word = "helps" if better else "hurts"
        return Verdict(
            word,
            f"{word}: {rates}, {_points(abs(diff))} points {'fewer' if diff < 0 else 'more'} "
            f"({span})",
        )
    if so_far >= target and -effect < low and high < effect:
        return Verdict(
            "no effect",
            f"no effect: {rates}; the {span} lies within ±{effect * 100:g} points",
        )
    more = target - so_far
    if more <= 0:
        # planned sample reached, interval still wider than ±effect: it narrows as 1/sqrt(n)
        half = (high - low) / 2
        room = effect - abs(diff)
        more = math.ceil(so_far * ((half / room) ** 2 - 1)) if room > 0 else so_far
        more = max(more, 1)
    return Verdict(
        "no evidence yet",
        f"no evidence yet: about {more:,} more firings needed to see a {size}; {rates}, {span}",
    )


def prevented(
    failures_treated: int,
    n_treated: int,
    failures_control: int,
    n_control: int,
    confidence: float = 0.95,
) -> tuple[float, Interval]:
    """Failures (tickets) the outreach prevented among the treated, with an interval.

    Had the treated not been contacted they would have failed at the held-out rate:
    n_treated × (p_control − p_treated) failures prevented, negative when reaching out caused
    them. The interval is Newcombe's for p_control − p_treated, times n_treated (the number of
    treated is fixed, only the rates are uncertain). No treated: nothing prevented, (0, 0). No
    held out: nothing is known, 0 with the interval (-n_treated, n_treated).
    """
    _check(failures_treated, n_treated)
    _check(failures_control, n_control)
    if n_treated == 0:
        return 0.0, Interval(0.0, 0.0)
    if n_control == 0:
        return 0.0, Interval(-float(n_treated), float(n_treated))
    p_treated = failures_treated / n_treated
    p_control = failures_control / n_control
    low, high = newcombe(failures_control, n_control, failures_treated, n_treated, confidence)
    return n_treated * (p_control - p_treated), Interval(n_treated * low, n_treated * high)


BAD = ("higher", "lower")


class Sequential:
    """An always-valid test for harm: it may be asked after every firing, for as long as the
    trigger runs, and the chance it ever cries harm when there is none stays at most `alpha`.

    A fixed-sample test looked at again and again will, sooner or later, cross its threshold by
    chance: a one-sided 5% z-test checked after every 50 firings up to 5000 flags about 30% of
    harmless triggers. This one is a mixture sequential probability ratio test (mSPRT; Robbins
    1970, Johari, Pekelis and Walsh 2017, "Always valid inference") on the difference of two
    proportions, one-sided towards harm.

    With d = p1 - p2 (treated minus held out, sign flipped when lower is worse), its variance
    under no effect v = p (1 - p) (1/n1 + 1/n2), p the pooled rate, the information I = 1/v and
    the score S = d I, the likelihood ratio of a difference θ against none is
    exp(θ S - θ² I / 2). Averaged over harmful differences, θ half-normal with scale τ:

        Λ = 2 / sqrt(1 + τ² I) * exp(τ² S² / (2 (1 + τ² I))) * Φ(τ S / sqrt(1 + τ² I))

    Under no harm Λ is a nonnegative (super)martingale with mean at most 1, so by Ville's
    inequality it exceeds 1/alpha with probability at most alpha, however often it is looked at.
    The always-valid p-value is the least 1/Λ seen so far; harm is declared once it is at most
    `alpha`, and stays declared.

    Why this one: it needs no plan of how often or how long to look (an alpha-spending bound
    does), its p-value can be shown on a dashboard at any time, and one parameter, `tau`, says
    which size of harm to catch fastest (the default 0.05: five points). The rates enter only
    through the normal approximation, so the test waits until each group has `min_each` firings
    and the pooled count has `min_each` successes and failures; with a 10% holdout that is a few
    hundred firings.

    State is the least p-value seen, per direction of harm; `state` is plain data, and a
    Sequential made with `Sequential(..., state=s)` goes on where the other stopped. The counts
    passed are cumulative since the trigger started.
    """

    def __init__(
        self,
        alpha: float = 0.05,
        tau: float = 0.05,
        min_each: int = 20,
        state: dict[str, float] | None = None,
    ) -> None:
        _fraction("alpha", alpha)
        if tau <= 0:
            raise ValueError(f"tau must be a positive difference of rates, got {tau}")
        self.alpha = alpha
        self.tau = tau
        self.min_each = min_each
        self.lowest = {bad: 1.0 for bad in BAD}
        if state:
            self.lowest.update({bad: float(state[bad]) for bad in BAD if bad in state})

    @property
    def state(self) -> dict[str, float]:
        return dict(self.lowest)

    def ratio(self, x1: int, n1: int, x2: int, n2: int, bad: str = "higher") -> float:
        """The mixture likelihood ratio Λ of harm against none at these counts (1 while the
        groups are too small to say)."""
        if bad not in BAD:
            raise ValueError(f'bad must be "higher" or "lower", got {bad!r}')
        _check(x1, n1)
        _check(x2, n2)
        x, n = x1 + x2, n1 + n2
        if min(n1, n2, x, n - x) < self.min_each:
            return 1.0
        pooled = x / n
        info = 1 / (pooled * (1 - pooled) * (1 / n1 + 1 / n2))
        diff = x1 / n1 - x2 / n2
        score = (diff if bad == "higher" else -diff) * info
        t2 = self.tau**2
        spread = 1 + t2 * info
        log_ratio = (
            math.log(2)
            - 0.5 * math.log(spread)
            + t2 * score**2 / (2 * spread)
            + math.log(max(_NORMAL.cdf(self.tau * score / math.sqrt(spread)), 1e-300))
        )
        return math.exp(min(log_ratio, 700.0))

    def p_value(self, x1: int, n1: int, x2: int, n2: int, bad: str = "higher") -> float:
        """The always-valid p-value for harm: the least 1/Λ over every look so far."""
        current = min(1.0, 1 / self.ratio(x1, n1, x2, n2, bad))
        self.lowest[bad] = min(self.lowest[bad], current)
        return self.lowest[bad]

    def harmful(self, x1: int, n1: int, x2: int, n2: int, bad: str = "higher") -> bool:
        """True once the evidence that the treated do worse (a `higher` failure rate, or a
        `lower` goal rate) has crossed the boundary 1/alpha; it stays True after."""
        return self.p_value(x1, n1, x2, n2, bad) <= self.alpha
