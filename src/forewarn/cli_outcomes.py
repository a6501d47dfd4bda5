"""The commands that measure what outreach does: the live server's report, the size a holdout
comparison needs, and a simulated product whose true effect is known."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from forewarn.cli_args import (
    Commands,
    add_format,
    add_playbooks,
    add_store,
    duration_arg,
    env,
    time_arg,
    workspace_db,
)
from forewarn.errors import InputError
from forewarn.settings import policy as policy_settings
from forewarn.sources import load_playbooks


def add_report(commands: Commands) -> None:
    report = commands.add_parser(
        "report",
        help="how the live server's triggers did: decisions, outcomes, precision, recall",
        description="Report on the firings the server recorded and what happened after each, "
        "read from its own event log: per trigger, the decisions, the goal and failure rates of "
        "treated and held-out subjects, precision and recall.",
    )
    add_playbooks(report)
    add_store(report)
    report.add_argument("--trigger", help="one trigger only")
    report.add_argument("--since", default="30d", help="the period: the last 30d")
    add_format(report, "table", "json", "csv")
    report.set_defaults(run=_report)


def _report(args: argparse.Namespace) -> int:
    import csv

    from forewarn import backtest, clock, report

    triggers = load_playbooks(args.playbooks)
    if args.trigger and args.trigger not in {t.id for t in triggers}:
        known = ", ".join(t.id for t in triggers)
        raise InputError(f"no trigger '{args.trigger}' in the playbooks; they define: {known}")
    span = duration_arg("--since", args.since)
    with workspace_db(args.db, args.workspace) as (conn, ws, reads):
        now = clock.now_ms()
        result = report.report_from(reads, conn, ws, triggers, now - span, now, args.trigger)
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


def add_plan(commands: Commands) -> None:
    plan = commands.add_parser(
        "plan",
        help="how many firings a holdout test needs, and how long that takes",
        description="The sample-size planner: given the rate of the goal or failure among "
        "held-out subjects and the smallest change worth seeing, how many firings the "
        "comparison needs, and how many days at the trigger's current volume.",
    )
    plan.add_argument("--baseline", type=float, required=True, help="e.g. 0.2: 20%% file a ticket")
    plan.add_argument("--effect", type=float, required=True, help="e.g. -0.05: down to 15%%")
    plan.add_argument("--holdout", type=float, default=0.1, help="the trigger's holdout share")
    plan.add_argument("--per-day", type=float, default=0.0, help="the trigger's firings per day")
    plan.add_argument("--so-far", type=int, default=0, help="firings already counted")
    add_format(plan, "text", "json")
    plan.set_defaults(run=_plan)


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


def add_simulate(commands: Commands) -> None:
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
    start = time_arg("--start", args.start) if args.start else default_start
    assert start is not None
    reach: simulate.Reach = simulate.NO_REACH
    if args.to is not None:
        key = args.write_key or env("WRITE_KEY")
        if not key:
            raise InputError("--to needs the server's write key: --write-key or FOREWARN_WRITE_KEY")
        sender = simulate_outreach.Sender(args.to, key)
        if args.effect > 0:
            admin = args.admin_key or env("ADMIN_KEY")
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
