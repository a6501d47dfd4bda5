"""Replay a real dataset and check `absent` against what the purchase dates imply.

UCI Online Retail (../shared/datasets/onlineretail/, see SOURCE.txt there): one row per
(invoice, customer), Dec 2010 - Dec 2011. Every non-cancelled invoice becomes a Segment `track`
event `Order Completed` for its customer; a user-scoped `absent: {name: Order Completed, for: 90d}`
trigger is replayed through the real CLI up to the data's cut-off, and its firings are compared
with firings worked out here from the purchase dates alone.

The expected firings follow DESIGN.md "Semantics, precisely": `absent` is true from exactly
last purchase + 90d until the next purchase, and a timer due at t runs before events stamped t.
So each gap between consecutive purchases of at least 90 days gives one firing at the earlier
purchase + 90d (a next purchase stamped exactly then still sees the firing), and a customer's last
purchase gives one more if + 90d is at or before --until. Without cooldown or holdout, every
firing is sent.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import os
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from forewarn import cli

DATASET = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "datasets"
    / "onlineretail"
    / "invoices_by_customer.csv.gz"
)
UNTIL = "2011-12-10T00:00:00Z"  # the day after the last invoice (2011-12-09)
UNTIL_MS = int(datetime(2011, 12, 10, tzinfo=UTC).timestamp() * 1000)
FOR = timedelta(days=90)
FOR_MS = int(FOR.total_seconds() * 1000)
TRIGGER = "retail-lapsed-90d"
EVENT = "Order Completed"

PLAYBOOK = f"""\
triggers:
  - id: {TRIGGER}
    description: A customer who has not ordered for 90 days
    scope: user
    when:
      absent: {{name: {EVENT}, for: 90d}}
    action: {{channel: email, message: "We miss you."}}
