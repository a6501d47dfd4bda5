"""The offline commands: check playbooks, and run them or the detector over recorded data."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

import msgspec

from forewarn import decide, describe, engine, settings
from forewarn.cli_args import (
    PLAYBOOKS_HELP,
    Commands,
    add_format,
    add_playbooks,
    add_store,
    columns,
    count_arg,
    duration_arg,
    time_arg,
    workspace_db,
)
from forewarn.errors import InputError
from forewarn.model import Event
from forewarn.playbook import Trigger
from forewarn.policy import POLICY_TRAITS, Holding, Outreach
from forewarn.runner import Runner
from forewarn.sources import EventBatch, OutOfOrder, load_playbooks, read_events, stream_events

PROGRESS_MIN_BYTES = 8 << 20


class Progress:
    """A one-line progress report on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, total: int, stream: IO[str] = sys.stderr) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.on = stream.isatty() and total >= PROGRESS_MIN_BYTES

    def __call__(self, done: int) -> None:
        if self.on:
            share = min(done / self.total, 1.0)
            bar = "#" * int(share * 30)
            self.stream.write(f"\r{self.label} [{bar:<30}] {share:4.0%}")
            self.stream.flush()

    def close(self) -> None:
        if self.on:
            self.stream.write("\r" + " " * (len(self.label) + 40) + "\r")
            self.stream.flush()


def add_replay(commands: Commands) -> None:
    replay = commands.add_parser(
        "replay",
        help="run playbooks over recorded events on a virtual clock",
        description="Run playbooks over recorded Segment-spec events (JSONL, gzip accepted) on a "
        "virtual clock and print one JSON line per firing.",
    )
    add_playbooks(replay, required=True)
    replay.add_argument(
        "--events",
        required=True,
        help="JSONL of Segment messages (gzip accepted), a folder of them, or - for stdin",
    )
    replay.add_argument("--until", help="run the clock on to this ISO 8601 time after the events")
    add_format(replay, "jsonl", "table")
    replay.add_argument(
        "--show-rejected",
        type=count_arg,
        default=20,
        help="how many invalid lines to list on stderr (0 for none)",
    )
    replay.set_defaults(run=_replay)


def _replay(args: argparse.Namespace) -> int:
    triggers = load_playbooks(args.playbooks)
    until_ms = time_arg("--until", args.until)
    batch, firings, replayed = _replay_events(args.events, triggers, until_ms)
    for bad in batch.rejected[: args.show_rejected]:
        print(bad, file=sys.stderr)
    if len(batch.rejected) > args.show_rejected:
        more = len(batch.rejected) - args.show_rejected
        print(f"{args.events}: ... and {more} more invalid lines skipped", file=sys.stderr)
    if batch.after_until:
        print(f"{batch.after_until} events after --until are not replayed", file=sys.stderr)
    out = sys.stdout
    if args.format == "table":
        _print_table(triggers, firings, out)
    else:
        encode = msgspec.json.Encoder().encode
        for f in firings:
            out.write(encode(f.to_dict()).decode())
            out.write("\n")
    summary = f"replayed {replayed} events"
    if batch.rejected:
        summary += f", skipped {len(batch.rejected)} invalid lines"
    if batch.duplicates:
        summary += f", skipped {batch.duplicates} repeated messageIds"
    print(summary, file=sys.stderr)
    return 0


def _replay_events(
    path: str, triggers: list[Trigger], until_ms: int | None
) -> tuple[EventBatch, list[engine.Firing], int]:
    """Replay the events of `path` up to `until_ms`: the batch's counts, the firings decided in
    order, and how many events were applied. Files in time order (the usual case) are replayed
    as they are read, a chunk at a time; others, and stdin, are read whole and sorted first."""
    size = os.path.getsize(path) if path != "-" and Path(path).is_file() else 0
    fired: list[engine.Firing] = []
    if path != "-":
        batch = EventBatch()
        progress = Progress(f"replaying {path}", size)
        try:
            runner = _run(triggers, stream_events(path, batch, progress, until_ms), until_ms, fired)
            return batch, fired, runner.events
        except OutOfOrder:
            fired.clear()  # and again, sorted
        finally:
            progress.close()
    progress = Progress(f"reading {path}", size)
    batch = read_events(path, progress, until_ms=until_ms)
    progress.close()
    gc.freeze()  # the events live to the end: keep the collector from re-scanning them
    try:
        runner = _run(triggers, batch.events, until_ms, fired)
    finally:
        gc.unfreeze()
    return batch, fired, runner.events


def _run(
    triggers: list[Trigger],
    events: Iterable[Event],
    until_ms: int | None,
    fired: list[engine.Firing],
) -> Runner:
    """The events in order, then the timers up to `until_ms` (else the last event), with the
    full policy; each firing decided goes to `fired` once no later one can displace it."""
    keep = (POLICY_TRAITS, POLICY_TRAITS)
    runner = Runner(engine.State(engine.Playbook(triggers, keep=keep)), lateness_ms=0)
    holding = Holding(Outreach(runner.state, triggers, settings.policy()), fired.append)
    gc.disable()  # the engine makes no reference cycles: reference counting frees everything
    try:
        runner.replay(events, None, holding)
        # events come in order, so the clock now stands at the last one
        for firing in runner.finish(until_ms if until_ms is not None else runner.clock_ms):
            holding(firing)
        holding.release()
    finally:
        gc.enable()
    return runner


