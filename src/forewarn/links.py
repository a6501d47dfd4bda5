"""Signed unsubscribe links: a token naming the workspace, the subject and the channel, with an
HMAC made with a secret kept in the database (`store_outbox.secret`)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import msgspec

from forewarn.errors import ForewarnError

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


def unsubscribe_token(secret: str, workspace: int, scope: str, subject: str, channel: str) -> str:
    body = _b64(msgspec.json.encode([workspace, scope, subject, channel]))
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()[:16]
    return f"{body}.{_b64(mac)}"


def read_token(secret: str, token: str) -> tuple[int, str, str, str]:
    body, _, mac = token.partition(".")
    try:
        expected = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(_unb64(mac), expected):
            raise ValueError("signature")
        ws, scope, subject, channel = msgspec.json.decode(_unb64(body))
        if not isinstance(ws, int) or scope not in SCOPES or channel not in CHANNELS:
            raise ValueError("fields")
        return ws, scope, str(subject), channel
    except (ValueError, TypeError, msgspec.DecodeError):
        raise LinkError(
            "this unsubscribe link is not valid: use the link from the message as it came"
        ) from None


def unsubscribe_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/u/{token}"
