"""Reading recorded events: a file in time order is streamed, a chunk at a time, and gives what
reading it whole gives; anything out of order is found, so that replay can sort instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forewarn import sources
from forewarn.cli import main
from forewarn.model import format_time
from forewarn.sources import EventBatch, OutOfOrder, read_events, stream_events
from tests.factories import MINUTE, T0_MS

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOKS = ROOT / "examples" / "playbooks"
EVENTS = ROOT / "examples" / "events"


def _line(i: int, t: int, **more: object) -> str:
    message = {
        "type": "track",
        "messageId": f"m{i}",
        "timestamp": format_time(t),
        "userId": f"u{i % 3}",
        "event": "Login",
        **more,
    }
    return json.dumps(message)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_file_in_order_streams_to_what_reading_it_whole_gives(tmp_path):
    lines = [_line(i, T0_MS + i * MINUTE) for i in range(40)]
    lines[5] = "{not json"
    lines.insert(10, lines[9])  # a resent message
    lines.append(_line(99, T0_MS + 1000 * MINUTE))  # after --until
    path = _write(tmp_path / "in-order.jsonl", lines)
    until = T0_MS + 100 * MINUTE
    whole = read_events(path, until_ms=until)
    counted = EventBatch()
    streamed = list(stream_events(path, counted, until_ms=until))
    assert streamed == whole.events and len(streamed) == 39
    assert (counted.lines, counted.duplicates, counted.after_until) == (42, 1, 1)
    assert counted.rejected == whole.rejected and len(counted.rejected) == 1
    assert counted.events == []  # the stream keeps none of them


def test_the_stream_holds_a_chunk_of_events_at_most(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK", 2)
    times = [MINUTE, 2 * MINUTE, 3 * MINUTE, 0]
    lines = [_line(i, T0_MS + t) for i, t in enumerate(times)]
    path = _write(tmp_path / "late.jsonl", lines)
    stream = stream_events(path, EventBatch())
    # given once a chunk is full, before the line out of order is read
    assert [next(stream).message_id, next(stream).message_id] == ["m0", "m1"]
    with pytest.raises(OutOfOrder, match=r"late.jsonl:4: an event at \d+ ms after one at \d+"):
        next(stream)


def test_the_events_of_one_moment_come_in_order_key_order(tmp_path):
    """At one moment who-is-who (identify, group) comes before what happened, as sorting the
    whole file gives (model.order_key); otherwise file order is kept."""

    def group(user: str, t: int) -> str:
        return json.dumps(
            {
                "type": "group",
                "messageId": f"g-{user}-{t}",
                "timestamp": format_time(t),
                "userId": user,
                "groupId": "acme",
            }
        )

    lines = [
        _line(0, T0_MS),
        _line(1, T0_MS),
        group("u9", T0_MS),
        _line(3, T0_MS + 1),
        group("u8", T0_MS + 2),
        _line(4, T0_MS + 2),
        group("u7", T0_MS + 2),
        _line(5, T0_MS + 3),
    ]
    path = _write(tmp_path / "moments.jsonl", lines)
    whole = read_events(path)
    assert whole.in_order  # ties are put in order as they are read: no sort needed
    assert list(stream_events(path, EventBatch())) == whole.events
    assert [e.message_id for e in whole.events] == [
        f"g-u9-{T0_MS}",
        "m0",
        "m1",
        "m3",
        f"g-u8-{T0_MS + 2}",
        f"g-u7-{T0_MS + 2}",
        "m4",
        "m5",
    ]


@pytest.mark.parametrize("where", ["first", "last"])
def test_replay_output_is_the_same_in_order_or_not(capsys, tmp_path, where):
    """One event moved out of place, at the start or at the very end of the file, is replayed
    as if the file were sorted; stdin (read whole) agrees too."""
    lines = sorted(
        (line for f in sorted(EVENTS.glob("*.jsonl")) for line in f.read_text().splitlines()),
        key=lambda line: (json.loads(line)["timestamp"], json.loads(line)["type"] != "group"),
    )
    in_order = _write(tmp_path / "in-order.jsonl", lines)
    moved = lines[1:] + lines[:1] if where == "first" else [*lines[:-2], lines[-1], lines[-2]]
    shuffled = _write(tmp_path / "moved.jsonl", moved)
    outputs = []
    for path in (in_order, shuffled, EVENTS):
        assert (
            main(
                [
                    "replay",
                    "--playbooks",
                    str(PLAYBOOKS),
                    "--events",
                    str(path),
                    "--until",
                    "2026-12-31T00:00:00Z",
                ]
            )
            == 0
        )
        out, err = capsys.readouterr()
        outputs.append((out, err.splitlines()[-1]))
    assert outputs[0][0].count("\n") >= 9
    assert outputs[0] == outputs[1] == outputs[2]
