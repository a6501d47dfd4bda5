"""Users and their home accounts in the scale-out worker (see `store_pg` for how a home is set:
the first account a user is seen with).

Events accepted under a user's own partition while their home was being set are applied in the
home (`send_home`), and a user new to an account partition brings the state their own
partition kept before they had a home (`adopt`), under that partition's lock: only tried, so
that no worker waits for a lock while holding others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg

from forewarn import dead_letters, partition, store_pg
from forewarn.dead_letters import BadState
from forewarn.partition import Part

log = logging.getLogger("forewarn.worker")


def send_home(conn: psycopg.Connection[Any], workspace: int, loaded: list[Part]) -> set[int]:
    """Events queued under a user who has since got a home account (accepted while the
    home was being set) go to that account: applied with it now when it is claimed in
    this step (in log order), else moved to its queue. Returns the ids moved."""
    users = [p for p in loaded if p.name.startswith("user:") and p.ids]
    if not users:
        return set()
    homes = dict(
        conn.execute(
            "SELECT 'user:' || person, 'account:' || account FROM homes"
            " WHERE workspace = %s AND 'user:' || person = ANY(%s)",
            (workspace, [p.name for p in users]),
        ).fetchall()
    )
    here = {p.name: p for p in loaded}
    moved: set[int] = set()
    for p in users:
        home = homes.get(p.name)
        if home is None:
            continue
        into = here.get(home)
        if into is not None:
            merged = sorted(
                zip(into.ids + p.ids, into.events + p.events, strict=True),
                key=lambda pair: pair[0],
            )
            into.ids = [i for i, _ in merged]
            into.events = [e for _, e in merged]
        else:
            conn.execute("UPDATE queue SET part = %s WHERE id = ANY(%s)", (home, p.ids))
            moved.update(p.ids)
        p.events, p.ids = [], []
    return moved


def adopt(
    conn: psycopg.Connection[Any],
    workspace: int,
    playbooks: str,
    parts: list[Part],
    here: dict[str, Part],
    load: Callable[[str, tuple[bytes, str] | None, list[tuple[int, int, bytes]]], Part],
) -> set[str]:
    """Users new to an account partition bring the state their own partition kept before
    they had a home: from that partition claimed in this step (`here`), else from the
    database under its lock. The lock is only tried, never waited for (a worker waiting
    while holding others' could deadlock): an account whose users' partitions another
    worker holds is deferred to a later step, its events left queued. Returns the names
    of the accounts deferred."""
    needs: dict[str, list[str]] = {}
    for p in parts:
        state = p.runner.state
        for event in p.events:
            who = store_pg.person(event)
            if who not in state.users and who not in state.aliases:
                name = "user:" + who
                if name not in needs.setdefault(p.name, []):
                    needs[p.name].append(name)
    elsewhere = sorted({n for names in needs.values() for n in names if n not in here})
    got: set[str] = set()
    if elsewhere:
        keys = [store_pg.lock_key(workspace, n) for n in elsewhere]
        got = {str(n) for (n,) in conn.execute(dead_letters.TRY_LOCKS, (elsewhere, keys))}
    deferred = {
        a for a, names in needs.items() if any(n not in here and n not in got for n in names)
    }
    wanted: dict[str, Part] = {}
    for p in parts:
        if p.name not in deferred:
            for name in needs.get(p.name, ()):
                wanted.setdefault(name, p)
    for name in [n for n in wanted if n in here]:
        own = here[name]
        snap = partition.decode(partition.snapshot(own.runner, own.outreach))
        partition.move_user(snap, wanted.pop(name), name[len("user:") :])
        rest = load(name, (partition.encode(snap), playbooks), [])
        own.runner, own.outreach = rest.runner, rest.outreach
    if deferred:
        log.info("accounts %s wait for users' partitions another worker holds", sorted(deferred))
    if not wanted:
        return deferred
    names = sorted(wanted)
    rows = conn.execute(
        "SELECT part, state, playbooks FROM parts WHERE workspace = %s AND part = ANY(%s)",
        (workspace, names),
    ).fetchall()
    for name, raw, playbooks in rows:
        if playbooks != playbooks:
            continue
        try:
            snap = partition.decode(bytes(raw))
        except Exception as exc:
            raise BadState(str(name), exc) from exc
        partition.move_user(snap, wanted[name], name[len("user:") :])
        if snap.users or snap.accounts:
            conn.execute(
                "UPDATE parts SET state = %s, due_ms = %s WHERE workspace = %s AND part = %s",
                (
                    partition.encode(snap),
                    partition.next_due(snap.users, snap.accounts),
                    workspace,
                    name,
                ),
            )
        else:
            conn.execute(
                "DELETE FROM parts WHERE workspace = %s AND part = %s",
                (workspace, name),
            )
    return deferred
