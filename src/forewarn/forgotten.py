"""The people a workspace was asked to forget, as ingest checks them.

Only a keyed hash of each id is kept (`subject_hash`), so the list does not hold the ids it
protects in plain text. An event belongs to a forgotten person when its `userId`,
`anonymousId` or an alias's `previousId` hashes to one of them: such an event is refused with
`REASON`, before deduplication, whatever route it came by.
"""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from typing import Any

REASON = (
    "this person was forgotten at the workspace's request (forewarn forget): their events are "
    "not stored; stop sending events about them"
)
PEOPLE_FIELDS = ("userId", "anonymousId", "previousId")
_SALT = struct.Struct("<q")
_KNOWN_MAX = 200_000


def subject_hash(workspace: int, subject: str) -> str:
    """128 bits of BLAKE2b of the id, salted with the workspace."""
    digest = hashlib.blake2b(
        subject.encode(), digest_size=16, person=b"forewarn-forget", salt=_SALT.pack(workspace)
    )
    return digest.hexdigest()


def people_of(message: dict[str, Any]) -> list[str]:
    """The ids of the person a message is about."""
    return [str(v) for v in (message.get(f) for f in PEOPLE_FIELDS) if v is not None and v != ""]


class Forgotten:
    """Every workspace's forgotten hashes, reloaded when the table has changed (`refresh` is
    one query: the writer calls it inside each transaction, so that a person forgotten by
    another process is refused from the next commit on)."""

    def __init__(self) -> None:
        self.mark = -1
        self.hashes: dict[int, set[str]] = {}
        # (workspace, id) -> forgotten?: customers send many events each, a hash costs more
        self._known: dict[tuple[int, str], bool] = {}

    def refresh(self, conn: sqlite3.Connection) -> None:
        mark = int(conn.execute("SELECT coalesce(max(id), 0) FROM forgotten").fetchone()[0])
        if mark == self.mark:
            return
        hashes: dict[int, set[str]] = {}
        for workspace, h in conn.execute("SELECT workspace, hash FROM forgotten"):
            hashes.setdefault(int(workspace), set()).add(str(h))
        self.hashes, self.mark = hashes, mark
        self._known = {}

    def load(self, workspace: int, hashes: set[str]) -> None:
        """Replace one workspace's hashes (the scale-out store reloads them per workspace)."""
        self.hashes[workspace] = hashes
        self._known = {}

    def holds(self, workspace: int, message: dict[str, Any]) -> bool:
        hashes = self.hashes.get(workspace)
        if not hashes:
            return False
        known = self._known
        for field in PEOPLE_FIELDS:
            value = message.get(field)
            if value is None or value == "":
                continue
            key = (workspace, value if type(value) is str else str(value))
            hit = known.get(key)
            if hit is None:
                if len(known) >= _KNOWN_MAX:
                    known.clear()
                hit = known[key] = subject_hash(workspace, key[1]) in hashes
            if hit:
                return True
        return False


def among(conn: sqlite3.Connection, workspace: int, messages: list[dict[str, Any]]) -> Forgotten:
    """The forgotten hashes that these messages' people have: a lookup per id, for the few
    events Forewarn logs itself (delivery results), where loading every hash would cost more."""
    hashes = {subject_hash(workspace, p) for m in messages for p in people_of(m)}
    found = Forgotten()
    if hashes:
        marks = ",".join("?" * len(hashes))
        rows = conn.execute(
            f"SELECT hash FROM forgotten WHERE workspace = ? AND hash IN ({marks})",
            (workspace, *hashes),
        )
        found.hashes[workspace] = {str(h) for (h,) in rows}
    return found


def mark(conn: sqlite3.Connection, workspace: int) -> int:
    """Changes whenever someone of the workspace is forgotten: the live engine compares it in
    each step's transaction, and rebuilds its state from the log when it has moved."""
    row = conn.execute(
        "SELECT coalesce(max(id), 0) FROM forgotten WHERE workspace = ?", (workspace,)
    ).fetchone()
    return int(row[0])
