"""The embedded server's moving parts, around one SQLite file:

- `Writer`: one thread that owns the write connection. Requests hand it their parsed batches;
  it commits whatever has queued up in one transaction (group commit: concurrent requests share
  one fsync) and only then answers them, so a 2xx always means committed.
- `EngineLoop`: one thread stepping each workspace's `LiveEngine`, woken by every commit and at
  least every `tick_ms` for timers.

The HTTP routes live in `api`; `forewarn serve` wires everything together.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import multiprocessing
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from forewarn import clock, compose, dedup, engine, settings, store_sqlite
from forewarn.errors import ForewarnError, NotFoundError
from forewarn.forgotten import Forgotten
from forewarn.live import Committed, LiveEngine, StateForgotten
from forewarn.model import format_time
from forewarn.playbook import Trigger
from forewarn.store_sqlite import Append, Appended, StoreError

log = logging.getLogger("forewarn")

GROUP_MAX = 256  # requests per transaction at most
CHECKPOINT_EVERY_S = 0.25
WAL_RESTART_FRAMES = 16_384  # pages: 64 MB of WAL
RESTART_WAIT_MS = 20
PURGE_EVERY_MS = 3_600_000  # with a retention: at start, then every hour
MIN_STEP_MS = 10.0  # the engine steps at most this often: under load, steps gather commits


class WriteLock:
    """Turns at writing the database, across the threads and processes of one server: the
    writer, the engine (in a thread or a process of its own) and the checkpointer take it
    around their transactions. A waiter wakes as soon as the holder lets go, where SQLite's
    busy handler would sleep between looks, up to 100 ms at a time: those sleeps were the
    slowest answers under load. The lock is an `flock` on `<db>.write.lock`, with a thread
    lock in front of it, since threads of one process share the file's lock."""

    def __init__(self, path: str | Path) -> None:
        self._threads = threading.Lock()
        self._fd = os.open(f"{path}.write.lock", os.O_RDWR | os.O_CREAT, 0o600)
        weakref.finalize(self, os.close, self._fd)

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._threads.release()


def freeze_startup() -> None:
    """Keep what a server process holds for its life (modules, routes, playbooks: some 50,000
    objects) out of the cycle collector's full passes, which took 20-35 ms each under load."""
    gc.collect()
    gc.freeze()


@dataclass
class _Job:
    append: Append
    future: asyncio.Future[Appended]
    loop: asyncio.AbstractEventLoop


class Writer:
    """Commits batches for the event loop, in a thread of its own; hands each committed
    batch's events to `on_commit`."""

    def __init__(
        self,
        path: str | Path,
        on_commit: Callable[[list[tuple[int, Committed]]], None] | None = None,
        write_lock: WriteLock | None = None,
    ) -> None:
        self.path = path
        self.on_commit = on_commit
        self.write_lock = write_lock or WriteLock(path)
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="forewarn-writer", daemon=True)
        self._checkpointer = threading.Thread(
            target=self._checkpoints, name="forewarn-checkpoint", daemon=True
        )
        self._stopped = threading.Event()
        where = dedup.index_path(path)
        self.seen = dedup.SeenIds(dedup.Index(where) if where is not None else None)
        self.forgotten = Forgotten()

    def start(self) -> None:
        conn = store_sqlite.connect(self.path)  # fails now, in the caller, if it cannot open
        try:
            self.seen.load(conn, clock.now_ms())
        finally:
            conn.close()
        self.seen.start()
        self._thread.start()
        self._checkpointer.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self.seen.stop()
        self._stopped.set()
        self._checkpointer.join(timeout=10)

    def _checkpoints(self) -> None:
        """Copy the WAL back into the database every so often, in this thread alone: the copy
        and its fsync then never delay an answer or a firing, and writers go on meanwhile.

        Under steady load those copies never catch up with a moment when no reader is in the
        WAL, so it would never start again from its beginning and would grow without end; and
        every page read looks through the WAL's index, which grows with it. Past
        `WAL_RESTART_FRAMES`, a checkpoint that makes it start again runs between two of the
        writer's commits and waits up to `RESTART_WAIT_MS` for the readers (the engine's) to
        move on.

        SQLite syncs the database file only at a checkpoint that reaches the WAL's end: under
        load, only that RESTART, inside the lock, by which time a second or two of copies
        (tens of MB) wait to be written. At 50,000 events/s that sync grew from 5 ms to 35-40
        ms over two minutes as the database grew, every commit waiting meanwhile. So this
        thread syncs the file itself after each copy, outside the lock."""
        conn = store_sqlite.connect(self.path, store_sqlite.NO_CHECKPOINT)
        conn.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
        database = os.open(self.path, os.O_RDONLY)
        synced = 0  # frames copied as of the last sync
        failing = False  # said once when checkpoints start failing, once when they recover
        while not self._stopped.wait(CHECKPOINT_EVERY_S):
            try:
                frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1:]
                if copied != synced:
                    _sync_data(database)
                    synced = copied
                if frames >= WAL_RESTART_FRAMES:
                    with self.write_lock:  # between two commits: only readers to wait for
                        conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            except (sqlite3.Error, OSError) as exc:
                if not failing:
                    log.warning("checkpoints fail (%s): retrying until they work again", exc)
                failing = True
                continue
            if failing:
                log.warning("checkpoints work again")
                failing = False
        os.close(database)
        conn.close()

    async def submit(self, append: Append) -> Appended:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Appended] = loop.create_future()
        self._queue.put(_Job(self.prepare(append), future, loop))
        return await future

    def prepare(self, append: Append) -> Append:
        """What needs no database, done in the request's thread before the writer's turn."""
        return store_sqlite.prepare(append)

    def _run(self) -> None:
        conn = store_sqlite.connect(self.path, store_sqlite.NO_CHECKPOINT)
        while True:
            job = self._queue.get()
            if job is None:
                break
            jobs = [job]
            stop = False
            while len(jobs) < GROUP_MAX:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                jobs.append(more)
            self._commit(conn, jobs)
            if stop:
                break
        conn.close()

    def _commit(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        try:
            with self.write_lock:
                appends = [j.append for j in jobs]
                results = store_sqlite.append_batches(conn, appends, self.seen, self.forgotten)
        except sqlite3.Error as exc:
            error = store_sqlite.unavailable(exc)
            log.error("could not commit %d requests: %s", len(jobs), exc)
            settle(jobs, [error] * len(jobs))
            return
        settle(jobs, results)
        handed: list[tuple[int, Committed]] = []
        for j, result in zip(jobs, results, strict=True):
            events = j.append.events
            if result.batch is not None and events is not None:
                if result.kept is not None:
                    events = [events[i] for i in result.kept]
                handed.append(
                    (j.append.workspace, Committed(result.batch, j.append.received_ms, events))
                )
        if self.on_commit is not None:
            self.on_commit(handed)


_sync_data = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def settle(jobs: list[_Job], outcomes: Sequence[Appended | BaseException]) -> None:
    """Answer the jobs' requests, with one wake of each event loop they wait in (a wake is a
    system call, and a commit answers many requests)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Appended], Any]]] = {}
    for j, outcome in zip(jobs, outcomes, strict=True):
        by_loop.setdefault(j.loop, []).append((j.future, outcome))
    for loop, settled in by_loop.items():
        loop.call_soon_threadsafe(_set, settled)


def _set(settled: list[tuple[asyncio.Future[Appended], Any]]) -> None:
    for future, outcome in settled:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


@dataclass
class EngineStats:
    steps: int = 0
    events: int = 0
    firings: int = 0
    errors: int = 0
    lag: dict[int, int] = field(default_factory=dict)  # batches not yet applied, per workspace
    up: bool = True  # False: the engine did not answer
    engines: dict[int, LiveEngine] = field(default_factory=dict)


class Engines(Protocol):
    """What the API needs of the engines, wherever they run (`EngineLoop` in a thread of this
    process, `EngineProcess` in a process of its own)."""

    triggers: list[Trigger]

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def committed(self, batches: list[tuple[int, Committed]]) -> None: ...
    def reload(self, triggers: list[Trigger]) -> None: ...
    def subject_state(self, workspace: int, subject_id: str) -> list[dict[str, Any]]: ...
    def why(self, workspace: int, subject_id: str, trigger: str, now_ms: int) -> dict[str, Any]: ...
    def stats_view(self) -> EngineStats: ...


class EngineLoop:
    """Steps every workspace's engine in one thread, woken by commits and by the clock."""

    def __init__(
        self,
        path: str | Path,
        triggers: list[Trigger],
        tick_ms: int = 1_000,
        now_ms: Callable[[], int] = clock.now_ms,
        write_lock: WriteLock | None = None,
        min_step_ms: float = MIN_STEP_MS,
        playbooks: str | Path | None = None,
    ) -> None:
        self.path = path
        self.playbooks = playbooks  # where the message templates are
        self.write_lock = write_lock or WriteLock(path)
        self.min_step_ms = min_step_ms
        self._handed: dict[int, list[Committed]] = {}
        self.triggers = triggers
        self.tick_ms = tick_ms
        self.now_ms = now_ms
        self.stats = EngineStats()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reload: list[Trigger] | None = None
        self._lock = threading.Lock()
        self.state_lock = threading.Lock()  # held while stepping: readers of engine state take it
        self._thread = threading.Thread(target=self._run, name="forewarn-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run(self) -> None:
        """Step in the calling thread until `stop_soon`."""
        self._run()

    def stop_soon(self) -> None:
        self._stop.set()
        self._wake.set()

    def stop(self) -> None:
        self.stop_soon()
        self._thread.join(timeout=30)

    def wake(self) -> None:
        self._wake.set()

    def committed(self, batches: list[tuple[int, Committed]]) -> None:
        """Called by the writer after each commit, from its thread."""
        with self._lock:
            for workspace, batch in batches:
                self._handed.setdefault(workspace, []).append(batch)
        self._wake.set()

    def reload(self, triggers: list[Trigger]) -> None:
        """Use other playbooks from the next step on (each engine rebuilds from the log)."""
        with self._lock:
            self._reload = triggers
        self._wake.set()

    def _run(self) -> None:
        conn = store_sqlite.connect(self.path, store_sqlite.NO_CHECKPOINT)
        engines = self.stats.engines
        policy = settings.policy()
        guard_every = settings.guard_every_ms()
        guarded_at: dict[int, int] = {}
        retention = settings.retention_ms()
        purged_at: dict[int, int] = {}
        composer: compose.Composer | None = None
        keep: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        last = 0.0
        while not self._stop.is_set():
            self._wake.wait(self.tick_ms / 1000)
            # under load, let a few commits gather: one step and one commit for them all
            pause = self.min_step_ms - (clock.monotonic_ms() - last)
            if pause > 0:
                time.sleep(pause / 1000)
            self._wake.clear()
            last = clock.monotonic_ms()
            try:
                with self._lock:
                    reload, self._reload = self._reload, None
                if reload is not None:
                    self.triggers = reload
                    engines.clear()
                    composer = None
                if composer is None:
                    composer, keep = compose.for_playbooks(conn, self.playbooks, self.triggers)
                for ws, _ in store_sqlite.workspaces(conn):
                    live = engines.get(ws)
                    if live is None:
                        live = engines[ws] = LiveEngine(
                            conn,
                            ws,
                            self.triggers,
                            write_lock=self.write_lock,
                            policy=policy,
                            compose=composer,
                            keep=keep,
                        )
                    with self.state_lock:
                        stepped = self._step(live)
                    if not stepped:
                        del engines[ws]  # its memory ran ahead of the database: rebuild it
                    now = self.now_ms()
                    # the first look comes an interval after start, not while the engine catches up
                    if guard_every and now - guarded_at.setdefault(ws, now) >= guard_every:
                        guarded_at[ws] = now
                        self._guard(conn, ws, now, live.runner.state)
                    if (
                        retention
                        and now - purged_at.get(ws, now - PURGE_EVERY_MS) >= PURGE_EVERY_MS
                    ):
                        purged_at[ws] = now
                        self._purge(conn, ws, now, retention)
            except sqlite3.Error as exc:  # busy or full: the next wake tries again
                self.stats.errors += 1
                log.error("engine loop failed, will retry: %s", exc)
        conn.close()

    def _purge(self, conn: sqlite3.Connection, workspace: int, now: int, keep_ms: int) -> None:
        """Delete what is older than the retention (`FOREWARN_RETENTION`)."""
        from forewarn import privacy

        try:
            counts = privacy.purge(conn, workspace, now - keep_ms, "retention", now, False)
            log.info("retention purge of workspace %d: %s", workspace, counts)
        except Exception:  # the purge must never stop the engine
            log.exception("the retention purge failed; it will try again")

    def _guard(
        self, conn: sqlite3.Connection, workspace: int, now: int, state: engine.State
    ) -> None:
        """Record the outcomes whose windows have closed, then let the auto-guard judge."""
        from forewarn import guard, report

        try:
            with self.write_lock:
                result = report.live_report(
                    conn,
                    workspace,
                    self.triggers,
                    now - guard.WINDOW_MS,
                    now,
                    record=True,
                    state=state,
                )
                judged = guard.run(conn, workspace, self.triggers, now, state=state, result=result)
                for found in judged:
                    log.warning("auto-guard: %s %s: %s", found.trigger, found.mode, found.reason)
        except Exception:  # the guard must never stop the engine
            log.exception("the auto-guard failed; it will try again")

    # --- reading the state, for the admin API ---

    def _live(self, workspace: int) -> LiveEngine:
        live = self.stats.engines.get(workspace)
        if live is None:
            raise NotFoundError("the engine has not started on this workspace yet: retry shortly")
        return live

    def subject_state(self, workspace: int, subject_id: str) -> list[dict[str, Any]]:
        with self.state_lock:
            return subject_state(self._live(workspace).runner.state, subject_id)

    def why(self, workspace: int, subject_id: str, trigger: str, now_ms: int) -> dict[str, Any]:
        with self.state_lock:
            return engine.explain(self._live(workspace).runner.state, trigger, subject_id, now_ms)

    def stats_view(self) -> EngineStats:
        return EngineStats(
            self.stats.steps,
            self.stats.events,
            self.stats.firings,
            self.stats.errors,
            dict(self.stats.lag),
        )

    def _take(self, workspace: int) -> list[Committed]:
        with self._lock:
            return self._handed.pop(workspace, [])

    def _step(self, live: LiveEngine) -> bool:
        try:
            while True:
                before = live.firings_recorded
                n = live.step(self.now_ms(), clock.now_ms(), self._take(live.workspace))
                self.stats.steps += 1
                self.stats.events += n
                self.stats.firings += live.firings_recorded - before
                lag = self.stats.lag[live.workspace] = live.lag()
                if n == 0 or lag == 0:
                    return True
        except sqlite3.Error as exc:  # the database is busy or full: try again next wake
            self.stats.errors += 1
            log.error("engine step failed, will rebuild and retry: %s", exc)
            return False
        except StateForgotten:  # rebuilt from the log, which no longer holds them
            log.info("someone was forgotten: the engine rebuilds its state from the log")
            return False


def subject_state(state: engine.State, subject_id: str) -> list[dict[str, Any]]:
    """The user and/or account called `subject_id`: first seen, traits, trigger states."""
    book = state.book
    found = []
    for scope, table in (("user", state.users), ("account", state.accounts)):
        subject = table.get(subject_id)
        if subject is None:
            continue
        s = 1 if scope == "account" else 0
        states = {}
        for ct in book.triggers:
            if ct.account == (scope == "account") and subject.states:
                ts = subject.states[ct.slot]
                if ts is not None:
                    episode = ts[engine.EPISODE]
                    states[ct.spec.id] = {
                        "active": bool(ts[engine.ACTIVE]),
                        "episode_started": format_time(episode) if episode >= 0 else None,
                    }
        found.append(
            {
                "scope": scope,
                "first_seen": format_time(subject.first_seen) if subject.first_seen else None,
                "traits": _traits(subject.traits, book.trait_keys[s], book.date_slots[s]),
                "accounts": subject.accounts or [],
                "triggers": states,
            }
        )
    return found


def _traits(
    values: list[Any] | None, keys: tuple[str, ...], dates: dict[str, int]
) -> dict[str, Any]:
    """The traits the playbooks read; a date read only as a date is kept parsed: shown as ISO."""
    if values is None:
        return {}
    shown: dict[str, Any] = {}
    for i, key in enumerate(keys):
        value = values[i]
        if value is None:
            continue
        if dates.get(key) == i and type(value) is int:
            value = format_time(value)
        shown[key] = value
    return shown


# --- the engine in a process of its own --------------------------------------------------------


class EngineProcess:
    """The `EngineLoop` in a child process, so that requests keep this process's interpreter
    to themselves and the engine runs on another core. The child reads committed batches from
    the log (woken through a pipe after each commit, and every second for timers) and answers
    the admin API's questions about its state over another pipe. It takes an exclusive lock on
    `<db>.engine.lock`, so that an engine left over from a killed server has exited before a
    new one steps, and it exits when the process that started it is gone."""

    def __init__(self, path: str | Path, playbooks: str, triggers: list[Trigger]) -> None:
        self.path = str(path)
        self.playbooks = playbooks
        self.triggers = triggers
        ctx = multiprocessing.get_context("spawn")
        self._wake_r, self._wake_w = ctx.Pipe(duplex=False)
        os.set_blocking(self._wake_w.fileno(), False)
        self._ask, child = ctx.Pipe()
        self._ask_lock = threading.Lock()
        self._process = ctx.Process(
            target=_engine_main,
            args=(self.path, playbooks, self._wake_r, child, os.getpid()),
            name="forewarn-engine",
            daemon=True,
        )

    def start(self) -> None:
        self._process.start()
        self._wake_r.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError, BrokenPipeError), self._ask_lock:
            self._ask.send(("stop",))
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._wake_w.close()

    def committed(self, batches: list[tuple[int, Committed]]) -> None:
        # one byte, written whole or not at all; a full pipe is a wake already pending
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w.fileno(), b"w")

    def reload(self, triggers: list[Trigger]) -> None:
        self._call("reload")
        self.triggers = triggers

    def subject_state(self, workspace: int, subject_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("subject", workspace, subject_id)
        return result

    def why(self, workspace: int, subject_id: str, trigger: str, now_ms: int) -> dict[str, Any]:
        result: dict[str, Any] = self._call("why", workspace, subject_id, trigger, now_ms)
        return result

    def stats_view(self) -> EngineStats:
        try:
            result: EngineStats = self._call("stats", timeout_s=1.0)
        except StoreError:
            return EngineStats(up=False)
        return result

    def _call(self, *request: Any, timeout_s: float = 10.0) -> Any:
        with self._ask_lock:
            try:
                self._ask.send(request)
                if not self._ask.poll(timeout_s):
                    raise StoreError("the engine did not answer in time: retry shortly")
                ok, value = self._ask.recv()
            except (OSError, EOFError) as exc:
                raise StoreError(f"the engine is not running ({exc}): retry shortly") from None
        if not ok:
            raise value
        return value


def _engine_main(path: str, playbooks: str, wake: Any, ask: Any, parent: int) -> None:
    """The engine process: one engine loop, a thread turning pipe bytes into wakes, a thread
    answering questions, and a watch on the parent."""
    from forewarn.sources import load_playbooks

    logging.basicConfig(level=logging.WARNING)
    lock = open(f"{path}.engine.lock", "a")  # noqa: SIM115 (held for the life of the process)
    fcntl.flock(lock, fcntl.LOCK_EX)  # waits for an engine of a killed server to be gone
    if os.getppid() != parent:
        return
    loop = EngineLoop(path, load_playbooks(playbooks), playbooks=playbooks)
    freeze_startup()

    def wakes() -> None:
        while True:
            try:
                data = os.read(wake.fileno(), 4096)
            except OSError:
                data = b""
            if not data:
                loop.stop_soon()
                return
            loop.wake()

    def answers() -> None:
        while True:
            try:
                request = ask.recv()
            except (EOFError, OSError):
                loop.stop_soon()
                return
            verb, args = request[0], request[1:]
            if verb == "stop":
                loop.stop_soon()
                return
            try:
                if verb == "subject":
                    value: Any = loop.subject_state(*args)
                elif verb == "why":
                    value = loop.why(*args)
                elif verb == "stats":
                    value = loop.stats_view()
                elif verb == "reload":
                    loop.reload(load_playbooks(playbooks))
                    value = None
                else:
                    raise ValueError(f"unknown request {verb!r}")
                ask.send((True, value))
            except ForewarnError as exc:
                ask.send((False, exc))

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)  # the server is gone (killed): so is its engine

    for target in (wakes, answers, watch):
        threading.Thread(target=target, daemon=True).start()
    loop.run()
