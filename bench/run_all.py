"""`make bench`: every benchmark, each in a fresh process; its JSON into bench/results/NAME.json
and a short summary into bench/results/SUMMARY.md, each figure beside a physical reference
measured in the same run (decoding the same events; SQLite's batched insert rate on this disk;
a no-op HTTP endpoint on the same server), so the ratios can be compared across machines.

    python bench/run_all.py [--quick] [--only engine,ingest,...] [--backtest-accounts N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


def commands(quick: bool, backtest_accounts: int) -> dict[str, list[str]]:
    py = [sys.executable]
    if quick:
        return {
            "engine": [*py, str(BENCH / "engine.py"), "--quick", "--no-tracemalloc"],
            "ingest": [*py, str(BENCH / "ingest.py"), "--seconds", "2", "--rate", "20000"],
            "delivery": [
                *py,
                str(BENCH / "outreach.py"),
                "--firings",
                "20000",
                "--messages",
                "200",
            ],
            "detection": [*py, str(BENCH / "detection.py"), "--quick"],
            "quality": [*py, str(BENCH / "quality.py"), "--quick", "--no-simulated"],
            "backtest": [*py, str(BENCH / "backtest.py"), "--accounts", "1000"],
            "privacy": [
                *py,
                str(BENCH / "privacy.py"),
                "--events",
                "100000",
                "--forgotten",
                "1000",
            ],
        }
    return {
        "engine": [
            *py,
            str(BENCH / "engine.py"),
            "--subjects",
            "1000,10000,100000,1000000",
            "--events",
            "200000,500000,1000000,1500000",
        ],
        "ingest": [*py, str(BENCH / "ingest.py")],
        "delivery": [*py, str(BENCH / "outreach.py")],
        "detection": [*py, str(BENCH / "detection.py")],
        "quality": [*py, str(BENCH / "quality.py"), "--no-simulated"],
        "widget": [*py, str(BENCH / "widget.py")],
        "backtest": [*py, str(BENCH / "backtest.py"), "--accounts", str(backtest_accounts)],
        "privacy": [*py, str(BENCH / "privacy.py")],
    }


def sqlite_batched_insert(rows: int = 200_000, per_transaction: int = 1_000) -> dict[str, Any]:
    """Rows of about one event's size, 1,000 per transaction, WAL, synchronous=NORMAL, into a
    file in the system's temporary folder: what this machine's disk and SQLite allow."""
    body = b"x" * 320
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "reference.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, ws INTEGER, body BLOB)")
        batch = [(1, body)] * per_transaction
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(rows // per_transaction):
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO log (ws, body) VALUES (?, ?)", batch)
            conn.execute("COMMIT")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        conn.close()
    return {
        "rows": rows,
        "rows_per_transaction": per_transaction,
        "rows_per_s": round(rows / wall),
        "rows_per_cpu_s": round(rows / cpu),
    }


def run(name: str, argv: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=BENCH.parent)
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {done.returncode}", "output": tail, "bench_seconds": seconds}
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"error": "no JSON on stdout", "output": done.stdout[-500:]}
    result["bench_seconds"] = seconds
    return result


# --------------------------------------------------------------------------- the summary


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _n(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and value < 100:
        return f"{value:,.2f}{unit}"
    return f"{value:,.0f}{unit}"


def _ratio(a: Any, b: Any) -> str:
    numbers = isinstance(a, int | float) and isinstance(b, int | float)
    return f"{a / b:.3g}" if numbers and b else "—"


def summary(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []

    def add(what: str, value: str, ref: str, ref_value: str, ratio: str) -> None:
        rows.append((what, value, f"{ref} {ref_value}".strip(), ratio))

    engine = results.get("engine", {})
    for r in engine.get("results") or []:
        replay = _get(r, "replay", "events_per_s")
        decode = _get(r, "decode_only", "events_per_s")
        add(
            f"replay events/s, {r['subjects']:,} subjects",
            _n(replay),
            "decode only",
            _n(decode),
            _ratio(replay, decode),
        )
    if engine.get("results"):
        last = engine["results"][-1]
        add(
            f"state bytes per subject at {last['subjects']:,} subjects",
            _n(_get(last, "state", "bytes_per_subject")),
            "",
            "",
            "",
        )
    http = _get(results, "ingest", "http") or {}
    noop_rps = _get(http, "noop", "requests_per_s")
    batch = http.get("batch_events", 100)
    for run_name, label in (("at_rate", "paced"), ("max", "as fast as answered")):
        events = _get(http, run_name, "acknowledged_events_per_s")
        add(
            f"HTTP ingest events/s ({label})",
            _n(events),
            f"no-op endpoint, requests/s x {batch}",
            _n(noop_rps * batch if noop_rps else None),
            _ratio(events, noop_rps * batch if noop_rps else None),
        )
        add(
            f"HTTP ingest ack p99 ms ({label})",
            _n(_get(http, run_name, "ack_ms_p99")),
            "no-op endpoint p99 ms",
            _n(_get(http, "noop", "ack_ms_p99")),
            "",
        )
        add(
            f"event to firing p99 ms ({label})",
            _n(_get(http, run_name, "event_to_firing_ms_p99")),
            "",
            "",
            "",
        )
    sqlite_rate = _get(results, "reference", "sqlite", "rows_per_s")
    delivery = results.get("delivery", {})
    decisions = _get(delivery, "policy", "decisions_per_s")
    add(
        "policy decisions/s",
        _n(decisions),
        "SQLite batched inserts/s",
        _n(sqlite_rate),
        _ratio(decisions, sqlite_rate),
    )
    for channel in ("in_app", "webhook", "email"):
        rate = _get(delivery, f"outbox_{channel}", "messages_per_s")
        add(
            f"outbox to {channel}, messages/s",
            _n(rate),
            "SQLite batched inserts/s",
            _n(sqlite_rate),
            _ratio(rate, sqlite_rate),
        )
    bt = _get(results, "backtest", "backtest") or {}
    ref = _get(results, "backtest", "reference") or {}
    if bt:
        add(
            f"backtest, {bt['accounts']:,} accounts x {bt['days']} days "
            f"({bt['events']:,} events): wall s",
            _n(bt.get("wall_s")),
            "",
            "",
            "",
        )
        add("backtest peak memory MB", _n(bt.get("peak_rss_mb")), "", "", "")
        add(
            "backtest events per CPU second (simulator included)",
            _n(bt.get("events_per_cpu_s")),
            "decode only",
            _n(ref.get("decode_only_events_per_cpu_s")),
            _ratio(bt.get("events_per_cpu_s"), ref.get("decode_only_events_per_cpu_s")),
        )
        add(
            "simulator events per CPU second",
            _n(ref.get("simulate_events_per_cpu_s")),
            "decode only",
            _n(ref.get("decode_only_events_per_cpu_s")),
            _ratio(ref.get("simulate_events_per_cpu_s"), ref.get("decode_only_events_per_cpu_s")),
        )
    chat = _get(results, "widget", "event_to_chat_s_p50")
    if chat is not None:
        add("event to chat on the widget, median s", _n(chat), "", "", "")

    lines = [
        "# Benchmark summary",
        "",
        f"{meta['when']} · commit {meta['commit']} · {meta['machine']} · {meta['cpus']} cores · "
        f"Python {meta['python']}{' · quick run' if meta['quick'] else ''}",
        "",
        "| figure | measured | physical reference, same run | ratio |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
    ]
    detection = results.get("detection", {})
    if detection.get("triggers"):
        w = detection["world"]
        lines += [
            "",
            f"Detection on a simulated world ({w['accounts']:,} accounts, {w['days']} days, "
            f"seed {w['seed']}):",
            "",
            "| trigger | problem | firings | precision | recall | onset to firing, median |"
            " onset to outreach, median |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in detection["triggers"]:
            fire = _get(t, "delay_to_firing_s", "median")
            send = _get(t, "delay_to_outreach_s", "median")
            lines.append(
                f"| {t['trigger']} | {t['target'] or 'none simulated'} | {t['firings']} | "
                f"{_n(t.get('precision'))} | {_n(t.get('recall'))} | "
                f"{_duration(fire)} | {_duration(send)} |"
            )
    failed = [name for name, r in results.items() if "error" in r]
    if failed:
        lines += [
            "",
            "Did not complete: " + ", ".join(f"{n} ({results[n]['error']})" for n in failed),
        ]
    return "\n".join(lines) + "\n"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", help="comma-separated names, e.g. engine,backtest")
    parser.add_argument("--backtest-accounts", type=int, default=100_000)
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    chosen = commands(args.quick, args.backtest_accounts)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - set(chosen)
        if unknown:
            parser.error(f"no benchmark {sorted(unknown)}; there are {sorted(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in wanted}
    results: dict[str, dict[str, Any]] = {}
    for path in RESULTS.glob("*.json"):  # the figures of earlier runs, for --only
        results[path.stem] = json.loads(path.read_text())
    results["reference"] = {"sqlite": sqlite_batched_insert()}
    (RESULTS / "reference.json").write_text(json.dumps(results["reference"], indent=1))
    for name, argv_ in chosen.items():
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        results[name] = run(name, argv_)
        (RESULTS / f"{name}.json").write_text(json.dumps(results[name], indent=1))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH
    ).stdout.strip()
    meta = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "quick": args.quick,
    }
    text = summary(results, meta)
    (RESULTS / "SUMMARY.md").write_text(text)
    print(text)
    return 1 if any("error" in results[n] for n in chosen) else 0


if __name__ == "__main__":
    raise SystemExit(main())
