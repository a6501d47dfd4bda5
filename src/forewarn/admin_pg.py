"""What the admin API reads in the scale-out mode, from PostgreSQL: a subject's state from the
partitions holding it (`parts`), its timeline from the event log, and why a trigger is or is
not firing for it. The state is read by the embedded server's own code (`server.subject_state`,
`engine.explain`), run on the stored partition states, so both modes answer alike.

Where a subject lives: an account in its own partition (`account:ID`); a person in their home
account's partition, in their own (`user:ID`, from before they had a home) and in the partition
of every account their events named (`context.groupId`), each holding a state of its own for
them. An answer lists the person's states home first, each with its partition.

A partition is read only under the playbooks it was stored with (the workers' fingerprint): an
API process started with other playbooks than the workers' says so instead of misreading it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg

from forewarn import engine, live, partition, server, store_pg
from forewarn.errors import ForewarnError, NotFoundError
from forewarn.playbook import Trigger
from forewarn.store_sqlite import _subjects_of  # which ids a logged message names

RECENT_EVENTS = 50  # events in a subject's timeline, newest first (as the embedded server's)
RECENT_FIRINGS = 50
SCAN = 2_000  # an account partition's latest events looked through for those naming it


class OtherPlaybooksError(ForewarnError):
    status = 409
    code = "other_playbooks"


@dataclass
class Held:
    """A partition's stored state, restored under this process's playbooks."""

    part: str
    state: engine.State


_PARTS_OF_PERSON = """
WITH RECURSIVE seen(part) AS (
    (SELECT part FROM events WHERE workspace = %(ws)s AND person = %(who)s
     ORDER BY part LIMIT 1)
    UNION ALL
    SELECT (SELECT e.part FROM events e WHERE e.workspace = %(ws)s AND e.person = %(who)s
            AND e.part > seen.part ORDER BY e.part LIMIT 1)
    FROM seen WHERE seen.part IS NOT NULL
)
SELECT part FROM seen WHERE part IS NOT NULL
"""

_PERSON_EVENTS = """
SELECT e.id, e.message FROM unnest(%(parts)s::text[]) AS p(part)
CROSS JOIN LATERAL (
    SELECT id, message FROM events
    WHERE workspace = %(ws)s AND person = %(who)s AND part = p.part
    ORDER BY id DESC LIMIT %(n)s
) e
ORDER BY e.id DESC LIMIT %(n)s
"""


class Reader:
    """Reads subjects' stored states under one set of playbooks (the API process's), laid
    out as the workers lay them out: the same triggers and the same traits kept for the
    policy and the message templates (`keep`)."""

    def __init__(
        self, triggers: list[Trigger], keep: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    ) -> None:
        self.book = live.playbook(triggers, keep)
        self.playbooks = live.fingerprint(triggers, keep)

    # --- the routes' answers ------------------------------------------------------------

    def subject(
        self, conn: psycopg.Connection[Any], workspace: int, subject: str
    ) -> dict[str, Any]:
        """`GET /api/v1/subjects/{id}`: its states (`as`), its latest logged messages
        (`events`, newest first) and its first firings (`firings`, rows of `firings`)."""
        with _snapshot(conn):
            people = _person_parts(conn, workspace, subject)
            found = self._states(conn, workspace, subject, people)
            if not found:
                raise NotFoundError(f"no subject '{subject}' in this workspace's events")
            events = _timeline(conn, workspace, subject, people, RECENT_EVENTS)
            firings = store_pg.query_firings(conn, workspace, None, subject, RECENT_FIRINGS)
        return {"id": subject, "as": found, "events": events, "firings": firings}

    def states(
        self, conn: psycopg.Connection[Any], workspace: int, subject: str
    ) -> list[dict[str, Any]]:
        """The subject's states (`as` of `subject`), none when it has none."""
        with _snapshot(conn):
            return self._states(conn, workspace, subject, _person_parts(conn, workspace, subject))

    def why(
        self,
        conn: psycopg.Connection[Any],
        workspace: int,
        subject: str,
        trigger: str,
        now_ms: int,
    ) -> dict[str, Any]:
        """`GET /api/v1/subjects/{id}/why`: `engine.explain` on the partition holding the
        subject (an account's own; a person's home first), and on the person's other
        partitions under `other_partitions`."""
        ct = next((ct for ct in self.book.triggers if ct.spec.id == trigger), None)
        if ct is None:  # the embedded engine's answer: not found, naming the triggers
            return engine.explain(engine.State(self.book), trigger, subject, now_ms)
        with _snapshot(conn):
            if ct.account:
                names = ["account:" + subject]
            else:
                names = _person_parts(conn, workspace, subject)
            held = self._held(conn, workspace, subject, names)
        known = [
            (h.part, answer)
            for h in held
            if (answer := engine.explain(h.state, trigger, subject, now_ms))["known"]
        ]
        if not known:
            return {"trigger": trigger, "subject": subject, "known": False}
        part, first = known[0]
        found = {**first, "partition": part}
        if len(known) > 1:
            found["other_partitions"] = [
                {
                    "partition": p,
                    "true": a["true"],
                    "active": a["active"],
                    "evidence": a["evidence"],
                }
                for p, a in known[1:]
            ]
        return found

    # --- reading -------------------------------------------------------------------------

    def _states(
        self, conn: psycopg.Connection[Any], workspace: int, subject: str, people: list[str]
    ) -> list[dict[str, Any]]:
        held = self._held(conn, workspace, subject, [*people, "account:" + subject])
        found = [
            {**entry, "partition": h.part}
            for h in held
            for entry in server.subject_state(h.state, subject)
        ]
        found.sort(key=lambda entry: entry["scope"] == "account")  # users first
        return found

    def _held(
        self, conn: psycopg.Connection[Any], workspace: int, subject: str, names: list[str]
    ) -> list[Held]:
        """The stored states of these partitions, in this order; those stored under other
        playbooks are left out, and an error says so when no other holds the subject."""
        order = list(dict.fromkeys(names))
        rows = {
            str(p): (bytes(s), str(b))
            for p, s, b in conn.execute(
                "SELECT part, state, playbooks FROM parts WHERE workspace = %s AND part = ANY(%s)",
                (workspace, order),
            )
        }
        held, other = [], []
        for name in order:
            if name not in rows:
                continue
            raw, playbooks = rows[name]
            if playbooks != self.playbooks:
                other.append(name)
                continue
            held.append(Held(name, self._restore(raw)))
        if other and not held:
            raise OtherPlaybooksError(
                f"the state of '{subject}' (partition {other[0]}) was stored by workers running "
                "other playbooks than this API process: run the API and worker processes with "
                "the same playbooks, restarting both after a change (a partition the restarted "
                "workers have not claimed yet starts afresh at its next event)"
            )
        return held

    def _restore(self, raw: bytes) -> engine.State:
        snap = partition.decode(raw)
        state = engine.State(self.book)
        state.users, state.accounts = snap.users, snap.accounts
        state.aliases, state.members, state.urgent = snap.aliases, snap.members, snap.urgent
        return state


