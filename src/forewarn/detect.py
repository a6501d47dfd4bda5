"""Adaptive anomaly detection for one numeric series at a time, and the typical gap between events.

`Detector` judges one sample per period (an event count, or a value such as a latency) against
the normal it has learned for that series: a level, a spread and a coarse seasonal profile
(eight three-hour bins of the day, weekday against weekend). The learning is a robust
Holt-Winters: every residual is clipped at three spreads before it moves the level and the
profile, so an incident does not become the new normal within a few samples.

Counts are first put on the Anscombe scale, 2·sqrt(x + 3/8), where Poisson noise has spread 1
whatever the rate; the spread is the learned mean absolute deviation, never below that Poisson
floor, so "3 errors instead of 0.2" is not an alarm but "40 instead of 4" is. Values keep their own
scale and the spread is a root mean square that lets large residuals in (clipped at ten spreads),
because measured values such as latencies and rates have heavy tails. The choice was measured on
the labelled Microsoft cloud-monitoring series: see docs/detection.md and bench/quality.py.

Alarms come once per incident: after one, the series must be quiet (score below 60 % of the
threshold) for three samples in a row before it can alarm again.

Pure: no clock, no I/O; time is `t_ms`. State is a flat list of numbers (msgpack-friendly).
"""

from __future__ import annotations

import math
from typing import NamedTuple

SENSITIVITIES = ("low", "medium", "high")
DIRECTIONS = ("up", "down", "both")

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS

# Score thresholds; the score is u²/(1+u²) with u the deviation in units of the medium threshold.
_THRESHOLDS = {"low": 0.65, "medium": 0.5, "high": 0.35}
_MEDIUM_DEVIATION = {True: 5.0, False: 6.0}  # spreads, counts / values (measured)
_ALPHA = 0.05  # level and spread: memory of about 20 samples, or 20 hours if shorter
_GAMMA = 0.1  # seasonal bins: about 10 visits
_CLIP = 3.0  # residuals move the level and the profile by at most this many spreads
_CLIP_SPREAD_VALUES = 10.0
_REARM_SAMPLES = 3
_REARM_SHARE = 0.6
_WARM_MIN = 12
_BIN_HOURS = 3
_HOUR_BINS = 24 // _BIN_HOURS

# state layout: [n, rearm countdown (0 = armed), level, spread, 8 day bins, weekday, weekend]
_N, _WAIT, _LEVEL, _SPREAD, _BINS = 0, 1, 2, 3, 4
_WEEKDAY = _BINS + _HOUR_BINS
_STATE_LEN = _WEEKDAY + 2


class Verdict(NamedTuple):
    score: float  # in [0, 1]: how unusual the value is against the learned normal
    alarm: bool  # over the sensitivity's threshold, and not a repeat alarm of an ongoing incident
    expected: float  # what the normal was for this moment (seasonality included)
    observed: float


