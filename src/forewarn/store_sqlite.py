"""The embedded store: one SQLite file in WAL mode with `synchronous=FULL`.

What it keeps:

- `workspaces` and their `keys`: a write key (ingest only) and admin keys, stored as SHA-256
  hashes (keys are 192 random bits, so a fast hash is enough) with a short prefix to recognise
  them by; a key is shown once, when created.
- `batches`: the event log. One row per accepted request holds its accepted messages, already
  normalised to Segment-spec JSON; the row id is the log position the engine reads by.
- each batch also keeps its events as the engine reads them (`EVENTS_FORMAT`), five times
  cheaper to read back than the messages, and a 64-bit hash of each of its message ids.
  Messages and events are stored compressed (zstd, level 1: about 60 µs for a batch of 100
  events, a seventh of their size): at 50,000 events a second, writing them as they are was
  about 25 MB a second to the database and twice that to its WAL, and the disk's slowing
  fsyncs made the slowest answers. Batches stored uncompressed by earlier versions are read
  as they are.
  `dedup.SeenIds` tells from them whether a message id was seen in the last `DEDUP_DAYS` days,
  so a client resending a batch after a timeout adds nothing.
- `firings`: what the engine fired and the policy decided, with its evidence.
- the outreach (`store_outbox`): the `outbox` the delivery workers drain, consent, bounced
  addresses, suppressions, the in-app inbox (and chat openers), push subscriptions.
- `engine`: per workspace, how far the engine has read the log (`cursor`), its clock, and the
  latest snapshot of its state; `ticks`: the steps it took since (see `live`).

Every connection is opened by `connect`; each thread or process opens its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import sqlite3
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import zstandard

from forewarn import audit, schema
from forewarn.errors import ForewarnError, InputError
from forewarn.forgotten import Forgotten, among
from forewarn.model import Event

if TYPE_CHECKING:
    from forewarn.dedup import SeenIds

SCHEMA_VERSION = schema.VERSION
KEY_KINDS = ("write", "admin")
_KEY_PREFIX = {"write": "fw_wk_", "admin": "fw_ak_"}
_IN_CHUNK = 500  # message ids per `IN (...)` query


class StoreError(ForewarnError):
    """The database cannot be used (locked, full, damaged, or from a newer version)."""

    status = 503
    code = "unavailable"


class StoreFullError(StoreError):
    """The disk under the database is full."""

    status = 507
    code = "storage_full"


def unavailable(exc: sqlite3.Error) -> StoreError:
    """What to tell a client whose write or read failed in SQLite: nothing of it was stored."""
    text = str(exc)
    if "full" in text or getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return StoreFullError("the disk is full: nothing was stored; retry when space is freed")
    return StoreError(f"the database is unavailable ({text}); nothing was stored, retry")


ENV_KEY_NAME = "from the environment"  # the name of keys made from FOREWARN_*_KEY
NO_CHECKPOINT = 100_000  # pages: a connection that leaves checkpoints to the checkpointer


def connect(path: str | Path, checkpoint_pages: int | None = None) -> sqlite3.Connection:
    """A connection with the settings every user of the store relies on; migrates the schema.
    `checkpoint_pages`: the WAL size at which this connection's commits copy it back into the
    database (SQLite's default is 1,000 pages, 4 MiB). The server's writer and engine set
    `NO_CHECKPOINT` and leave the copying to a thread of its own, off the paths that answer
    requests and record firings."""
    try:
        conn = sqlite3.connect(str(path), timeout=10.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise InputError(f"cannot open database {path}: {exc}") from None
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a 2xx means the batch survives a power cut
    conn.execute("PRAGMA foreign_keys=ON")
    # what is deleted (a forgotten person, a purge) is overwritten in the file, not just unlinked
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    if checkpoint_pages is not None:
        conn.execute(f"PRAGMA wal_autocheckpoint={int(checkpoint_pages)}")
    migrate(conn)
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations this file has and the database lacks; returns the version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the database is at schema version {version}, newer than this Forewarn "
            f"({SCHEMA_VERSION}): upgrade Forewarn"
        )
    for step in range(version + 1, SCHEMA_VERSION + 1):
        with transaction(conn):
            if conn.execute("PRAGMA user_version").fetchone()[0] < step:  # not raced to it
                for statement in schema.statements(step, "sqlite"):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={step}")
    return SCHEMA_VERSION


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any error; inside a transaction already open,
    it is that transaction's part (the caller commits)."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# --- workspaces and keys ------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    workspace: int
    kind: str
    prefix: str


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_key_token(kind: str) -> str:
    return _KEY_PREFIX[kind] + secrets.token_urlsafe(24)


def keys_to_make(write_key: str | None, admin_key: str | None) -> tuple[str, str, list[str]]:
    """A new workspace's keys: those given, and new ones for those not, each new one with a
    line showing it (once: call this only where the lines go to a terminal, since printed
    into a service's log a key would be kept there in plain text)."""
    created: list[str] = []
    if not write_key:
        write_key = new_key_token("write")
        created.append(f"write key: {write_key}")
    if not admin_key:
        admin_key = new_key_token("admin")
        created.append(f"admin key: {admin_key}")
    return write_key, admin_key, created


def create_workspace(conn: sqlite3.Connection, name: str, now_ms: int) -> int:
    try:
        cur = conn.execute(
            "INSERT INTO workspaces (name, created_ms) VALUES (?, ?)", (name, now_ms)
        )
    except sqlite3.IntegrityError:
        raise InputError(f"workspace '{name}' exists already: pick another name") from None
    return int(cur.lastrowid or 0)


def workspace_id(conn: sqlite3.Connection, name: str) -> int | None:
    row = conn.execute("SELECT id FROM workspaces WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else None


def workspaces(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    return [(int(i), str(n)) for i, n in conn.execute("SELECT id, name FROM workspaces")]


def add_key(
    conn: sqlite3.Connection,
    workspace: int,
    kind: str,
    now_ms: int,
    token: str | None = None,
    name: str = "",
    actor: str = "cli",
) -> str:
    """Store a key (a new random one unless `token` is given); returns the token, which is not
    kept anywhere: only its hash is. The audit log records who (`actor`) created it."""
    if kind not in KEY_KINDS:
        raise InputError(f"unknown key kind '{kind}': use one of {', '.join(KEY_KINDS)}")
    token = token or new_key_token(kind)
    if len(token) < 16:
        raise InputError("a key must be at least 16 characters long: use a random one")
    try:
        with transaction(conn):
            conn.execute(
                "INSERT INTO keys (workspace, kind, prefix, hash, name, created_ms)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (workspace, kind, token[:10], hash_key(token), name, now_ms),
            )
            detail = {"kind": kind, "name": name}
            audit.record(conn, workspace, actor, "key.created", token[:10], now_ms, detail)
    except sqlite3.IntegrityError:
        raise InputError("that key is in use already: create a new one") from None
    return token


def find_key(conn: sqlite3.Connection, token: str) -> Key | None:
    row = conn.execute(
        "SELECT workspace, kind, prefix FROM keys WHERE hash = ? AND revoked_ms IS NULL",
        (hash_key(token),),
    ).fetchone()
    return Key(int(row[0]), str(row[1]), str(row[2])) if row else None


def ensure_workspace(
    conn: sqlite3.Connection,
    name: str,
    now_ms: int,
    write_key: str | None = None,
    admin_key: str | None = None,
) -> int:
    """The workspace called `name`, created if missing; the given keys are added to it unless
    they are already known (a restart with the same environment changes nothing)."""
    with transaction(conn):
        ws = workspace_id(conn, name)
        if ws is None:
            ws = create_workspace(conn, name, now_ms)
        for kind, token in (("write", write_key), ("admin", admin_key)):
            if token:
                known = find_key(conn, token)
                if known is None:
                    add_key(conn, ws, kind, now_ms, token, ENV_KEY_NAME, "environment")
                elif known.kind != kind or known.workspace != ws:
                    raise InputError(
                        f"the {kind} key from the environment is already a {known.kind} key "
                        "of another workspace: give each key one use"
                    )
    return ws


# --- the event log ------------------------------------------------------------------------


@dataclass
class Append:
    """One request's messages for the log: `ids` are their message ids, in order."""

    workspace: int
    source: str
    received_ms: int
    messages: list[dict[str, Any]]
    ids: list[str]
    events: list[Any] | None = None  # the messages as events, handed to the engine after
    # made by `prepare`, before the writer's turn: the ids' hashes, and the whole request's
    # events packed and messages encoded (as stored when all of them are kept, the usual case)
    hashes: list[int] | None = None
    blobs: tuple[bytes | None, bytes] | None = None


def prepare(a: Append) -> Append:
    """Do for `a` what needs no database, before it waits for the writer: the writer's turn,
    which everything written waits for, then only checks ids and inserts."""
    a.hashes = [id_hash(a.workspace, mid) for mid in a.ids]
    a.blobs = (_packed(a.events), encode_messages(a.messages))
    return a


def _packed(events: list[Any] | None) -> bytes | None:
    if events is None:
        return None
    return pack_rows([msgspec.structs.astuple(e) for e in events])


def compressed(data: bytes) -> bytes:
    """`data` as stored compressed (zstd, level 1)."""
    return _zstd().compress(data)


def uncompressed(raw: bytes) -> bytes:
    """What `compressed` made, as it was; anything else (as older versions stored it) as is."""
    return _unzstd().decompress(raw) if raw[:4] == _ZSTD_MAGIC else raw


def encode_messages(messages: list[dict[str, Any]]) -> bytes:
    """Messages as stored: their JSON array, compressed."""
    return compressed(_encode(messages))


def decode_messages(raw: bytes) -> list[dict[str, Any]]:
    """Stored messages back as dicts."""
    return _decode_messages(uncompressed(raw))


def pack_rows(rows: list[tuple[Any, ...]]) -> bytes:
    """Events' field tuples as stored."""
    return EVENTS_FORMAT + compressed(_pack(rows))


def event_rows(raw: bytes | None) -> list[tuple[Any, ...]] | None:
    """Stored events' field tuples; None if the batch has none in a format this version
    reads (its messages are read instead)."""
    if raw is None:
        return None
    if raw[:1] == EVENTS_FORMAT:
        return _unpack_rows(_unzstd().decompress(raw[1:]))
    if raw[:1] == EVENTS_FORMAT_PLAIN:
        return _unpack_rows(raw[1:])
    return None


_codecs = threading.local()  # zstd contexts are not to be shared between threads


def _zstd() -> zstandard.ZstdCompressor:
    try:
        return _codecs.compressor  # type: ignore[no-any-return]
    except AttributeError:
        _codecs.compressor = zstandard.ZstdCompressor(level=1)
        return _codecs.compressor  # type: ignore[no-any-return]


def _unzstd() -> zstandard.ZstdDecompressor:
    try:
        return _codecs.decompressor  # type: ignore[no-any-return]
    except AttributeError:
        _codecs.decompressor = zstandard.ZstdDecompressor()
        return _codecs.decompressor  # type: ignore[no-any-return]


@dataclass
class Appended:
    batch: int | None  # the log position, None when every message was a duplicate
    stored: int
    duplicates: list[int]  # indexes into the request's messages
    kept: list[int] | None = None  # indexes stored, when some were not
    forgotten: list[int] = field(default_factory=list)  # indexes of forgotten people's events


_encode = msgspec.json.Encoder().encode
_pack = msgspec.msgpack.Encoder().encode
_unpack_rows = msgspec.msgpack.Decoder(list[tuple[Any, ...]]).decode
# A batch's events, each as the tuple of `model.Event`'s fields, msgpack, compressed, after this
# byte (after `EVENTS_FORMAT_PLAIN`, as older versions stored them: not compressed; PostgreSQL
# keeps each event so, one per row). Change the bytes when those fields change: a batch written
# in another format is read from its messages.
EVENTS_FORMAT = b"\x02"
EVENTS_FORMAT_PLAIN = b"\x01"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd frame starts with it; JSON and msgpack do not
DAY_MS = 86_400_000
_HASH = struct.Struct("<q")


_SALTED: dict[int, Any] = {}  # workspace -> its BLAKE2b, salted, to copy for each id


def id_hash(workspace: int, message_id: str) -> int:
    """64 bits of BLAKE2b of the workspace and message id. Two different ids share a hash
    with a chance of about one in 10**11 among a week of 35 million events. (Copying a hash
    made once per workspace costs 0.6 µs an id, making one 1.1 µs.)"""
    salted = _SALTED.get(workspace)
    if salted is None:
        salted = _SALTED[workspace] = hashlib.blake2b(digest_size=8, salt=_HASH.pack(workspace))
    digest = salted.copy()
    digest.update(message_id.encode())
    return int(_HASH.unpack(digest.digest())[0])


def log_end_all(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(id), 0) FROM batches").fetchone()[0])


def append_batches(
    conn: sqlite3.Connection,
    appends: Sequence[Append],
    seen: SeenIds,
    forgotten: Forgotten | None = None,
) -> list[Appended]:
    """Store several requests in one transaction (one fsync); a message id already seen in
    its workspace, in this request or an earlier one, is not stored again, nor an event of a
    person the workspace has forgotten. `seen` learns the new ids only once they are
    committed."""
    results: list[Appended] = []
    added: list[tuple[int, int, list[int], list[int]]] = []
    fresh: set[int] = set()  # ids of this transaction
    forgotten = forgotten or Forgotten()
    with transaction(conn):
        forgotten.refresh(conn)  # inside: a person forgotten before this commit is refused
        for a in appends:
            result, hashes, stamps = _append(conn, a, seen, fresh, forgotten)
            results.append(result)
            if result.batch is not None:
                added.append((a.received_ms, result.batch, hashes, stamps))
    for received_ms, batch, hashes, stamps in added:
        seen.add(received_ms, hashes, stamps, batch)
    return results


def append_within(conn: sqlite3.Connection, a: Append) -> Appended:
    """Store one batch inside the caller's transaction, its message ids trusted to be new
    (events Forewarn makes itself, each with an id of its own); those about a forgotten
    person are left out."""
    return _append(conn, a, None, set(), among(conn, a.workspace, a.messages))[0]


def _append(
    conn: sqlite3.Connection,
    a: Append,
    seen: SeenIds | None,
    fresh: set[int],
    forgotten: Forgotten,
) -> tuple[Appended, list[int], list[int]]:
    """One request's messages into the log; also returns the hashes of the ids stored and
    their events' times, for `seen` to learn once committed."""
    keep: list[dict[str, Any]] = []
    hashes: list[int] = []
    stamps: list[int] = []
    duplicates: list[int] = []
    refused: list[int] = []
    kept: list[int] = []
    check = bool(forgotten.hashes.get(a.workspace))
    received = a.received_ms
    events = a.events
    ws = a.workspace
    every = a.hashes if a.hashes is not None else [id_hash(ws, mid) for mid in a.ids]
    for i, (message, h) in enumerate(zip(a.messages, every, strict=True)):
        if check and forgotten.holds(ws, message):
            refused.append(i)
            continue
        # an event Forewarn made itself has no event to time it by: its receipt does
        stamp = events[i].timestamp_ms if events is not None else received
        if h in fresh or (seen is not None and seen.seen(h, received, stamp, "sentAt" in message)):
            duplicates.append(i)
            continue
        fresh.add(h)
        keep.append(message)
        kept.append(i)
        hashes.append(h)
        stamps.append(stamp)
    whole = len(kept) == len(a.messages)
    if not keep:
        return Appended(None, 0, duplicates, forgotten=refused), hashes, stamps
    if whole and a.blobs is not None:
        packed, encoded = a.blobs
    else:
        packed = _packed(events if whole or events is None else [events[i] for i in kept])
        encoded = encode_messages(keep)
    cur = conn.execute(
        "INSERT INTO batches (workspace, received_ms, source, count, ids, events, messages)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            a.workspace,
            a.received_ms,
            a.source,
            len(keep),
            struct.pack(f"<{len(hashes)}q", *hashes),
            packed,
            encoded,
        ),
    )
    batch = int(cur.lastrowid or 0)
    appended = Appended(batch, len(keep), duplicates, None if whole else kept, refused)
    return appended, hashes, stamps


@dataclass
class LogBatch:
    id: int
    received_ms: int
    raw_messages: bytes
    raw_events: bytes | None = None

    @property
    def messages(self) -> list[dict[str, Any]]:
        return decode_messages(self.raw_messages)

    def event_rows(self) -> list[tuple[Any, ...]] | None:
        """The events' field tuples, if the batch has them in a format this version reads."""
        return event_rows(self.raw_events)


_decode_messages = msgspec.json.Decoder(list[dict[str, Any]]).decode


def read_log(conn: sqlite3.Connection, workspace: int, after: int, limit: int) -> list[LogBatch]:
    rows = conn.execute(
        "SELECT id, received_ms, messages, events FROM batches WHERE workspace = ? AND id > ?"
        " ORDER BY id LIMIT ?",
        (workspace, after, limit),
    ).fetchall()
    return [LogBatch(int(i), int(r), m, e) for i, r, m, e in rows]


def recent_events(
    conn: sqlite3.Connection, workspace: int, subject: str, limit: int, scan: int = 2_000
) -> list[dict[str, Any]]:
    """The subject's latest messages (as user, anonymous id or account), newest first. The
    batches holding them come from the engine's subject index; the batches the index does not
    cover yet (committed after the engine's last step, or logged before the index existed) are
    looked through, at most `scan` of each."""
    row = conn.execute(
        "SELECT since_batch, (SELECT cursor FROM engine WHERE workspace = ?)"
        " FROM subject_index WHERE workspace = ?",
        (workspace, workspace),
    ).fetchone()
    since, cursor = (row[0], row[1] or 0) if row else (None, 0)
    found: list[dict[str, Any]] = []
    looked: set[int] = set()  # a batch both unindexed and not yet stepped is looked at once

    def look(batches: Iterable[tuple[int, bytes]]) -> bool:
        for batch, blob in batches:
            if batch in looked:
                continue
            looked.add(batch)
            for message in reversed(decode_messages(blob)):
                if subject in _subjects_of(message):
                    found.append(message)
                    if len(found) >= limit:
                        return True
        return False

    if since is None:  # no index yet: the latest part of the log
        look(
            conn.execute(
                "SELECT id, messages FROM batches WHERE workspace = ? ORDER BY id DESC LIMIT ?",
                (workspace, scan),
            )
        )
        return found
    done = look(
        conn.execute(
            "SELECT id, messages FROM batches WHERE workspace = ? AND id > ?"
            " ORDER BY id DESC LIMIT ?",
            (workspace, cursor, scan),
        )
    ) or look(
        conn.execute(
            "SELECT b.id, b.messages FROM subject_batches s JOIN batches b"
            f" ON b.id BETWEEN s.batch * {SUBJECT_BLOCK} AND s.batch * {SUBJECT_BLOCK} + "
            f"{SUBJECT_BLOCK - 1} AND b.workspace = s.workspace AND b.id <= ?"
            " WHERE s.workspace = ? AND s.subject = ? ORDER BY b.id DESC LIMIT ?",
            (cursor, workspace, subject, limit * SUBJECT_BLOCK),
        )
    )
    if not done and since > 1:
        look(
            conn.execute(
                "SELECT id, messages FROM batches WHERE workspace = ? AND id < ?"
                " ORDER BY id DESC LIMIT ?",
                (workspace, since, scan),
            )
        )
    return found


def _subjects_of(message: dict[str, Any]) -> tuple[Any, ...]:
    context = message.get("context")
    account = context.get("groupId") if isinstance(context, dict) else None
    return (message.get("userId"), message.get("anonymousId"), message.get("groupId"), account)


SUBJECT_BLOCK = 16  # batches per entry of the subject index


class SubjectIndex:
    """Which blocks of `SUBJECT_BLOCK` batches hold each subject's events, written inside the
    engine step that applied them; a subject is recorded once per block (remembered here for
    the block being filled), so a customer active all day costs one row per block, not one per
    event. The first block recorded for a workspace marks where the index starts."""

    def __init__(self, workspace: int) -> None:
        self.workspace = workspace
        self._block = -1
        self._recorded: set[str] = set()

    def record(self, conn: sqlite3.Connection, batches: Iterable[tuple[int, list[Event]]]) -> None:
        rows: list[tuple[int, str, int]] = []
        recorded, ws = self._recorded, self.workspace
        for batch, events in batches:
            block = batch // SUBJECT_BLOCK
            if block != self._block:
                self._block, recorded = block, set()
                self._recorded = recorded
            for e in events:
                for subject in (e.user_id, e.anonymous_id, e.account_id):
                    if subject is not None and subject not in recorded:
                        recorded.add(subject)
                        rows.append((ws, subject, block))
        if not rows:
            return
        conn.executemany("INSERT OR IGNORE INTO subject_batches VALUES (?, ?, ?)", rows)
        start = rows[0][2] * SUBJECT_BLOCK
        conn.execute("INSERT OR IGNORE INTO subject_index VALUES (?, ?)", (ws, start))

    def forget(self) -> None:
        """After a step that was not committed: what was remembered may not be stored."""
        self._block, self._recorded = -1, set()


def log_end(conn: sqlite3.Connection, workspace: int) -> int:
    row = conn.execute("SELECT max(id) FROM batches WHERE workspace = ?", (workspace,)).fetchone()
    return int(row[0] or 0)


def count_events(conn: sqlite3.Connection, workspace: int) -> int:
    row = conn.execute(
        "SELECT coalesce(sum(count), 0) FROM batches WHERE workspace = ?", (workspace,)
    ).fetchone()
    return int(row[0])


# --- the engine's progress ----------------------------------------------------------------


@dataclass
class EngineRow:
    cursor: int
    clock_ms: int | None
    tick: int
    snapshot: bytes | None
    snapshot_tick: int
    playbooks: str


def load_engine(conn: sqlite3.Connection, workspace: int) -> EngineRow | None:
    row = conn.execute(
        "SELECT e.cursor, e.clock_ms, e.tick, s.snapshot, e.snapshot_tick, e.playbooks"
        " FROM engine e LEFT JOIN engine_snapshots s ON s.workspace = e.workspace"
        " WHERE e.workspace = ?",
        (workspace,),
    ).fetchone()
    if row is None:
        return None
    return EngineRow(int(row[0]), row[1], int(row[2]), row[3], int(row[4]), str(row[5]))


def ticks_after(conn: sqlite3.Connection, workspace: int, tick: int) -> list[tuple[int, int, int]]:
    """(tick, cursor, clock_ms) of every step after `tick`, in order."""
    return [
        (int(t), int(c), int(k))
        for t, c, k in conn.execute(
            "SELECT tick, cursor, clock_ms FROM ticks WHERE workspace = ? AND tick > ?"
            " ORDER BY tick",
            (workspace, tick),
        )
    ]


FIRING_COLUMNS = "trig, subject, scope, at_ms, evidence, decision, reason, channel, send_at_ms"
FiringRow = tuple[str, str, str, int, str, str, str | None, str, int | None]


def commit_step(
    conn: sqlite3.Connection,
    workspace: int,
    tick: int,
    cursor: int,
    clock_ms: int,
    firings: Iterable[FiringRow],
    playbooks: str,
    snapshot: bytes | None = None,
    recorded_ms: int | None = None,
    then: Callable[[sqlite3.Connection, list[int]], None] | None = None,
) -> list[int]:
    """One engine step, atomically: its firings, how far it read, and its clock; with a
    snapshot of the state when one is given (older ticks are then no longer needed); and
    whatever `then` writes, given the new firings' ids (the outbox rows). Returns the ids."""
    with transaction(conn):
        insert = (
            f"INSERT INTO firings (workspace, {FIRING_COLUMNS}, cursor, recorded_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        ids = [
            int(conn.execute(insert, (workspace, *f, cursor, recorded_ms)).lastrowid or 0)
            for f in firings
        ]
        conn.execute(
            "INSERT INTO ticks (workspace, tick, cursor, clock_ms) VALUES (?, ?, ?, ?)",
            (workspace, tick, cursor, clock_ms),
        )
        if snapshot is not None:
            conn.execute(
                "INSERT INTO engine (workspace, cursor, clock_ms, tick, snapshot, snapshot_tick,"
                " playbooks) VALUES (?, ?, ?, ?, NULL, ?, ?) ON CONFLICT (workspace) DO UPDATE SET"
                " cursor = excluded.cursor, clock_ms = excluded.clock_ms, tick = excluded.tick,"
                " snapshot_tick = excluded.snapshot_tick, playbooks = excluded.playbooks",
                (workspace, cursor, clock_ms, tick, tick, playbooks),
            )
            conn.execute(
                "INSERT OR REPLACE INTO engine_snapshots (workspace, snapshot) VALUES (?, ?)",
                (workspace, snapshot),
            )
            conn.execute("DELETE FROM ticks WHERE workspace = ? AND tick <= ?", (workspace, tick))
        else:
            conn.execute(
                "INSERT INTO engine (workspace, cursor, clock_ms, tick, snapshot, snapshot_tick,"
                " playbooks) VALUES (?, ?, ?, ?, NULL, 0, ?) ON CONFLICT (workspace) DO UPDATE"
                " SET cursor = excluded.cursor, clock_ms = excluded.clock_ms,"
                " tick = excluded.tick",
                (workspace, cursor, clock_ms, tick, playbooks),
            )
        if then is not None:
            then(conn, ids)
    return ids


def filters(*conditions: tuple[str, Any]) -> tuple[str, list[Any]]:
    """A WHERE clause of the conditions whose value is not None, and their arguments."""
    kept = [(sql, value) for sql, value in conditions if value is not None]
    return " AND ".join(sql for sql, _ in kept) or "1", [value for _, value in kept]


def query_firings(
    conn: sqlite3.Connection,
    workspace: int,
    trigger: str | None = None,
    subject: str | None = None,
    since_ms: int | None = None,
    limit: int = 1000,
) -> list[FiringRow]:
    where, args = filters(
        ("workspace = ?", workspace),
        ("trig = ?", trigger),
        ("subject = ?", subject),
        ("at_ms >= ?", since_ms),
    )
    args.append(limit)
    return conn.execute(
        f"SELECT {FIRING_COLUMNS} FROM firings WHERE {where} ORDER BY at_ms, id LIMIT ?",
        args,
    ).fetchall()
