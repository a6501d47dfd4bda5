"""schemathesis against a real server: every check (server errors, answers that break the
document, schema-valid requests refused, invalid ones accepted, 405s without `Allow`, auth that
is declared but not enforced), the stateful phase following the document's links, a fixed seed
and a bounded number of examples. `make fuzz` runs the same with many more."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from . import pg
from . import server as srv
from .fuzz import api_run

EXAMPLES = 15  # per operation and phase: about 20 s here


def test_the_api_holds_to_its_openapi_document(tmp_path: Path) -> None:
    code, report = api_run.run(tmp_path, EXAMPLES)
    assert code == 0, report
    summary = re.search(r"(\d+) generated, (\d+) passed", report)
    assert summary and summary[1] == summary[2] and int(summary[1]) > 1000, report


@pytest.fixture
def database_url() -> Iterator[str]:
    yield from pg.database()


def test_a_scale_out_api_process_holds_to_its_own_document(
    tmp_path: Path, database_url: str
) -> None:
    """The same against `forewarn serve --role all` on PostgreSQL: the document it serves
    (ingest and the admin reads) and nothing else."""
    code, report = api_run.run_scale_out(tmp_path, database_url, EXAMPLES)
    assert code == 0, report
    summary = re.search(r"(\d+) generated, (\d+) passed", report)
    assert summary and summary[1] == summary[2] and int(summary[1]) > 500, report


def test_what_the_api_fuzzer_found_stays_fixed(tmp_path: Path) -> None:
    """Each thing schemathesis found, as one request and the answer it must get."""
    with srv.running(tmp_path / "forewarn.db") as live:
        admin = {"Authorization": f"Bearer {srv.ADMIN_KEY}"}

        def call(method: str, path: str, **kw: Any) -> httpx.Response:
            return httpx.request(method, live.url + path, timeout=10, **kw)

        def post(path: str, body: Any) -> httpx.Response:
            return call("POST", path, json=body, headers=admin)

        undeclared = call("DELETE", "/v1/batch")
        assert undeclared.status_code == 405 and undeclared.headers["allow"] == "POST"
        token = api_run.tokens(live.db)["/e/{token}"]
        assert call("POST", f"/e/{token}", json={"event": {}}).status_code == 400  # was a 500
        subject = "/api/v1/subjects/u1"
        for body in ({"scope": None}, {"untill": "2026-11-23T18:00:00Z"}, {"until": 5}):
            refused = post(subject + "/suppress", body)
            assert refused.status_code == 400, (body, refused.text)
        assert "'untill'" in post(subject + "/suppress", {"untill": "x"}).json()["error"]["message"]
        assert post(subject + "/unsubscribe", {"channel": "email", "x": 1}).status_code == 400
        long_endpoint = {
            "endpoint": "https://p/" + "x" * 3000,
            "keys": {"p256dh": "p", "auth": "a"},
        }
        assert post(subject + "/push-subscriptions", long_endpoint).status_code == 400
        assert post("/api/v1/backtests", {"triggers": None}).status_code == 400
        assert post("/api/v1/backtests", {"triggers": ["nope"]}).status_code == 404
        assert post("/api/v1/backtests", {"since": "99999999999w"}).status_code == 200
        since = {"since": "2026-11-23"}  # no time, no zone
        assert call("GET", "/api/v1/firings", params=since, headers=admin).status_code == 400
        since = {"since": "1900-01-01T00:00:00Z"}  # before the epoch: everything
        assert call("GET", "/api/v1/firings", params=since, headers=admin).status_code == 200
        write = (srv.WRITE_KEY, "")
        assert call("POST", "/v1/track", content=b"5", auth=write).status_code == 400
        assert (
            call("POST", "/webhooks/tickets/generic", content=b'"x"', auth=write).status_code == 400
        )
        batch = {"batch": [], "sentAt": 1795000000000.0}
        assert call("POST", "/v1/batch", json=batch, auth=write).status_code == 200
