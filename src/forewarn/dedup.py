"""Exact message-id deduplication over `DEDUP_DAYS` days, in memory that does not grow with
them.

Clients resend a whole batch when its answer does not reach them, with the same message ids,
and the log must not take those events twice. A 64-bit hash of each id (`store_sqlite.id_hash`)
is what is compared.

- **In memory**: the hashes received in the last `MEMORY_MS`, one set per minute of receipt,
  plus any not yet written to disk.
- **On disk**: an index beside the database (`<database>-ids`, SQLite), written in bulk every
  `FLUSH_EVERY_S` by a thread of its own. It is derived from the log, so it needs no fsync of
  its own: it records the last batch it holds and catches up from the log when it starts.
  Rows are keyed by the minute of the event's time, so each bulk write touches the few pages
  of the last minutes instead of a random page per id (a B-tree keyed by the hash alone costs
  a random page per event, which at a few thousand events a second outweighs everything
  else the store writes).

Which new ids need a look on disk: a resent message carries its event's original time. For a
message sent with `sentAt`, the skew-corrected time of the resend differs from the original's
only by how much longer one request took in transit than the other (at most `JITTER_MS`), and
the original's corrected time is at or before its receipt. So a message with `sentAt` whose
corrected time is at most `MEMORY_MS - JITTER_MS` old was, if it is a resend, received within
the memory window: memory answers. Everything else is looked up on disk:

- events older than that (a phone's queue sent after a day offline), by the minutes within
  `JITTER_MS` of their time;
- messages without `sentAt`, whose time is the client's own timestamp, the same in every
  resend, by the minute of that time;
- messages without any time (their time is their receipt) and events more than a day from
  their receipt, by hash alone, in a second table kept by day of receipt.

Live traffic from the Segment, PostHog and Sentry clients carries `sentAt`, so it rarely
touches the disk.

Millions of ids are held at once (three minutes at 40,000 events a second is 7 million), and
Python's cycle collector visits every item of every set and list it tracks, holding the
interpreter for tens of milliseconds per pass over them: the server's slowest answers came
from those passes. So memory holds its ids in dicts of ints to ints, which the collector
does not track, and the ids waiting for the index in arrays, whose items it does not visit.

Memory is one map from each id held to the minute it was received in, so that asking costs
one lookup whatever the number of minutes held (a dict per minute cost one lookup per minute,
each a miss in the processor's cache: 1.9 µs an id for four minutes, against 0.3). A dict that
grows is copied whole into a table twice its size without letting another thread run (213 ms
at 2.8 million ids, in which no request is answered), so the map is spread over `SHARDS` dicts
by the ids' low bits, each small enough to grow in a few milliseconds. Each minute also keeps
its ids in an array; when the minute leaves memory, the index thread takes them out of the
map `EVICT_CHUNK` at a time, pausing between chunks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import struct
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from forewarn import clock
from forewarn.model import Event, parse_time_ms
from forewarn.store_sqlite import LogBatch, transaction

log = logging.getLogger(__name__)

DEDUP_DAYS = 7
DAY_MS = 86_400_000
MINUTE_MS = 60_000
MEMORY_MS = 3 * MINUTE_MS
JITTER_MS = MINUTE_MS
FLUSH_EVERY_S = 30.0  # two bulk writes a minute: each fills a stretch of the B-tree in order
PRUNE_EVERY_MS = 3_600_000
# an event this far from its receipt is indexed by hash alone: its minute may be pruned first
NEAR_MS = DAY_MS
INDEX_VERSION = 1
SHARDS = 256  # dicts of the ids in memory: at 50,000 ids/s for five minutes, 59,000 in each
EVICT_CHUNK = 16_384  # ids a minute leaving memory takes out of the map between two pauses
EVICT_PAUSE_S = 0.005
NICE = 10  # the index thread's nice value: it runs when the requests leave a core idle
CACHE_KIB = 16_384  # page cache per connection to the index
_HASH = struct.Struct("<q")
_CATCH_UP_BATCHES = 2_000  # batches read from the log per transaction while catching up
_TIME_FIELD = Event.__struct_fields__.index("timestamp_ms")  # in a batch's event tuples

_LOOKUP = (
    "SELECT 1 FROM ids_only WHERE h = ?1 UNION ALL"
    " SELECT 1 FROM ids_at WHERE minute IN (?2, ?3, ?4) AND h = ?1 LIMIT 1"
)
_json = msgspec.json.encode

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ids_at (minute INTEGER NOT NULL, h INTEGER NOT NULL,"
    " PRIMARY KEY (minute, h)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS ids_only (h INTEGER PRIMARY KEY, day INTEGER NOT NULL)"
    " WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS ids_only_day ON ids_only (day)",
    "CREATE TABLE IF NOT EXISTS upto (one INTEGER PRIMARY KEY CHECK (one = 1),"
    " batch INTEGER NOT NULL)",
)


def index_path(database: str | Path) -> Path | None:
    """Where the index of `database` lives; None for an in-memory database."""
    text = str(database)
    if text == ":memory:" or text.startswith("file::memory:"):
        return None
    return Path(text + "-ids")


def needs_disk(received_ms: int, stamp: int, sent: bool) -> bool:
    """Whether memory alone cannot tell if this message was seen before (see the module)."""
    return not sent or not received_ms - (MEMORY_MS - JITTER_MS) <= stamp < received_ms


@dataclass(slots=True)
class _Flush:
    batch: int
    received_ms: int
    hashes: array[int]  # "q": the cycle collector does not visit its items
    stamps: array[int]


@dataclass
class _Pending:
    """Entries committed to the log but not yet to the index, per minute of receipt."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    minutes: dict[int, int] = field(default_factory=dict)


