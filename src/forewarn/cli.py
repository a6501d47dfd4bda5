"""The `forewarn` command line."""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import os
import sqlite3
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import msgspec

from forewarn import decide, describe, engine, settings
from forewarn.errors import ForewarnError, InputError
from forewarn.model import Event, parse_time_ms
from forewarn.playbook import Trigger
from forewarn.policy import POLICY_TRAITS, Holding, Outreach
from forewarn.runner import Runner
from forewarn.settings import policy as policy_settings
from forewarn.sources import load_playbooks, read_events

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


def _until(text: str | None) -> int | None:
    """--until as milliseconds, or None."""
    if not text:
        return None
    try:
        return parse_time_ms(text)
    except ValueError:
        raise InputError(
            f"--until {text!r} is not an ISO 8601 time, e.g. 2026-11-23T00:00:00Z"
        ) from None


def _replay(args: argparse.Namespace) -> int:
    triggers = load_playbooks(args.playbooks)
    until_ms = _until(args.until)
    size = os.path.getsize(args.events) if args.events != "-" and Path(args.events).is_file() else 0
    progress = Progress(f"reading {args.events}", size)
    batch = read_events(args.events, progress)
    progress.close()
    gc.freeze()  # the events live to the end: keep the collector from re-scanning them
    for bad in batch.rejected[: args.show_rejected]:
        print(bad, file=sys.stderr)
    if len(batch.rejected) > args.show_rejected:
        more = len(batch.rejected) - args.show_rejected
        print(f"{args.events}: ... and {more} more invalid lines skipped", file=sys.stderr)

    # the events are sorted, so nothing arrives late: apply each one as it comes
    keep = (POLICY_TRAITS, POLICY_TRAITS)
    runner = Runner(engine.State(engine.Playbook(triggers, keep=keep)), lateness_ms=0)
    outreach = Outreach(runner.state, triggers, settings.policy())
    out = sys.stdout
    table = args.format == "table"
    rows: dict[str, Counter[str]] = defaultdict(Counter)
    subjects: dict[str, set[str]] = defaultdict(set)
    encode = msgspec.json.Encoder().encode

    def emit(f: engine.Firing) -> None:
        if table:
            rows[f.trigger]["firings"] += 1
            decided = f"suppressed:{f.reason}" if f.decision == decide.SUPPRESSED else f.decision
            rows[f.trigger][decided] += 1
            subjects[f.trigger].add(f.subject)
        else:
            out.write(encode(f.to_dict()).decode())
            out.write("\n")

    replayed = batch.events
    if until_ms is not None and replayed and replayed[-1].timestamp_ms > until_ms:
        cut = bisect.bisect_right(replayed, until_ms, key=_timestamp)
        print(f"{len(replayed) - cut} events after --until are not replayed", file=sys.stderr)
        replayed = replayed[:cut]
    last = replayed[-1].timestamp_ms if replayed else None
    gc.disable()  # the engine makes no reference cycles: reference counting frees everything
    try:
        holding = Holding(outreach, emit)
        runner.replay(replayed, until_ms if until_ms is not None else last, holding)
        holding.release()
    finally:
        gc.enable()
        gc.unfreeze()
    if table:
        _print_table(triggers, rows, subjects, out)
    summary = f"replayed {runner.events} events"
    if batch.rejected:
        summary += f", skipped {len(batch.rejected)} invalid lines"
    if batch.duplicates:
        summary += f", skipped {batch.duplicates} repeated messageIds"
    print(summary, file=sys.stderr)
    return 0


def _timestamp(event: Event) -> int:
    return event.timestamp_ms


def _print_table(
    triggers: Sequence[Trigger],
    rows: dict[str, Counter[str]],
    subjects: dict[str, set[str]],
    out: IO[str],
) -> None:
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
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        out.write("\n")


