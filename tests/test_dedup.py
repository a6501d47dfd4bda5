"""Message-id deduplication over a week in bounded memory: recent ids in memory, older ones in
the on-disk index beside the database, found again whichever way the message was timed."""

from __future__ import annotations

import sqlite3
import time
from array import array
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forewarn import dedup, ingest, store_sqlite
from forewarn.dedup import DAY_MS, JITTER_MS, MEMORY_MS, MINUTE_MS, Index, SeenIds
from forewarn.store_sqlite import Append

T0 = 1_790_000_000_000  # 2026-09-21


def _message(mid: str, stamp: int | None, sent: int | None) -> dict[str, Any]:
    m: dict[str, Any] = {"type": "track", "event": "Clicked", "userId": "u1", "messageId": mid}
    if stamp is not None:
        m["timestamp"] = ingest.iso(stamp)
    if sent is not None:
        m["sentAt"] = ingest.iso(sent)
    return m


def _send(
    conn: sqlite3.Connection, seen: SeenIds, received_ms: int, *messages: dict[str, Any]
) -> list[int]:
    """The messages as one Segment batch received at `received_ms`; returns the indexes the
    store found to be duplicates."""
    body = msgspec.json.encode({"batch": list(messages)})
    parsed = ingest.segment(body, "batch", received_ms)
    assert not parsed.rejected, parsed.rejected
    ids = [str(m["messageId"]) for m in parsed.messages]
    append = Append(1, "segment", received_ms, parsed.messages, ids, parsed.events)
    (done,) = store_sqlite.append_batches(conn, [append], seen)
    return done.duplicates


def _flush(seen: SeenIds) -> None:
    assert seen.index is not None
    conn = seen.index.open()
    try:
        seen.flush(conn)
    finally:
        conn.close()


def _filler(conn: sqlite3.Connection, seen: SeenIds, received_ms: int, n: int = 1) -> None:
    """Fresh traffic at `received_ms`: moves memory's window on."""
    for i in range(n):
        _send(conn, seen, received_ms, _message(f"fill-{received_ms}-{i}", received_ms - 5, None))


def _store(tmp_path: Path) -> tuple[sqlite3.Connection, SeenIds]:
    db = tmp_path / "forewarn.db"
    conn = store_sqlite.connect(db)
    where = dedup.index_path(db)
    assert where is not None
    seen = SeenIds(Index(where))
    seen.load(conn, T0)
    return conn, seen


def test_a_resend_after_memory_moved_on_is_found_on_disk(tmp_path):
    conn, seen = _store(tmp_path)
    # a Segment client: event at T0 - 2 s, sent at T0 - 1 s on a clock 10 minutes fast
    fast = 600_000
    original = _message("m-1", T0 - 2_000 + fast, T0 - 1_000 + fast)
    assert _send(conn, seen, T0, original) == []
    _flush(seen)
    _filler(conn, seen, T0 + 3 * DAY_MS)  # three days on: memory holds none of T0's ids
    _flush(seen)
    assert store_sqlite.id_hash(1, "m-1") not in seen
    resent = _message("m-1", T0 - 2_000 + fast, T0 + 3 * DAY_MS - 500 + fast)
    assert _send(conn, seen, T0 + 3 * DAY_MS, resent) == [0]
    assert seen.disk_lookups >= 1


def test_a_resend_in_another_request_that_took_longer_in_transit_is_found(tmp_path):
    conn, seen = _store(tmp_path)
    assert _send(conn, seen, T0 + 100, _message("m-1", T0 - 1_000, T0)) == []
    _flush(seen)
    _filler(conn, seen, T0 + DAY_MS)
    # the resend's request spent almost the whole jitter allowance longer on the way
    late = T0 + DAY_MS + JITTER_MS - 1_000
    assert _send(conn, seen, late, _message("m-1", T0 - 1_000, T0 + DAY_MS)) == [0]


