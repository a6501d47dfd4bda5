"""schemathesis against a real `forewarn serve`: every check, the stateful phase, a fixed seed.

`run(folder, max_examples)` starts a server on a fresh database, gives it data to find (events
for a few subjects, so firings and subjects exist; signed links of each kind), writes the
schemathesis configuration with every way a key is given, and runs `st run`. Returns the exit
code and the report. `python -m tests.fuzz.api_run --max-examples N` runs it by hand (what
`make fuzz` does, with more examples).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx

from forewarn import links, store_outbox, store_sqlite

from .. import server as srv

STRIPE_SECRET = "whsec_fuzz-signing-secret"
SEED = 20261124


def seed_batch() -> dict[str, Any]:
    """Subjects with traits and events, enough for the example playbooks to fire."""
    batch: list[dict[str, Any]] = []
    for user in ("u1", "u2"):
        batch.append({"type": "identify", "userId": user, "traits": {"plan": "pro"}})
        batch.append({"type": "group", "userId": user, "groupId": "acme"})
        batch += [{"type": "track", "userId": user, "event": "Export Failed"} for _ in range(6)]
    for msg in batch:
        msg["messageId"] = str(uuid.uuid4())
    return {"batch": batch}


def seed_data(server: srv.Server) -> None:
    r = httpx.post(
        server.url + "/v1/batch", json=seed_batch(), auth=(srv.WRITE_KEY, ""), timeout=10
    )
    r.raise_for_status()
    server.wait_for(lambda: server.firings(), timeout_s=10)


def tokens(db: Path) -> dict[str, str]:
    """A valid signed link of each kind, for workspace 1's subject u1."""
    conn = store_sqlite.connect(str(db))
    try:
        secret = store_outbox.secret(conn, links.SECRET_NAME)
    finally:
        conn.close()
    return signed(secret, 1)


def pg_credentials(database_url: str) -> tuple[dict[str, str], str]:
    """The signed links and the widget's identity token, from a scale-out deployment's
    database."""
    import time

    import jwt
    import psycopg

    from forewarn import outreach_pg, store_pg

    with psycopg.connect(database_url, autocommit=True) as conn:
        workspace = store_pg.workspace_id(conn, "default")
        assert workspace is not None
        made = signed(outreach_pg.secret(conn, links.SECRET_NAME), workspace)
        secret = outreach_pg.identity_secret(conn, workspace)
    claims = {"sub": "u1", "exp": int(time.time()) + 3600}
    return made, jwt.encode(claims, secret, algorithm="HS256")


def signed(secret: str, workspace: int) -> dict[str, str]:
    about = links.About(workspace, "user", "u1", "fuzz", "email", "fuzz-message")
    return {
        "/u/{token}": links.unsubscribe_token(secret, workspace, "user", "u1", "email"),
        "/o/{token}": links.engagement_token(secret, about),
        "/e/{token}": links.engagement_token(secret, about),
        "/c/{token}": links.click_token(secret, about, "https://example.com/docs"),
    }


def identity(db: Path) -> str:
    """An identity token for user u1 of workspace 1, as a host's backend signs it."""
    import time

    import jwt

    from forewarn import widget

    conn = store_sqlite.connect(str(db))
    try:
        secret = widget.identity_secret(conn, 1)
    finally:
        conn.close()
    return jwt.encode({"sub": "u1", "exp": int(time.time()) + 3600}, secret, algorithm="HS256")