def _check(args: argparse.Namespace) -> int:
    from forewarn import compose

    triggers = load_playbooks(args.playbooks)
    compose.check(args.playbooks, triggers)
    for t in triggers:
        print(describe.trigger(t))
        print()
    print(f"{len(triggers)} trigger{'s' if len(triggers) != 1 else ''} valid")
    return 0


def _env(name: str) -> str | None:
    return settings.env(name)


def _serve(args: argparse.Namespace) -> int:
    import threading

    import uvicorn

    from forewarn import api, clock, compose, store_sqlite
    from forewarn.server import EngineLoop, EngineProcess, Engines, Writer

    url = _env("DATABASE_URL")
    if url or args.role != "all":
        if not url:
            raise InputError(
                f"--role {args.role} needs FOREWARN_DATABASE_URL=postgresql://…: the embedded "
                "mode (SQLite) runs every role in one process, --role all"
            )
        from forewarn import scaleout

        return scaleout.serve(
            args.role,
            url,
            args.playbooks,
            args.workspace,
            args.host,
            args.port,
            args.rate_limit,
            args.log_level,
        )
    triggers = load_playbooks(args.playbooks)
    compose.check(args.playbooks, triggers)
    policy_settings()  # bad policy settings stop the start, with what was wrong
    conn = store_sqlite.connect(args.db)
    write_key, admin_key = _env("WRITE_KEY"), _env("ADMIN_KEY")
    created: list[str] = []
    # keys are shown on a terminal only: printed into a service's log, they would be kept there
    # in plain text
    shown = sys.stdout.isatty()
    if store_sqlite.workspace_id(conn, args.workspace) is None and shown:
        if not write_key:
            write_key = store_sqlite.new_key_token("write")
            created.append(f"write key: {write_key}")
        if not admin_key:
            admin_key = store_sqlite.new_key_token("admin")
            created.append(f"admin key: {admin_key}")
    ws = store_sqlite.ensure_workspace(conn, args.workspace, clock.now_ms(), write_key, admin_key)
    from forewarn import widget

    if _env("WIDGET_ORIGINS") is not None:
        widget.set_origins(conn, ws, _env("WIDGET_ORIGINS") or "")
    identity = _env("IDENTITY_SECRET")
    if identity and len(identity.encode()) < 32:
        raise InputError(
            "FOREWARN_IDENTITY_SECRET is shorter than 32 bytes: HS256 needs at least 32; "
            "leave it unset and Forewarn makes one (forewarn keys identity prints it)"
        )
    if identity:
        conn.execute(
            "INSERT OR REPLACE INTO secrets (name, value) VALUES (?, ?)",
            (f"identity:{ws}", identity),
        )
    kinds = {k for (k,) in conn.execute("SELECT kind FROM keys WHERE workspace = ?", (ws,))}
    keyless = [kind for kind in ("write", "admin") if kind not in kinds]
    conn.close()
    settings = api.Settings(
        db=args.db,
        playbooks=args.playbooks,
        rate_limit_per_s=float(args.rate_limit),
        rate_burst=float(args.rate_limit * 2),
        stripe_secret=_env("STRIPE_SECRET"),
        write_key=write_key,
    )
    engines: Engines
    if args.engine == "process":
        engines = EngineProcess(args.db, args.playbooks, triggers)
        writer = Writer(args.db, on_commit=engines.committed)
    else:
        write_lock = threading.Lock()  # the writer and the engine take turns at the database
        engines = EngineLoop(args.db, triggers, write_lock=write_lock, playbooks=args.playbooks)
        writer = Writer(args.db, on_commit=engines.committed, write_lock=write_lock)
    app = api.Forewarn(settings, writer, engines)
    knowledge = _env("KB")
    articles = None
    if knowledge:
        articles = app.use_knowledge(
            knowledge,
            _env("LLM_URL"),
            _env("LLM_MODEL"),
            _env("LLM_KEY"),
            _env("KB_BASE_URL") or "",
        )
    delivery = None
    if args.delivery == "on":
        import subprocess

        delivery = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "forewarn",
                "deliver",
                "--db",
                args.db,
                "--parent",
                str(os.getpid()),
            ]
        )
    url = f"http://{args.host}:{args.port}"
    print(f"Forewarn on {url} with {len(triggers)} triggers, database {args.db}", flush=True)
    if articles is not None:
        print(f"the chat assistant answers from {articles} articles in {knowledge}", flush=True)
    if created:
        print("workspace '" + args.workspace + "' created; keys (shown once):", flush=True)
        for line in created:
            print("  " + line, flush=True)
    elif write_key or admin_key:
        print("keys from FOREWARN_WRITE_KEY / FOREWARN_ADMIN_KEY", flush=True)
    for kind in keyless:
        print(
            f"workspace '{args.workspace}' has no {kind} key: make one with `forewarn keys create"
            f" --db {args.db} --workspace {args.workspace} --kind {kind}`, or set"
            f" FOREWARN_{kind.upper()}_KEY",
            flush=True,
        )
    try:
        uvicorn.run(
            api.build(app),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
            lifespan="on",
        )
    finally:
        if delivery is not None:
            delivery.terminate()
            delivery.wait(timeout=30)
    return 0