class Detector:
    """Parameters, immutable; one per playbook condition, shared by every series of it."""

    __slots__ = (
        "_alpha",
        "_count_cap",
        "_counts",
        "_direction",
        "_gamma_day",
        "_gamma_hour",
        "_rearm",
        "_scale",
        "_threshold",
        "_use_day",
        "_use_week",
        "period_ms",
        "warm_samples",
    )

    def __init__(
        self,
        period_ms: int,
        direction: str = "both",
        sensitivity: str = "medium",
        counts: bool = True,
    ) -> None:
        if period_ms <= 0:
            raise ValueError(f"period_ms must be positive, got {period_ms}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if sensitivity not in SENSITIVITIES:
            raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {sensitivity!r}")
        self.period_ms = period_ms
        self._direction = direction
        self._counts = counts
        self._threshold = _THRESHOLDS[sensitivity]
        self._rearm = _REARM_SHARE * math.sqrt(self._threshold / (1.0 - self._threshold))
        self._scale = _MEDIUM_DEVIATION[counts]
        self._use_day = period_ms < DAY_MS
        self._use_week = period_ms < WEEK_MS
        # per-sample rates, so that a bin learns about _GAMMA per visit whatever the period
        self._gamma_hour = _GAMMA / max(1.0, _BIN_HOURS * HOUR_MS / period_ms)
        self._gamma_day = _GAMMA / max(1.0, DAY_MS / period_ms)
        # a day of samples when the profile has a day to learn, and never fewer than 12
        self.warm_samples = max(_WARM_MIN, DAY_MS // period_ms if self._use_day else 0)
        # below an hour the level would follow the daily cycle itself and leave the profile
        # nothing to learn: keep its memory at about 20 hours
        self._alpha = _ALPHA * min(1.0, period_ms / HOUR_MS)
        self._count_cap = max(self.warm_samples, round(1 / self._alpha))

    def new_state(self) -> list[float]:
        return [0] * _STATE_LEN

    def warm(self, state: list[float]) -> bool:
        return state[_N] >= self.warm_samples

    def update(self, state: list[float], t_ms: int, value: float) -> Verdict:
        return self._judge(state, t_ms, value, learn=True)

    def peek(self, state: list[float], t_ms: int, value: float) -> Verdict:
        return self._judge(state, t_ms, value, learn=False)

    def idle(self, state: list[float], t_ms: int, periods: int) -> Verdict | None:
        """Learn `periods` samples of zero from `t_ms` on (a silence, for counts). The first is
        judged and learned exactly (a sudden silence can be the anomaly); the rest in closed
        form, as that many updates would move the level, the spread and the profile toward
        the zero level if every one were inside the clip. A week of silence then costs what
        two samples do, instead of a thousand."""
        if periods <= 0:
            return None
        verdict = self.update(state, t_ms, 0.0)
        rest = periods - 1
        if rest <= 0 or state[_N] == 0:
            return verdict
        keep = (1.0 - self._alpha) ** rest
        zero = self._transform(0.0)
        state[_LEVEL] = zero + (state[_LEVEL] - zero) * keep
        state[_SPREAD] *= keep
        if self._use_day:
            visits = rest / max(1.0, DAY_MS / self.period_ms) * _HOUR_BINS
            fade = (1.0 - self._gamma_hour) ** max(1.0, visits)
            for i in range(_BINS, _BINS + _HOUR_BINS):
                state[i] *= fade
        if self._use_week:
            fade = (1.0 - self._gamma_day) ** rest
            state[_WEEKDAY] *= fade
            state[_WEEKDAY + 1] *= fade
        state[_WAIT] = max(0, state[_WAIT] - rest)  # quiet samples re-arm it
        n = state[_N] + rest
        state[_N] = n if n < self._count_cap else max(state[_N], self._count_cap)
        return verdict

    def _transform(self, value: float) -> float:
        if self._counts:
            return 2.0 * math.sqrt(max(value, 0.0) + 0.375)
        return value

    def _untransform(self, y: float) -> float:
        if self._counts:
            return max(0.0, (y / 2.0) ** 2 - 0.375) if y > 0 else 0.0
        return y

    def _judge(self, state: list[float], t_ms: int, value: float, *, learn: bool) -> Verdict:
        if not math.isfinite(value):
            raise ValueError(f"value must be a finite number, got {value!r}")
        n = state[_N]
        y = self._transform(value)
        if n == 0:
            if learn:
                state[_N] = 1
                state[_LEVEL] = y
            return Verdict(0.0, False, value, value)
        hour_bin = _BINS + (t_ms // HOUR_MS) % 24 // _BIN_HOURS if self._use_day else -1
        week_bin = -1
        if self._use_week:
            weekday = (t_ms // DAY_MS + 3) % 7  # 1970-01-01 was a Thursday; Monday is 0
            week_bin = _WEEKDAY + (1 if weekday >= 5 else 0)
        season = (state[hour_bin] if hour_bin >= 0 else 0.0) + (
            state[week_bin] if week_bin >= 0 else 0.0
        )
        expected_y = state[_LEVEL] + season
        residual = y - expected_y
        if self._counts:
            spread = max(1.0, 1.2533 * state[_SPREAD])  # MAD to sigma; Poisson floor
        else:
            spread = max(1e-12, math.sqrt(state[_SPREAD]), 1e-9 * abs(expected_y))
        z = residual / spread
        deviation = z if self._direction == "up" else -z if self._direction == "down" else abs(z)
        u = max(0.0, deviation) / self._scale
        score = u * u / (1.0 + u * u)
        warm = n >= self.warm_samples
        alarm = warm and state[_WAIT] == 0 and score >= self._threshold
        verdict = Verdict(score, alarm, self._untransform(expected_y), value)
        if not learn:
            return verdict

        if warm:
            if alarm:
                state[_WAIT] = _REARM_SAMPLES
            elif state[_WAIT] > 0:
                state[_WAIT] = state[_WAIT] - 1 if u < self._rearm else _REARM_SAMPLES
        limit = _CLIP * spread
        clipped = limit if residual > limit else -limit if residual < -limit else residual
        rate = max(self._alpha, 1.0 / (n + 1))
        state[_LEVEL] += rate * clipped
        rest = clipped * (1.0 - rate)
        if hour_bin >= 0:
            state[hour_bin] += self._gamma_hour * rest
        if week_bin >= 0:
            state[week_bin] += self._gamma_day * rest
        size = abs(residual)
        if self._counts:
            size = min(size, limit)
        else:
            size = min(size, _CLIP_SPREAD_VALUES * spread) ** 2 if n > 1 else size * size
        state[_SPREAD] += rate * (size - state[_SPREAD])
        state[_N] = n + 1 if n < self._count_cap else n  # stays a small int, compact in msgpack
        return verdict


class Gaps:
    """The typical gap between a subject's events, and when its silence becomes overdue.

    The typical gap is a geometric mean (a running mean of log gaps, exponentially weighted once
    there are 8 gaps), so one long holiday moves it far less than it moves an arithmetic mean.
    Events within an hour of the previous one are one burst, not a gap.

    Overdue is judged one of two ways. By default, silence longer than `factor` × the typical
    gap. With `lapse`, when the probability that the subject has stopped reaches `lapse`: the
    BG/NBD model of repeat behaviour (Fader, Hardie & Lee 2005) with its time scale at zero, so it
    needs no unit of time: odds(stopped) = a / (b + x − 1) · (T / t)^(r + x), for x repeat
    bursts, t from the first burst to the last and T from the first burst to now. It weighs the
    silence against the subject's own rhythm and how sure that rhythm is (more repeats, more
    sure), and the published population shape (r, a, b from the CDNOW fit) lets frequent
    subjects, who rarely stop, pause a little longer before they count as stopped.
    """

    __slots__ = ("_lapse_log_odds", "factor", "lapse", "min_events")

    def __init__(
        self, factor: float = 2.0, min_events: int = 3, lapse: float | None = None
    ) -> None:
        if factor <= 0:
            raise ValueError(f"factor must be positive, got {factor}")
        if min_events < 2:
            raise ValueError(f"min_events must be at least 2, got {min_events}")
        if lapse is not None and not LAPSE_MIN <= lapse <= LAPSE_MAX:
            raise ValueError(f"lapse must be between {LAPSE_MIN} and {LAPSE_MAX}, got {lapse}")
        self.factor = factor
        self.min_events = min_events
        self.lapse = lapse
        self._lapse_log_odds = 0.0 if lapse is None else math.log(lapse / (1.0 - lapse))

    def new_state(self) -> list[float]:
        # events (bursts), last burst (ms), mean log gap (log ms), first burst (ms)
        return [0, 0, 0.0, 0]

    def update(self, state: list[float], t_ms: int) -> None:
        events = state[0]
        if events == 0:
            state[0], state[1] = 1, t_ms
            state[3:] = [t_ms]
            return
        gap = t_ms - state[1]
        if gap < _BURST_MS:
            state[1] = max(state[1], t_ms)
            return
        rate = max(_GAP_RATE, 1.0 / events)
        state[2] += rate * (math.log(gap) - state[2])
        state[0] = events + 1
        state[1] = t_ms

    def typical_gap_ms(self, state: list[float]) -> float | None:
        if state[0] < 2:
            return None
        return math.exp(state[2])

    def stopped(self, state: list[float], now_ms: int) -> float | None:
        """The probability that the subject has stopped, judged at `now_ms` (None before two
        bursts)."""
        span = _span(state)
        if span is None:
            return None
        repeats = state[0] - 1
        silence = max(0, now_ms - state[1])
        log_odds = math.log(_A / (_B + repeats - 1)) + (_R + repeats) * math.log1p(silence / span)
        return 1.0 / (1.0 + math.exp(-log_odds)) if log_odds > -700 else 0.0

    def due_ms(self, state: list[float]) -> int | None:
        if state[0] < self.min_events:
            return None
        if self.lapse is None:
            return int(state[1] + self.factor * math.exp(state[2]))
        span = _span(state)
        if span is None:
            return None
        # solve stopped(now) = lapse for the silence: (r + x) · log(1 + s / t) = K
        repeats = state[0] - 1
        k = self._lapse_log_odds - math.log(_A / (_B + repeats - 1))
        # K > 0 always: lapse ≥ 0.5 and a / (b + x − 1) < 1; a silence of at least a millisecond
        silence = span * math.expm1(k / (_R + repeats))
        return int(state[1] + max(1.0, math.ceil(silence)))


def _span(state: list[float]) -> float | None:
    """Time from the first burst to the last, or None: too few bursts, or a state kept before
    the first burst was recorded."""
    if state[0] < 2 or len(state) < 4 or state[1] <= state[3]:
        return None
    return state[1] - state[3]


# BG/NBD population shape (Fader, Hardie & Lee 2005, CDNOW): r for purchase rates, a and b for
# the chance of stopping after each purchase. Dimensionless; the time scale alpha is set to 0.
_R, _A, _B = 0.243, 0.793, 2.426
LAPSE_MIN, LAPSE_MAX = 0.5, 0.999


_BURST_MS = HOUR_MS
_GAP_RATE = 1.0 / 8
