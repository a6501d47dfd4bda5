"""Settings from the environment: every `FOREWARN_*` variable Forewarn reads is named here,
with its default, so that one list is documented (docs/deployment.md, kept so by a test)."""

from __future__ import annotations

import os

from forewarn import decide
from forewarn.errors import InputError
from forewarn.playbook import parse_duration

PREFIX = "FOREWARN_"

# name (without the prefix) -> default ("" for none)
SETTINGS: dict[str, str] = {
    "DB": "forewarn.db",
    "PLAYBOOKS": "playbooks",
    "HOST": "127.0.0.1",
    "PORT": "8750",
    "WORKSPACE": "default",
    "RATE_LIMIT": "50000",
    "ENGINE": "process",
    "LOG_LEVEL": "warning",
    "WRITE_KEY": "",
    "ADMIN_KEY": "",
    "STRIPE_SECRET": "",
    "REQUIRE_SERVICES": "",
    # scale-out on PostgreSQL (docs/deploy.md)
    "DATABASE_URL": "",
    "ROLE": "all",
    "PG_STATEMENT_TIMEOUT": "30s",
    "PG_TIMEOUT_RETRIES": "3",
    "PG_KEEPALIVE": "30s",
    "PG_KEEP_EVENTS": "7d",
    "PG_PRUNE_EVERY": "10m",
    # the policy (docs/concepts.md)
    "FREQUENCY_CAPS": "2/7d,1/1d",
    "CHANNEL_CAPS": "",
    "QUIET_HOURS": "21:00-08:00",
    "TIMEZONE": "UTC",
    "PRIORITY_WINDOW": "30s",
    "EPISODE": "3d",
    "HOLDOUT_SALT": "forewarn",
    # delivery (docs/channels.md, docs/channels-http.md)
    "PUBLIC_URL": "http://127.0.0.1:8750",
    "SMTP_URL": "",
    "EMAIL_FROM": "",
    "WEBHOOK_URL": "",
    "WEBHOOK_SECRET": "",
    "WEBHOOK_ALLOW_PRIVATE": "",
    "VAPID_PRIVATE_KEY": "",
    "VAPID_PUBLIC_KEY": "",
    "VAPID_SUBJECT": "",
    # the widget and the assistant (docs/widget.md, docs/assistant.md)
    "WIDGET_ORIGINS": "",
    "IDENTITY_SECRET": "",
    "KB": "",
    "KB_BASE_URL": "",
    "LLM_URL": "",
    "LLM_MODEL": "",
    "LLM_KEY": "",
    "GUARD_EVERY": "1h",
    "RETENTION": "off",
    "DELIVERY": "on",
    "DELIVERY_ATTEMPTS": "8",
    "DELIVERY_LEASE": "5m",
    # the demo's mail sink writes each email here as an .eml file; the dashboard reads them
    "DEMO_MAILDIR": "",
}


def env(name: str) -> str | None:
    """The setting's value from the environment, else its default (None when it has none)."""
    if name not in SETTINGS:
        raise KeyError(f"no setting {PREFIX}{name}: add it to forewarn.settings.SETTINGS")
    value = os.environ.get(PREFIX + name)
    if value is None or value == "":
        return SETTINGS[name] or None
    return value


def policy() -> decide.Policy:
    """The policy settings; a bad value is an InputError naming the variable."""
    name = ""
    try:
        name = "FREQUENCY_CAPS"
        caps = decide.parse_caps(env(name) or "")
        name = "CHANNEL_CAPS"
        channel_caps = decide.parse_channel_caps(env(name) or "")
        name = "QUIET_HOURS"
        quiet = decide.parse_quiet_hours(env(name) or "off")
        name = "TIMEZONE"
        timezone = env(name) or "UTC"
        decide.zone(None, timezone)
        name = "PRIORITY_WINDOW"
        window = 0 if env(name) in ("0", "off") else parse_duration(env(name))
        name = "EPISODE"
        episode = parse_duration(env(name))
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"{PREFIX}{name}: {exc}") from None
    return decide.Policy(
        caps=caps,
        channel_caps=channel_caps,
        quiet_start_min=quiet[0],
        quiet_end_min=quiet[1],
        timezone=timezone,
        priority_window_ms=window,
        episode_ms=episode,
        salt=env("HOLDOUT_SALT") or "forewarn",
    )


MIN_RETENTION_MS = 8 * 86_400_000


def retention_ms(text: str | None = None) -> int:
    """How long data is kept (`FOREWARN_RETENTION`, or `text`); 0 when forever."""
    text = text if text is not None else (env("RETENTION") or "off")
    if text.strip().lower() in ("0", "off"):
        return 0
    try:
        span = parse_duration(text)
    except ValueError as exc:
        raise InputError(f"{PREFIX}RETENTION: {exc}; e.g. 400d, or off") from None
    if span < MIN_RETENTION_MS:
        raise InputError(
            f"{PREFIX}RETENTION={text}: keep data at least 8d (resends are deduplicated against "
            "the last 7 days of the log), or off"
        )
    return span


def guard_every_ms() -> int:
    """How often the auto-guard looks; 0 when it is off."""
    text = env("GUARD_EVERY") or "1h"
    if text.strip().lower() in ("0", "off"):
        return 0
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise InputError(f"{PREFIX}GUARD_EVERY: {exc}") from None


def pg_statement_timeout_ms() -> int:
    """The server-side timeout of one statement on PostgreSQL (twice it for a transaction left
    idle); 0 when Forewarn sets none."""
    return _span_ms("PG_STATEMENT_TIMEOUT", "e.g. 30s, or off")


def pg_timeout_retries() -> int:
    """How many times in a row a scale-out worker tries a partition whose step alone hits the
    statement timeout before it sets the partition's oldest event aside as a dead letter."""
    text = env("PG_TIMEOUT_RETRIES") or "3"
    if not text.strip().isdigit() or int(text) < 1:
        raise InputError(
            f"{PREFIX}PG_TIMEOUT_RETRIES={text}: give a whole number of tries, 1 or more (3 "
            "by default)"
        )
    return int(text)


def pg_keepalive_s() -> int:
    """Seconds of silence on a PostgreSQL connection before TCP keepalives probe it; 0 when
    off."""
    return _span_ms("PG_KEEPALIVE", "e.g. 30s, or off") // 1000


DEDUP_MS = 7 * 86_400_000  # a message id resent within this is recognised


def pg_keep_events_ms() -> int:
    """How long the scale-out workers keep applied events in the log; 0 when for ever."""
    span = _span_ms("PG_KEEP_EVENTS", "e.g. 30d, or off")
    if span and span < DEDUP_MS:
        raise InputError(
            f"{PREFIX}PG_KEEP_EVENTS={env('PG_KEEP_EVENTS')}: keep events at least 7d (a "
            "message id resent within 7 days is recognised by its row), or off"
        )
    return span


def pg_prune_every_ms() -> int:
    """How often a scale-out worker prunes what is no longer needed; 0 when never."""
    return _span_ms("PG_PRUNE_EVERY", "e.g. 10m, or off")


def _span_ms(name: str, example: str) -> int:
    text = env(name) or "off"
    if text.strip().lower() in ("0", "off"):
        return 0
    try:
        span = parse_duration(text)
    except ValueError as exc:
        raise InputError(f"{PREFIX}{name}: {exc}; {example}") from None
    if span < 1000:
        raise InputError(f"{PREFIX}{name}={text}: give at least 1s; {example}")
    return span