def _backtest(args: argparse.Namespace) -> int:
    from forewarn import backtest
    from forewarn.model import order_key

    triggers = load_playbooks(args.playbooks)
    until_ms = _until(args.until)
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


def _report(args: argparse.Namespace) -> int:
    import csv

    from forewarn import backtest, clock, report

    triggers = load_playbooks(args.playbooks)
    if args.trigger and args.trigger not in {t.id for t in triggers}:
        known = ", ".join(t.id for t in triggers)
        raise InputError(f"no trigger '{args.trigger}' in the playbooks; they define: {known}")
    span = _since(args.since)
    with _workspace_db(args.db, args.workspace) as (conn, ws):
        now = clock.now_ms()
        result = report.live_report(conn, ws, triggers, now - span, now, args.trigger)
    if args.format == "json":
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        columns = ["trigger", "firings", "firings_per_day", "subjects", "precision", "recall"]
        writer.writerow(columns)
        for row in result["triggers"]:
            writer.writerow([row[c] for c in columns])
    else:
        sys.stdout.write(backtest.table(result))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from forewarn import stats

    for name in ("baseline", "holdout"):
        value = getattr(args, name)
        if not 0 < value < 1:
            raise InputError(f"--{name} {value}: give a share between 0 and 1, e.g. 0.2")
    if not 0 < args.baseline + args.effect < 1 or args.effect == 0:
        raise InputError(
            f"--effect {args.effect}: give a non-zero change that keeps the rate between 0 and "
            "1, e.g. -0.05 for 20% to 15%"
        )
    if args.per_day < 0:
        raise InputError("--per-day: give the trigger's firings per day, 0 or more")
    planned = stats.plan(args.baseline, args.effect, args.per_day, args.holdout, so_far=args.so_far)
    if args.format == "json":
        sys.stdout.write(msgspec.json.encode(planned).decode() + "\n")
        return 0
    days = planned["days"]
    when = (
        f"about {days:.0f} days at {args.per_day:g} firings a day"
        if days is not None
        else ("give --per-day to know how long")
    )
    print(
        f"{planned['firings']} firings ({planned['treated']} treated, {planned['held_out']} held "
        f"out) to see a change from {args.baseline:.0%} of {args.effect * 100:+g} points with "
        f"80% power at the 5% level; {planned['remaining']} still to come: {when}"
    )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import gzip

    from forewarn import clock, simulate, simulate_outreach

    if args.accounts < 1 or args.days < 1:
        raise InputError("--accounts and --days must be 1 or more")
    if not 0.0 <= args.effect <= 1.0:
        raise InputError(f"--effect {args.effect} must be between 0 and 1 (0.5 halves tickets)")
    if (args.out is None) == (args.to is None):
        raise InputError("give --out FILE to write the events, or --to URL to send them")
    default_start = clock.now_ms() if args.realtime else 1_767_225_600_000  # 2026-01-01
    start = _until(args.start) if args.start else default_start
    assert start is not None
    reach: simulate.Reach = simulate.NO_REACH
    if args.to is not None:
        key = args.write_key or _env("WRITE_KEY")
        if not key:
            raise InputError("--to needs the server's write key: --write-key or FOREWARN_WRITE_KEY")
        sender = simulate_outreach.Sender(args.to, key)
        if args.effect > 0:
            admin = args.admin_key or _env("ADMIN_KEY")
            if not admin or not args.realtime:
                raise InputError(
                    "--effect with --to learns from the server who was reached: it needs "
                    "--realtime (its firings are stamped with its clock) and the admin key "
                    "(--admin-key or FOREWARN_ADMIN_KEY)"
                )
            reach = simulate_outreach.ServerReach(args.to, admin, sender)
        world, messages = simulate.generate(
            args.accounts, args.days, args.seed, start, args.effect, reach
        )
        sent = simulate_outreach.send(messages, sender, realtime=args.realtime)
        truth_file = simulate.write_truth(world.truth, Path(args.truth or "simulated.truth.jsonl"))
        print(
            f"sent {sent} events to {args.to}; {len(world.truth)} problems in {truth_file}",
            file=sys.stderr,
        )
        return 0
    if args.effect > 0:
        if not args.playbooks:
            raise InputError(
                "--effect with --out needs --playbooks: the outreach that lowers tickets is what "
                "those playbooks and the policy would send over the simulated events"
            )
        triggers = load_playbooks(args.playbooks)
        reach = simulate_outreach.EngineReach(triggers, policy_settings())
    world, messages = simulate.generate(
        args.accounts, args.days, args.seed, start, args.effect, reach
    )
    out = Path(args.out)
    opener = gzip.open if out.suffix == ".gz" else open
    encode = msgspec.json.Encoder().encode
    count = 0
    with opener(out, "wb") as f:
        for message in messages:
            f.write(encode(message) + b"\n")
            count += 1
    truth = simulate.write_truth(
        world.truth, Path(args.truth or out.with_name(out.name + ".truth.jsonl"))
    )
    print(
        f"{count} events of {args.accounts} accounts over {args.days} days in {out}; "
        f"{len(world.truth)} problems in {truth}",
        file=sys.stderr,
    )
    return 0


