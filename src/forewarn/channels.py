"""Channels: how a decided message leaves Forewarn. Edge.

Every channel is one small interface: `send` one `Outgoing` message, get back an `Outcome`. The
delivery worker (`deliver`) claims outbox rows, turns each into an `Outgoing`, sends it on its
channel and acts on the outcome: mark it sent, retry later with back-off, dead-letter it,
suppress a bounced address, forget a push subscription or disable a webhook endpoint that is gone.

Each channel has a twin for unit tests (`MemoryChannel`); the integration tests use the real peer
(an SMTP server, an HTTP receiver, a push endpoint that decrypts).
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec


class Outgoing(msgspec.Struct, frozen=True, kw_only=True):
    """One message, ready to go: rendered when it was decided, so a retry sends the same
    bytes."""

    id: int  # the outbox row
    key: str  # idempotency key: one per (trigger, subject, episode, channel), the same each try
    channel: str  # email | webhook | push | in_app | chat
    workspace: int
    trigger: str
    subject: str  # the user or account it is about
    scope: str  # user | account
    attempt: int = 1  # 1 on the first try
    to: str = ""  # email address; webhook URL ("" = the channel's default endpoint)
    title: str = ""  # email Subject, push title, Slack header
    text: str = ""  # the plain-text body
    html: str = ""  # the HTML body (email), already escaped and sanitised
    # what else the channel may use: "evidence", "traits", "unsubscribe_url" (email),
    # "subscriptions" (push: [{endpoint, keys: {p256dh, auth}}]), "payload" (webhook)
    data: dict[str, Any] = {}
    # per-trigger channel settings overriding the server's, e.g. {"url": ..., "secret": ...}
    settings: dict[str, str] = {}


class Sent(msgspec.Struct, frozen=True):
    """The peer accepted it."""

    detail: str = ""
    endpoints: tuple[str, ...] = ()  # push subscriptions found gone while others took it


class Retry(msgspec.Struct, frozen=True):
    """A passing failure (connection, timeout, a 4xx at SMTP, 429 or 5xx over HTTP)."""

    detail: str
    after_ms: int | None = None  # the peer asked to wait at least this long (Retry-After)


class Failed(msgspec.Struct, frozen=True):
    """This message will never go through as it is: dead-letter it."""

    detail: str


class Bounced(msgspec.Struct, frozen=True):
    """The address refused it for good (a 5xx at SMTP): suppress the address too."""

    detail: str


class Gone(msgspec.Struct, frozen=True):
    """The endpoint is gone (HTTP 410; every push subscription expired or unknown)."""

    detail: str
    endpoints: tuple[str, ...] = ()  # push endpoints or webhook URLs to forget


# closed: the worker matches every kind, ending in typing.assert_never
Outcome = Sent | Retry | Failed | Bounced | Gone


class Channel(Protocol):
    name: str
    # whether the receiving end drops a second copy with the same key (so a resend after a
    # crash is harmless); email and push cannot promise that
    deduplicates: bool

    async def send(self, message: Outgoing) -> Outcome: ...

    async def aclose(self) -> None: ...


class MemoryChannel:
    """The in-memory twin: records what it was given; `script` says what to answer, in order,
    then `Sent` for ever."""

    def __init__(self, name: str, script: list[Outcome] | None = None, dedup: bool = False):
        self.name = name
        self.deduplicates = dedup
        self.sent: list[Outgoing] = []
        self.tried: list[Outgoing] = []
        self.script = list(script or ())

    async def send(self, message: Outgoing) -> Outcome:
        self.tried.append(message)
        outcome = self.script.pop(0) if self.script else Sent()
        if isinstance(outcome, Sent):
            self.sent.append(message)
        return outcome

    async def aclose(self) -> None:
        return None
