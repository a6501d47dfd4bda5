"""The engine's records as msgspec Structs: the event it reads (and the Segment message that
becomes one, and the request bodies that carry them), the state it keeps per subject, the
firing it emits.

They live apart from the code that uses them so that this module is never compiled: the
optional mypyc build (see docs/benchmarks.md) compiles `model`, `engine` and the other hot
modules, and mypyc keeps no union or generic annotations on classes it compiles, which msgspec
reads to decode (a `str | None` field would only accept a `type`). `model` and `engine` export
them under their usual names.
"""

from __future__ import annotations

from typing import Any

import msgspec


class SegmentContext(msgspec.Struct, rename="camel"):
    group_id: str | int | None = None


class SegmentMessage(msgspec.Struct, rename="camel"):
    """The fields of a Segment-spec message that Forewarn uses; others are ignored."""

    type: str | None = None
    event: str | None = None
    name: str | None = None
    user_id: str | int | None = None
    anonymous_id: str | int | None = None
    group_id: str | int | None = None
    previous_id: str | int | None = None
    properties: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    context: SegmentContext | None = None
    timestamp: str | int | None = None
    original_timestamp: str | int | None = None
    message_id: str | int | None = None


class SegmentBatch(msgspec.Struct):
    """A Segment `/v1/batch` body: its messages are decoded one by one (one bad message does
    not sink the rest)."""

    batch: list[msgspec.Raw]
    sent_at: str | int | float | None = msgspec.field(default=None, name="sentAt")
    write_key: str | None = msgspec.field(default=None, name="writeKey")
    context: dict[str, Any] | None = None


class PostHogBody(msgspec.Struct):
    """The parts of a capture body read before its events; a body without `batch` is one event."""

    batch: list[msgspec.Raw] | None = None
    api_key: Any = None
    token: Any = None
    sent_at: Any = None


class Event(msgspec.Struct, gc=False):
    """One normalised event. Times are integer milliseconds since the Unix epoch, UTC."""

    kind: str
    name: str
    user_id: str | None
    anonymous_id: str | None
    account_id: str | None
    properties: dict[str, Any]
    traits: dict[str, Any]
    timestamp_ms: int
    message_id: str = ""
    previous_id: str | None = None

    @property
    def person(self) -> str | None:
        """The user-scoped subject: the user id, else the anonymous id."""
        return self.user_id if self.user_id is not None else self.anonymous_id


class Firing(msgspec.Struct):
    trigger: str
    subject: str
    scope: str
    at_ms: int
    evidence: dict[str, Any]
    decision: str
    reason: str | None
    channel: str
    cooldown: bool = False  # a new episode inside the trigger's cooldown
    send_at_ms: int | None = None  # when the message may go (set by the policy)

    def to_dict(self) -> dict[str, Any]:
        from forewarn.model import format_time  # model imports this module: not at the top

        return {
            "trigger": self.trigger,
            "subject": self.subject,
            "scope": self.scope,
            "at": format_time(self.at_ms),
            "evidence": self.evidence,
            "decision": self.decision,
            "reason": self.reason,
            "channel": self.channel,
            "send_at": None if self.send_at_ms is None else format_time(self.send_at_ms),
        }


class Subject(msgspec.Struct, gc=False):
    """A user or an account: first seen, the traits the playbooks read, trigger states.

    Not tracked by the garbage collector (it holds no reference cycles): a million subjects
    would otherwise make every full collection walk them all.
    """

    first_seen: int
    traits: list[Any] | None = None  # by Playbook.trait_slots; None: not set
    # by the trigger's slot in its scope: engine.TState, a flat list
    states: list[list[Any] | None] | None = None
    accounts: list[str] | None = None  # users: accounts joined, newest last
