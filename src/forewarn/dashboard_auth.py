"""Signing in to the dashboard: an admin key is exchanged for a signed session cookie, and every
form carries a CSRF token. Edge.

The cookie holds the workspace, the id of the admin key used (never the key), a random CSRF
token and an expiry, signed (HMAC-SHA256) with a secret kept in the database: sessions survive
a restart, end after `SESSION_S`, and end at once when their key is revoked (it is looked up on
every request). Nothing of a session is kept in a process, so in the scale-out mode every API
process honours a session another issued (the secret in PostgreSQL's `secrets`). The sign-in
form itself is protected by a double-submit token: a cookie and a hidden field that must
match, so another site cannot sign a browser in with its own key. The functions take a
connection to either store (`dashboard_store`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

import msgspec

from forewarn import audit, store_outbox, store_sqlite
from forewarn.dashboard_store import call, dialect, execute, transaction
from forewarn.errors import NotFoundError

COOKIE = "fw_session"
SIGNIN_COOKIE = "fw_signin"  # the sign-in form's own CSRF token
SECRET_NAME = "dashboard-session"
SESSION_S = 12 * 3600


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the workspace, the key's id and prefix, and the session's CSRF token
    (empty when the request came with the admin key itself, which has no forms)."""

    workspace: int
    key_id: int
    prefix: str
    csrf: str

    @property
    def actor(self) -> str:
        """How the audit log names what this viewer does."""
        return f"dashboard:{self.prefix}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, body: str) -> str:
    return _b64(hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest())


def secret(conn: Any) -> str:
    return str(call(store_outbox.secret, conn, SECRET_NAME))


def admin_key_id(conn: Any, token: str) -> tuple[int, int, str] | None:
    """(key id, workspace, prefix) of an admin key that is not revoked; None otherwise."""
    row = execute(
        conn,
        "SELECT id, workspace, prefix FROM keys WHERE hash = ? AND kind = 'admin'"
        " AND revoked_ms IS NULL",
        (store_sqlite.hash_key(token),),
    ).fetchone()
    return (int(row[0]), int(row[1]), str(row[2])) if row else None


def issue(secret_: str, key_id: int, workspace: int, now_s: int) -> tuple[str, str]:
    """A new session cookie value and its CSRF token."""
    csrf = secrets.token_urlsafe(24)
    payload = {"k": key_id, "w": workspace, "c": csrf, "e": now_s + SESSION_S}
    body = _b64(msgspec.json.encode(payload))
    return f"{body}.{_mac(secret_, body)}", csrf


def read(conn: Any, secret_: str, value: str | None, now_s: int) -> Viewer | None:
    """The session in a cookie value, if its signature holds, it has not expired and its key
    is still an admin key of that workspace."""
    if not value or value.count(".") != 1:
        return None
    body, mac = value.split(".")
    if not hmac.compare_digest(mac.encode(), _mac(secret_, body).encode()):
        return None
    try:
        payload: dict[str, Any] = msgspec.json.decode(_unb64(body))
        key_id, workspace, csrf, expires = (payload[k] for k in ("k", "w", "c", "e"))
    except (msgspec.DecodeError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(expires, int) or expires <= now_s:
        return None
    row = execute(
        conn,
        "SELECT prefix FROM keys WHERE id = ? AND workspace = ? AND kind = 'admin'"
        " AND revoked_ms IS NULL",
        (key_id, workspace),
    ).fetchone()
    if row is None:
        return None
    return Viewer(int(workspace), int(key_id), str(row[0]), str(csrf))


def same(expected: str, given: str | None) -> bool:
    """Whether a form's token is the one expected (in constant time)."""
    return (
        bool(expected)
        and given is not None
        and hmac.compare_digest(expected.encode(), given.encode())  # str: ASCII only
    )


def new_token() -> str:
    return secrets.token_urlsafe(24)


ENV_KEY_NAME = store_sqlite.ENV_KEY_NAME


def revoke(conn: Any, workspace: int, key_id: int, now_ms: int, actor: str = "cli") -> str | None:
    """Revoke a key of the workspace; None when done, else why it was not (the message says
    what to do). The last admin key is kept (nobody could sign in any more), and so is a key
    from the environment (the next start would add it again and fail). NotFoundError when the
    workspace has no such key."""
    with transaction(conn, workspace, "keys"):  # two revokes at once cannot both pass the count
        row = execute(
            conn,
            "SELECT kind, name, revoked_ms, prefix FROM keys WHERE id = ? AND workspace = ?",
            (key_id, workspace),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no key {key_id} in this workspace: see /settings")
        kind, name, revoked, prefix = row
        if revoked is not None:
            return None
        if name == ENV_KEY_NAME:
            return (
                "this key comes from FOREWARN_WRITE_KEY / FOREWARN_ADMIN_KEY: set another there and"
                " restart, then revoke it"
            )
        if kind == "admin":
            admins = execute(
                conn,
                "SELECT count(*) FROM keys WHERE workspace = ? AND kind = 'admin'"
                " AND revoked_ms IS NULL",
                (workspace,),
            ).fetchone()[0]
            if admins <= 1:
                return "this is the last admin key: create another first, or nobody can sign in"
        execute(conn, "UPDATE keys SET revoked_ms = ? WHERE id = ?", (now_ms, key_id))
        detail = {"kind": kind}
        audit.record(
            conn, workspace, actor, "key.revoked", str(prefix), now_ms, detail, dialect(conn)
        )
        return None
