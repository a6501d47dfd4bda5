"""Engine throughput and state size at 1e3, 1e5 and 1e6 subjects, on one core; prints JSON.

Flow: for each N, a seeded synthetic Segment stream for the example playbooks is written as JSONL
(sorted by time); then a fresh subprocess per N measures, over that one file:

- `decode_only`: msgspec decoding each line into `model.SegmentMessage`, no engine (the floor);
- `replay`: what `forewarn replay` does without printing or the policy: the file, in time
  order, streamed line by line (`stream_events`: read, decode, skip repeated messageIds) into
  `Runner.replay` (lateness 0), then `Runner.finish(until)`, with the collector off, as replay
  runs; firings and timers counted, and the process's peak memory;
- `engine_only`: the same Runner pass over events already decoded in memory, with the time
  `finish` took and the garbage collector's pauses;
- `engine_only_buffered`: the same with the default lateness, as a live server would run it;
- `apply_only`: `engine.apply` per event without the Runner (its buffer and timer wheel), timers
  dropped: what the Runner adds is `engine_only` minus this;
- state size: a walk of the engine `State` object graph (the compiled playbook and the event list
  excluded), per subject (users + accounts), with and without traits, broken down by where the
  bytes sit; and a tracemalloc cross-check.

Timed passes are best of 3 up to 1e5 subjects, single above (`--repeat`); "target_met" compares
with the targets (events/s at 1e5 subjects, bytes of state per subject).

    .venv/bin/python bench/engine.py                # full run: about 5 minutes
    .venv/bin/python bench/engine.py --quick        # smoke run: a few seconds
    .venv/bin/python bench/engine.py --profile      # adds cProfile's hottest functions per N
    .venv/bin/python bench/engine.py --data-dir /tmp/streams   # keep and reuse the streams
    .venv/bin/python bench/engine.py --quick --write-stream s.jsonl   # the 1e3 stream, no timing

To measure another checkout's engine, put its src first: `PYTHONPATH=../other/src`. To measure
the compiled build, run it with that build's Python: `.venv-compiled/bin/python bench/engine.py`
(after `make compiled`); "forewarn.compiled" in the JSON says which was measured.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import platform
import pstats
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec

import forewarn
from forewarn import engine, model
from forewarn.runner import DEFAULT_LATENESS_MS, Runner
from forewarn.sources import EventBatch, load_playbooks, read_events, stream_events

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOKS = ROOT / "examples" / "playbooks"

TARGET_EVENTS_PER_S = 200_000  # end to end, at 1e5 subjects
TARGET_EVENTS_AT = 100_000
TARGET_BYTES_PER_SUBJECT = 400

SECOND, MINUTE, HOUR, DAY = 1_000, 60_000, 3_600_000, 86_400_000
T0_MS = 1_793_577_600_000  # 2026-11-02T00:00:00Z, a Monday
USERS_PER_ACCOUNT = 10
STREAM_VERSION = 2  # bump when the generator changes: --data-dir reuses streams by name


# --- the synthetic stream ---------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    """What a stream is made of; its file name changes with anything that changes its bytes."""

    subjects: int  # users; accounts are about subjects / 10
    events: int
    days: int
    seed: int

    @property
    def name(self) -> str:
        shape = f"{self.subjects}u-{self.events}e-{self.days}d-s{self.seed}"
        return f"stream-v{STREAM_VERSION}-{shape}.jsonl"


@dataclass
class StreamStats:
    lines: int
    bytes: int
    users: int
    accounts: int
    first_ms: int
    last_ms: int
    mix: dict[str, int]


# (timestamp, sequence, kind, user index, detail): sorted, then encoded one line at a time.
Row = tuple[int, int, str, int, Any]

PAGES = (
    ("/dashboard", "Dashboard", 30),
    ("/projects", "Projects", 14),
    ("/projects/board", "Project board", 12),
    ("/reports", "Reports", 8),
    ("/inbox", "Inbox", 10),
    ("/kb/articles/getting-started", "Knowledge base", 5),
    ("/kb/articles/exports", "Knowledge base", 3),
    ("/kb/settings/notifications", "Knowledge base settings", 2),
    ("/kb/settings/sso", "Knowledge base settings", 1),
    ("/kb/settings/billing", "Knowledge base settings", 1),
    ("/settings/profile", "Profile", 4),
    ("/billing", "Billing", 2),
)
FEATURES = (
    ("reports", 15),
    ("dashboards", 25),
    ("export", 10),
    ("editor", 30),
    ("sharing", 10),
    ("api", 5),
    ("automations", 5),
)
ERRORS = (
    ("billing-export-timeout", "Export timed out", 8),
    ("image-resize", "Resize failed", 20),
    ("ws-disconnect", "Websocket closed", 40),
    ("quota-exceeded", "Quota exceeded", 12),
    ("editor-save-conflict", "Save conflict", 20),
)
# What a session is made of, after its first event (weights in percent).
SESSION_MIX = (
    ("page", 45),
    ("Feature Used", 20),
    ("Button Clicked", 11),
    ("Search Performed", 8),
    ("Login", 5),
    ("Error", 4),
    ("Export Completed", 3),
    ("Item Created", 3),
    ("Ticket Created", 1),
)
SEARCHES = ("sso", "export", "invoice", "api key", "webhooks", "permissions", "reports")


def _uid(i: int) -> str:
    # 20 characters, like `usr_` + a database id: the subject key the engine keeps per user.
    return f"usr_{(i * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF:016x}"


def _aid(a: int) -> str:
    return f"acc_{(a * 0xC2B2AE3D27D4EB4F) & 0xFFFFFFFFFFFF:012x}"


_DAYS_BACK = 800
_DATES = [
    time.strftime("%Y-%m-%d", time.gmtime((T0_MS + d * DAY) / 1000))
    for d in range(-_DAYS_BACK, _DAYS_BACK)
]


def _iso(ms: int) -> str:
    """ISO 8601 UTC to the millisecond, for T0 +- 800 days; much faster than datetime."""
    d, rest = divmod(ms - T0_MS, DAY)
    s, milli = divmod(rest, 1000)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{_DATES[d + _DAYS_BACK]}T{h:02d}:{m:02d}:{s:02d}.{milli:03d}Z"


def _rows(spec: StreamSpec) -> tuple[list[Row], list[int], list[dict[str, Any]]]:
    """Every event as a compact row, unsorted; also each user's account and each account's
    traits. Deterministic for a spec."""
    rng = random.Random(f"forewarn-bench/{spec.seed}/{spec.subjects}")
    n = spec.subjects
    n_accounts = max(1, round(n / USERS_PER_ACCOUNT))
    span = spec.days * DAY
    account_of = [rng.randrange(n_accounts) for _ in range(n)]
    arrival = [int(rng.random() ** 1.5 * span * 0.8) for _ in range(n)]  # most arrive early on
    rows: list[Row] = []
    seq = 0

    def add(t: int, kind: str, user: int, detail: Any = None) -> None:
        nonlocal seq
        seq += 1
        rows.append((min(t, T0_MS + span - 1), seq, kind, user, detail))

    # Accounts: traits set by a group call when their first user arrives; every later user's
    # group call repeats them (as SDKs do), with storage creeping up on some accounts.
    traits: list[dict[str, Any]] = []
    for a in range(n_accounts):
        limit = rng.choice((100, 250, 500, 1000))
        traits.append(
            {
                "name": f"Account {a}",
                "plan": rng.choice(("starter", "team", "business", "enterprise")),
                "employees": rng.choice((5, 20, 80, 300, 2000)),
                "storage_used": round(limit * rng.betavariate(2, 3), 1),
                "storage_limit": limit,
                "renewal_date": _iso(T0_MS + rng.randrange(-30 * DAY, 365 * DAY)),
            }
        )
    first_user = [-1] * n_accounts
    for u in range(n):
        a = account_of[u]
        if first_user[a] < 0 or arrival[u] < arrival[first_user[a]]:
            first_user[a] = u

    # Every user appears once at arrival: new users (a fifth) with an identify carrying
    # created_at, most of them finishing onboarding later; the others with a Login. The account's
    # first user, and a few others (as SDKs repeat it), send a group call with its traits.
    for u in range(n):
        t = T0_MS + arrival[u]
        if rng.random() < 0.2:
            add(t, "identify", u, t)
            if rng.random() < 0.6:
                add(t + rng.randrange(10 * MINUTE, 5 * DAY), "Onboarding Completed", u)
        else:
            add(t, "Login", u)
            if rng.random() < 0.02:  # an existing user re-identified
                add(t + 20, "identify", u, t - rng.randrange(30 * DAY, 700 * DAY))
        if first_user[account_of[u]] == u or rng.random() < 0.05:
            add(t + 50, "group", u)

    # Storage creeping up on 2% of accounts; a failed payment on 0.5% of them.
    for a in rng.sample(range(n_accounts), max(1, n_accounts // 50)):
        u = first_user[a]
        if u >= 0:
            for _ in range(rng.randint(1, 3)):
                add(T0_MS + rng.randrange(arrival[u], span), "storage", u, rng.uniform(1.0, 1.25))
    for a in rng.sample(range(n_accounts), max(1, n_accounts // 200)):
        u = first_user[a]
        if u >= 0:
            add(T0_MS + rng.randrange(arrival[u], span), "Payment Failed", u)

    # Error bursts on a few accounts in the second week (the error-spike trigger's baseline).
    for a in rng.sample(range(n_accounts), max(2, n_accounts // 500)):
        u = first_user[a]
        if u < 0:
            continue
        start = T0_MS + rng.randrange(min(max(span // 2, arrival[u] + 8 * DAY), span - 1), span)
        for _ in range(rng.randint(15, 50)):
            add(start + rng.randrange(5 * MINUTE), "Error", u, "burst")

    # The rest: sessions of a few events seconds apart, by users with heavy-tailed activity.
    budget = spec.events - len(rows)
    if budget <= 0:
        print(f"{spec.name}: arrivals alone are {len(rows)} events", file=sys.stderr)
    else:
        weights = [rng.paretovariate(1.2) for _ in range(n)]
        cum = []
        total = 0.0
        for w in weights:
            total += w
            cum.append(total)
        lengths: list[int] = []
        left = budget
        while left > 0:
            length = min(left, 1 + int(rng.expovariate(1 / 7)))
            lengths.append(length)
            left -= length
        users = rng.choices(range(n), cum_weights=cum, k=len(lengths))
        # drawn in one call: far cheaper than a call per event
        kinds = rng.choices([k for k, _ in SESSION_MIX], [w for _, w in SESSION_MIX], k=budget)
        ki = 0
        for u, length in zip(users, lengths, strict=True):
            t = T0_MS + rng.randrange(arrival[u], max(arrival[u] + 1, span - HOUR))
            add(t, "Login" if rng.random() < 0.5 else "page", u)
            for _ in range(length - 1):
                t += int(rng.expovariate(1 / (40 * SECOND)))
                add(t, kinds[ki], u)
                ki += 1
    return rows, account_of, traits


def generate(spec: StreamSpec, path: Path) -> StreamStats:
    """Write the stream as JSONL of Segment-spec messages, sorted by timestamp."""
    rows, account_of, traits = _rows(spec)
    rows.sort()
    rng = random.Random(f"forewarn-bench/encode/{spec.seed}/{spec.subjects}")
    pages = [(p, title) for p, title, _ in PAGES]
    page_w = [w for _, _, w in PAGES]
    feats = [f for f, _ in FEATURES]
    feat_w = [w for _, w in FEATURES]
    errs = [(fp, msg) for fp, msg, _ in ERRORS]
    err_w = [w for _, _, w in ERRORS]
    n = len(rows)
    page_draws = rng.choices(pages, weights=page_w, k=n)
    feat_draws = rng.choices(feats, weights=feat_w, k=n)
    err_draws = rng.choices(errs, weights=err_w, k=n)
    library = {"name": "analytics.js", "version": "5.2.0"}
    encode = msgspec.json.Encoder().encode
    mix: Counter[str] = Counter()
    users: set[int] = set()
    accounts: set[int] = set()
    storage: dict[int, float] = {}
    size = 0
    with path.open("wb") as out:
        chunk: list[bytes] = []
        for i, (t, _, kind, u, detail) in enumerate(rows):
            when = _iso(t)
            a = account_of[u]
            users.add(u)
            msg: dict[str, Any] = {
                "type": "track",
                "messageId": f"{rng.getrandbits(128):032x}",
                "timestamp": when,
                "sentAt": when,
                "userId": _uid(u),
            }
            if kind == "page":
                path_, title = page_draws[i]
                msg["type"] = "page"
                msg["anonymousId"] = f"anon-{u:x}"
                msg["name"] = title
                msg["properties"] = {
                    "path": path_,
                    "url": "https://app.example.com" + path_,
                    "title": title,
                    "referrer": "",
                }
                msg["context"] = {"library": library, "ip": "203.0.113.7"}
            elif kind == "identify":
                msg["type"] = "identify"
                msg["traits"] = {
                    "email": f"user{u}@example.com",
                    "name": f"User {u}",
                    "created_at": _iso(detail),
                }
            elif kind in ("group", "storage"):
                accounts.add(a)
                account_traits = dict(traits[a])
                if kind == "storage":
                    storage[a] = round(storage.get(a, account_traits["storage_used"]) * detail, 1)
                if a in storage:
                    account_traits["storage_used"] = storage[a]
                msg["type"] = "group"
                msg["groupId"] = _aid(a)
                msg["traits"] = account_traits
                kind = "group"
            else:
                msg["event"] = kind
                if kind == "Feature Used":
                    props: dict[str, Any] = {"feature": feat_draws[i]}
                elif kind == "Error":
                    fp, text = ("billing-export-timeout", "Export timed out")
                    if detail != "burst":
                        fp, text = err_draws[i]
                    props = {"fingerprint": fp, "message": text, "type": "AppError"}
                elif kind == "Search Performed":
                    props = {"query": SEARCHES[i % len(SEARCHES)], "results": i % 13}
                elif kind == "Payment Failed":
                    props = {"amount": 490, "currency": "usd"}
                else:
                    props = {}
                msg["properties"] = props
                context: dict[str, Any] = {"library": library}
                if i % 10 < 7:  # most SDK calls carry the account
                    context["groupId"] = _aid(a)
                    accounts.add(a)
                msg["context"] = context
            mix[msg["type"] if msg["type"] != "track" else kind] += 1
            line = encode(msg)
            size += len(line) + 1
            chunk.append(line)
            if len(chunk) >= 8192:
                out.write(b"\n".join(chunk) + b"\n")
                chunk.clear()
        if chunk:
            out.write(b"\n".join(chunk) + b"\n")
    return StreamStats(
        lines=n,
        bytes=size,
        users=len(users),
        accounts=len(accounts),
        first_ms=rows[0][0] if rows else T0_MS,
        last_ms=rows[-1][0] if rows else T0_MS,
        mix=dict(mix.most_common()),
    )


# --- the size of the engine state ---------------------------------------------------------------

_ATOMS = (str, bytes, int, float, complex)


def _slots(cls: type) -> tuple[str, ...]:
    """Attributes kept outside a `__dict__`: slots, and those of a class compiled by mypyc."""
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names.extend([slots] if isinstance(slots, str) else slots)
        names.extend(klass.__dict__.get("__mypyc_attrs__", ()))
    return tuple(dict.fromkeys(names))


def walk_size(
    root: object, skip: Callable[[str, object], bool]
) -> tuple[int, dict[str, list[int]]]:
    """Bytes of every object reachable from `root`, each counted once, grouped by where it was
    first reached: `.users{v}.states[]` is a trigger state of a user, `{k}` a dict key."""
    seen: set[int] = set()
    groups: dict[str, list[int]] = {}
    total = 0
    slot_cache: dict[type, tuple[str, ...]] = {}
    stack: list[tuple[object, str]] = [(root, "")]
    getsizeof = sys.getsizeof
    while stack:
        obj, label = stack.pop()
        if obj is None or obj is True or obj is False or id(obj) in seen:
            continue
        seen.add(id(obj))
        size = getsizeof(obj)
        total += size
        key = f"{label} {type(obj).__name__}"
        group = groups.get(key)
        if group is None:
            groups[key] = [1, size]
        else:
            group[0] += 1
            group[1] += size
        if isinstance(obj, _ATOMS):
            continue
        if isinstance(obj, dict):
            for k, v in obj.items():
                stack.append((k, label + "{k}"))
                stack.append((v, label + "{v}"))
        elif isinstance(obj, list | tuple | set | frozenset):
            child = label + "[]"
            for item in obj:
                stack.append((item, child))
        else:
            cls = type(obj)
            names = slot_cache.get(cls)
            if names is None:
                names = slot_cache[cls] = _slots(cls) + getattr(cls, "__struct_fields__", ())
            for name in names:
                child_label = f"{label}.{name}"
                value = getattr(obj, name, None)
                if not skip(child_label, value):
                    stack.append((value, child_label))
            attrs = getattr(obj, "__dict__", None)
            if attrs is not None:
                seen.add(id(attrs))
                total += getsizeof(attrs)
                for name, value in attrs.items():
                    child_label = f"{label}.{name}"
                    if not skip(child_label, value):
                        stack.append((value, child_label))
    return total, groups


def _skip_in_state(label: str, value: object) -> bool:
    # The compiled playbook is shared by every subject and does not grow with them.
    return label == ".book" or isinstance(value, type)


# --- the measurements, one subprocess per N -----------------------------------------------------


@dataclass(frozen=True)
class Job:
    path: str
    playbooks: str
    subjects: int
    users: int
    accounts: int
    until_ms: int
    repeat: int
    tracemalloc: bool
    profile: bool


def _best(samples: list[float]) -> float:
    return min(samples)


def _rate(count: int, seconds: float) -> int:
    return round(count / seconds) if seconds > 0 else 0


_playbooks = PLAYBOOKS  # the worker's --playbooks
REPLAY_LATENESS_MS = 0  # as `forewarn replay`: its input is sorted, so nothing waits


def _new_runner(lateness_ms: int = REPLAY_LATENESS_MS) -> Runner:
    return Runner(engine.State(engine.Playbook(load_playbooks(_playbooks))), lateness_ms)


def _decode_only(path: str) -> tuple[float, int]:
    decode = msgspec.json.Decoder(model.SegmentMessage).decode
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb") as file:
        for line in file:
            decode(line)
            n += 1
    return time.perf_counter() - t0, n


def _drive(
    runner: Runner, events: Iterable[model.Event], until_ms: int
) -> tuple[Counter[str], int, float]:
    """As `forewarn replay` runs: `Runner.replay` with the collector off. Returns the firings
    per trigger, the timers pending after the last event and the seconds the timers due after
    it took."""
    fired: Counter[str] = Counter()

    def emit(firing: engine.Firing) -> None:
        fired[firing.trigger] += 1

    gc.disable()
    try:
        runner.replay(events, None, emit)  # the events, and the timers due among them
        pending = runner.pending_timers
        t0 = time.perf_counter()
        fired.update(f.trigger for f in runner.finish(until_ms))
        finish_s = time.perf_counter() - t0
    finally:
        gc.enable()
    return fired, pending, finish_s


def _replay(job: Job) -> dict[str, Any]:
    """`forewarn replay` minus printing and the outreach policy: the file, in time order, is
    decoded line by line straight into the runner (`stream_events`), holding no events."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    batch = EventBatch()
    runner = _new_runner()
    fired, peak, finish_s = _drive(runner, stream_events(job.path, batch), job.until_ms)
    t1, cpu1 = time.perf_counter(), time.process_time()
    n = runner.events
    return {
        "events": n,
        "rejected": len(batch.rejected),
        "streamed": True,
        "seconds": round(t1 - t0, 3),
        "events_per_s": _rate(n, t1 - t0),
        # CPU time of this process, which a shared machine's other work does not inflate
        "cpu_s": round(cpu1 - cpu0, 3),
        "cpu_events_per_s": _rate(n, cpu1 - cpu0),
        "us_per_event": round((t1 - t0) / n * 1e6, 3) if n else 0,
        "finish_s": round(finish_s, 3),
        "firings": sum(fired.values()),
        "firings_by_trigger": dict(sorted(fired.items())),
        "timers_run": runner.timers_run,
        "timers_pending_after_events": peak,
        "timers_pending_after_finish": runner.pending_timers,
        "late_events": runner.late,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


class GcPauses:
    """The collector's pauses while it is installed, by generation: [count, seconds]."""

    def __init__(self) -> None:
        self.by_generation = [[0, 0.0], [0, 0.0], [0, 0.0]]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            entry = self.by_generation[info["generation"]]
            entry[0] += 1
            entry[1] += time.perf_counter() - self._started

    def report(self) -> dict[str, Any]:
        return {
            f"gen{g}": {"collections": int(n), "seconds": round(s, 3)}
            for g, (n, s) in enumerate(self.by_generation)
        }


def _engine_only(
    events: list[model.Event], until_ms: int, lateness_ms: int = REPLAY_LATENESS_MS
) -> tuple[float, float, Runner, dict[str, Any]]:
    """Seconds for all of it, seconds of `finish`, the runner (for its state), GC pauses."""
    runner = _new_runner(lateness_ms)
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    try:
        t0 = time.perf_counter()
        _, _, finish_s = _drive(runner, events, until_ms)
        seconds = time.perf_counter() - t0
    finally:
        gc.callbacks.remove(pauses)
    return seconds, finish_s, runner, pauses.report()


def _apply_only(events: list[model.Event]) -> float:
    state = engine.State(engine.Playbook(load_playbooks(_playbooks)))
    apply = engine.apply
    t0 = time.perf_counter()
    for event in events:
        apply(state, event, event.timestamp_ms)
    return time.perf_counter() - t0


def _state_size(runner: Runner, job: Job) -> dict[str, Any]:
    state = runner.state
    total, groups = walk_size(state, _skip_in_state)
    traits = sum(b for key, (_, b) in groups.items() if ".traits" in key)
    users = sum(b for key, (_, b) in groups.items() if key.startswith(".users"))
    accounts = sum(b for key, (_, b) in groups.items() if key.startswith(".accounts"))
    n_users = len(getattr(state, "users", ())) or job.users
    n_accounts = len(getattr(state, "accounts", ())) or job.accounts
    subjects = n_users + n_accounts
    wheel = getattr(runner, "_timers", None)
    timers_bytes = walk_size(wheel, lambda label, value: False)[0] if wheel is not None else 0
    breakdown = sorted(groups.items(), key=lambda item: -item[1][1])
    return {
        "users": n_users,
        "accounts": n_accounts,
        "bytes_total": total,
        "bytes_per_subject": round(total / subjects, 1),
        "bytes_per_subject_without_traits": round((total - traits) / subjects, 1),
        "bytes_per_user": round(users / n_users, 1) if n_users else 0,
        "bytes_per_account": round(accounts / n_accounts, 1) if n_accounts else 0,
        "pending_timers": len(wheel) if wheel is not None else None,
        "bytes_per_pending_timer": round(timers_bytes / len(wheel), 1) if wheel else None,
        # where the bytes sit: path from the State, type -> objects and bytes per subject
        "breakdown_per_subject": {
            key.strip(): {"objects": round(count / subjects, 3), "bytes": round(size / subjects, 1)}
            for key, (count, size) in breakdown
            if size / subjects >= 0.5
        },
    }


def _traced_state_bytes(events: list[model.Event], until_ms: int, subjects: int) -> dict[str, Any]:
    """tracemalloc's view of the state a replay leaves behind (the runner's timer wheel dropped).
    Subject keys are strings allocated by the decoder before tracing starts, so they are not in
    it; the walk counts them."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    runner = _new_runner()
    _drive(runner, events, until_ms)
    with_timers = tracemalloc.get_traced_memory()[0] - base
    state = runner.state
    del runner
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del state
    return {
        "bytes_per_subject": round((current - base) / subjects, 1),
        "bytes_per_subject_with_timer_wheel": round(with_timers / subjects, 1),
        "peak_bytes_per_subject": round((peak - base) / subjects, 1),
    }


def _profile(events: list[model.Event], job: Job) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n = len(events)
    for name, work in (
        ("read_events", lambda: read_events(job.path)),
        ("runner", lambda: _drive(_new_runner(), events, job.until_ms)),
    ):
        prof = cProfile.Profile()
        prof.enable()
        work()
        prof.disable()
        stats = pstats.Stats(prof).get_stats_profile()
        top = sorted(stats.func_profiles.items(), key=lambda item: -item[1].tottime)[:25]
        out[name] = [
            {
                "function": f"{Path(p.file_name).name}:{p.line_number}({fn})",
                "calls": p.ncalls,
                "tottime_us_per_event": round(p.tottime / n * 1e6, 3),
                "cumtime_us_per_event": round(p.cumtime / n * 1e6, 3),
            }
            for fn, p in top
        ]
    return out


def measure(job: Job) -> dict[str, Any]:
    """Every figure for one stream. Each timed pass starts with no other engine state alive, so
    that the garbage collector's full passes cost what they would in a real process."""
    global _playbooks
    _playbooks = Path(job.playbooks)
    subjects = job.users + job.accounts
    decode = [_decode_only(job.path) for _ in range(job.repeat)]
    lines = decode[0][1]
    replays = []
    for _ in range(job.repeat):
        replays.append(_replay(job))
        gc.collect()
    replay = min(replays, key=lambda r: float(r["cpu_s"]))
    del replays
    # the passes below run the engine alone, over the events held in memory
    events = read_events(job.path).events
    gc.freeze()
    n = len(events)

    apply_runs = []
    for _ in range(job.repeat):
        gc.collect()
        apply_runs.append(_apply_only(events))
    buffered_runs = []
    for _ in range(job.repeat):
        gc.collect()
        buffered_runs.append(_engine_only(events, job.until_ms, DEFAULT_LATENESS_MS)[0])
        gc.collect()
    engine_runs: list[float] = []
    finish_runs: list[float] = []
    gc_runs: list[dict[str, Any]] = []
    runner: Runner | None = None
    for _ in range(job.repeat):
        runner = None
        gc.collect()
        seconds, finish_s, runner, pauses = _engine_only(events, job.until_ms)
        engine_runs.append(seconds)
        finish_runs.append(finish_s)
        gc_runs.append(pauses)
    assert runner is not None
    size = _state_size(runner, job)
    t0 = time.perf_counter()
    gc.collect()
    gc_ms = (time.perf_counter() - t0) * 1000  # with the events too: what replay would see
    tracked = len(gc.get_objects())
    del runner
    gc.collect()
    traced = _traced_state_bytes(events, job.until_ms, subjects) if job.tracemalloc else None
    profile = _profile(events, job) if job.profile else None
    engine_s = _best(engine_runs)
    apply_s = _best(apply_runs)
    buffered_s = _best(buffered_runs)
    decode_s = _best([s for s, _ in decode])
    result: dict[str, Any] = {
        "subjects": subjects,
        "repeat": job.repeat,
        "users": job.users,
        "accounts": job.accounts,
        "events": n,
        "replay": replay,
        "decode_only": {
            "lines": lines,
            "events_per_s": _rate(lines, decode_s),
            "us_per_event": round(decode_s / lines * 1e6, 3) if lines else 0,
        },
        "engine_only": {
            "events_per_s": _rate(n, engine_s),
            "us_per_event": round(engine_s / n * 1e6, 3) if n else 0,
            "runs_s": [round(s, 3) for s in engine_runs],
            "finish_s": round(finish_runs[engine_runs.index(engine_s)], 3),
            "gc_pauses": gc_runs[engine_runs.index(engine_s)],
        },
        "engine_only_buffered": {
            "lateness_ms": DEFAULT_LATENESS_MS,
            "events_per_s": _rate(n, buffered_s),
            "us_per_event": round(buffered_s / n * 1e6, 3) if n else 0,
        },
        "apply_only": {
            "events_per_s": _rate(n, apply_s),
            "us_per_event": round(apply_s / n * 1e6, 3) if n else 0,
        },
        "state": size,
        "tracemalloc": traced,
        "full_gc_ms_after_replay": round(gc_ms, 1),
        "gc_tracked_objects_per_subject": round(tracked / subjects, 2),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if profile is not None:
        result["profile"] = profile
    return result


# --- the driver ---------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--subjects", type=_ints, default=[1_000, 100_000, 1_000_000], help="users, comma-separated"
    )
    parser.add_argument(
        "--events",
        type=_ints,
        default=[200_000, 1_000_000, 1_500_000],
        help="events per subjects count (one value, or one per --subjects entry); every user "
        "arrives (identify or Login, group, onboarding: about 1.3 events a user), the rest are "
        "sessions, so a stream has at least about 1.3 x subjects events",
    )
    parser.add_argument("--days", type=int, default=14, help="days of virtual time in the stream")
    parser.add_argument(
        "--until-days",
        type=int,
        default=30,
        help="run timers on this many days past the last event (as replay --until does)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--playbooks", type=Path, default=PLAYBOOKS, help="the stream is made for the examples"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help="timed passes per figure, best of (default: 3 up to 1e5 subjects, 1 above)",
    )
    parser.add_argument("--quick", action="store_true", help="small streams: a smoke run")
    parser.add_argument("--data-dir", help="keep generated streams here and reuse them")
    parser.add_argument("--no-tracemalloc", action="store_true", help="skip the tracemalloc pass")
    parser.add_argument("--profile", action="store_true", help="add cProfile's hottest functions")
    parser.add_argument("--out", help="also write the JSON to this file")
    parser.add_argument(
        "--write-stream",
        metavar="PATH",
        help="only write the first stream to PATH (JSONL) and print its figures: a replay to "
        "compare two builds by",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def _source() -> dict[str, Any]:
    """Which forewarn was measured: its folder, and its git commit when it is a checkout."""
    folder = Path(forewarn.__file__).resolve().parent
    out: dict[str, Any] = {
        "path": str(folder),
        # the mypyc build (`make compiled`) or pure Python
        "compiled": not str(engine.__file__).endswith(".py"),
        "commit": None,
        "dirty": None,
    }
    try:
        git = ["git", "-C", str(folder)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.returncode == 0:
            out["commit"] = head.stdout.strip()
            status = subprocess.run(
                [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True
            )
            out["dirty"] = bool(status.stdout.strip())
    except OSError:
        pass
    return out


def _targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    at = next((r for r in results if r["users"] == TARGET_EVENTS_AT), None)
    out: dict[str, Any] = {
        "events_per_s_at_1e5_subjects": TARGET_EVENTS_PER_S,
        "bytes_per_subject": TARGET_BYTES_PER_SUBJECT,
    }
    met: dict[str, bool | None] = {}
    for figure in ("replay", "engine_only"):
        rate = None if at is None else at[figure]["events_per_s"]
        met[f"{figure}_events_per_s_at_1e5"] = None if rate is None else rate >= TARGET_EVENTS_PER_S
    for r in results:
        met[f"bytes_per_subject_at_{r['users']}"] = (
            r["state"]["bytes_per_subject"] <= TARGET_BYTES_PER_SUBJECT
        )
    out["target_met"] = met
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        job = Job(**json.loads(args.worker))
        json.dump(measure(job), sys.stdout)
        return 0
    subjects: list[int] = [1_000, 10_000] if args.quick else args.subjects
    events: list[int] = [20_000, 40_000] if args.quick else args.events
    if len(events) == 1:
        events = events * len(subjects)
    if len(events) != len(subjects):
        print("--events needs one value or one per --subjects entry", file=sys.stderr)
        return 2
    if args.write_stream:
        spec = StreamSpec(subjects=subjects[0], events=events[0], days=args.days, seed=args.seed)
        json.dump(asdict(generate(spec, Path(args.write_stream))), sys.stdout)
        print()
        return 0
    data_dir = Path(args.data_dir) if args.data_dir else None
    scratch = None if data_dir else tempfile.TemporaryDirectory(prefix="forewarn-bench-")
    folder = data_dir or Path(scratch.name if scratch else ".")
    folder.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    streams: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for n, count in zip(subjects, events, strict=True):
            spec = StreamSpec(subjects=n, events=count, days=args.days, seed=args.seed)
            path = folder / spec.name
            meta = path.with_suffix(".json")
            t0 = time.perf_counter()
            if path.exists() and meta.exists():
                stats = StreamStats(**json.loads(meta.read_text()))
            else:
                print(f"generating {spec.name}", file=sys.stderr)
                stats = generate(spec, path)
                meta.write_text(json.dumps(asdict(stats)))
            streams.append(
                {
                    **asdict(spec),
                    **asdict(stats),
                    "mean_line_bytes": round(stats.bytes / max(stats.lines, 1), 1),
                    "generate_s": round(time.perf_counter() - t0, 2),
                }
            )
            job = Job(
                path=str(path),
                playbooks=str(args.playbooks),
                subjects=n,
                users=stats.users,
                accounts=stats.accounts,
                until_ms=stats.last_ms + args.until_days * DAY,
                repeat=max(1, args.repeat or (3 if n <= 100_000 else 1)),
                tracemalloc=not args.no_tracemalloc,
                profile=args.profile,
            )
            print(f"measuring {n} subjects, {stats.lines} events", file=sys.stderr)
            done = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(asdict(job))],
                stdout=subprocess.PIPE,
                check=True,
                env={**os.environ, "PYTHONHASHSEED": "0"},
            )
            results.append(json.loads(done.stdout))
    finally:
        if scratch is not None:
            scratch.cleanup()
    report = {
        "benchmark": "engine",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "msgspec": msgspec.__version__,
        "forewarn": _source(),
        "one_core": True,
        "config": {
            "playbooks": str(args.playbooks),
            "days": args.days,
            "until_days_after_last_event": args.until_days,
            "replay_lateness_ms": REPLAY_LATENESS_MS,
            "buffered_lateness_ms": DEFAULT_LATENESS_MS,
            "repeat": args.repeat or "3 up to 1e5 subjects, 1 above",
            "quick": args.quick,
        },
        "streams": streams,
        "results": results,
        "targets": _targets(results),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