def _since(text: str) -> int:
    """--since as milliseconds."""
    from forewarn.playbook import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise InputError(f"--since: {exc}") from None


@contextlib.contextmanager
def _workspace_db(db: str, workspace: str) -> Iterator[tuple[sqlite3.Connection, int]]:
    """The server's database and the workspace's id in it, for commands that read them."""
    from forewarn import store_sqlite

    if not Path(db).exists():
        raise InputError(f"no database {db}: give the server's --db")
    conn = store_sqlite.connect(db)
    try:
        ws = store_sqlite.workspace_id(conn, workspace)
        if ws is None:
            raise InputError(f"no workspace '{workspace}' in {db}")
        yield conn, ws
    finally:
        conn.close()


def _log_events(db: str, workspace: str, since: str) -> list[Event]:
    """The events of the server's log stamped within `since` of now."""
    from forewarn import clock, report

    span = _since(since)
    with _workspace_db(db, workspace) as (conn, ws):
        now = clock.now_ms()
        return report.log_events(conn, ws, now - span, now)


def _detect(args: argparse.Namespace) -> int:
    from forewarn import series
    from forewarn.playbook import parse_duration

    period = None
    if args.period:
        try:
            period = parse_duration(args.period)
        except ValueError as exc:
            raise InputError(f"--period: {exc}") from None
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