def test_a_resend_slower_on_the_way_than_its_original_is_looked_for_on_disk(tmp_path):
    conn, seen = _store(tmp_path)
    start = T0 // MINUTE_MS * MINUTE_MS + 59_000  # the end of a minute
    assert _send(conn, seen, start, _message("m-1", start - 1_000, start)) == []
    _flush(seen)
    again = start + 1_000 + MEMORY_MS  # memory has just let the original's minute go
    _filler(conn, seen, again)
    assert store_sqlite.id_hash(1, "m-1") not in seen
    # 50 s longer on the way: its corrected time is within memory's reach, yet the
    # original was received before it
    slow = _message("m-1", start - 1_000, again - (JITTER_MS - 10_000))
    assert _send(conn, seen, again, slow) == [0]


def test_messages_without_sent_at_or_without_any_time_are_found_on_disk(tmp_path):
    conn, seen = _store(tmp_path)
    timed = _message("timed", T0 - 42_000, None)  # the client's clock, the same in each resend
    untimed = _message("untimed", None, None)  # timed by its receipt, different in each
    assert _send(conn, seen, T0, timed, untimed) == []
    _flush(seen)
    _filler(conn, seen, T0 + 6 * DAY_MS)
    _flush(seen)
    assert len(seen) == 1  # the filler alone
    assert _send(conn, seen, T0 + 6 * DAY_MS + 1, timed, untimed) == [0, 1]


def test_an_event_a_day_older_than_its_receipt_is_kept_for_the_whole_window(tmp_path):
    conn, seen = _store(tmp_path)
    old = T0 - 30 * DAY_MS  # a phone's queue, sent after a month offline
    assert _send(conn, seen, T0, _message("queued", old, T0 - 10)) == []
    _flush(seen)
    index = Index(seen.index.path).open()  # type: ignore[union-attr]
    Index.prune(index, T0 + 6 * DAY_MS)
    index.close()
    _filler(conn, seen, T0 + 6 * DAY_MS)
    assert _send(conn, seen, T0 + 6 * DAY_MS, _message("queued", old, T0 + 6 * DAY_MS)) == [0]


def test_memory_holds_only_the_window_once_the_index_has_the_rest(tmp_path):
    conn, seen = _store(tmp_path)
    for minute in range(30):
        _filler(conn, seen, T0 + minute * MINUTE_MS, n=3)
        _flush(seen)
    window_minutes = MEMORY_MS // MINUTE_MS
    assert len(seen.slots) <= window_minutes + 1
    assert len(seen) <= 3 * (window_minutes + 1)


def test_minutes_dropped_from_memory_are_taken_out_by_the_index_thread(tmp_path, monkeypatch):
    """Taking a minute of ids out of memory holds the interpreter, so the writer leaves it to
    the index thread, which must not let dropped minutes pile up."""
    monkeypatch.setattr(dedup, "FLUSH_EVERY_S", 0.01)
    monkeypatch.setattr(dedup, "SHIP_EVERY_S", 0.01)
    conn, seen = _store(tmp_path)
    seen.start()
    try:
        for minute in range(10):
            _filler(conn, seen, T0 + minute * MINUTE_MS, n=3)
            deadline = time.monotonic() + 10
            while seen._pending.minutes and time.monotonic() < deadline:
                time.sleep(0.005)  # the thread writes the minute to the index
            assert not seen._pending.minutes
        window_minutes = MEMORY_MS // MINUTE_MS
        deadline = time.monotonic() + 10
        while len(seen) > 3 * (window_minutes + 1) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert seen._dropped == [] and seen._leaving == []
        assert len(seen.slots) <= window_minutes + 1
        assert len(seen) <= 3 * (window_minutes + 1)
        # what memory dropped is still found, on disk
        assert _send(
            conn, seen, T0 + 9 * MINUTE_MS, _message("fill-" + str(T0) + "-0", T0 - 5, None)
        ) == [0]
    finally:
        seen.stop()
    assert seen._dropped == [] and seen._leaving == []  # nor after it stops