"""


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Retail:
    """The dataset as events on disk, and the purchase times per customer."""

    def __init__(self, events: Path, purchases: dict[str, list[int]], invoices: int) -> None:
        self.events = events
        self.purchases = purchases  # customer -> sorted distinct purchase times (ms)
        self.invoices = invoices


def expected_firings(purchases: dict[str, list[int]], until_ms: int) -> set[tuple[str, int]]:
    """(subject, at_ms) of every firing of `absent: {for: 90d}`, from the purchase times only."""
    out: set[tuple[str, int]] = set()
    for customer, times in purchases.items():
        for previous, following in itertools.pairwise(times):
            due = previous + FOR_MS
            if following >= due:  # the timer at `due` runs before an order stamped `due`
                out.add((customer, due))
        due = times[-1] + FOR_MS
        if due <= until_ms:
            out.add((customer, due))
    return out


@pytest.fixture(scope="module")
def retail(tmp_path_factory: pytest.TempPathFactory) -> Retail:
    if not DATASET.is_file():
        missing = f"Online Retail dataset not found: {DATASET}"
        if os.environ.get("FOREWARN_REQUIRE_SERVICES") == "1":
            pytest.fail(missing + " (FOREWARN_REQUIRE_SERVICES=1)")
        pytest.skip(missing)
    events = tmp_path_factory.mktemp("retail") / "orders.jsonl.gz"
    purchases: dict[str, set[int]] = defaultdict(set)
    invoices = 0
    with (
        gzip.open(DATASET, "rt", encoding="utf-8", newline="") as source,
        gzip.open(events, "wt", encoding="utf-8") as sink,
    ):
        for row in csv.DictReader(source):
            if row["is_cancellation"] == "True":
                continue
            assert row["is_cancellation"] == "False", row
            customer = row["CustomerID"]
            when = datetime.fromisoformat(row["InvoiceDate"]).replace(tzinfo=UTC)
            when_ms = int(when.timestamp() * 1000)
            message = {
                "type": "track",
                "event": EVENT,
                "userId": customer,
                "timestamp": _iso(when_ms),
                "messageId": f"{row['InvoiceNo']}-{customer}",
                "properties": {
                    "value": round(float(row["value"]), 2),
                    "n_lines": int(row["n_lines"]),
                    "country": row["Country"],
                },
            }
            sink.write(json.dumps(message, separators=(",", ":")))
            sink.write("\n")
            purchases[customer].add(when_ms)
            invoices += 1
    return Retail(events, {c: sorted(t) for c, t in purchases.items()}, invoices)


@pytest.fixture(scope="module")
def playbook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("retail-playbook") / "retail.yaml"
    path.write_text(PLAYBOOK, encoding="utf-8")
    return path


def _replay(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    capsys.readouterr()
    code = cli.main(["replay", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, captured.err


def test_the_dataset_is_what_source_txt_describes(retail: Retail) -> None:
    # Guards against a changed file: 18,536 non-cancelled invoices (of 22,190 rows); the
    # datasets README counts 4,372 customers in all, 4,339 of them with a non-cancelled invoice.
    assert retail.invoices == 18_536
    assert len(retail.purchases) == 4_339


def test_absent_90d_fires_exactly_when_the_purchase_dates_say(
    retail: Retail, playbook: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, err = _replay(
        capsys, "--playbooks", str(playbook), "--events", str(retail.events), "--until", UNTIL
    )
    assert f"replayed {retail.invoices} events" in err
    assert "skipped" not in err
    firings = [json.loads(line) for line in out.splitlines()]

    expected = expected_firings(retail.purchases, UNTIL_MS)
    actual = [(f["subject"], _ms(f["at"])) for f in firings]
    assert len(actual) == len(set(actual)), "a subject fired twice at one moment"
    missing = sorted(expected - set(actual))
    extra = sorted(set(actual) - expected)
    assert not missing and not extra, (
        f"missing {len(missing)}: {[(s, _iso(t)) for s, t in missing[:10]]}; "
        f"extra {len(extra)}: {[(s, _iso(t)) for s, t in extra[:10]]}"
    )
    assert len(firings) == len(expected)
    assert {f["trigger"] for f in firings} == {TRIGGER}
    assert {f["scope"] for f in firings} == {"user"}
    assert {f["channel"] for f in firings} == {"email"}
    assert {f["decision"] for f in firings} == {"send"}
    # the default policy: held 30 s for the priority window, and to 08:00 UTC (no time zone
    # trait here) when that falls in the quiet hours, 21:00 to 08:00
    for f in firings:
        at = _ms(f["at"]) + 30_000
        hour = at // 3_600_000 % 24
        if 8 <= hour < 21:
            assert (f["reason"], _ms(f["send_at"])) == (None, at)
        else:
            day = at // 86_400_000 + (1 if hour >= 21 else 0)
            assert (f["reason"], _ms(f["send_at"])) == (
                "deferred:quiet_hours",
                day * 86_400_000 + 8 * 3_600_000,
            )
    assert len({f["subject"] for f in firings}) == len({s for s, _ in expected})

    # Every firing's evidence names the purchase the silence is measured from.
    last_seen = {
        (s, t + FOR_MS): _iso(t)
        for s, times in retail.purchases.items()
        for t in times
        if (s, t + FOR_MS) in expected
    }
    for f in firings:
        evidence = f["evidence"]
        assert evidence["condition"] == "absent"
        assert evidence["last_seen"] == last_seen[f["subject"], _ms(f["at"])], f


def test_table_summary_matches_the_purchase_dates(
    retail: Retail, playbook: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = _replay(
        capsys,
        "--playbooks",
        str(playbook),
        "--events",
        str(retail.events),
        "--until",
        UNTIL,
        "--format",
        "table",
    )
    expected = expected_firings(retail.purchases, UNTIL_MS)
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert rows[0] == ["trigger", "firings", "subjects", "send", "held_out", "suppressed"]
    by_trigger = {row[0]: row[1:] for row in rows[1:]}
    assert by_trigger == {
        TRIGGER: [
            str(len(expected)),
            str(len({s for s, _ in expected})),
            str(len(expected)),
            "0",
            "0",
        ]
    }


def test_the_expected_model_agrees_with_the_engine_at_the_boundary(
    playbook: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The independent model's boundary cases, checked on a few hand-made customers: an order
    exactly 90d later (fires), one minute earlier (does not), and a final silence reaching --until
    exactly (fires) or one minute short of it (does not)."""
    start = int(datetime(2011, 1, 1, tzinfo=UTC).timestamp() * 1000)
    minute = 60_000
    purchases = {
        "exact": [start, start + FOR_MS, start + FOR_MS + minute],
        "early": [start, start + FOR_MS - minute],
        "until": [UNTIL_MS - FOR_MS],
        "short": [UNTIL_MS - FOR_MS + minute],
    }
    events = tmp_path / "boundary.jsonl"
    with events.open("w", encoding="utf-8") as sink:
        for customer, times in purchases.items():
            for n, t in enumerate(times):
                message = {
                    "type": "track",
                    "event": EVENT,
                    "userId": customer,
                    "timestamp": _iso(t),
                    "messageId": f"{customer}-{n}",
                }
                sink.write(json.dumps(message) + "\n")
    out, _ = _replay(
        capsys, "--playbooks", str(playbook), "--events", str(events), "--until", UNTIL
    )
    actual = {(f["subject"], _ms(f["at"])) for f in map(json.loads, out.splitlines())}
    expected = expected_firings(purchases, UNTIL_MS)
    assert expected == {
        ("exact", start + FOR_MS),
        ("exact", start + 2 * FOR_MS + minute),
        ("early", start + 2 * FOR_MS - minute),
        ("until", UNTIL_MS),
    }
    assert actual == expected


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)