def _migrate(args: argparse.Namespace) -> int:
    from forewarn import schema, store_sqlite

    url = _env("DATABASE_URL")
    if url:
        from forewarn import store_pg

        pool = store_pg.connect(url, max_size=1)
        pool.close()
        where = "the PostgreSQL database"
    else:
        store_sqlite.connect(args.db).close()
        where = args.db
    print(f"{where} is at schema version {schema.VERSION}")
    return 0


def _embedded(args: argparse.Namespace, what: str) -> tuple[sqlite3.Connection, int]:
    """The SQLite file's connection and the workspace's id, for the embedded-only commands."""
    from forewarn import store_sqlite

    if _env("DATABASE_URL"):
        raise InputError(
            f"{what} works on the embedded SQLite store only: unset FOREWARN_DATABASE_URL "
            "(the scale-out mode does not support it yet)"
        )
    conn = store_sqlite.connect(args.db)
    ws = store_sqlite.workspace_id(conn, args.workspace)
    if ws is None:
        conn.close()
        raise InputError(f"no workspace '{args.workspace}' in {args.db}: check --workspace")
    return conn, ws


def _forget(args: argparse.Namespace) -> int:
    from forewarn import clock, privacy

    conn, ws = _embedded(args, "forget")
    try:
        done = privacy.forget(conn, ws, args.user, "cli", clock.now_ms())
    finally:
        conn.close()
    print(msgspec.json.encode({"forgotten": True, **done.to_dict()}).decode())
    print(
        f"forgot {done.events} events in {done.batches} batches and everything else kept "
        f"about that person in workspace '{args.workspace}'; their events are refused from now on",
        file=sys.stderr,
    )
    return 0


def _purge(args: argparse.Namespace) -> int:
    from forewarn import clock, privacy

    keep_ms = settings.retention_ms(args.retention)
    if not keep_ms:
        raise InputError("no retention: give --retention 400d or set FOREWARN_RETENTION")
    conn, ws = _embedded(args, "purge")
    try:
        now = clock.now_ms()
        counts = privacy.purge(conn, ws, now - keep_ms, "cli", now)
    finally:
        conn.close()
    print(msgspec.json.encode(counts).decode())
    return 0


def _deliver(args: argparse.Namespace) -> int:
    from forewarn import deliver

    deliver.main(args.db, args.parent, _env("DATABASE_URL"))
    return 0


