"""Exact message-id deduplication over `DEDUP_DAYS` days, in memory that does not grow with
them.

Clients resend a whole batch when its answer does not reach them, with the same message ids,
and the log must not take those events twice. A 64-bit hash of each id (`store_sqlite.id_hash`)
is what is compared.

- **In memory**: the hashes received in the last `MEMORY_MS`, one set per minute of receipt,
  plus any not yet written to disk.
- **On disk**: an index beside the database (`<database>-ids`, SQLite), written in bulk every
  `FLUSH_EVERY_S` by a process of its own, to which a thread of the server hands the newly
  committed ids every `SHIP_EVERY_S`. It is derived from the log, so it needs no fsync of its
  own: it records the last batch it holds and catches up from the log when it starts.
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

Why a process: a bulk write is SQLite sorting and inserting about a million ids, a second of a
core. In a thread of the server, though SQLite runs it without the lock on Python, answers
were slower all through it (up to 150-240 ms, against 50-65 without any write, at 50,000
events/s); in a process of its own it does not delay them (measured in docs/benchmarks.md).
The thread hands over raw arrays of ids, grouped as the index keys them, every second: a few
milliseconds of the server's time. The process answers with the last batch it has written;
until then memory keeps the ids, and the thread keeps them to hand to a new process if that
one dies. When the server is gone, the process writes what it holds and exits.

Memory is one map from each id held to the minute it was received in, so that asking costs
one lookup whatever the number of minutes held (a dict per minute cost one lookup per minute,
each a miss in the processor's cache: 1.9 µs an id for four minutes, against 0.3). A dict that
grows is copied whole into a table twice its size without letting another thread run (213 ms
at 2.8 million ids, in which no request is answered), so the map is spread over `SHARDS` dicts
by the ids' low bits, each small enough to grow in a few milliseconds. Shards of one size would
fill alike and grow in the same second (at 5.6 million ids, all 256 within about a second:
100 ms more work in it, and at 50,000 events/s a queue of answers up to 330 ms late), so the
shards take shares of the `BUCKETS` low-bit values that grow by a constant factor from one to
the next, from 1 to 2: their sizes spread over a doubling, they grow a few at a time, at any
number of ids. Each minute also keeps its ids in an array; when the minute leaves memory, the
index thread takes them out of the map `EVICT_CHUNK` at a time, spending at most `EVICT_SHARE`
of the time on it per minute waiting, each chunk followed by a pause in proportion: a minute
at 50,000 events/s is 3 million ids, a second of the lock on Python. Taken out in two seconds
(chunks with 5-ms pauses), it slowed the request process, then near a whole core, below the
arrival rate, answers queueing for up to a second each minute. In chunks with `sleep(0)`
between them, 50 ms each second, the answers waiting meanwhile waited for all of them, 55-65 ms:
a thread that lets go of the lock and takes it straight back keeps it, since each take restarts
the wait after which the others ask for their turn.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import sqlite3
import struct
import threading
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
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
SHIP_EVERY_S = 1.0  # the server hands the ids committed since to the index process
STOP_WAIT_S = 30.0  # at stop, how long the server waits for the index process's last write
PRUNE_EVERY_MS = 3_600_000
# an event this far from its receipt is indexed by hash alone: its minute may be pruned first
NEAR_MS = DAY_MS
INDEX_VERSION = 1
SHARDS = 256  # dicts of the ids in memory: at 50,000 ids/s for five minutes, 59,000 each on average
BUCKETS = 16_384  # the ids' low-bit values, shared out among the shards unevenly
EVICT_CHUNK = 4_096  # ids taken out of the map at a time (1-2 ms), each followed by a pause
EVICT_SHARE = 0.05  # of its time, the index thread's taking ids out, per minute waiting (<= 1/2)
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


@dataclass(slots=True)
class _Grouped:
    """Ids as the index keys them: by the minute of their event's time, or by hash alone with
    the day of their receipt; `upto`, the last batch they come from."""

    at: dict[int, array[int]] = field(default_factory=dict)
    only: dict[int, array[int]] = field(default_factory=dict)
    upto: int = 0

    def take(self, handed: _Handed) -> None:
        """Add what the server handed over (raw arrays of hashes)."""
        for mine, theirs in ((self.at, handed.at), (self.only, handed.only)):
            for key, raw in theirs.items():
                _array_of(mine, key).frombytes(raw)
        self.upto = max(self.upto, handed.upto)


def _group(entries: list[_Flush]) -> _Grouped:
    """Sort entries' ids out the way the index keys them. Python looks at each id only in a
    batch whose events span two minutes or lie far from its receipt: a batch whose events all
    lie in one minute near it is sorted out whole."""
    grouped = _Grouped()
    by_minute, only = grouped.at, grouped.only
    for e in entries:
        grouped.upto = max(grouped.upto, e.batch)
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
                _array_of(only, received // DAY_MS).append(h)
            else:
                _array_of(by_minute, stamp // MINUTE_MS).append(h)
    return grouped


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
        """Add entries in one transaction and move `upto` to the last of their batches."""
        Index.write_grouped(conn, _group(entries))

    @staticmethod
    def write_grouped(conn: sqlite3.Connection, grouped: _Grouped) -> None:
        """Add grouped ids in one transaction and move `upto` to their last batch. The hashes
        go in one statement per minute (and per day for those kept by hash alone), as a JSON
        array that SQLite reads and sorts itself: the B-tree filled in order, and the lock on
        Python released while it is (the array is encoded in pieces, between which other
        threads run)."""
        with transaction(conn):
            for minute in sorted(grouped.at):
                conn.execute(
                    "INSERT OR IGNORE INTO ids_at SELECT ?, value FROM json_each(?) ORDER BY value",
                    (minute, _json_array(grouped.at[minute])),
                )
            for day in sorted(grouped.only):
                conn.execute(
                    "INSERT OR IGNORE INTO ids_only SELECT value, ? FROM json_each(?)"
                    " ORDER BY value",
                    (day, _json_array(grouped.only[day])),
                )
            if grouped.upto:
                conn.execute(
                    "INSERT INTO upto VALUES (1, ?) ON CONFLICT (one) DO UPDATE"
                    " SET batch = max(batch, excluded.batch)",
                    (grouped.upto,),
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
        self.shards, self.ids = _shards()
        # slot -> the ids received in it, to take out of `ids` when the slot is dropped
        self.slots: dict[int, array[int]] = {}
        self._dropped: list[tuple[int, array[int]]] = []  # for the index thread to take out
        self._leaving: list[_Leaving] = []  # the index thread's: being taken out
        self._pending = _Pending()
        self._queue: queue.SimpleQueue[_Flush] = queue.SimpleQueue()
        self._waiting: list[_Flush] = []  # taken from the queue, not yet written
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: _IndexProcess | None = None  # started with the first ids to write
        self._shipped: list[_Shipped] = []  # handed to the process, not yet written by it
        self.disk_lookups = 0  # how many ids memory could not settle

    # --- the writer's side: one thread asks and adds --------------------------------------

    def __contains__(self, h: int) -> bool:
        """Whether `h` is in memory (an id of a dropped slot may still be: it was seen)."""
        return h in self.ids[h & _MASK]

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)

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
            _take_out(self.ids, slot, members)

    def _take_out_dropped(self) -> None:
        """Take the ids of the slots dropped from memory out of it, all of them now (at stop,
        when no request waits)."""
        self._take_leaving()
        while self._leaving:
            self._take_out_chunk()

    def _take_out_paced(self, seconds: float) -> bool:
        """For `seconds` (the index thread), take the ids of the slots dropped from memory
        out of it `EVICT_CHUNK` at a time, spending at most `EVICT_SHARE` of the time per
        slot waiting (at most half), pausing after each chunk in proportion, so that the
        chunks are spread through the second. Whether the thread was told to stop."""
        deadline = time.monotonic() + seconds
        while True:
            self._take_leaving()
            left = deadline - time.monotonic()
            if not self._leaving or left <= 0:
                return self._stop.wait(max(left, 0.0))
            share = min(EVICT_SHARE * len(self._leaving), 0.5)
            pause = self._take_out_chunk() * (1 - share) / share
            if self._stop.wait(min(pause, max(deadline - time.monotonic(), 0.0))):
                return True

    def _take_leaving(self) -> None:
        with self._pending.lock:
            self._leaving += (_Leaving(slot, members) for slot, members in self._dropped)
            self._dropped = []

    def _take_out_chunk(self) -> float:
        """Take the next `EVICT_CHUNK` ids leaving out of the map; how long that took."""
        start = time.perf_counter()
        first = self._leaving[0]
        end = first.at + EVICT_CHUNK
        _take_out(self.ids, first.slot, first.members[first.at : end])
        first.at = end
        if end >= len(first.members):
            self._leaving.pop(0)
        return time.perf_counter() - start

    # --- start: memory and index from the log ---------------------------------------------

    def load(self, conn: sqlite3.Connection, now_ms: int) -> None:
        """Bring the index up to the log's end (the batches it missed: the last seconds
        before a stop, or the whole window the first time) and memory to the window."""
        self.slots.clear()
        self.shards, self.ids = _shards()
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
        """Have what is queued written and stop the thread and the index process."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=STOP_WAIT_S + 10)
        self._thread = None
        self._take_out_dropped()  # what the thread left
        if self.index is not None:
            self.index.close()

    def flush(self, conn: sqlite3.Connection) -> None:
        """Write the queued ids to the index now, in this process (the thread has the index
        process do it); on an error they stay queued, and in memory."""
        self._waiting += self._take_queued()
        if not self._waiting:
            return
        Index.write(conn, self._waiting)
        self._written(_slots_of(self._waiting, self.slot_ms))
        self._waiting = []

    def _take_queued(self) -> list[_Flush]:
        taken: list[_Flush] = []
        while True:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                return taken

    def _written(self, slots: dict[int, int]) -> None:
        """So many entries of each slot are on disk: once all of a slot's are, it may leave
        memory."""
        with self._pending.lock:
            pending = self._pending.minutes
            for slot, entries in slots.items():
                left = pending.get(slot, 0) - entries
                if left > 0:
                    pending[slot] = left
                else:
                    pending.pop(slot, None)

    def _run(self) -> None:
        assert self.index is not None
        while True:
            stopping = self._take_out_paced(SHIP_EVERY_S)
            self._ship(stopping)
            if stopping:
                break

    def _ship(self, stopping: bool) -> None:
        """Hand the ids committed since the last call to the index process, and let memory
        drop those it has written. A process that died is replaced, and handed again what it
        had not written. At stop, wait for it to write everything and exit."""
        assert self.index is not None
        entries = self._take_queued()
        fresh: list[_Shipped] = []
        if entries:
            grouped = _group(entries)
            fresh.append(_Shipped(grouped.upto, _handed(grouped), _slots_of(entries, self.slot_ms)))
            self._shipped += fresh
        process = self._process
        if process is not None and not process.alive():
            log.warning(
                "the message-id index process exited (%s): starting another",
                process.exitcode(),
            )
            process = self._process = None
        if process is None:
            if not self._shipped:
                return
            try:
                process = self._process = _IndexProcess(self.index.path)
            except OSError as exc:  # out of processes, say: memory keeps the ids meanwhile
                log.warning("cannot start the message-id index process (%s): retrying", exc)
                return
            fresh = self._shipped
        try:
            for shipped in fresh:
                process.hand(shipped.handed)
            if stopping:
                process.hand(_STOP)
        except OSError:  # it died: the next call starts another and hands all of it again
            return
        want = self._shipped[-1].upto if self._shipped else 0
        written = process.written(STOP_WAIT_S if stopping else 0.0, want)
        done = 0
        while done < len(self._shipped) and self._shipped[done].upto <= written:
            self._written(self._shipped[done].slots)
            done += 1
        del self._shipped[:done]
        if stopping:
            process.join()
            self._process = None


