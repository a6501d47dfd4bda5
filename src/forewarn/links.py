"""Signed links in messages: a token naming what the link is about, with an HMAC made with a
secret kept in the database (`store_outbox.secret`), so no key is needed to follow one and none
can be forged.

- `/u/TOKEN`: unsubscribe (workspace, subject, channel);
- `/o/TOKEN`: an email opened (the tracking pixel); `/e/TOKEN`: an engagement reported by the
  widget or a push service worker (the message's key);
- `/c/TOKEN`: a click, redirected to the URL the token holds (so it is no open redirect).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any, NamedTuple

import msgspec

from forewarn.errors import ForewarnError
from forewarn.model import format_time

SECRET_NAME = "unsubscribe"
SCOPES = ("user", "account")
CHANNELS = ("email", "in_app", "push", "chat", "*")


class LinkError(ForewarnError):
    status = 401
    code = "unauthorized"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, fields: list[Any]) -> str:
    body = _b64(msgspec.json.encode(fields))
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()[:16]
    return f"{body}.{_b64(mac)}"


def _read(secret: str, token: str, kind: str, size: int) -> list[Any]:
    body, _, mac = token.partition(".")
    try:
        expected = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(_unb64(mac), expected):
            raise ValueError("signature")
        fields = msgspec.json.decode(_unb64(body))
        if not isinstance(fields, list) or len(fields) != size or fields[0] != kind:
            raise ValueError("fields")
        if not isinstance(fields[1], int) or fields[2] not in SCOPES:
            raise ValueError("fields")
        return fields[1:]
    except (ValueError, TypeError, msgspec.DecodeError):
        what = "unsubscribe link" if kind == "u" else "link"
        raise LinkError(
            f"this {what} is not valid: use the link from the message as it came"
        ) from None


def unsubscribe_token(secret: str, workspace: int, scope: str, subject: str, channel: str) -> str:
    return _sign(secret, ["u", workspace, scope, subject, channel])


def read_token(secret: str, token: str) -> tuple[int, str, str, str]:
    ws, scope, subject, channel = _read(secret, token, "u", 5)
    if channel not in CHANNELS:
        raise LinkError("this unsubscribe link is not valid: use the link from the message")
    return ws, scope, str(subject), str(channel)


def unsubscribe_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/u/{token}"


class About(NamedTuple):
    """Which message an engagement link is about."""

    workspace: int
    scope: str
    subject: str
    trigger: str
    channel: str
    key: str


def engagement_token(secret: str, sent: About) -> str:
    return _sign(secret, ["e", *sent])


def read_engagement(secret: str, token: str) -> About:
    ws, scope, subject, trigger, channel, key = _read(secret, token, "e", 7)
    return About(ws, scope, str(subject), str(trigger), str(channel), str(key))


def click_token(secret: str, sent: About, url: str) -> str:
    return _sign(secret, ["c", *sent, url])


def read_click(secret: str, token: str) -> tuple[About, str]:
    ws, scope, subject, trigger, channel, key, url = _read(secret, token, "c", 8)
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise LinkError("this link is not valid: use the link from the message as it came")
    return About(ws, scope, str(subject), str(trigger), str(channel), str(key)), url


def event_message(
    sent: About, name: str, now_ms: int, extra: dict[str, Any], message_id: str
) -> dict[str, Any]:
    """What happened to a message, as a Segment track message of the subject it concerns (an
    account's as `anonymousId: account:ID` with its `groupId`)."""
    msg: dict[str, Any] = {
        "type": "track",
        "event": name,
        "messageId": message_id,
        "timestamp": format_time(now_ms),
        "properties": {"trigger": sent.trigger, "channel": sent.channel, "key": sent.key, **extra},
    }
    if sent.scope == "account":
        msg["anonymousId"] = f"account:{sent.subject}"
        msg["context"] = {"groupId": sent.subject}
    else:
        msg["userId"] = sent.subject
    return msg