def _keys(args: argparse.Namespace) -> int:
    from forewarn import clock, store_sqlite

    if args.action == "identity":
        from forewarn import widget

        conn = store_sqlite.connect(args.db)
        ws = store_sqlite.workspace_id(conn, args.workspace)
        if ws is None:
            ws = store_sqlite.ensure_workspace(conn, args.workspace, clock.now_ms())
        print(widget.identity_secret(conn, ws))
        conn.close()
        print(
            f"the identity secret of workspace '{args.workspace}': your backend signs each "
            "user's widget token with it (JWT HS256, sub = user id, exp); keep it secret",
            file=sys.stderr,
        )
        return 0
    if args.action == "vapid":
        from forewarn.channel_push import generate_vapid_keys

        private, public = generate_vapid_keys()
        print(f"FOREWARN_VAPID_PRIVATE_KEY={private}")
        print(f"FOREWARN_VAPID_PUBLIC_KEY={public}")
        print("a new Web Push key pair: keep the private key secret", file=sys.stderr)
        return 0

    conn = store_sqlite.connect(args.db)
    ws = store_sqlite.workspace_id(conn, args.workspace)
    if ws is None:
        ws = store_sqlite.ensure_workspace(conn, args.workspace, clock.now_ms())
    token = store_sqlite.add_key(conn, ws, args.kind, clock.now_ms(), name=args.name or "")
    conn.close()
    print(token)
    print(
        f"a new {args.kind} key for workspace '{args.workspace}': it is shown only now",
        file=sys.stderr,
    )
    return 0


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forewarn",
        description="Proactive support: spot the customer about to hit a problem, reach out first.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    replay = commands.add_parser(
        "replay",
        help="run playbooks over recorded events on a virtual clock",
        description="Run playbooks over recorded Segment-spec events (JSONL, gzip accepted) on a "
        "virtual clock and print one JSON line per firing.",
    )
    replay.add_argument("--playbooks", required=True, help="a playbook file or folder")
    replay.add_argument(
        "--events",
        required=True,
        help="JSONL of Segment messages (gzip accepted), a folder of them, or - for stdin",
    )
    replay.add_argument("--until", help="run the clock on to this ISO 8601 time after the events")
    replay.add_argument("--format", choices=("jsonl", "table"), default="jsonl")
    replay.add_argument(
        "--show-rejected",
        type=_count,
        default=20,
        help="how many invalid lines to list on stderr (0 for none)",
    )
    replay.set_defaults(run=_replay)

    check = commands.add_parser(
        "check",
        help="validate playbooks and say what each trigger will do",
        description="Validate playbooks; print, per trigger, what it will do in plain words.",
    )
    check.add_argument("playbooks", help="a playbook file or folder")
    check.set_defaults(run=_check)

    serve = commands.add_parser(
        "serve",
        help="run the live server: ingest, engine and admin API on SQLite",
        description="Run the live server on one SQLite file. Every option can also be set with "
        "its FOREWARN_* environment variable.",
    )
    serve.add_argument("--db", default=_env("DB"), help="the SQLite file")
    serve.add_argument("--playbooks", default=_env("PLAYBOOKS"), help="a playbook file or folder")
    serve.add_argument("--host", default=_env("HOST"))
    serve.add_argument("--port", type=int, default=_env("PORT"))
    serve.add_argument("--workspace", default=_env("WORKSPACE"))
    serve.add_argument(
        "--rate-limit",
        type=int,
        default=_env("RATE_LIMIT"),
        help="events per second per workspace",
    )
    serve.add_argument(
        "--engine",
        default=_env("ENGINE"),
        choices=("process", "thread"),
        help="run the engine in a process of its own (another core) or a thread of the server",
    )
    serve.add_argument(
        "--delivery",
        default=_env("DELIVERY"),
        choices=("on", "off"),
        help="run a delivery worker beside the server (off: run `forewarn deliver` yourself)",
    )
    serve.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL"),
        choices=("critical", "error", "warning", "info", "debug"),
    )
    serve.add_argument(
        "--role",
        default=_env("ROLE"),
        choices=("all", "api", "worker", "delivery"),
        help="with FOREWARN_DATABASE_URL: what this process does (api: ingest only; worker: "
        "the engine and the policy; all: both); without it, all (the embedded server)",
    )
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser(
        "migrate",
        help="bring the database's schema up to this version",
        description="Apply the schema migrations the database lacks (PostgreSQL when "
        "FOREWARN_DATABASE_URL is set, else the SQLite file), then exit. Every process also "
        "applies them when it starts.",
    )
    migrate.add_argument("--db", default=_env("DB"), help="the SQLite file")
    migrate.set_defaults(run=_migrate)

    keys = commands.add_parser(
        "keys",
        help="create a write or admin key",
        description="Create a key for a workspace (created if missing); the key is printed once "
        "and only its hash is stored.",
    )
    keys.add_argument(
        "action",
        choices=("create", "vapid", "identity"),
        metavar="ACTION",
        help="create (a write or admin key), vapid (a Web Push key pair, printed as settings) "
        "or identity (the secret that signs the widget's user tokens)",
    )
    keys.add_argument("--db", default=_env("DB"), help="the SQLite file")
    keys.add_argument("--workspace", default=_env("WORKSPACE"))
    keys.add_argument("--kind", choices=("write", "admin"), default="write")
    keys.add_argument("--name", help="a note to recognise the key by")
    keys.set_defaults(run=_keys)

    forget = commands.add_parser(
        "forget",
        help="remove everything kept about a person and refuse their events from now on",
        description="Remove a person's events, engine state, firings, messages, inbox and "
        "conversations, consent, push subscriptions and outcomes from the SQLite file, and "
        "refuse their future events (only a hash of the id is kept for that). Works while the "
        "server runs. Prints what was removed, as JSON.",
    )
    forget.add_argument("user", metavar="USER", help="the user id or anonymous id")
    forget.add_argument("--db", default=_env("DB"), help="the SQLite file")
    forget.add_argument("--workspace", default=_env("WORKSPACE"))
    forget.set_defaults(run=_forget)

    purge = commands.add_parser(
        "purge",
        help="delete data older than the retention",
        description="Delete the events, firings, outcomes, finished messages and inbox items "
        "older than the retention, then exit; `serve` does the same every hour when "
        "FOREWARN_RETENTION is set. Prints the rows deleted per table, as JSON.",
    )
    purge.add_argument("--db", default=_env("DB"), help="the SQLite file")
    purge.add_argument("--workspace", default=_env("WORKSPACE"))
    purge.add_argument(
        "--retention",
        default=_env("RETENTION"),
        help="how long to keep data, e.g. 400d (at least 8d)",
    )
    purge.set_defaults(run=_purge)

    deliver = commands.add_parser(
        "deliver",
        help="run a delivery worker: drain the outbox onto the channels",
        description="Send what the engine decided: claim due outbox rows, send them on their "
        "channels, retry with back-off, dead-letter after the last attempt. `serve` runs one; "
        "more can run beside it on the same database.",
    )
    deliver.add_argument("--db", default=_env("DB"), help="the SQLite file")
    deliver.add_argument(
        "--parent", type=int, metavar="PID", help="exit when the process PID is gone"
    )
    deliver.set_defaults(run=_deliver)

    backtest = commands.add_parser(
        "backtest",
        help="what playbooks would have done over history, and how it turned out",
        description="Replay history (a file, or the server's own event log) through the "
        "playbooks with the full policy on a virtual clock, and report per trigger: firings "
        "per day, subjects hit more than once, overlap, what the policy would have suppressed, "
        "goal and failure rates of treated and held-out subjects, precision and recall.",
    )
    backtest.add_argument("--playbooks", required=True, help="a playbook file or folder")
    backtest.add_argument("--events", help="JSONL of Segment messages (gzip accepted), a folder")
    backtest.add_argument("--since", help="read the server's log: the events of the last 30d")
    backtest.add_argument("--db", default=_env("DB"), help="the SQLite file, with --since")
    backtest.add_argument("--workspace", default=_env("WORKSPACE"), help="with --since")
    backtest.add_argument("--until", help="run the clock on to this ISO 8601 time")
    backtest.add_argument("--format", choices=("table", "json"), default="table")
    backtest.set_defaults(run=_backtest)

    report = commands.add_parser(
        "report",
        help="how the live server's triggers did: decisions, outcomes, precision, recall",
        description="Report on the firings the server recorded and what happened after each, "
        "read from its own event log: per trigger, the decisions, the goal and failure rates of "
        "treated and held-out subjects, precision and recall.",
    )
    report.add_argument("--playbooks", default=_env("PLAYBOOKS"), help="a playbook file or folder")
    report.add_argument("--db", default=_env("DB"), help="the SQLite file")
    report.add_argument("--workspace", default=_env("WORKSPACE"))
    report.add_argument("--trigger", help="one trigger only")
    report.add_argument("--since", default="30d", help="the period: the last 30d")
    report.add_argument("--format", choices=("table", "json", "csv"), default="table")
    report.set_defaults(run=_report)

    plan = commands.add_parser(
        "plan",
        help="how many firings a holdout test needs, and how long that takes",
        description="The sample-size planner: given the rate of the goal or failure among "
        "held-out subjects and the smallest change worth seeing, how many firings the "
        "comparison needs, and how many days at the trigger's current volume.",
    )
    plan.add_argument("--baseline", type=float, required=True, help="e.g. 0.2: 20% file a ticket")
    plan.add_argument("--effect", type=float, required=True, help="e.g. -0.05: down to 15%")
    plan.add_argument("--holdout", type=float, default=0.1, help="the trigger's holdout share")
    plan.add_argument("--per-day", type=float, default=0.0, help="the trigger's firings per day")
    plan.add_argument("--so-far", type=int, default=0, help="firings already counted")
    plan.add_argument("--format", choices=("text", "json"), default="text")
    plan.set_defaults(run=_plan)

    simulate = commands.add_parser(
        "simulate",
        help="a synthetic SaaS product's events, with known problems and their ground truth",
        description="Generate the events of a synthetic SaaS product — accounts, users, daily "
        "and weekly rhythm — with injected problems (error spikes, users stuck in settings, "
        "usage decay, storage limits, failed payments, stalled onboarding), and a ground-truth "
        "file of who had which problem when and whether it led to a ticket.",
    )
    simulate.add_argument("--accounts", type=int, default=100)
    simulate.add_argument("--days", type=int, default=30)
    simulate.add_argument("--seed", type=int, default=1)
    simulate.add_argument("--start", help="when the world starts (ISO 8601; default 2026-01-01)")
    simulate.add_argument("--out", help="the events, JSONL (.gz to compress)")
    simulate.add_argument("--to", help="or send them to this server, e.g. http://127.0.0.1:8750")
    simulate.add_argument("--write-key", help="with --to: the server's write key")
    simulate.add_argument("--truth", help="the ground truth, JSONL (default: OUT.truth.jsonl)")
    simulate.add_argument(
        "--effect",
        type=float,
        default=0.0,
        help="the true effect of outreach in time: it multiplies a ticket's probability by "
        "1 - EFFECT (default 0: outreach changes nothing)",
    )
    simulate.add_argument(
        "--playbooks", help="with --out and --effect: the playbooks whose outreach counts"
    )
    simulate.add_argument(
        "--realtime",
        action="store_true",
        help="with --to: start now and send each event when its time comes",
    )
    simulate.add_argument("--admin-key", help="with --to and --effect: the server's admin key")
    simulate.set_defaults(run=_simulate)

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

    demo = commands.add_parser(
        "demo",
        help="run the guided demo: server, SMTP sink and a simulated product feeding it",
        description="Start `forewarn serve` with the example playbooks, an SMTP sink keeping "
        "each email as a file, and the simulated product sending it live traffic; print the "
        "URLs, and run until Ctrl-C.",
    )
    demo.add_argument("--dir", default="forewarn-demo", help="the demo's database, mail, logs")
    demo.add_argument("--host", default=_env("HOST"))
    demo.add_argument("--port", type=int, default=_env("PORT"))
    demo.add_argument("--accounts", type=int, default=2000, help="accounts in the product")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--effect", type=float, default=0.5, help="the true effect of outreach")
    demo.add_argument("--playbooks", help="default: the examples (examples/playbooks)")
    demo.add_argument("--for", dest="duration", type=float, help="stop after this many seconds")
    demo.set_defaults(run=_demo)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from forewarn import demo

    if args.accounts < 1 or not 0.0 <= args.effect <= 1.0:
        raise InputError("--accounts must be 1 or more, --effect between 0 and 1")
    options = demo.Options(Path(args.dir), args.host, args.port, args.accounts, args.seed)
    options.effect, options.duration_s = args.effect, args.duration
    if args.playbooks:
        options.playbooks = Path(args.playbooks)
    return demo.run(options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except ForewarnError as exc:
        print(f"forewarn {args.command}: {exc.message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
