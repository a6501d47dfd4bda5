"""The admin API of a scale-out API process (`forewarn serve --role api`) on a real PostgreSQL,
with a worker stepped by the test: subjects, `why`, triggers and the audit log read from the
database with the embedded contract; the routes it does not serve refused with
`embedded_only`, and absent from its `/openapi.json`; no key reads another workspace; and the
same events give the same answers as an embedded server's."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from forewarn import clock, openapi, outreach_pg, scaleout, store_pg
from forewarn.forgotten import REASON
from forewarn.sources import load_playbooks
from forewarn.worker import Worker
from tests import server as srv
from tests.server import ADMIN_KEY, WRITE_KEY, free_port
from tests.test_scaleout import _env, _healthy, _serve, _stop

PLAYBOOK = """
triggers:
  - id: export-trouble
    when:
      all:
        - traits: {plan: [free, pro]}
        - event: {name: Export Failed, count: 3, within: 1d}
    action: {channel: in_app, message: "Exports failing, {{ traits.first_name }}?"}
  - id: storage-85
    scope: account
    when: {threshold: {value: "traits.storage_used / traits.storage_limit", ">=": 0.85}}
    action: {channel: in_app, message: Storage is nearly full}
"""


def ago(minutes: float) -> str:
    when = datetime.now(UTC) - timedelta(minutes=minutes)
    return when.isoformat().replace("+00:00", "Z")


def batch(*messages: dict[str, Any]) -> dict[str, Any]:
    for m in messages:
        m["messageId"] = str(uuid.uuid4())
    return {"batch": list(messages)}


def customer(user: str = "u1", account: str = "acme", plan: str = "free") -> dict[str, Any]:
    """A user who joins an account that is nearly out of storage, then fails to export three
    times there and once in another account."""
    return batch(
        {"type": "identify", "userId": user, "traits": {"plan": plan, "first_name": "Ann"}}
        | {"timestamp": ago(30)},
        {
            "type": "group",
            "userId": user,
            "groupId": account,
            "traits": {"storage_used": 90, "storage_limit": 100},
            "timestamp": ago(29),
        },
        *(
            {
                "type": "track",
                "userId": user,
                "event": "Export Failed",
                "context": {"groupId": account},
                "timestamp": ago(20 - i),
            }
            for i in range(3)
        ),
        {
            "type": "track",
            "userId": user,
            "event": "Export Failed",
            "context": {"groupId": account + "-other"},
            "timestamp": ago(10),
        },
    )


@dataclass
class ScaleOut:
    """An API process and a worker, on one database."""

    client: httpx.Client
    pool: store_pg.Pool
    worker: Worker
    keep: tuple[tuple[str, ...], tuple[str, ...]]  # the traits the workers keep

    def send(self, body: dict[str, Any], key: str = WRITE_KEY) -> None:
        r = self.client.post("/v1/batch", json=body, auth=(key, ""))
        assert r.status_code == 200 and r.json()["accepted"] == len(body["batch"]), r.text
        self.worker.run_until_idle(clock.now_ms())

    def get(self, path: str, key: str = ADMIN_KEY, **params: str) -> httpx.Response:
        return self.client.get(path, params=params, headers={"Authorization": f"Bearer {key}"})


def _playbooks(folder: Path, text: str = PLAYBOOK) -> str:
    folder.mkdir(exist_ok=True)
    (folder / "p.yaml").write_text(text)
    return str(folder)


@contextlib.contextmanager
def api_process(url: str, playbooks: str) -> Iterator[httpx.Client]:
    port = free_port()
    process = _serve("api", _env(url), Path(playbooks), port)
    try:
        _healthy(port, process)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        _stop([process])


@pytest.fixture
def scale_out(url: str, tmp_path: Path) -> Iterator[ScaleOut]:
    playbooks = _playbooks(tmp_path / "playbooks")
    triggers = load_playbooks(playbooks)
    keep = scaleout.kept_traits(playbooks, triggers)
    with api_process(url, playbooks) as client:
        pool = store_pg.connect(url)
        try:
            with pool.connection() as conn:
                ws = store_pg.workspace_id(conn, "default")
            assert ws is not None
            yield ScaleOut(client, pool, Worker(pool, ws, triggers, keep=keep), keep)
        finally:
            pool.close()


def test_a_subject_is_read_from_every_partition_holding_it(scale_out: ScaleOut) -> None:
    scale_out.send(customer())
    scale_out.send(batch({"type": "identify", "userId": "u2", "timestamp": ago(5)}))
    user = scale_out.get("/api/v1/subjects/u1").json()
    # home first, with the traits; then the account its last event named, where the user
    # has a state of its own (without the traits sent elsewhere)
    assert [(s["scope"], s["partition"]) for s in user["as"]] == [
        ("user", "account:acme"),
        ("user", "account:acme-other"),
    ]
    home, other = user["as"]
    assert home["traits"] == {"plan": "free", "first_name": "Ann"}  # (a template reads it)
    assert home["accounts"] == ["acme"]
    assert home["triggers"]["export-trouble"]["active"] is True
    assert other["traits"] == {} and other["triggers"]["export-trouble"]["active"] is False
    # the timeline spans both partitions, newest first
    assert [(e["kind"], e["name"]) for e in user["events"]] == [
        *[("track", "Export Failed")] * 4,
        ("group", None),
        ("identify", None),
    ]
    assert [(f["trigger"], f["decision"]) for f in user["firings"]] == [("export-trouble", "send")]

    account = scale_out.get("/api/v1/subjects/acme").json()
    assert [(s["scope"], s["partition"]) for s in account["as"]] == [("account", "account:acme")]
    assert account["as"][0]["traits"] == {"storage_used": 90, "storage_limit": 100}
    # the events naming the account: not its other user's identify, applied in its partition
    assert len(account["events"]) == 4 and all(e["kind"] != "identify" for e in account["events"])
    assert [f["trigger"] for f in account["firings"]] == ["storage-85"]

    missing = scale_out.get("/api/v1/subjects/nobody")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "no subject 'nobody' in this workspace's events"


def test_why_explains_each_condition_from_the_stored_state(scale_out: ScaleOut) -> None:
    scale_out.send(customer())
    why = scale_out.get("/api/v1/subjects/u1/why", trigger="export-trouble").json()
    assert (why["known"], why["true"], why["active"], why["partition"]) == (
        True,
        True,
        True,
        "account:acme",
    )
    plan, failures = why["evidence"]["of"]
    assert plan["values"] == {"traits.plan": "free"} and plan["true"] is True
    assert (failures["count"], failures["at_least"], failures["within"]) == (3, 3, "1d")
    [elsewhere] = why["other_partitions"]
    assert elsewhere["partition"] == "account:acme-other" and elsewhere["true"] is False
    assert elsewhere["evidence"]["of"][1]["count"] == 1

    storage = scale_out.get("/api/v1/subjects/acme/why", trigger="storage-85").json()
    assert storage["true"] is True and storage["evidence"]["value"] == 0.9
    assert scale_out.get("/api/v1/subjects/u9/why", trigger="export-trouble").json() == {
        "trigger": "export-trouble",
        "subject": "u9",
        "known": False,
    }
    unknown = scale_out.get("/api/v1/subjects/u1/why", trigger="nope")
    assert unknown.status_code == 404
    assert "the playbooks define: export-trouble, storage-85" in unknown.text
    assert scale_out.get("/api/v1/subjects/u1/why").json()["error"]["code"] == "invalid_input"


def test_states_stored_under_other_playbooks_are_not_misread(
    scale_out: ScaleOut, url: str, tmp_path: Path
) -> None:
    scale_out.send(customer())
    other = _playbooks(tmp_path / "other", PLAYBOOK.replace("count: 3", "count: 4"))
    with api_process(url, other) as client:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for path in ("/api/v1/subjects/u1", "/api/v1/subjects/u1/why?trigger=export-trouble"):
            r = client.get(path, headers=headers)
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "other_playbooks"
            assert "run the API and worker processes with the same playbooks" in r.text


def test_the_audit_log_lists_the_keys_added(scale_out: ScaleOut) -> None:
    rows = scale_out.get("/api/v1/audit").json()["audit"]
    assert [(r["actor"], r["action"], r["target"]) for r in rows] == [
        ("environment", "key.created", ADMIN_KEY[:10]),
        ("environment", "key.created", WRITE_KEY[:10]),
    ]
    assert scale_out.get("/api/v1/audit", limit="1").json()["audit"] == rows[:1]
    assert scale_out.get("/api/v1/audit", action="key.revoked").json()["audit"] == []
    refused = scale_out.get("/api/v1/audit", action="key.lost")
    assert refused.status_code == 400 and "give one of" in refused.text


def test_forgetting_a_person_over_http_removes_them_and_refuses_their_events(
    scale_out: ScaleOut,
) -> None:
    scale_out.send(customer())
    scale_out.send(customer("u2"))
    before = scale_out.get("/api/v1/firings").json()["firings"]
    assert {f["subject"] for f in before} == {"u1", "u2", "acme"}
    delete = {"Authorization": f"Bearer {ADMIN_KEY}"}
    refused = scale_out.client.delete(
        "/api/v1/subjects/u1", headers={"Authorization": f"Bearer {WRITE_KEY}"}
    )
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    answer = scale_out.client.delete("/api/v1/subjects/u1", headers=delete)
    assert answer.status_code == 200, answer.text
    done = answer.json()
    assert done["forgotten"] is True and done["events"] == 6 and done["firings"] == 1
    assert scale_out.get("/api/v1/subjects/u1").status_code == 404
    scale_out.worker.run_until_idle(clock.now_ms())  # acme rebuilt with u2 alone
    assert scale_out.get("/api/v1/subjects/u1").status_code == 404
    account = scale_out.get("/api/v1/subjects/acme").json()
    assert [f["trigger"] for f in account["firings"]] == ["storage-85"]
    # the others' firings stay, and rebuilding acme fired nothing again
    assert scale_out.get("/api/v1/firings").json()["firings"] == [
        f for f in before if f["subject"] != "u1"
    ]
    again = scale_out.client.post("/v1/batch", json=customer(), auth=(WRITE_KEY, ""))
    assert again.status_code == 200
    body = again.json()
    assert body["accepted"] == 0 and len(body["rejected"]) == 6
    assert {r["reason"] for r in body["rejected"]} == {REASON}
    actions = [r["action"] for r in scale_out.get("/api/v1/audit").json()["audit"]]
    assert actions[:2] == ["subject.forgotten", "subject.forget_requested"]


def test_only_what_is_served_is_described_and_the_rest_says_embedded_only(
    scale_out: ScaleOut,
) -> None:
    doc = scale_out.client.get("/openapi.json").json()
    described = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert {
        ("/api/v1/triggers", "get"),
        ("/api/v1/firings", "get"),
        ("/api/v1/subjects/{subject}", "get"),
        ("/api/v1/subjects/{subject}/why", "get"),
        ("/api/v1/subjects/{subject}", "delete"),
        ("/api/v1/audit", "get"),
        ("/api/v1/reports", "get"),
        ("/api/v1/backtests", "post"),
        ("/api/v1/backtests/{id}", "get"),
        ("/v1/batch", "post"),
        ("/healthz", "get"),
    } <= described
    links = [
        link["operationId"]
        for ops in doc["paths"].values()
        for op in ops.values()
        for link in op["responses"].get("200", {}).get("links", {}).values()
    ]
    assert links and {
        op["operationId"]
        for ops in doc["paths"].values()
        for op in ops.values()
        if "operationId" in op
    } >= set(links)
    embedded = {(p, m) for p, ops in openapi.OPENAPI["paths"].items() for m in ops}
    elsewhere = sorted(embedded - described)
    # the dashboard's JSON twins are served too: only the reload is the embedded server's
    assert elsewhere == [("/api/v1/playbooks/reload", "post")]
    for path, method in elsewhere:
        target = path.replace("{subject}", "u1").replace("{trigger}", "storage-85")
        for name in ("token", "id", "project", "flavour"):
            target = target.replace("{" + name + "}", "1")
        r = scale_out.client.request(
            method, target, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert r.json()["error"]["code"] == "embedded_only", (method, path, r.text)
        if path in doc["paths"]:  # another method of a path served here
            assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", (path, r.text)
        else:
            assert r.status_code == 501, (method, path, r.text)
    reload = scale_out.client.post(
        "/api/v1/playbooks/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert "restart every worker process, then the API processes" in reload.text
    assert scale_out.client.get("/api/v1/nothing").json()["error"]["code"] == "not_found"


def test_no_key_reads_another_workspace_and_write_keys_open_nothing(
    scale_out: ScaleOut,
) -> None:
    b_write, b_admin = "fw_wk_beta-write-key-0123456789", "fw_ak_beta-admin-key-0123456789"
    pool = scale_out.pool
    beta = store_pg.ensure_workspace(pool, "beta", clock.now_ms(), b_write, b_admin)
    b_worker = Worker(pool, beta, scale_out.worker.triggers, keep=scale_out.keep)
    b_subject, b_account = "tenant-b-user-7f3a", "tenant-b-account"
    r = scale_out.client.post(
        "/v1/batch",
        json=customer(b_subject, b_account, plan="pro"),
        auth=(b_write, ""),
    )
    assert r.status_code == 200, r.text
    b_worker.run_until_idle(clock.now_ms())
    scale_out.send(customer())
    assert scale_out.get(f"/api/v1/subjects/{b_subject}", b_admin).status_code == 200

    doc = scale_out.client.get("/openapi.json").json()
    tried = 0
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if {"adminKey": []} not in op.get("security", []):
                continue
            for subject in (b_subject, b_account):
                target = path.replace("{subject}", subject)
                params = {"trigger": "export-trouble", "subject": subject}
                for key in (WRITE_KEY, b_write, "fw_ak_no-such-key-0123456789"):
                    refused = scale_out.client.request(
                        method, target, params=params, headers={"Authorization": f"Bearer {key}"}
                    )
                    assert refused.status_code in (401, 403), (method, path, refused.text)
                answer = scale_out.client.request(
                    method, target, params=params, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
                )
                assert answer.status_code in (200, 400, 404), (method, path, answer.text)
                for marker in (b_subject, b_account, "beta", b_write[:10], b_admin[:10]):
                    if marker != subject:
                        assert marker not in answer.text, (method, path, answer.text)
                explained = ("/api/v1/subjects/{subject}", "/api/v1/subjects/{subject}/why")
                if method == "delete":  # forgets them in its own workspace: no one there
                    assert answer.json()["events"] == 0, answer.text
                elif path in explained and answer.status_code == 200:
                    assert answer.json().get("known") is False, answer.text
                tried += 1
    assert tried >= 10
    assert scale_out.get(f"/api/v1/subjects/{b_subject}", b_admin).status_code == 200


# when a firing happened: the embedded engine applies an event at the moment it takes it in,
# a worker at the event's own time (the same here but for the network's delay)
FIRING_TIMES = ("at", "send_at", "episode_started")


def _comparable(answer: Any) -> Any:
    """An answer without the firing times, and without the partitions scale-out adds."""
    if isinstance(answer, dict):
        event = "kind" in answer  # a logged event: its time is the message's own
        return {
            k: _comparable(v)
            for k, v in answer.items()
            if k != "partition" and (event or k not in FIRING_TIMES)
        }
    if isinstance(answer, list):
        return [_comparable(v) for v in answer]
    return answer


def test_the_same_events_read_the_same_as_on_an_embedded_server(
    scale_out: ScaleOut, tmp_path: Path
) -> None:
    """Events that name their account (as the partitioning needs for the same semantics)."""
    body = customer()
    body["batch"].pop()  # (the event in another account: counted apart in scale-out mode)
    body["batch"].append(
        {"type": "identify", "userId": "u2", "traits": {"plan": "pro"}, "timestamp": ago(5)}
    )
    embedded = srv.start(
        tmp_path / "forewarn.db",
        env={"FOREWARN_DELIVERY": "off"},
        playbooks=tmp_path / "playbooks",
    )
    try:
        r = httpx.post(embedded.url + "/v1/batch", json=body, auth=(WRITE_KEY, ""), timeout=10)
        assert r.status_code == 200, r.text
        scale_out.send(body)
        assert embedded.wait_for(lambda: embedded.metric("forewarn_engine_events_total") >= 6)
        reads: list[tuple[str, dict[str, str]]] = [
            ("/api/v1/triggers", {}),
            ("/api/v1/firings", {}),
            ("/api/v1/subjects/u1", {}),
            ("/api/v1/subjects/u2", {}),
            ("/api/v1/subjects/acme", {}),
            ("/api/v1/subjects/nobody", {}),
            ("/api/v1/subjects/u1/why", {"trigger": "export-trouble"}),
            ("/api/v1/subjects/u2/why", {"trigger": "export-trouble"}),
            ("/api/v1/subjects/acme/why", {"trigger": "storage-85"}),
            ("/api/v1/subjects/u9/why", {"trigger": "storage-85"}),
            ("/api/v1/subjects/u1/why", {"trigger": "nope"}),
        ]
        answers: dict[str, Any] = {}
        for path, params in reads:
            want = httpx.get(
                embedded.url + path,
                params=params,
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                timeout=10,
            )
            got = scale_out.get(path, **params)
            assert got.status_code == want.status_code, (path, got.text, want.text)
            assert _comparable(got.json()) == _comparable(want.json()), path
            answers[path + str(params)] = want.json()
        assert len(answers["/api/v1/firings{}"]["firings"]) == 2
        [u1] = answers["/api/v1/subjects/u1{}"]["as"]
        assert u1["traits"]["plan"] == "free" and u1["triggers"]["export-trouble"]["active"]
        assert len(answers["/api/v1/subjects/u1{}"]["events"]) == 5
        assert answers["/api/v1/subjects/acme/why{'trigger': 'storage-85'}"]["true"] is True
        audit = [
            [(r["actor"], r["action"], r["target"], r["detail"]) for r in answer["audit"]]
            for answer in (embedded.admin("/api/v1/audit"), scale_out.get("/api/v1/audit").json())
        ]
        assert audit[0] == audit[1] and len(audit[0]) == 2
    finally:
        srv.stop(embedded)


def test_a_key_created_on_the_command_line_works_and_is_audited(
    scale_out: ScaleOut, url: str
) -> None:
    command = [sys.executable, "-m", "forewarn", "keys", "create", "--kind", "admin"]
    env = {**_env(url), "FOREWARN_ADMIN_KEY": "", "FOREWARN_WRITE_KEY": ""}
    done = subprocess.run(
        [*command, "--name", "ops"], env=env, capture_output=True, text=True, check=True
    )
    key = done.stdout.strip()
    assert key.startswith("fw_ak_")
    rows = scale_out.get("/api/v1/audit", key).json()["audit"]  # it opens the admin API
    assert (rows[0]["actor"], rows[0]["action"], rows[0]["target"], rows[0]["detail"]) == (
        "cli",
        "key.created",
        key[:10],
        {"kind": "admin", "name": "ops"},
    )
    identity = subprocess.run(
        [sys.executable, "-m", "forewarn", "keys", "identity"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert identity.returncode == 0, identity.stderr  # the secret the API processes read
    with scale_out.pool.connection() as conn:
        assert identity.stdout.strip() == outreach_pg.identity_secret(conn, 1)