class Index:
    """The on-disk part: `ids_at` keyed by (minute of the event's time, hash), `ids_only` by
    hash with its day of receipt, and `upto`, the last log batch written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader: sqlite3.Connection | None = None

    def open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path), timeout=10.0, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # derived from the log: a write lost in a power cut is written again from it
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=10000")
            # the pages of the last minutes' ids: a bulk write and the lookups find them here
            conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, INDEX_VERSION):
                raise sqlite3.DatabaseError(f"index version {version}")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={INDEX_VERSION}")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def reader(self) -> sqlite3.Connection:
        if self._reader is None:
            self._reader = self.open()
        return self._reader

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def holds(self, h: int, stamp: int, sent: bool) -> bool:
        """Whether `h` is on disk, for a message whose (corrected) time is `stamp`; `sent`
        says whether it came with `sentAt`, in which case its time may be `JITTER_MS` off the
        original's."""
        if sent:  # stamp ± JITTER_MS spans at most three minutes
            first = (stamp - JITTER_MS) // MINUTE_MS
            minutes = (first, first + 1, first + 2)
        else:
            minutes = (stamp // MINUTE_MS,) * 3
        # fetchall, not fetchone: a statement left unfinished keeps its read transaction open,
        # and with it a snapshot that would miss later writes and keep the WAL from shrinking
        return bool(self.reader().execute(_LOOKUP, (h, *minutes)).fetchall())

    @staticmethod
    def write(conn: sqlite3.Connection, entries: list[_Flush]) -> None:
        """Add entries in one transaction and move `upto` to the last of their batches. The
        hashes go in one statement per minute, as a JSON array that SQLite reads and sorts
        itself: the B-tree filled in order, and the lock on Python released while it is
        (sorting a million ints in Python would hold it for half a second; the array is
        encoded in pieces, between which other threads run). Python looks at each id only in
        a batch whose events span two minutes or lie far from its receipt: a batch whose
        events all lie in one minute near it is sorted out whole."""
        by_minute: dict[int, array[int]] = {}
        only: list[int] = []
        only_days: list[int] = []
        for e in entries:
            received, stamps = e.received_ms, e.stamps
            if not stamps:
                continue
            minute = min(stamps) // MINUTE_MS
            if (
                max(stamps) // MINUTE_MS == minute
                and received - NEAR_MS <= minute * MINUTE_MS
                and (minute + 1) * MINUTE_MS <= received + NEAR_MS
                and received not in stamps
            ):
                _array_of(by_minute, minute).extend(e.hashes)
                continue
            near, far = received - NEAR_MS, received + NEAR_MS
            for h, stamp in zip(e.hashes, stamps, strict=True):
                if stamp == received or not near <= stamp < far:
                    only.append(h)
                    only_days.append(received // DAY_MS)
                else:
                    _array_of(by_minute, stamp // MINUTE_MS).append(h)
        with transaction(conn):
            for minute in sorted(by_minute):
                conn.execute(
                    "INSERT OR IGNORE INTO ids_at SELECT ?, value FROM json_each(?) ORDER BY value",
                    (minute, _json_array(by_minute[minute])),
                )
            conn.executemany(
                "INSERT OR IGNORE INTO ids_only VALUES (?, ?)", zip(only, only_days, strict=True)
            )
            if entries:
                conn.execute(
                    "INSERT INTO upto VALUES (1, ?) ON CONFLICT (one) DO UPDATE"
                    " SET batch = max(batch, excluded.batch)",
                    (max(e.batch for e in entries),),
                )

    @staticmethod
    def upto(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT batch FROM upto").fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def prune(conn: sqlite3.Connection, now_ms: int) -> int:
        """Drop what is older than the window; returns the rows removed."""
        # an id kept in `ids_at` has a time within NEAR_MS of a receipt in the window
        minute = (now_ms - (DEDUP_DAYS + 1) * DAY_MS - NEAR_MS - JITTER_MS) // MINUTE_MS
        day = now_ms // DAY_MS - DEDUP_DAYS - 1
        removed = 0
        with transaction(conn):
            removed += conn.execute("DELETE FROM ids_at WHERE minute < ?", (minute,)).rowcount
            removed += conn.execute("DELETE FROM ids_only WHERE day < ?", (day,)).rowcount
        return removed


class SeenIds:
    """The message-id hashes seen in the last `DEDUP_DAYS` days or more.

    Without an index (`index=None`), all of them are kept in memory, about 70 bytes each, one
    dict per day of receipt: for tests and tools that hold a log briefly. With one, memory
    keeps `MEMORY_MS` of them and a thread writes them to the index (`start`, `stop`)."""

    def __init__(self, index: Index | None = None) -> None:
        self.index = index
        self.slot_ms = MINUTE_MS if index is not None else DAY_MS
        # received before now minus this, a slot is dropped (if written to the index)
        self.keep_ms = MEMORY_MS if index is not None else (DEDUP_DAYS + 1) * DAY_MS
        # each id held -> the slot it was received in, in the dict of its low bits
        self.ids: tuple[dict[int, int], ...] = _shards()
        # slot -> the ids received in it, to take out of `ids` when the slot is dropped
        self.slots: dict[int, array[int]] = {}
        self._dropped: list[tuple[int, array[int]]] = []  # for the index thread to take out
        self._pending = _Pending()
        self._queue: queue.SimpleQueue[_Flush] = queue.SimpleQueue()
        self._waiting: list[_Flush] = []  # taken from the queue, not yet written
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.disk_lookups = 0  # how many ids memory could not settle

    # --- the writer's side: one thread asks and adds --------------------------------------

    def __contains__(self, h: int) -> bool:
        """Whether `h` is in memory (an id of a dropped slot may still be: it was seen)."""
        return h in self.ids[h & _MASK]

    def __len__(self) -> int:
        return sum(len(ids) for ids in self.ids)

    def seen(self, h: int, received_ms: int, stamp: int, sent: bool) -> bool:
        """Whether `h` was seen before: in memory, else on disk where memory cannot tell."""
        if h in self:
            return True
        if self.index is None or not needs_disk(received_ms, stamp, sent):
            return False
        self.disk_lookups += 1
        return self.index.holds(h, stamp, sent)

    def add(self, received_ms: int, hashes: list[int], stamps: list[int], batch: int) -> None:
        """Learn the ids of a committed batch (`stamps`: their events' times)."""
        slot = received_ms // self.slot_ms
        if slot not in self.slots:  # a new minute: the oldest may leave memory
            self._drop_old(received_ms)
        self._hold(slot, hashes)
        if self.index is not None:
            with self._pending.lock:
                self._pending.minutes[slot] = self._pending.minutes.get(slot, 0) + 1
            self._queue.put(_Flush(batch, received_ms, array("q", hashes), array("q", stamps)))

    def _hold(self, slot: int, hashes: list[int]) -> None:
        """Hold `hashes` in memory as received in `slot`."""
        _array_of(self.slots, slot).extend(hashes)
        ids = self.ids
        for h in hashes:
            ids[h & _MASK][h] = slot

    def _drop_old(self, now_ms: int) -> None:
        """Drop the slots wholly older than the memory window whose ids are on disk."""
        oldest = (now_ms - self.keep_ms) // self.slot_ms  # this slot holds ids still in it
        with self._pending.lock:
            pending = self._pending.minutes
            old = [s for s in self.slots if s < oldest and not pending.get(s)]
            dropped = [(s, self.slots.pop(s)) for s in old]
            if self._thread is not None:  # the index thread takes their ids out
                self._dropped += dropped
                return
        for slot, members in dropped:
            self._evict(slot, members, 0.0)

    def _take_out_dropped(self, pause_s: float) -> None:
        """Take the ids of the slots dropped from memory out of it (the index thread)."""
        with self._pending.lock:
            dropped, self._dropped = self._dropped, []
        for slot, members in dropped:
            self._evict(slot, members, pause_s)

    def _evict(self, slot: int, members: array[int], pause_s: float) -> None:
        """Take `slot`'s ids out of the map, `EVICT_CHUNK` at a time with `pause_s` after
        each chunk: a minute of ids is millions, and the lock on Python is held meanwhile."""
        ids = self.ids
        for start in range(0, len(members), EVICT_CHUNK):
            for h in members[start : start + EVICT_CHUNK]:
                shard = ids[h & _MASK]
                if shard.get(h) == slot:
                    del shard[h]
            if pause_s:
                time.sleep(pause_s)

    # --- start: memory and index from the log ---------------------------------------------

    def load(self, conn: sqlite3.Connection, now_ms: int) -> None:
        """Bring the index up to the log's end (the batches it missed: the last seconds
        before a stop, or the whole window the first time) and memory to the window."""
        self.slots.clear()
        self.ids = _shards()
        since = _since(now_ms, self.keep_ms, self.slot_ms)
        if self.index is not None:
            self._catch_up(conn, now_ms)
        first = _first_batch_at(conn, since)
        rows = conn.execute("SELECT received_ms, ids FROM batches WHERE id >= ?", (first,))
        for received_ms, ids in rows:
            if received_ms >= since:
                self._hold(received_ms // self.slot_ms, [h for (h,) in _HASH.iter_unpack(ids)])

    def _catch_up(self, conn: sqlite3.Connection, now_ms: int) -> None:
        assert self.index is not None
        try:
            index = self.index.open()
        except sqlite3.OperationalError:  # a full disk, say: not a reason to throw it away
            raise
        except sqlite3.DatabaseError as exc:  # damaged or from another version: built again
            log.warning(
                "the message-id index %s is unusable (%s): rebuilding it", self.index.path, exc
            )
            self.index.close()
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(f"{self.index.path}{suffix}")
            index = self.index.open()
        try:
            after = max(
                Index.upto(index),
                _first_batch_at(conn, _since(now_ms, DEDUP_DAYS * DAY_MS + DAY_MS, DAY_MS)) - 1,
            )
            total = 0
            while True:
                rows = conn.execute(
                    "SELECT id, received_ms, ids, events, messages FROM batches WHERE id > ?"
                    " ORDER BY id LIMIT ?",
                    (after, _CATCH_UP_BATCHES),
                ).fetchall()
                if not rows:
                    break
                Index.write(index, [_from_row(*row) for row in rows])
                after = rows[-1][0]
                total += len(rows)
                if total >= 10 * _CATCH_UP_BATCHES:
                    log.info("message-id index: %d batches written from the log", total)
            Index.prune(index, now_ms)
        finally:
            index.close()

    # --- the thread that writes the index -------------------------------------------------

    def start(self) -> None:
        if self.index is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="forewarn-dedup", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued and stop the thread."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=30)
        self._thread = None
        self._take_out_dropped(0.0)  # dropped after the thread's last pass; no request waits now
        if self.index is not None:
            self.index.close()

    def flush(self, conn: sqlite3.Connection) -> None:
        """Write the queued ids to the index now (the thread does every `FLUSH_EVERY_S`); on
        an error they stay queued, and in memory."""
        while True:
            try:
                self._waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if not self._waiting:
            return
        Index.write(conn, self._waiting)
        with self._pending.lock:
            pending = self._pending.minutes
            for e in self._waiting:
                slot = e.received_ms // self.slot_ms
                left = pending.get(slot, 0) - 1
                if left > 0:
                    pending[slot] = left
                else:
                    pending.pop(slot, None)
        self._waiting = []

    def _run(self) -> None:
        assert self.index is not None
        _yield_to_others()
        conn: sqlite3.Connection | None = None
        failing = False
        pruned_ms = clock.now_ms()
        while True:
            stopping = self._stop.wait(FLUSH_EVERY_S)
            self._take_out_dropped(EVICT_PAUSE_S)
            try:
                if conn is None:
                    conn = self.index.open()
                self.flush(conn)
                now = clock.now_ms()
                if now - pruned_ms >= PRUNE_EVERY_MS:
                    Index.prune(conn, now)
                    pruned_ms = now
            except sqlite3.Error as exc:  # a full disk, say: memory keeps the ids meanwhile
                if not failing:
                    log.warning("cannot write the message-id index (%s): retrying", exc)
                failing = True
            else:
                if failing:
                    log.warning("the message-id index is written again")
                failing = False
            if stopping:
                break
        if conn is not None:
            conn.close()


_MASK = SHARDS - 1


def _shards() -> tuple[dict[int, int], ...]:
    """The map of ids held: a dict of ints alone is not tracked by the collector, which
    visits the tuple's dicts and not what they hold."""
    return tuple({} for _ in range(SHARDS))


def _yield_to_others() -> None:
    """Lower this thread's scheduling priority (Linux: a thread's own nice value), so that
    SQLite's sorting and inserting, which it does without the lock on Python, takes the
    cores the requests and the engine leave idle rather than delaying them."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)


def _array_of(table: dict[int, array[int]], key: int) -> array[int]:
    """`table`'s array of hashes at `key`, made empty if it has none."""
    hashes = table.get(key)
    if hashes is None:
        hashes = table[key] = array("q")
    return hashes


_PIECE = 8_192  # ids encoded at a time: well under a millisecond each


def _json_array(values: array[int]) -> str:
    pieces = (_json(values[i : i + _PIECE].tolist())[1:-1] for i in range(0, len(values), _PIECE))
    return (b"[" + b",".join(pieces) + b"]").decode()


def _since(now_ms: int, keep_ms: int, slot_ms: int) -> int:
    return (now_ms - keep_ms) // slot_ms * slot_ms


def _from_row(
    batch: int, received_ms: int, ids: bytes, events: bytes | None, messages: bytes
) -> _Flush:
    """A logged batch as an index entry: its id hashes with their events' times."""
    hashes = array("q", [h for (h,) in _HASH.iter_unpack(ids)])
    logged = LogBatch(batch, received_ms, messages, events)
    rows = logged.event_rows()
    stamps: list[int] | None = None
    if rows is not None:
        stamps = [int(row[_TIME_FIELD]) for row in rows]
    else:
        with contextlib.suppress(msgspec.DecodeError, ValueError, TypeError, KeyError):
            stamps = [parse_time_ms(m["timestamp"]) for m in logged.messages]
    if stamps is None or len(stamps) != len(hashes):  # by hash alone: found whatever its time
        stamps = [received_ms] * len(hashes)
    return _Flush(batch, received_ms, hashes, array("q", stamps))


def _first_batch_at(conn: sqlite3.Connection, since_ms: int) -> int:
    """About the first batch received at `since_ms` or later, found by bisecting the ids:
    batches are appended in the order they are received, give or take a few milliseconds,
    so a margin of a thousand batches is kept."""
    low = 0
    high = int(conn.execute("SELECT coalesce(max(id), 0) FROM batches").fetchone()[0]) + 1
    while low < high:
        mid = (low + high) // 2
        row = conn.execute(
            "SELECT received_ms FROM batches WHERE id >= ? ORDER BY id LIMIT 1", (mid,)
        ).fetchone()
        if row is None or row[0] >= since_ms:
            high = mid
        else:
            low = mid + 1
    return max(0, low - 1_000)
