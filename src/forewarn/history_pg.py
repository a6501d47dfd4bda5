"""A person's outreach across partitions, for the policy of the scale-out workers.

The policy decides a user-scoped firing from the outreach that user was already sent or held
out for (`decide`: frequency caps, episodes, priority). In the embedded mode there is one
history per subject. In the scale-out mode a user who belongs to two accounts has a state in
each account's partition, and both may fire for them, possibly in two workers at once; each
partition's own history holds only its outreach. So before a partition decides for users, it
takes each user's lock, `pg_try_advisory_xact_lock` on `person:ID` (held to the end of the
step's transaction), and then reads their outreach recorded by every partition: the firings
sent or held out, the same rows the embedded engine reloads its history from. A second worker
deciding for the same person meanwhile does not get the lock, and does not wait for it while
holding its partitions' (no lock is ever waited for while others are held): the worker rolls
its step back and runs it again without that partition, which a later step decides, after
the first worker's firings are committed and visible to it (`worker`).

An account-scoped firing's subject is the account: its outreach is decided in that account's
partition alone, and counted in the account's caps, not in its users'. Its users' own caps
count the messages addressed to them, from every account, as in the embedded mode.
"""

from __future__ import annotations

from typing import Any

import psycopg

from forewarn import dead_letters, store_outbox, store_pg
from forewarn.engine import Firing
from forewarn.policy import Outreach

USER = "user"


class PersonBusy(Exception):
    """Another worker is deciding for one of the people a partition is to decide for: the
    step is rolled back and the partition left for a later one."""

    def __init__(self, part: str, people: list[str]) -> None:
        super().__init__(f"partition {part}: {', '.join(people)} decided by another worker")
        self.part, self.people = part, people


_RECORDS = f"""
SELECT subject, id, trig, channel, at_ms, coalesce(send_at_ms, at_ms) FROM firings
WHERE workspace = %s AND scope = '{USER}' AND subject = ANY(%s) AND at_ms >= %s
  AND {store_outbox.OUTREACH}
ORDER BY at_ms, id
"""


def people(firings: list[Firing]) -> list[str]:
    """The users these firings are decided for."""
    return sorted({f.subject for f in firings if f.scope == USER})


def take(
    conn: psycopg.Connection[Any],
    workspace: int,
    part: str,
    who: list[str],
    outreach: Outreach,
    since_ms: int,
) -> None:
    """Lock the people `who` for this transaction, never waiting, and put in `outreach` their
    records since `since_ms` from every partition. Raises PersonBusy when another transaction
    holds one of them."""
    names = ["person:" + p for p in who]
    keys = [store_pg.lock_key(workspace, n) for n in names]
    # the read is a statement of its own, after the locks: it sees what their last holder
    # committed (the two are sent together, in one round trip). It is planned for its values
    # each time: a prepared statement's generic plan, made while `firings` has no statistics
    # yet (a new database), scans the workspace's whole horizon
    with conn.pipeline():
        locked = conn.execute(dead_letters.TRY_LOCKS, (names, keys))
        read = conn.execute(_RECORDS, (workspace, who, since_ms), prepare=False)
    got = {str(n) for (n,) in locked.fetchall()}
    busy = [p for p, n in zip(who, names, strict=True) if n not in got]
    if busy:
        raise PersonBusy(part, busy)
    records: dict[str, list[Any]] = {p: [] for p in who}
    for subject, fid, trig, channel, at_ms, send_at in read.fetchall():
        records[str(subject)].append(
            outreach.stored(str(trig), str(channel), int(at_ms), int(send_at), int(fid))
        )
    for p, kept in records.items():
        outreach.history.reset(USER, p, kept)