def _person_parts(conn: psycopg.Connection[Any], workspace: int, who: str) -> list[str]:
    """The partitions a person's events went to, home first, then their own."""
    names = {str(p) for (p,) in conn.execute(_PARTS_OF_PERSON, {"ws": workspace, "who": who})}
    home = conn.execute(
        "SELECT 'account:' || account FROM homes WHERE workspace = %s AND person = %s",
        (workspace, who),
    ).fetchone()
    first = [str(home[0])] if home else []
    own = "user:" + who
    rest = sorted(names - {*first, own})
    return [*first, own, *rest]


def _timeline(
    conn: psycopg.Connection[Any], workspace: int, subject: str, people: list[str], limit: int
) -> list[dict[str, Any]]:
    """The latest logged messages naming the subject (as a person, from each partition
    their events went to; as an account, from its partition's latest), newest first."""
    found = {
        int(i): bytes(m)
        for i, m in conn.execute(
            _PERSON_EVENTS,
            {"parts": people, "ws": workspace, "who": subject, "n": limit},
        )
    }
    for i, m in conn.execute(
        "SELECT id, message FROM events WHERE workspace = %s AND part = %s"
        " ORDER BY id DESC LIMIT %s",
        (workspace, "account:" + subject, SCAN),
    ):
        found.setdefault(int(i), bytes(m))
    messages = []
    for i in sorted(found, reverse=True):
        message = msgspec.json.decode(found[i])
        if subject in _subjects_of(message):
            messages.append(message)
            if len(messages) == limit:
                break
    return messages


def recent_events(
    conn: psycopg.Connection[Any], workspace: int, subject: str, limit: int
) -> list[dict[str, Any]]:
    """The subject's latest logged messages, newest first (`store_sqlite.recent_events`)."""
    with _snapshot(conn):
        return _timeline(conn, workspace, subject, _person_parts(conn, workspace, subject), limit)


@contextlib.contextmanager
def _snapshot(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """One read-only transaction seeing one moment of the database: the states, the log and
    the firings agree while workers commit."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield
