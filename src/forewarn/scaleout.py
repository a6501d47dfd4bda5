"""The scale-out roles on PostgreSQL: `forewarn serve --role api|worker|delivery|all` with
`FOREWARN_DATABASE_URL` set.

- **api**: the ingest routes of the embedded server (Segment, PostHog, Sentry, ticket and
  billing webhooks), each request committed to PostgreSQL before it is answered, plus
  `/api/v1/firings`, `/healthz`, `/metrics`, the admin API's reads (`api_pg`), the outreach
  routes, reports and backtests (`report_pg`), the signed links inside messages and the
  widget API (`api_outreach` and `widget` over `outreach_pg`), the dashboard (`dashboard`
  over `dashboard_pg`) and `/openapi.json`. It runs no engine.
- **worker**: steps a `worker.Worker` in a loop: claims what it can, commits, and waits a
  moment only when there was nothing to claim. Beside it, pruning, the retention purge and
  the auto-guard (`guard_pg`), each run by one worker at a time.
- **delivery**: drains the outbox onto the channels (`deliver` over `outbox_pg`).
- **all**: an API, a worker and a delivery worker in one process.

Any number of each run side by side, on any machines, against one database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import psycopg
from psycopg_pool import PoolTimeout
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from forewarn import (
    admin_pg,
    api,
    api_outreach,
    api_pg,
    clock,
    compose,
    dashboard,
    dashboard_pg,
    dead_letters,
    guard_pg,
    live,
    outreach_pg,
    pruning,
    settings,
    store_pg,
    store_sqlite,
    widget,
)
from forewarn.errors import ForewarnError, InputError, NotFoundError
from forewarn.live import Committed
from forewarn.playbook import Trigger
from forewarn.server import GROUP_MAX, EngineStats, Writer, _Job, settle
from forewarn.store_sqlite import Append, Key, StoreError
from forewarn.worker import Worker

log = logging.getLogger("forewarn.scaleout")

IDLE_S = 0.02  # a worker that found nothing to claim looks again after this
STALE_S = 5.0  # a worker whose playbooks are not the current ones looks again after this
INGEST_PATHS = ("/v1/", "/batch/", "/capture/", "/i/v1/", "/api/{project}/", "/webhooks/")


API_WAIT_S = 2.0  # seconds an API request waits for a database connection
KEY_FOR_S = 60.0  # a key found is trusted this long: a revoked one stops working within it


class PgWriter(Writer):
    """The API's `Writer` on PostgreSQL: requests waiting at the same moment are committed
    together, in one transaction (one flush of the database's log for all of them), by a few
    threads side by side; each request is answered once its transaction has committed."""

    def __init__(self, pool: store_pg.Pool, threads: int = 2) -> None:
        self.pool = pool
        self.on_commit = None
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"forewarn-writer-{i}", daemon=True)
            for i in range(threads)
        ]

    def prepare(self, append: Append) -> Append:
        return append  # `store_pg.append_batches` hashes in its own threads

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < GROUP_MAX:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # for this thread's next turn
                    break
                jobs.append(more)
            try:
                results = store_pg.append_batches(self.pool, [j.append for j in jobs])
            except Exception as exc:  # nothing of these requests was stored: say so
                log.error("could not commit %d requests: %s", len(jobs), exc)
                error = StoreError(
                    f"the database is unavailable ({exc}); nothing was stored, retry"
                )
                settle(jobs, [error] * len(jobs))
                continue
            settle(jobs, results)


class Elsewhere:
    """The `server.Engines` of an API process: the engines run in the worker processes."""

    def __init__(self, triggers: list[Trigger]) -> None:
        self.triggers = triggers

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def committed(self, batches: list[tuple[int, Committed]]) -> None:
        pass

    def reload(self, triggers: list[Trigger]) -> None:
        raise InputError(
            "in scale-out mode the playbooks load when the worker processes start: "
            "restart the workers (and API processes) to reload them"
        )

    def subject_state(self, workspace: int, subject_id: str) -> list[dict[str, Any]]:
        raise NotFoundError("subject state lives in the worker processes in scale-out mode")

    def why(self, workspace: int, subject_id: str, trigger: str, now_ms: int) -> dict[str, Any]:
        raise NotFoundError("subject state lives in the worker processes in scale-out mode")

    def stats_view(self) -> EngineStats:
        return EngineStats()


class IngestApp(api.Forewarn):
    """The embedded API's ingest path with its keys read from PostgreSQL. (The embedded app
    also opens a SQLite database for its admin pages; here it is an empty one in memory.)"""

    def __init__(self, settings: api.Settings, pool: store_pg.Pool, triggers: list[Trigger]):
        super().__init__(settings, PgWriter(pool), Elsewhere(triggers))
        self.pool = pool
        self.reader = admin_pg.Reader(triggers, kept_traits(settings.playbooks, triggers))

    def key(self, token: str | None) -> Key | None:
        if not token:
            return None
        now = time.monotonic()
        cached = self._keys.get(token)
        if cached is not None and now - cached[1] < (KEY_FOR_S if cached[0] else 5.0):
            return cached[0]
        try:
            with self.pool.connection() as conn:
                found = store_pg.find_key(conn, token)
        except (psycopg.Error, PoolTimeout) as exc:  # down or restarting: a 503 to retry
            raise StoreError(f"the database is unavailable ({exc}); retry") from None
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[token] = (found, now)
        return found

    def read_origins(self, workspace: int) -> frozenset[str]:
        with self.pool.connection() as conn:
            return outreach_pg.get_origins(conn, workspace)

    async def widget_origins(self, token: str | None) -> frozenset[str]:
        """As the embedded app's; with the database down, no origin (the CORS middleware runs
        outside the error handlers: the route itself then answers 503 to retry, and a
        preflight is refused until the database is back)."""
        try:
            return await super().widget_origins(token)
        except (StoreError, psycopg.Error, PoolTimeout) as exc:
            log.warning("the widget's origins could not be read: %s", exc)
            return frozenset()


def build_api(app: IngestApp) -> Starlette:
    """The API process's routes: ingest, firings, health, the admin reads (`api_pg`)."""

    async def firings(request: Request) -> Response:
        key = app.admin_key(request)
        q = request.query_params
        since = q.get("since")
        since_ms = None if since is None else api_outreach.date_time_ms(since, "since")
        limit = api._int(q.get("limit"), 1000, "limit", 1, 10_000)

        def query() -> list[Any]:
            with app.pool.connection() as conn:
                return store_pg.query_firings(
                    conn, key.workspace, q.get("trigger"), q.get("subject"), limit, since_ms
                )

        rows = await asyncio.to_thread(query)
        body = {"firings": [live.firing_dict(r) for r in rows]}
        return Response(msgspec.json.encode(body), media_type="application/json")

    async def healthz(request: Request) -> Response:
        """Ready only while PostgreSQL answers: a load balancer then stops sending here."""

        def ping() -> None:
            with app.pool.connection(timeout=API_WAIT_S) as conn:
                conn.execute("SELECT 1")

        await asyncio.to_thread(ping)
        return Response(b'{"ok":true}', media_type="application/json")

    async def metrics(request: Request) -> Response:
        def read() -> tuple[dict[int, int], dict[int, int]]:
            with app.pool.connection() as conn:
                every = {int(w): 0 for (w,) in conn.execute("SELECT id FROM workspaces")}
                queued = every | {
                    int(w): int(n)
                    for w, n in conn.execute("SELECT workspace, count(*) FROM queue GROUP BY 1")
                }
                return every | dead_letters.count(conn), queued

        letters, queued = await asyncio.to_thread(read)
        return Response(pg_metrics(app.counters, letters, queued), media_type=METRICS_TYPE)

    kept = [
        r
        for r in api.routes(app)
        if isinstance(r, Route)
        and (r.path.startswith(INGEST_PATHS) or r.path == "/api/v1/triggers")
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        app.writer.start()
        try:
            yield
        finally:
            app.writer.stop()
            await app.close()

    return Starlette(
        lifespan=lifespan,
        routes=api_pg.complete(
            app,
            [
                *kept,
                Route("/api/v1/firings", firings, methods=["GET"]),
                Route("/healthz", healthz, methods=["GET"]),
                Route("/metrics", metrics, methods=["GET"]),
                *api_pg.routes(app, app.pool, app.reader),
                *outreach_routes(app),
                *dashboard.routes(app, dashboard_pg.runner(app.pool)),
            ],
        ),
        middleware=[Middleware(widget.Cors, origins=app.widget_origins)],
        exception_handlers={
            ForewarnError: api._forewarn_error,
            HTTPException: api._http_error,
            psycopg.Error: _unavailable,
            PoolTimeout: _unavailable,
            Exception: api._server_error,
        },
    )


def outreach_routes(app: IngestApp) -> list[Route]:
    """The embedded server's outreach and widget routes that PostgreSQL serves
    (`outreach_pg`): the signed links of messages, suppression, consent, inboxes, push
    subscriptions, pausing triggers, the widget; what they log goes through this process's
    writer."""
    run = outreach_pg.runner(app.pool)
    every = [*api_outreach.routes(app, run), *widget.routes(app, app.assistant, run)]
    paths = outreach_pg.PATHS | outreach_pg.WIDGET_PATHS
    return [r for r in every if isinstance(r, Route) and r.path in paths]


METRICS_TYPE = "text/plain; version=0.0.4"


def pg_metrics(c: api.Counters, letters: dict[int, int], queued: dict[int, int]) -> str:
    """/metrics of an API process: its own ingest counters, and from PostgreSQL what every
    worker shares: the events queued and the dead letters, by workspace."""
    return api.ingest_metrics(
        c,
        [
            "# HELP forewarn_queue_events Events accepted and not yet applied by a worker.",
            "# TYPE forewarn_queue_events gauge",
            *(f'forewarn_queue_events{{workspace="{w}"}} {n}' for w, n in sorted(queued.items())),
            "# HELP forewarn_dead_letters Events and partition states the workers set aside.",
            "# TYPE forewarn_dead_letters gauge",
            *(f'forewarn_dead_letters{{workspace="{w}"}} {n}' for w, n in sorted(letters.items())),
        ],
    )


async def _unavailable(request: Request, exc: Exception) -> Response:
    """PostgreSQL down, restarting or refusing a value under a request: nothing of it was
    stored; a 503 to retry, never a 500."""
    log.warning("%s %s: PostgreSQL failed: %s", request.method, request.url.path, exc)
    error = StoreError(f"the database is unavailable ({type(exc).__name__}); retry")
    return await api._forewarn_error(request, error)


def run_worker(
    worker: Worker,
    stop: threading.Event,
    now_ms: Callable[[], int] = clock.now_ms,
    idle_s: float = IDLE_S,
    prune_every_ms: int = 0,
    keep_events_ms: int = 0,
) -> None:
    """Step until `stop` is set; an error (the database restarting, say) is logged and the
    step tried again: its transaction was rolled back, so nothing was half done. Every
    `prune_every_ms` (0: never), prune what is no longer needed (`pruning`)."""
    pruned_ms = now_ms()  # not at start: a rolling restart starts many workers at once
    while not stop.is_set():
        if prune_every_ms and worker.current and now_ms() - pruned_ms >= prune_every_ms:
            pruned_ms = now_ms()
            try:
                pruning.prune(worker.pool, worker.workspace, pruned_ms, keep_events_ms)
            except Exception as exc:  # the next run goes on where this one stopped
                log.warning("pruning failed: %s", exc)
        try:
            done = worker.step(now_ms())
        except Exception as exc:  # the database failed: the whole step was rolled back
            log.warning("worker step failed, retrying: %s", exc)
            stop.wait(1.0)
            continue
        if done.stale:  # newer playbooks are current: look again now and then (a rollback)
            stop.wait(STALE_S)
        elif not done.parts and not done.dead:
            stop.wait(idle_s)


PURGE_EVERY_S = 3600.0  # with a retention: at start, then every hour


def run_purges(
    pool: store_pg.Pool,
    workspace: int,
    keep_ms: int,
    stop: threading.Event,
    now_ms: Callable[[], int] = clock.now_ms,
    every_s: float = PURGE_EVERY_S,
) -> None:
    """Purge what is older than the retention until `stop` is set: at once, then every
    `every_s`. Each worker process runs this; the purge lock lets one at a time work, and the
    others skip that round."""
    from forewarn import privacy_pg

    while not stop.is_set():
        now = now_ms()
        try:
            counts = privacy_pg.purge(pool, workspace, now - keep_ms, "retention", now)
            if counts is not None:
                log.info("retention purge of workspace %d: %s", workspace, counts)
        except Exception as exc:  # the purge must never stop the worker
            log.warning("the retention purge failed, it will try again: %s", exc)
        stop.wait(every_s)


def composer_for(
    pool: store_pg.Pool, playbooks: str, triggers: list[Trigger]
) -> tuple[compose.Composer, tuple[tuple[str, ...], tuple[str, ...]]]:
    """`compose.for_playbooks`, its link secret kept in PostgreSQL."""
    from forewarn.links import SECRET_NAME
    from forewarn.templates import Templates

    directory = compose.templates_dir(playbooks)
    with pool.connection() as conn:
        key = outreach_pg.secret(conn, SECRET_NAME)
    composer = compose.Composer(
        Templates(directory if directory.is_dir() else None), settings.env("PUBLIC_URL") or "", key
    )
    return composer, kept_traits(playbooks, triggers)


def kept_traits(playbooks: str, triggers: list[Trigger]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The traits (user, account) the triggers' messages name: the workers keep them in the
    state, so the API processes read the state laid out the same way."""
    directory = compose.templates_dir(playbooks)
    user, account = compose.trait_names(triggers, directory if directory.is_dir() else None)
    return tuple(sorted(user)), tuple(sorted(account))


def serve(
    role: str,
    url: str,
    playbooks: str,
    workspace: str,
    host: str,
    port: int,
    rate_limit: int,
    log_level: str,
) -> int:
    """`forewarn serve --role ROLE` on PostgreSQL."""
    import signal

    import uvicorn

    from forewarn.sources import load_playbooks

    # the workers' log (dead letters, older playbooks, pruning) at FOREWARN_LOG_LEVEL
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if role == "delivery":
        from forewarn import deliver

        store_pg.connect(url, max_size=1).close()  # migrated, or a clear error now
        print("Forewarn delivery on PostgreSQL", flush=True)
        deliver.main("", None, url)
        return 0
    triggers = load_playbooks(playbooks)
    compose.check(playbooks, triggers)
    policy = settings.policy()
    pool = store_pg.connect(
        url,
        max_size=4 if role == "worker" else 8,
        # a request waits this long for the database, then gets a 503 to retry later
        wait_s=None if role == "worker" else API_WAIT_S,
    )
    try:
        write_key, admin_key = settings.env("WRITE_KEY"), settings.env("ADMIN_KEY")
        created: list[str] = []
        with pool.connection() as conn:
            known = store_pg.workspace_id(conn, workspace) is not None
        if not known and sys.stdout.isatty():  # as `forewarn serve` embedded: see keys_to_make
            write_key, admin_key, created = store_sqlite.keys_to_make(write_key, admin_key)
        ws = store_pg.ensure_workspace(pool, workspace, clock.now_ms(), write_key, admin_key)
        # the widget's settings, as the embedded server takes them when it starts
        identity = widget.identity_setting(settings.env("IDENTITY_SECRET"))
        with pool.connection() as conn:
            if settings.env("WIDGET_ORIGINS") is not None:
                outreach_pg.set_origins(conn, ws, settings.env("WIDGET_ORIGINS") or "")
            if identity:
                outreach_pg.set_identity_secret(conn, ws, identity)
        if created:
            print("workspace '" + workspace + "' created; keys (shown once):", flush=True)
            for line in created:
                print("  " + line, flush=True)
        stop = threading.Event()
        thread = None
        delivery: subprocess.Popen[bytes] | None = None
        if role in ("worker", "all"):
            composer, keep = composer_for(pool, playbooks, triggers)
            retries = settings.pg_timeout_retries()
            worker = Worker(pool, ws, triggers, policy, composer, keep, timeout_retries=retries)
            prune = (settings.pg_prune_every_ms(), settings.pg_keep_events_ms())
            if not worker.register(clock.now_ms()):
                print(
                    "newer playbooks than these were started by another worker: this one "
                    "claims nothing until it runs the current playbooks",
                    flush=True,
                )
            guard_every = settings.guard_every_ms()
            if guard_every:  # one worker at a time runs it (guard_pg)
                threading.Thread(
                    target=guard_pg.run_guards,
                    args=(pool, ws, triggers, guard_every, stop),
                    kwargs={"current": lambda: worker.current, "keep_events_ms": prune[1]},
                    name="forewarn-guard",
                    daemon=True,
                ).start()
            retention = settings.retention_ms()
            if retention:
                threading.Thread(
                    target=run_purges,
                    args=(pool, ws, retention, stop),
                    name="forewarn-purge",
                    daemon=True,
                ).start()
            if role == "worker":
                print(f"Forewarn worker with {len(triggers)} triggers on PostgreSQL", flush=True)
                signal.signal(signal.SIGTERM, lambda *_: stop.set())
                with contextlib.suppress(KeyboardInterrupt):
                    run_worker(worker, stop, prune_every_ms=prune[0], keep_events_ms=prune[1])
                return 0
            thread = threading.Thread(
                target=run_worker,
                args=(worker, stop),
                kwargs={"prune_every_ms": prune[0], "keep_events_ms": prune[1]},
                name="forewarn-worker",
                daemon=True,
            )
            thread.start()
            if settings.env("DELIVERY") == "on":  # the delivery worker, as the embedded server
                command = [sys.executable, "-m", "forewarn", "deliver", "--parent"]
                delivery = subprocess.Popen([*command, str(os.getpid())])
        app = IngestApp(
            api.Settings(
                db=":memory:",
                playbooks=playbooks,
                rate_limit_per_s=float(rate_limit),
                rate_burst=float(rate_limit * 2),
                stripe_secret=settings.env("STRIPE_SECRET"),
                write_key=write_key,
            ),
            pool,
            triggers,
        )
        print(f"Forewarn {role} on http://{host}:{port} on PostgreSQL", flush=True)
        try:
            uvicorn.run(
                build_api(app),
                host=host,
                port=port,
                log_level=log_level,
                access_log=False,
                lifespan="on",
            )
        finally:
            stop.set()
            if thread is not None:
                thread.join(timeout=10)
            if delivery is not None:
                delivery.terminate()
                delivery.wait(timeout=30)
        return 0
    finally:
        pool.close()
