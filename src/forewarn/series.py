"""`forewarn detect`: a metric series from CSV through the same detector as the playbooks'
`anomaly` condition, one verdict per row. Edge (reads and writes files).

Rows are judged in the order given (a series is expected sorted by time). The sampling period
is the median gap between timestamps unless given. A row whose time or value cannot be read is
still written, with an empty score, and named on stderr; it is not learned.
"""

from __future__ import annotations

import csv
import itertools
import statistics
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO

from forewarn import detect
from forewarn.errors import InputError

HEADER = ("timestamp", "value", "score", "alarm")
SAMPLE_FOR_PERIOD = 1_000  # rows read to find the period


def parse_time(text: str) -> int | None:
    """ISO 8601 (a time without offset is UTC), or seconds since the epoch; milliseconds."""
    text = text.strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return int(number * 1000) if number < 1e11 else int(number)  # seconds, else ms
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def parse_value(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def _columns(header: list[str], time_column: str, value_column: str) -> tuple[int, int]:
    found = []
    for name in (time_column, value_column):
        if name not in header:
            raise InputError(
                f"no column {name!r} in the CSV header; it has: {', '.join(header) or 'nothing'}"
            )
        found.append(header.index(name))
    return found[0], found[1]


def infer_period(times: list[int]) -> int:
    gaps = [b - a for a, b in itertools.pairwise(times) if b > a]
    if not gaps:
        raise InputError(
            "cannot tell the sampling period from fewer than two distinct times: give --period"
        )
    return int(statistics.median(gaps))


def run(
    source: IO[str],
    out: IO[str],
    time_column: str,
    value_column: str,
    sensitivity: str = "medium",
    direction: str = "both",
    period_ms: int | None = None,
    kind: str = "auto",
    err: IO[str] | None = None,
) -> int:
    """Score every row; returns how many alarms were raised. Rows not scored are named on `err`
    (stderr as it is at the call, not as it was at import)."""
    if err is None:
        err = sys.stderr
    reader = csv.reader(source)
    try:
        header = next(reader)
    except StopIteration:
        raise InputError("the CSV is empty: it needs a header row and the series") from None
    t_col, v_col = _columns(header, time_column, value_column)
    # read ahead for the period and the kind of values, then go on streaming
    head: list[list[str]] = []
    for row in reader:
        head.append(row)
        if len(head) >= SAMPLE_FOR_PERIOD:
            break
    parsed = [_parse(row, t_col, v_col) for row in head]
    if period_ms is None:
        period_ms = infer_period([t for t, _ in parsed if t is not None])
    if kind == "auto":
        values = [v for _, v in parsed if v is not None]
        counts = bool(values) and all(v >= 0 and v == int(v) for v in values)
    else:
        counts = kind == "counts"
    detector = detect.Detector(period_ms, direction, sensitivity, counts=counts)
    state = detector.new_state()
    write = csv.writer(out, lineterminator="\n").writerow
    write(HEADER)
    alarms = 0
    for line, (row, (t, v)) in enumerate(_rows(head, parsed, reader, t_col, v_col), start=2):
        if t is None or v is None:
            what = "time" if t is None else "value"
            cell = row[t_col if t is None else v_col] if len(row) > max(t_col, v_col) else ""
            print(f"line {line}: cannot read the {what} {cell!r}: not scored", file=err)
            write((_cell(row, t_col), _cell(row, v_col), "", 0))
            continue
        verdict = detector.update(state, t, v)
        alarms += verdict.alarm
        write((row[t_col], row[v_col], f"{verdict.score:.4f}", int(verdict.alarm)))
    return alarms


def _cell(row: list[str], i: int) -> str:
    return row[i] if i < len(row) else ""


def _parse(row: list[str], t_col: int, v_col: int) -> tuple[int | None, float | None]:
    if len(row) <= max(t_col, v_col):
        return None, None
    return parse_time(row[t_col]), parse_value(row[v_col])


def _rows(
    head: list[list[str]],
    parsed: list[tuple[int | None, float | None]],
    rest: Iterator[list[str]],
    t_col: int,
    v_col: int,
) -> Iterator[tuple[list[str], tuple[int | None, float | None]]]:
    yield from zip(head, parsed, strict=True)
    for row in rest:
        yield row, _parse(row, t_col, v_col)