@dataclass(slots=True)
class _Shipped:
    """Ids handed to the index process at once, as handed (bytes, which the cycle collector
    does not visit: the entries they come from would be 45,000 objects for it at 50,000
    events/s), with the last batch they come from and how many entries of each slot."""

    upto: int
    handed: bytes
    slots: dict[int, int]


def _slots_of(entries: list[_Flush], slot_ms: int) -> dict[int, int]:
    slots: dict[int, int] = {}
    for e in entries:
        slot = e.received_ms // slot_ms
        slots[slot] = slots.get(slot, 0) + 1
    return slots


# --- the index process --------------------------------------------------------------------


class _Handed(msgspec.Struct, array_like=True):
    """What the server hands the index process: the ids of some batches as raw arrays of
    hashes ("q"), keyed as the index keys them; `stop`: write now and exit."""

    upto: int
    at: dict[int, bytes]
    only: dict[int, bytes]
    stop: bool = False


_hand_encode = msgspec.msgpack.Encoder().encode
_hand_decode = msgspec.msgpack.Decoder(_Handed).decode
_STOP = _hand_encode(_Handed(0, {}, {}, stop=True))


def _handed(grouped: _Grouped) -> bytes:
    return _hand_encode(
        _Handed(
            grouped.upto,
            {k: v.tobytes() for k, v in grouped.at.items()},
            {k: v.tobytes() for k, v in grouped.only.items()},
        )
    )


