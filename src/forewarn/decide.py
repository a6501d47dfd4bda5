"""Decide: turn a firing into send, held_out or suppressed with a named reason. Pure.

Order: shadow mode, then cooldown, then the holdout draw. Holdout is a stable hash of
(trigger, subject, salt), never a random draw, so a subject stays in the same group for a trigger
across replays, restarts and machines.
"""

from __future__ import annotations

import hashlib

SEND = "send"
HELD_OUT = "held_out"
SUPPRESSED = "suppressed"

# Every suppression reason the policy can give; docs/ must describe each one.
REASONS = {
    "shadow": "the trigger runs in shadow mode: decisions are recorded, nothing is sent",
    "cooldown": "a new episode began within the trigger's cooldown for this subject",
}


def holdout_bucket(trigger_id: str, subject: str, salt: str) -> float:
    """A number in [0, 1) fixed by (trigger, subject, salt)."""
    digest = hashlib.blake2b(f"{trigger_id}\x1f{subject}\x1f{salt}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / 2.0**64


def decide(
    trigger_id: str, subject: str, *, mode: str, holdout: float, in_cooldown: bool, salt: str
) -> tuple[str, str | None]:
    if mode == "shadow":
        return SUPPRESSED, "shadow"
    if in_cooldown:
        return SUPPRESSED, "cooldown"
    if holdout > 0 and holdout_bucket(trigger_id, subject, salt) < holdout:
        return HELD_OUT, None
    return SEND, None