def config(
    server: srv.Server | None,
    link_tokens: dict[str, str] | None = None,
    identity_token: str | None = None,
) -> str:
    """`server`: the embedded server, whose database gives the widget's and the links'
    credentials; None for a scale-out API process, whose database gives its `link_tokens`
    (by path) and the widget's `identity_token`."""
    lines = [
        f"seed = {SEED}",
        'hooks = "tests.fuzz.api_hooks"',
        "[checks]",
        "enabled = true",
        "[checks.negative_data_rejection]",
        # a body over a limit is refused with 413, which is a refusal too
        "expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]",
        "[phases.stateful]",
        "enabled = true",
        "[auth.openapi.writeKey]",
        f'username = "{srv.WRITE_KEY}"',
        'password = ""',
        "[auth.openapi.writeKeyQuery]",
        f'api_key = "{srv.WRITE_KEY}"',
        "[auth.openapi.sentryAuth]",
        f'api_key = "Sentry sentry_key={srv.WRITE_KEY}, sentry_version=7"',
        "[auth.openapi.sentryKey]",
        f'api_key = "{srv.WRITE_KEY}"',
        "[auth.openapi.adminKey]",
        f'bearer = "{srv.ADMIN_KEY}"',
    ]
    if server is not None:
        link_tokens = tokens(server.db)
        identity_token = identity(server.db)
    if identity_token is not None:
        lines += ["[auth.openapi.widgetAnonymousId]", 'api_key = "anon-fuzz-visitor-01"']
        lines += ["[auth.openapi.widgetIdentity]", f'api_key = "{identity_token}"']
        # the stream never ends on its own: it is for a browser, not a request-answer fuzzer
        lines += ["[[operations]]", 'include-path = "/w/v1/stream"', "enabled = false"]
    for path, token in (link_tokens or {}).items():
        lines += [
            "[[operations]]",
            f'include-path = "{path}"',
            f'parameters = {{ token = "{token}" }}',
        ]
    # An envelope is newline-separated JSON, which JSON Schema cannot describe: the generator can
    # only make strings, which are rarely envelopes, and any text is of the declared type. The envelope parser has its own fuzzer
    # (tests/fuzz/targets.py) and the Sentry SDK its end-to-end test.
    lines += [
        "[[operations]]",
        'include-path = "/api/{project}/envelope/"',
        "checks.positive_data_acceptance.enabled = false",
        "checks.negative_data_rejection.enabled = false",
    ]
    return "\n".join(lines) + "\n"


ENV = {"FOREWARN_STRIPE_SECRET": STRIPE_SECRET, "FOREWARN_RATE_LIMIT": "1000000"}


def run(folder: Path, max_examples: int, extra: list[str] | None = None) -> tuple[int, str]:
    server = srv.start(folder / "forewarn.db", env=ENV)
    try:
        seed_data(server)
        (folder / "schemathesis.toml").write_text(config(server))
        return schemathesis(folder, server.url, max_examples, extra)
    finally:
        srv.stop(server)


def run_scale_out(
    folder: Path, database_url: str, max_examples: int, extra: list[str] | None = None
) -> tuple[int, str]:
    """The same against a scale-out process on PostgreSQL (`--role all`: an API process and a
    worker), with the document it serves."""
    from tests.test_scaleout import _env, _healthy, _serve, _stop

    port = srv.free_port()
    env = {**_env(database_url), **ENV, "FOREWARN_DELIVERY": "off"}
    process = _serve("all", env, srv.PLAYBOOKS, port)
    try:
        _healthy(port, process)
        server = srv.Server(f"http://127.0.0.1:{port}", folder, process, port, env)
        batch = seed_batch()
        r = httpx.post(server.url + "/v1/batch", json=batch, auth=(srv.WRITE_KEY, ""), timeout=10)
        r.raise_for_status()
        server.wait_for(lambda: server.firings(), timeout_s=20)
        made, identity_token = pg_credentials(database_url)
        (folder / "schemathesis.toml").write_text(config(None, made, identity_token))
        return schemathesis(folder, server.url, max_examples, extra)
    finally:
        _stop([process])


def schemathesis(
    folder: Path, url: str, max_examples: int, extra: list[str] | None
) -> tuple[int, str]:
    """`st run` on the document at `url`, configured in `folder`."""
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
    command = [
        st,
        "--config-file",
        str(folder / "schemathesis.toml"),
        "--no-color",
        "run",
        url + "/openapi.json",
        "--max-examples",
        str(max_examples),
        "--output-truncate",
        "true",
        "--workers",
        "1",
        "--report-dir",
        str(folder / "report"),
        *(extra or []),
    ]
    done = subprocess.run(
        command,
        cwd=folder,
        env={
            **os.environ,
            "PYTHONPATH": str(srv.ROOT),
            "FUZZ_WRITE_KEY": srv.WRITE_KEY,
            "FUZZ_STRIPE_SECRET": STRIPE_SECRET,
            "SCHEMATHESIS_HOOKS": "tests.fuzz.api_hooks",
        },
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return done.returncode, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-examples", type=int, default=300)
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as folder:
        code, report = run(Path(folder), args.max_examples, extra)
    print(report)
    sys.exit(code)


if __name__ == "__main__":
    main()