_WRITTEN = struct.Struct("<q")


class _IndexProcess:
    """The server's side of the index process: hands it ids, hears what it has written."""

    def __init__(self, path: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_index_main,
            args=(str(path), child, FLUSH_EVERY_S, PRUNE_EVERY_MS),
            name="forewarn-ids",
            daemon=True,  # gone with the server, should it exit without stopping it
        )
        try:
            self._process.start()
        finally:
            child.close()
        self._written = 0

    def alive(self) -> bool:
        return self._process.is_alive()

    def exitcode(self) -> int | None:
        return self._process.exitcode

    def hand(self, handed: bytes) -> None:
        self._pipe.send_bytes(handed)

    def written(self, wait_s: float, want: int) -> int:
        """The last batch the process has written; waits up to `wait_s` for it to reach
        `want`."""
        deadline = time.monotonic() + wait_s
        try:
            while self._pipe.poll(
                0 if self._written >= want else max(0.0, deadline - time.monotonic())
            ):
                (self._written,) = _WRITTEN.unpack(self._pipe.recv_bytes())
        except (EOFError, OSError):
            pass  # it exited: what it wrote last is known
        return self._written

    def join(self) -> None:
        self._pipe.close()
        self._process.join(timeout=STOP_WAIT_S)
        if self._process.is_alive():
            self._process.kill()


def _index_main(path: str, pipe: Connection, flush_every_s: float, prune_every_ms: int) -> None:
    """The index process: take what the server hands over, write it every `flush_every_s`
    (or when asked), answer with the last batch written, prune hourly. When the server is
    gone (its end of the pipe closed), write what is held and exit."""
    logging.basicConfig(level=logging.WARNING)
    _idle_priority()
    index = Index(path)
    held = _Grouped()
    written = 0
    conn: sqlite3.Connection | None = None
    failing = False
    due = time.monotonic() + flush_every_s
    pruned_ms = clock.now_ms()
    stop = False
    while not stop:
        try:
            if pipe.poll(max(0.0, due - time.monotonic())):
                handed = _hand_decode(pipe.recv_bytes())
                held.take(handed)
                stop = handed.stop
                if not stop and time.monotonic() < due:
                    continue
        except (EOFError, OSError):
            stop = True  # the server is gone
        due = time.monotonic() + flush_every_s
        try:
            if conn is None:
                conn = index.open()
            if held.upto > written:
                Index.write_grouped(conn, held)
                written, held = held.upto, _Grouped(upto=held.upto)
            now = clock.now_ms()
            if now - pruned_ms >= prune_every_ms:
                Index.prune(conn, now)
                pruned_ms = now
        except sqlite3.Error as exc:  # a full disk, say: what is held is written next time
            if not failing:
                log.warning("cannot write the message-id index (%s): retrying", exc)
            failing = True
        else:
            if failing:
                log.warning("the message-id index is written again")
            failing = False
        with contextlib.suppress(OSError):
            pipe.send_bytes(_WRITTEN.pack(written))
    if conn is not None:
        conn.close()


def _idle_priority() -> None:
    """Run only on a core nothing else wants (Linux: `SCHED_IDLE`; elsewhere a high nice
    value): a bulk write is a second of CPU, which at nice 10 still slowed the answers."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)


_MASK = BUCKETS - 1


def _shards() -> tuple[list[dict[int, int]], tuple[dict[int, int], ...]]:
    """The map of ids held: its `SHARDS` dicts, and the dict of each of the `BUCKETS` low-bit
    values. Shard i takes a run of buckets in proportion to 2 ** (i / SHARDS), so that no two
    shards are the same size for long. A dict of ints alone is not tracked by the collector,
    which visits the tuple's dicts and not what they hold."""
    shards: list[dict[int, int]] = [{} for _ in range(SHARDS)]
    weights = [2 ** (i / SHARDS) for i in range(SHARDS)]
    total = sum(weights)
    by_bucket: list[dict[int, int]] = []
    edge = 0.0
    for shard, weight in zip(shards, weights, strict=True):
        edge += weight
        by_bucket += [shard] * (round(edge / total * BUCKETS) - len(by_bucket))
    return shards, tuple(by_bucket)


@dataclass
class _Leaving:
    """A slot dropped from memory, its ids taken out of the map up to `at`."""

    slot: int
    members: array[int]
    at: int = 0


def _take_out(ids: tuple[dict[int, int], ...], slot: int, members: array[int]) -> None:
    """Take `members` out of the map, those it still holds as received in `slot`."""
    for h in members:
        shard = ids[h & _MASK]
        if shard.get(h) == slot:
            del shard[h]


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