class _Clock:
    """A monotonic clock that moves only when told: by a chunk taken out, by a pause."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def _paced(monkeypatch, seen: SeenIds, chunk_s: float) -> tuple[_Clock, list[float], list[float]]:
    """Have `seen`'s paced take-out run on a clock of its own, each chunk taking `chunk_s`;
    record when each chunk starts, and the pauses instead of sleeping them."""
    import types

    clock = _Clock()
    fake = types.SimpleNamespace(monotonic=clock.monotonic, perf_counter=time.perf_counter)
    monkeypatch.setattr(dedup, "time", fake)
    chunks: list[float] = []
    pauses: list[float] = []
    take = seen._take_out_chunk

    def chunk() -> float:
        chunks.append(clock.now)
        take()
        clock.now += chunk_s
        return chunk_s

    class Stop:  # the thread's stop event, never set
        def wait(self, timeout: float) -> bool:
            pauses.append(timeout)
            clock.now += timeout
            return False

    monkeypatch.setattr(seen, "_take_out_chunk", chunk)
    monkeypatch.setattr(seen, "_stop", Stop())
    return clock, chunks, pauses


def test_ids_leaving_memory_are_taken_out_in_chunks_spread_through_the_second(monkeypatch):
    """A minute at 50,000 events/s is 3 million ids, a second of the lock on Python. Taken
    out in chunks with `sleep(0)` between them, the requests still waited for the whole run
    of chunks (55-65 ms each second in a soak): a thread that lets go of the lock and takes it
    straight back keeps it, since each take restarts the others' wait for their turn. So each
    chunk is followed by a pause in proportion, `EVICT_SHARE` of the time per minute waiting,
    and the next passes go on where one stopped."""
    import random

    seen = SeenIds()
    rng = random.Random(3)
    old = [rng.getrandbits(63) for _ in range(60_000)]
    new = [rng.getrandbits(63) for _ in range(1_000)]
    seen._hold(0, old)
    seen._hold(1, new)
    seen._dropped.append((0, seen.slots.pop(0)))
    clock, chunks, pauses = _paced(monkeypatch, seen, chunk_s=0.002)
    assert seen._take_out_paced(0.2) is False
    assert clock.now == pytest.approx(0.2)  # a pass lasts its time
    # 2 ms of work, then 38: 5% of the time, spread through it
    assert chunks == pytest.approx([0.0, 0.04, 0.08, 0.12, 0.16])
    assert pauses[:5] == pytest.approx([0.002 * (1 - dedup.EVICT_SHARE) / dedup.EVICT_SHARE] * 5)
    assert 61_000 - len(seen) == 5 * dedup.EVICT_CHUNK
    passes = 1
    while seen._leaving or seen._dropped:
        chunks.clear()
        seen._take_out_paced(1.0)
        passes += 1
    assert passes == 2 and len(chunks) == 10  # the rest, and the second's remainder idle
    assert len(seen) == 1_000 and seen.slots.keys() == {1}
    assert all(h in seen for h in new) and not any(h in seen for h in old[::100])


def test_more_minutes_waiting_to_leave_memory_get_more_of_each_second(monkeypatch):
    seen = SeenIds()
    for slot in range(3):
        seen._hold(slot, list(range(slot * 10**6, slot * 10**6 + 20_000)))
        seen._dropped.append((slot, seen.slots.pop(slot)))
    _, _, pauses = _paced(monkeypatch, seen, chunk_s=0.002)
    seen._take_out_paced(1.0)
    share = 3 * dedup.EVICT_SHARE
    assert pauses[0] == pytest.approx(0.002 * (1 - share) / share)
    for slot in range(12):  # however many wait, the thread never takes more than half
        seen._dropped.append((100 + slot, array("q", [slot])))
    pauses.clear()
    seen._take_out_paced(1.0)
    assert pauses[0] == pytest.approx(0.002)


def test_the_ids_held_are_out_of_the_cycle_collectors_sight(tmp_path):
    """Millions of ids sit in memory under load; in a container the collector tracks, each of
    them would be visited on every full pass, with the interpreter held meanwhile."""
    import gc

    conn, seen = _store(tmp_path)
    for minute in range(3):
        _filler(conn, seen, T0 + minute * MINUTE_MS, n=5)
    waiting = []
    while not seen._queue.empty():
        waiting.append(seen._queue.get_nowait())
    assert len(seen) == 15 and len(seen.slots) == 3 and len(waiting) == 15
    assert not any(gc.is_tracked(ids) for ids in seen.ids)
    # a pass visits the map's dicts, not the ids in them, and each minute's array alone
    assert {id(d) for d in gc.get_referents(seen.ids)} == {id(d) for d in seen.shards}
    assert len(seen.shards) == dedup.SHARDS
    assert all(gc.get_referents(members) == [array] for members in seen.slots.values())
    for e in waiting:  # arrays: the collector visits the array, not its items
        assert len(e.hashes) == 1 and gc.get_referents(e.hashes, e.stamps) == [array, array]
    for e in waiting:
        seen._queue.put(e)
    _flush(seen)  # and what waited is written as before
    assert seen.index is not None
    index = seen.index.open()
    assert index.execute("SELECT count(*) FROM ids_at").fetchone()[0] == 15
    index.close()


def test_the_maps_dicts_grow_a_few_at_a_time_never_all_together():
    """A dict that grows copies itself whole, holding the interpreter. Shards of one size
    would all grow within the same few thousand ids (at 50,000 events/s, 100 ms more work in
    one second); spread over a doubling of sizes, a few grow in any thousand ids."""
    import random
    import sys

    seen = SeenIds()
    sizes = [sys.getsizeof(d) for d in seen.shards]
    rng = random.Random(7)
    most = 0
    for chunk in range(600):
        seen._hold(0, [rng.getrandbits(63) for _ in range(1_000)])
        now = [sys.getsizeof(d) for d in seen.shards]
        grew = sum(a != b for a, b in zip(sizes, now, strict=True))
        if chunk >= 200:  # past the first few hundred ids each, where every dict is tiny
            most = max(most, grew)
        sizes = now
    assert len(seen) == 600_000
    # here 4-6 at most, about one a chunk on average; shards of one size: 15-17 at most
    assert 0 < most <= 8


def test_ids_not_yet_on_disk_stay_in_memory(tmp_path):
    conn, seen = _store(tmp_path)
    _send(conn, seen, T0, _message("m-1", T0 - 5, T0 - 1))
    _filler(conn, seen, T0 + DAY_MS)  # the index has not been written: memory keeps T0's ids
    assert store_sqlite.id_hash(1, "m-1") in seen
    assert _send(conn, seen, T0 + DAY_MS, _message("m-1", T0 - 5, T0 + DAY_MS)) == [0]


def test_after_a_crash_the_index_catches_up_from_the_log(tmp_path):
    conn, seen = _store(tmp_path)
    _send(conn, seen, T0, _message("m-1", T0 - 5, T0 - 1), _message("m-2", None, None))
    # never written to the index: the process died
    restarted = SeenIds(Index(seen.index.path))  # type: ignore[union-attr]
    restarted.load(conn, T0 + 2 * DAY_MS)
    assert len(restarted) == 0  # memory holds only its window
    later = T0 + 2 * DAY_MS
    resent = (_message("m-1", T0 - 5, later), _message("m-2", None, None))
    assert _send(conn, restarted, later, *resent) == [0, 1]


def test_a_damaged_index_is_built_again_from_the_log(tmp_path):
    conn, seen = _store(tmp_path)
    _send(conn, seen, T0, _message("m-1", T0 - 5, T0 - 1))
    _flush(seen)
    seen.index.close()  # type: ignore[union-attr]
    path = seen.index.path  # type: ignore[union-attr]
    path.write_bytes(b"not a database" * 100)
    rebuilt = SeenIds(Index(path))
    rebuilt.load(conn, T0 + DAY_MS)
    assert _send(conn, rebuilt, T0 + DAY_MS, _message("m-1", T0 - 5, T0 + DAY_MS)) == [0]


def test_the_index_forgets_what_is_older_than_the_window(tmp_path):
    conn, seen = _store(tmp_path)
    _send(conn, seen, T0, _message("m-1", T0 - 5, T0 - 1), _message("m-2", None, None))
    _flush(seen)
    index = seen.index.open()  # type: ignore[union-attr]
    assert Index.prune(index, T0 + 7 * DAY_MS) == 0  # the week is kept
    assert Index.prune(index, T0 + 11 * DAY_MS) == 2
    index.close()


def _on_disk(seen: SeenIds) -> set[int]:
    assert seen.index is not None
    index = seen.index.open()
    try:
        return {h for (h,) in index.execute("SELECT h FROM ids_at UNION SELECT h FROM ids_only")}
    finally:
        index.close()


def _wait_for(condition: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_index_process_writes_what_the_thread_hands_it_and_stop_writes_the_rest(
    tmp_path, monkeypatch
):
    """The thread hands new ids to the index process; their minutes stay in memory until it
    says they are written. At stop, what it holds is written before it exits."""
    monkeypatch.setattr(dedup, "SHIP_EVERY_S", 0.01)
    monkeypatch.setattr(dedup, "FLUSH_EVERY_S", 3600.0)  # only when asked: at stop
    conn, seen = _store(tmp_path)
    seen.start()
    try:
        _send(conn, seen, T0, _message("m-1", T0 - 5, T0 - 1), _message("m-2", None, None))
        _wait_for(lambda: seen._shipped and seen._process)  # handed over, not written
        assert seen._pending.minutes == {T0 // MINUTE_MS: 1}
        # kept as handed, for half a minute: out of the cycle collector's sight
        import gc

        (shipped,) = seen._shipped
        assert not gc.is_tracked(shipped.handed) and not gc.is_tracked(shipped.slots)
        assert _on_disk(seen) == set()
        process = seen._process
        assert process is not None and process.alive()
    finally:
        seen.stop()
    assert not process.alive()
    assert _on_disk(seen) == {store_sqlite.id_hash(1, "m-1"), store_sqlite.id_hash(1, "m-2")}
    assert seen._shipped == [] and seen._pending.minutes == {}


def test_a_killed_index_process_is_replaced_and_handed_again_what_it_had_not_written(
    tmp_path, monkeypatch
):
    import os
    import signal

    monkeypatch.setattr(dedup, "SHIP_EVERY_S", 0.01)
    monkeypatch.setattr(dedup, "FLUSH_EVERY_S", 3600.0)
    conn, seen = _store(tmp_path)
    seen.start()
    try:
        _send(conn, seen, T0, _message("m-1", T0 - 5, T0 - 1))
        _wait_for(lambda: seen._shipped and seen._process)
        first = seen._process
        assert first is not None
        os.kill(first._process.pid, signal.SIGKILL)  # type: ignore[arg-type]
        monkeypatch.setattr(dedup, "FLUSH_EVERY_S", 0.01)  # the next one writes at once
        _send(conn, seen, T0 + 1, _message("m-2", T0 - 5, T0 - 1))
        _wait_for(lambda: not seen._pending.minutes)
        assert seen._process is not first
        assert _on_disk(seen) == {store_sqlite.id_hash(1, "m-1"), store_sqlite.id_hash(1, "m-2")}
    finally:
        seen.stop()


def test_when_the_server_is_gone_the_index_process_writes_what_it_holds_and_exits(tmp_path):
    """A server killed with -9 leaves its index process a closed pipe: the ids it was handed
    are committed in the log, so it writes them rather than leave them to the next start."""
    conn, seen = _store(tmp_path)
    _send(conn, seen, T0, _message("m-1", T0 - 5, T0 - 1))
    entries = seen._take_queued()
    assert seen.index is not None
    process = dedup._IndexProcess(seen.index.path)
    process.hand(dedup._handed(dedup._group(entries)))
    process._pipe.close()  # as the server's death does
    process._process.join(timeout=20)
    assert process._process.exitcode == 0
    assert _on_disk(seen) == {store_sqlite.id_hash(1, "m-1")}
    index = seen.index.open()
    assert Index.upto(index) == entries[0].batch
    index.close()


def test_the_server_writes_the_index_beside_the_database(tmp_path):
    from forewarn.server import Writer

    db = tmp_path / "forewarn.db"
    store_sqlite.connect(db).close()
    writer = Writer(db)
    writer.start()
    writer.stop()  # writes what is queued
    assert (tmp_path / "forewarn.db-ids").exists()
    assert dedup.index_path(":memory:") is None


# --- against a week of resends, the same answers as remembering every id ---------------------

_client = st.tuples(
    st.integers(-3_600_000, 3_600_000),  # the client's clock error
    st.booleans(),  # whether it sends sentAt
    st.booleans(),  # whether it sends a timestamp
)
_sending = st.lists(
    st.tuples(
        st.integers(0, 7),  # message
        st.integers(0, 6 * DAY_MS),  # how long after the first the request was received
        st.integers(0, JITTER_MS // 2),  # time in transit
        st.booleans(),  # the index written after this request
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    client=_client,
    sending=_sending,
    ages=st.lists(st.integers(0, 2 * DAY_MS), min_size=8, max_size=8),
)
def test_within_a_week_every_resend_is_a_duplicate_and_nothing_else_is(
    tmp_path_factory, client, sending, ages
):
    skew, with_sent, with_time = client
    conn, seen = _store(tmp_path_factory.mktemp("dedup"))
    accepted: set[int] = set()
    happened: dict[int, int] = {}  # each message's event, on the server's clock
    for message, after, transit, flush in sorted(sending, key=lambda s: s[1]):
        received = T0 + after
        happened.setdefault(message, received - transit - ages[message])
        m = _message(
            f"id-{message}",
            happened[message] + skew if with_time else None,
            received - transit + skew if with_sent else None,
        )
        duplicates = _send(conn, seen, received, m)
        assert duplicates == ([0] if message in accepted else [])
        accepted.add(message)
        if flush:
            _flush(seen)


def test_a_lookup_sees_what_was_written_after_the_previous_lookup(tmp_path):
    index = Index(tmp_path / "ids")
    assert not index.holds(42, T0, sent=False)
    writer = index.open()
    Index.write(writer, [dedup._Flush(1, T0 + 5, array("q", [42]), array("q", [T0]))])
    assert index.holds(42, T0, sent=False)
    Index.write(writer, [dedup._Flush(2, T0 + 5, array("q", [43]), array("q", [T0]))])
    assert index.holds(43, T0, sent=True)
    writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert (tmp_path / "ids-wal").stat().st_size == 0  # no lookup holds a snapshot open
    writer.close()
    index.close()


@settings(max_examples=40, deadline=None)
@given(
    batches=st.lists(
        st.lists(
            st.one_of(
                st.integers(-90_000, 90_000),  # near its receipt, in one minute or across two
                st.just(0),  # no time of its own: its receipt
                st.integers(-3 * DAY_MS, 3 * DAY_MS),  # far from it
            ),
            min_size=1,
            max_size=6,
        ),
        min_size=1,
        max_size=5,
    )
)
def test_each_id_of_a_written_batch_is_found_at_its_events_time(batches):
    """A batch whose events lie in one minute near their receipt is filed whole; the others
    id by id: either way each id is found where a lookup for its event looks."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        index = Index(Path(tmp) / "ids")
        writer = index.open()
        entries: list[dedup._Flush] = []
        written: list[tuple[int, int]] = []
        h = 1
        for b, offsets in enumerate(batches):
            received = T0 + b * 7 * MINUTE_MS + 1_234
            stamps = [received + offset for offset in offsets]
            hashes = list(range(h, h + len(stamps)))
            h += len(stamps)
            entries.append(dedup._Flush(b + 1, received, array("q", hashes), array("q", stamps)))
            written += zip(hashes, stamps, strict=True)
        Index.write(writer, entries)
        for hashed, stamp in written:
            assert index.holds(hashed, stamp, sent=False), (hashed, stamp)
        assert not index.holds(h, written[0][1], sent=False)  # never written
        assert Index.upto(writer) == len(batches)
        writer.close()
        index.close()