def _print_table(triggers: Sequence[Trigger], firings: list[engine.Firing], out: IO[str]) -> None:
    rows: dict[str, Counter[str]] = defaultdict(Counter)
    subjects: dict[str, set[str]] = defaultdict(set)
    for f in firings:
        rows[f.trigger]["firings"] += 1
        decided = f"suppressed:{f.reason}" if f.decision == decide.SUPPRESSED else f.decision
        rows[f.trigger][decided] += 1
        subjects[f.trigger].add(f.subject)
    head = ("trigger", "firings", "subjects", "send", "held_out", "suppressed")
    lines = [head]
    for t in triggers:
        tid = t.id
        row = rows.get(tid, Counter())
        suppressed = ", ".join(
            f"{k.split(':', 1)[1]} {v}"
            for k, v in sorted(row.items())
            if k.startswith("suppressed:")
        )
        lines.append(
            (
                tid,
                str(row["firings"]),
                str(len(subjects.get(tid, ()))),
                str(row["send"]),
                str(row["held_out"]),
                suppressed or "0",
            )
        )
    for text in columns(lines):
        out.write(text + "\n")


def add_check(commands: Commands) -> None:
    check = commands.add_parser(
        "check",
        help="validate playbooks and say what each trigger will do",
        description="Validate playbooks; print, per trigger, what it will do in plain words.",
    )
    check.add_argument("playbooks", help=PLAYBOOKS_HELP)
    check.set_defaults(run=_check)


def _check(args: argparse.Namespace) -> int:
    from forewarn import compose

    triggers = load_playbooks(args.playbooks)
    compose.check(args.playbooks, triggers)
    for t in triggers:
        print(describe.trigger(t))
        print()
    print(f"{len(triggers)} trigger{'s' if len(triggers) != 1 else ''} valid")
    return 0


def add_backtest(commands: Commands) -> None:
    backtest = commands.add_parser(
        "backtest",
        help="what playbooks would have done over history, and how it turned out",
        description="Replay history (a file, or the server's own event log) through the "
        "playbooks with the full policy on a virtual clock, and report per trigger: firings "
        "per day, subjects hit more than once, overlap, what the policy would have suppressed, "
        "goal and failure rates of treated and held-out subjects, precision and recall.",
    )
    add_playbooks(backtest, required=True)
    backtest.add_argument("--events", help="JSONL of Segment messages (gzip accepted), a folder")
    backtest.add_argument("--since", help="read the server's log: the events of the last 30d")
    add_store(backtest, "with --since")
    backtest.add_argument("--until", help="run the clock on to this ISO 8601 time")
    add_format(backtest, "table", "json")
    backtest.set_defaults(run=_backtest)


def _backtest(args: argparse.Namespace) -> int:
    from forewarn import backtest
    from forewarn.model import order_key

    triggers = load_playbooks(args.playbooks)
    until_ms = time_arg("--until", args.until)
    if (args.events is None) == (args.since is None):
        raise InputError("give --events FILE, or --since DURATION to read the server's own log")
    if args.events is not None:
        batch = read_events(args.events, Progress("", 0))
        for bad in batch.rejected[:20]:
            print(bad, file=sys.stderr)
        events = batch.events
    else:
        events = _log_events(args.db, args.workspace, args.since)
    events.sort(key=order_key)
    if until_ms is not None:
        events = [e for e in events if e.timestamp_ms <= until_ms]
    result = backtest.run(triggers, events, settings.policy(), until_ms)
    if args.format == "json":
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    else:
        sys.stdout.write(backtest.table(result))
    print(f"backtested {len(events)} events over {result['days']} days", file=sys.stderr)
    return 0


def _log_events(db: str, workspace: str, since: str) -> list[Event]:
    """The events of the server's log stamped within `since` of now."""
    from forewarn import clock

    span = duration_arg("--since", since)
    with workspace_db(db, workspace) as (conn, ws, reads):
        now = clock.now_ms()
        return reads.events(conn, ws, now - span, now)


def add_detect(commands: Commands) -> None:
    detect = commands.add_parser(
        "detect",
        help="score a metric series for anomalies (the detector behind `anomaly`)",
        description="Read a time series from CSV and print it back as CSV with columns "
        "timestamp,value,score,alarm: the score in [0, 1] of each value against the series' "
        "own normal as learned so far, and whether it raises an alarm. The same detector as "
        "the playbooks' anomaly condition.",
    )
    detect.add_argument("--input", required=True, help="the CSV file, or - for stdin")
    detect.add_argument("--time-column", required=True, help="the column of timestamps")
    detect.add_argument("--value-column", required=True, help="the column of values")
    detect.add_argument("--sensitivity", choices=("low", "medium", "high"), default="medium")
    detect.add_argument("--direction", choices=("up", "down", "both"), default="both")
    detect.add_argument(
        "--period", help="the sampling interval, e.g. 1h (default: the median gap between rows)"
    )
    detect.add_argument(
        "--kind",
        choices=("auto", "counts", "values"),
        default="auto",
        help="counts of events per period, or measured values; auto: counts when every value "
        "is a whole number of 0 or more",
    )
    detect.set_defaults(run=_detect)


def _detect(args: argparse.Namespace) -> int:
    from forewarn import series

    period = duration_arg("--period", args.period) if args.period else None
    if args.input == "-":
        source: IO[str] = sys.stdin
    else:
        try:
            source = open(args.input, encoding="utf-8", newline="")  # noqa: SIM115
        except OSError as exc:
            raise InputError(f"cannot read {args.input}: {exc.strerror}") from None
    try:
        alarms = series.run(
            source,
            sys.stdout,
            args.time_column,
            args.value_column,
            args.sensitivity,
            args.direction,
            period,
            args.kind,
        )
    finally:
        if source is not sys.stdin:
            source.close()
    print(f"{alarms} alarm{'s' if alarms != 1 else ''}", file=sys.stderr)
    return 0
