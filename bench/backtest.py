"""A 30-day backtest of a large simulated product: wall time, CPU time and peak memory; prints
JSON.

The world (`forewarn.simulate`, default 100,000 accounts over 30 days) streams straight into
the backtest's engine, policy and outcome watcher (`forewarn.backtest` with the example
playbooks and the default policy), so memory holds the engine's state, the outcomes' and one
simulated hour of events, never the whole history: at about 1,600 events per account per month
the history alone would not fit in memory. (`forewarn backtest` reads its file into memory
first; this measures the same pipeline as a stream.)

Beside it, measured in the same run on a slice of the same world: the simulator alone
(generating the events) and msgspec decoding those events from JSON lines (the physical
reference), so the backtest's rate can be read against both.

    python bench/backtest.py [--accounts N] [--days D] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from forewarn import backtest, engine, simulate
from forewarn.engine import Firing
from forewarn.model import Event, event_from_dict
from forewarn.outcomes import Outcome, Outcomes
from forewarn.policy import POLICY_TRAITS, Holding, Outreach
from forewarn.runner import Runner
from forewarn.settings import policy as policy_settings
from forewarn.sources import load_playbooks

ROOT = Path(__file__).resolve().parents[1]
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def streamed_backtest(accounts: int, days: int, seed: int) -> dict[str, Any]:
    triggers = load_playbooks(ROOT / "examples" / "playbooks")
    keep = (POLICY_TRAITS, POLICY_TRAITS)
    runner = Runner(engine.State(engine.Playbook(triggers, keep=keep)), lateness_ms=0)
    outreach = Outreach(runner.state, triggers, policy_settings())
    outcomes = Outcomes(triggers, runner.state)
    firings: list[Firing] = []
    done: list[Outcome] = []
    holding = Holding(outreach, firings.append)

    def decided(f: Firing) -> None:
        holding(f)
        outcomes.fired(f)

    world, messages = simulate.generate(accounts, days, seed, START_MS)

    def events() -> Iterator[Event]:
        for message in messages:
            event = event_from_dict(message)
            done.extend(outcomes.close(event.timestamp_ms))
            outcomes.observe(event)
            yield event

    wall, cpu = time.perf_counter(), time.process_time()
    end_ms = START_MS + (days + 3) * simulate.DAY_MS
    runner.replay(events(), end_ms, decided)
    holding.release()
    done.extend(outcomes.finish())
    report = backtest.report(triggers, firings, done, outcomes, days, runner.events)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "accounts": accounts,
        "days": days,
        "events": runner.events,
        "problems": len(world.truth),
        "firings": len(firings),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "events_per_cpu_s": round(runner.events / cpu),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "per_trigger_firings": {row["trigger"]: row["firings"] for row in report["triggers"]},
    }


def references(accounts: int, days: int, seed: int) -> dict[str, Any]:
    """The simulator alone, and decoding its events from JSON lines, on a slice of the world."""
    cpu = time.process_time()
    _, messages = simulate.generate(accounts, days, seed, START_MS)
    lines = [msgspec.json.encode(m) for m in messages]
    generate_s = time.process_time() - cpu
    decode = msgspec.json.Decoder().decode
    cpu = time.process_time()
    for line in lines:
        decode(line)
    decode_s = time.process_time() - cpu
    return {
        "accounts": accounts,
        "events": len(lines),
        "simulate_events_per_cpu_s": round(len(lines) / generate_s),
        "decode_only_events_per_cpu_s": round(len(lines) / decode_s),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1,000 accounts: a smoke run")
    args = parser.parse_args(argv)
    accounts = 1_000 if args.quick else args.accounts
    out = {
        "reference": references(max(100, accounts // 100), args.days, args.seed),
        "backtest": streamed_backtest(accounts, args.days, args.seed),
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
