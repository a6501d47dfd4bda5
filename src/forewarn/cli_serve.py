"""The commands that run Forewarn: the server, its delivery worker, the schema migration and the
guided demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from forewarn.cli_args import (
    Commands,
    add_address,
    add_db,
    add_playbooks,
    add_workspace,
    env,
)
from forewarn.errors import InputError
from forewarn.settings import policy as policy_settings
from forewarn.sources import load_playbooks


def add_serve(commands: Commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the live server: ingest, engine and admin API on SQLite",
        description="Run the live server on one SQLite file. Every option can also be set with "
        "its FOREWARN_* environment variable.",
    )
    add_db(serve)
    add_playbooks(serve)
    add_address(serve)
    add_workspace(serve)
    serve.add_argument(
        "--rate-limit",
        type=int,
        default=env("RATE_LIMIT"),
        help="events per second per workspace",
    )
    serve.add_argument(
        "--engine",
        default=env("ENGINE"),
        choices=("process", "thread"),
        help="run the engine in a process of its own (another core) or a thread of the server",
    )
    serve.add_argument(
        "--delivery",
        default=env("DELIVERY"),
        choices=("on", "off"),
        help="run a delivery worker beside the server (off: run `forewarn deliver` yourself)",
    )
    serve.add_argument(
        "--log-level",
        default=env("LOG_LEVEL"),
        choices=("critical", "error", "warning", "info", "debug"),
    )
    serve.add_argument(
        "--role",
        default=env("ROLE"),
        choices=("all", "api", "worker", "delivery"),
        help="with FOREWARN_DATABASE_URL: what this process does (api: ingest only; worker: "
        "the engine and the policy; all: both); without it, all (the embedded server)",
    )
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from forewarn import api, clock, compose, store_sqlite
    from forewarn.server import (
        EngineLoop,
        EngineProcess,
        Engines,
        WriteLock,
        Writer,
        freeze_startup,
    )

    url = env("DATABASE_URL")
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
    write_key, admin_key = env("WRITE_KEY"), env("ADMIN_KEY")
    created: list[str] = []
    if store_sqlite.workspace_id(conn, args.workspace) is None and sys.stdout.isatty():
        write_key, admin_key, created = store_sqlite.keys_to_make(write_key, admin_key)
    ws = store_sqlite.ensure_workspace(conn, args.workspace, clock.now_ms(), write_key, admin_key)
    from forewarn import widget

    if env("WIDGET_ORIGINS") is not None:
        widget.set_origins(conn, ws, env("WIDGET_ORIGINS") or "")
    identity = widget.identity_setting(env("IDENTITY_SECRET"))
    if identity:
        widget.set_identity_secret(conn, ws, identity)
    kinds = {k for (k,) in conn.execute("SELECT kind FROM keys WHERE workspace = ?", (ws,))}
    keyless = [kind for kind in ("write", "admin") if kind not in kinds]
    conn.close()
    settings = api.Settings(
        db=args.db,
        playbooks=args.playbooks,
        rate_limit_per_s=float(args.rate_limit),
        rate_burst=float(args.rate_limit * 2),
        stripe_secret=env("STRIPE_SECRET"),
        write_key=write_key,
    )
    engines: Engines
    if args.engine == "process":
        engines = EngineProcess(args.db, args.playbooks, triggers)
        writer = Writer(args.db, on_commit=engines.committed)
    else:
        write_lock = WriteLock(args.db)  # the writer and the engine take turns at the database
        engines = EngineLoop(args.db, triggers, write_lock=write_lock, playbooks=args.playbooks)
        writer = Writer(args.db, on_commit=engines.committed, write_lock=write_lock)
    app = api.Forewarn(settings, writer, engines)
    knowledge = env("KB")
    articles = None
    if knowledge:
        articles = app.use_knowledge(
            knowledge,
            env("LLM_URL"),
            env("LLM_MODEL"),
            env("LLM_KEY"),
            env("KB_BASE_URL") or "",
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
    web = api.build(app)
    freeze_startup()
    try:
        uvicorn.run(
            web,
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


def add_migrate(commands: Commands) -> None:
    migrate = commands.add_parser(
        "migrate",
        help="bring the database's schema up to this version",
        description="Apply the schema migrations the database lacks (PostgreSQL when "
        "FOREWARN_DATABASE_URL is set, else the SQLite file), then exit. Every process also "
        "applies them when it starts.",
    )
    add_db(migrate)
    migrate.set_defaults(run=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    from forewarn import schema, store_sqlite

    url = env("DATABASE_URL")
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


def add_deliver(commands: Commands) -> None:
    deliver = commands.add_parser(
        "deliver",
        help="run a delivery worker: drain the outbox onto the channels",
        description="Send what the engine decided: claim due outbox rows, send them on their "
        "channels, retry with back-off, dead-letter after the last attempt. `serve` runs one; "
        "more can run beside it on the same database.",
    )
    add_db(deliver)
    deliver.add_argument(
        "--parent", type=int, metavar="PID", help="exit when the process PID is gone"
    )
    deliver.set_defaults(run=_deliver)


def _deliver(args: argparse.Namespace) -> int:
    from forewarn import deliver

    deliver.main(args.db, args.parent, env("DATABASE_URL"))
    return 0


def add_demo(commands: Commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the guided demo: server, SMTP sink and a simulated product feeding it",
        description="Start `forewarn serve` with the example playbooks, an SMTP sink keeping "
        "each email as a file, and the simulated product sending it live traffic; print the "
        "URLs, and run until Ctrl-C.",
    )
    demo.add_argument("--dir", default="forewarn-demo", help="the demo's database, mail, logs")
    add_address(demo)
    demo.add_argument("--accounts", type=int, default=2000, help="accounts in the product")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--effect", type=float, default=0.5, help="the true effect of outreach")
    demo.add_argument("--playbooks", help="default: the examples (examples/playbooks)")
    demo.add_argument("--for", dest="duration", type=float, help="stop after this many seconds")
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    from forewarn import demo

    if args.accounts < 1 or not 0.0 <= args.effect <= 1.0:
        raise InputError("--accounts must be 1 or more, --effect between 0 and 1")
    options = demo.Options(Path(args.dir), args.host, args.port, args.accounts, args.seed)
    options.effect, options.duration_s = args.effect, args.duration
    if args.playbooks:
        options.playbooks = Path(args.playbooks)
    return demo.run(options)
